"""Build the optional Cython extensions of NMS in place (a pure-Python fallback is used without them):

    cd model/utils/nms && python build.py build_ext --inplace
"""

import os
import sys

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

# IoUs must round exactly like the CUDA kernel's (compiled with --fmad=false): no fused multiply-add.
COMPILE_ARGS = [] if sys.platform == "win32" else ["-ffp-contract=off"]
EXTENSIONS = [
    Extension(name, [f"{name}.pyx"], include_dirs=[np.get_include()], extra_compile_args=COMPILE_ARGS)
    for name in ("_nms_gpu_post", "_nms_cpu")
]

if __name__ == "__main__":
    os.chdir(os.path.dirname(os.path.abspath(__file__)))  # --inplace puts the modules next to this file
    setup(name="nms_pyx", ext_modules=cythonize(EXTENSIONS, language_level=3, quiet=True))
