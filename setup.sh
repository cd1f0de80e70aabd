#!/usr/bin/env bash
# Make (or refresh) .venv with the pinned requirements and build the optional extensions (Cython: NMS, RoI;
# C++: the Winograd transforms of the CPU 3x3 convolutions).
# On a machine with an NVIDIA GPU (a driver answers), also install the CuPy wheel of the CUDA that torch was
# built for (torch 2.14.1+cu130 -> cupy-cuda13x), so that NMS and RoI pooling run as CUDA kernels.
# Safe to run again: pip skips what is installed, the build skips what is up to date.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade "pip>=25.3"
# visdom 0.2.4's sdist imports pkg_resources while building, which setuptools>=81 dropped.
constraint=.venv/build-constraints.txt
echo 'setuptools<81' > "$constraint"
.venv/bin/python -m pip install -q --build-constraint "$constraint" -r requirements.txt
# Optional speed-ups; the pure-Python fallbacks (stock convolutions) are used when they are missing.
(cd model/utils && ../../.venv/bin/python build.py build_ext --inplace -q) \
  || echo "setup.sh: the extension build failed; the slower Python/torch twins of NMS and RoI pooling and the stock convolutions will be used." >&2
# CuPy for the GPU kernels: only where an NVIDIA driver answers, in the CUDA major version of torch's build.
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  cuda=$(.venv/bin/python -c "import torch; print((torch.version.cuda or '').split('.')[0])")
  if [[ -n "$cuda" ]]; then
    .venv/bin/python -m pip install -q "cupy-cuda${cuda}x==14.2.0" \
      || echo "setup.sh: could not install cupy-cuda${cuda}x; NMS and RoI pooling will run on the CPU copies." >&2
  else
    echo "setup.sh: this torch is a CPU build; no CuPy installed." >&2
  fi
fi
