"""Non-maximum suppression: CUDA kernel through CuPy, and a CPU path selecting exactly the same boxes."""

from .non_maximum_suppression import non_maximum_suppression

__all__ = ["non_maximum_suppression"]
