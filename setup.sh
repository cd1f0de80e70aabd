#!/usr/bin/env bash
# Make (or refresh) .venv with the pinned requirements and build the optional Cython extensions (NMS, RoI).
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
# Optional speed-up; the pure-Python fallback is used when this is missing.
(cd model/utils && ../../.venv/bin/python build.py build_ext --inplace -q) \
  || echo "setup.sh: Cython build failed; the slower Python/torch twins of NMS and RoI pooling will be used." >&2
