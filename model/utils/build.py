"""Build the optional Cython extensions of ``model/utils`` in place (pure Python/torch twins are used without
them): NMS's post-processing and CPU path, and the CPU RoI pooling forward.

    cd model/utils && python build.py build_ext --inplace
"""

import os
import sys

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

# IoUs and bins must round exactly like the CUDA kernels' (compiled with --fmad=false): no fused multiply-add.
COMPILE_ARGS = [] if sys.platform == "win32" else ["-ffp-contract=off", "-O3"]
SOURCES = {
    "nms._nms_gpu_post": "nms/_nms_gpu_post.pyx",
    "nms._nms_cpu": "nms/_nms_cpu.pyx",
    "_roi_pool_cpu": "_roi_pool_cpu.pyx",
}
EXTENSIONS = [
    Extension(name, [source], include_dirs=[np.get_include()], extra_compile_args=COMPILE_ARGS)
    for name, source in SOURCES.items()
]

if __name__ == "__main__":
    os.chdir(os.path.dirname(os.path.abspath(__file__)))  # --inplace puts the modules next to their sources
    setup(name="model_utils_pyx", ext_modules=cythonize(EXTENSIONS, language_level=3, quiet=True))
