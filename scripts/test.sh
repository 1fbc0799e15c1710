#!/usr/bin/env bash
# The test command: sets up .venv, then runs the default (fast) tier. Extra args go to pytest,
# e.g. `bash scripts/test.sh -m slow` for the full-size parity tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -q "$@"
