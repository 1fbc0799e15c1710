#!/usr/bin/env bash
# The main job on its embedded default (no downloads): sets up .venv, then `run.py synthetic`, which trains a small
# EVF-SAM on generated data, evaluates it against text-blind baselines, predicts and draws workdir/synthetic/results.png.
# Extra args go to it, e.g. `bash scripts/run_default.sh --workdir /tmp/w --steps 3000`. Run again to resume.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$PWD/workdir/.jax_cache}"  # a rerun compiles nothing
exec .venv/bin/python run.py synthetic "$@"
