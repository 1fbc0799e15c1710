#!/usr/bin/env python3
"""evf-jax command line. `python run.py --help` lists the sub-commands."""

import sys

from evf_jax.cli import main

if __name__ == "__main__":
  sys.exit(main())
