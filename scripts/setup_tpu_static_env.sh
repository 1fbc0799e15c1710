#!/usr/bin/env bash
# Creates .venv-tpu-static for benchmarks/eval_compile.py: the runtime requirements plus libtpu, at the jax
# version the requirements resolve to (jax[tpu] pins the matching libtpu). No TPU needed: libtpu only
# compiles there. Kept apart from .venv so the tests never see a TPU runtime.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv-tpu-static/bin/python ]; then
  "$PY" -m venv .venv-tpu-static
fi
.venv-tpu-static/bin/python -m pip install -q --upgrade pip
.venv-tpu-static/bin/python -m pip install -q -r requirements.txt
jax_version=$(.venv-tpu-static/bin/python -c "import jax; print(jax.__version__)")
.venv-tpu-static/bin/python -m pip install -q "jax[tpu]==${jax_version}"
echo "ready: .venv-tpu-static/bin/python benchmarks/eval_compile.py --help"
