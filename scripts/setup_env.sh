#!/usr/bin/env bash
# Creates .venv (if missing), installs runtime + test requirements into it, and this checkout in editable mode.
# Re-running is cheap: a stamp of the requirement files skips pip when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# The web demo's browser test (tests/test_serve.py) drives Debian's chromium; it skips where that is missing.
# Checked on every run (before the stamp below), so a machine with a current .venv still gets the browser.
if [ ! -x /usr/bin/chromium ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "setup_env.sh: installing chromium (apt) for the web demo's browser test"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null \
      || echo "setup_env.sh: installing chromium failed; the web demo's browser test will skip"
  else
    echo "setup_env.sh: no /usr/bin/chromium (install Debian's chromium as root); the web demo's browser test will skip"
  fi
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.evf_jax_requirements.sha256
want=$( (cat requirements.txt requirements-dev.txt pyproject.toml scripts/setup_env.sh; pwd) | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements-dev.txt
# torchscale pins timm (-> torchvision -> a CUDA torch); BEiT-3 at EVF-SAM's settings needs neither.
.venv/bin/python -m pip install -q --no-deps torchscale==0.3.0 fairscale==0.4.0
# For the two --no-build-isolation installs below: setuptools>=70.1 builds wheels itself (bdist_wheel), and
# pyproject.toml's SPDX license string needs >=77.
.venv/bin/python -m pip install -q "setuptools>=77"
# sam2 (the SAM-2 parity reference) is an sdist whose build requires torch: build it against the venv's CPU
# torch, without its CUDA extension (used only by video hole filling) and without its torch/torchvision pins.
SAM2_BUILD_CUDA=0 .venv/bin/python -m pip install -q --no-deps --no-build-isolation sam2==1.1.0
# This checkout, editable: `import evf_jax` (and convert, data_pipelines, evf_testing) from anywhere.
.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
echo "$want" > "$stamp"
