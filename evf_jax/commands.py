"""Sub-commands of `run.py`. Each is registered with `@cli.command` and imports its heavy modules lazily."""

from __future__ import annotations

from evf_jax.cli import command  # noqa: F401
