"""CUDA kernels of this project run on the CPU (see README.md beside this file)."""

from .cpu_kernel import SCHEDULES, CpuKernel, KernelError, find_compiler, load_cpu_kernel

__all__ = ["SCHEDULES", "CpuKernel", "KernelError", "find_compiler", "load_cpu_kernel"]
