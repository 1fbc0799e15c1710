#!/usr/bin/env bash
# Prepares, on this machine, what a GPU run on the lent device machine needs beside its own image
# (Python 3.12, x86-64; it has jax, torch, etils, tensorstore, timm, ... but not the packages below):
#   .whl/       wheels of the runtime packages it lacks, at requirements.txt's versions;
#   .gpu_deps/  the PyTorch references (segment-anything, torchscale, fairscale, sam2 and sam2's config stack),
#               pure Python, for the benchmarks' reference rows (PYTHONPATH=$PWD/.gpu_deps).
# Both are git-ignored; name them in the device call's `carry` and start the command with
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
# Run from the repository root after scripts/setup_env.sh (it uses .venv's pip); ~15 s, ~11 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=".venv/bin/python -m pip"
rm -rf .whl .gpu_deps
# Each with --no-deps: everything these need is in the device's image or in this list.
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  flax==0.12.8 optax==0.2.8 orbax-checkpoint==0.12.8 ml-collections==1.1.0 grain==0.2.18 array-record==0.8.6 \
  portpicker==1.6.0 tensorboardX==2.6.5
$PIP install -q --no-deps --no-compile --target .gpu_deps \
  segment-anything==1.0 torchscale==0.3.0 fairscale==0.4.0 sam2==1.1.0 hydra-core==1.3.8 omegaconf==2.3.1 \
  antlr4-python3-runtime==4.9.3 iopath==0.1.9
# Compiled files would be for this machine's Python; the device's is 3.12.
if find .gpu_deps -name '*.so' | grep -q .; then
  echo "error: .gpu_deps holds compiled extensions (built for this machine's Python):" >&2
  find .gpu_deps -name '*.so' >&2
  exit 1
fi
# fairscale, sam2 and torchscale also install top-level benchmarks/, training/ and examples/ of their
# repositories: the first would shadow ours on the path, and none is part of the models.
rm -rf .gpu_deps/bin .gpu_deps/benchmarks .gpu_deps/training .gpu_deps/examples
du -sh .whl .gpu_deps
