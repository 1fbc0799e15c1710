#!/usr/bin/env python3
"""evf-jax command line. `python run.py --help` lists the sub-commands."""

import sys

from evf_jax import cli

if __name__ == "__main__":
  sys.exit(cli.main())
