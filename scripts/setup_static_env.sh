#!/usr/bin/env bash
# Creates the environment in which benchmarks/{eval,train}_compile.py and benchmarks/experimental/gpu_static.py compile for chips
# this machine does not have: the runtime requirements plus, at the jax version they resolve to,
#   gpu: jax's CUDA 12 plugin and the CUDA libraries it loads (~6 GB)  -> .venv-gpu-static
#   tpu: libtpu (jax[tpu] pins the matching one; ~1.5 GB)              -> .venv-tpu-static
# Nothing here needs the chips: the plugins only compile. Kept apart from .venv so the tests never see them.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  gpu) extra="jax-cuda12-plugin[with-cuda]" ;;
  tpu) extra="jax[tpu]" ;;
  *) echo "usage: scripts/setup_static_env.sh gpu|tpu" >&2; exit 2 ;;
esac
venv=".venv-$1-static"
PY=${PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
  "$PY" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -r requirements.txt
jax_version=$("$venv/bin/python" -c "import jax; print(jax.__version__)")
"$venv/bin/python" -m pip install -q "${extra}==${jax_version}"
echo "ready: $venv/bin/python -m benchmarks.eval_compile --help  (or benchmarks.train_compile)"
