"""Build the optional compiled extensions of ``model/utils`` in place (pure Python/torch twins, or the stock
layers, are used without them): NMS's post-processing and CPU path and the CPU RoI pooling forward
(Cython), and the Winograd transforms of the CPU 3x3 convolutions (``winograd.cpp``, a PyTorch C++
extension).

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


def build_winograd() -> None:
    """The Winograd transforms against the installed torch's headers; its threads are torch's own
    (``at::parallel_for``), so ``torch.set_num_threads`` governs them."""
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    extension = CppExtension("_winograd", ["winograd.cpp"], extra_compile_args=COMPILE_ARGS)
    setup(name="model_utils_winograd", ext_modules=[extension],
          cmdclass={"build_ext": BuildExtension.with_options(use_ninja=False)})


if __name__ == "__main__":
    os.chdir(os.path.dirname(os.path.abspath(__file__)))  # --inplace puts the modules next to their sources
    setup(name="model_utils_pyx", ext_modules=cythonize(EXTENSIONS, language_level=3, quiet=True))
    build_winograd()
