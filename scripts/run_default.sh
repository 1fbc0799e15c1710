#!/usr/bin/env bash
# The main job on its embedded default (no downloads): sets up .venv, then `run.py demo`.
# Extra args go to the demo, e.g. `bash scripts/run_default.sh --workdir /tmp/demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python run.py demo "$@"
