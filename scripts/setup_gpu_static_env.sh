#!/usr/bin/env bash
# Creates .venv-gpu-static for benchmarks/gpu_static.py: the runtime requirements plus jax's CUDA 12 plugin
# and the CUDA libraries it loads (~6 GB), at the jax version the requirements resolve to. No GPU needed:
# the plugin only compiles. Kept apart from .venv so the tests never see a CUDA plugin.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv-gpu-static/bin/python ]; then
  "$PY" -m venv .venv-gpu-static
fi
.venv-gpu-static/bin/python -m pip install -q --upgrade pip
.venv-gpu-static/bin/python -m pip install -q -r requirements.txt
jax_version=$(.venv-gpu-static/bin/python -c "import jax; print(jax.__version__)")
.venv-gpu-static/bin/python -m pip install -q "jax-cuda12-plugin[with-cuda]==${jax_version}"
echo "ready: .venv-gpu-static/bin/python benchmarks/gpu_static.py --help"
