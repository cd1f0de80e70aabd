"""Compile a CUDA kernel source string for the CPU with the shim and launch it through ctypes.

The source is the very string the CuPy path hands to NVRTC. It is written verbatim to ``kernel.cu``, which a
generated translation unit includes after ``cuda_shim.h`` and follows with ``CUDA_SHIM_EXPORT(name)`` for
each of its kernels; the library links to the shim's runtime (``cuda_shim_runtime.cpp``, built once).
Libraries are cached per hash of (compiler, flags, shim files, source) under ``$CUDA_SHIM_CACHE`` (default
``<tmp>/cuda_shim-<uid>``): the runtime builds in about a second, each kernel source in a fraction of one.

:class:`CpuKernel` is called like a ``cupy.RawKernel``: ``kernel(grid, block, args)``, with numpy arrays in
place of device arrays and numpy scalars of the exact C type (``numpy.int32`` for ``int``, ``numpy.float32``
for ``float``): CuPy would pass a Python ``float`` as a C ``double``, so a bare Python number is refused here.
Arrays passed through non-const pointers are written in place, and a write outside an array is caught by
guard bands around it.
"""

import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

__all__ = ["SCHEDULES", "CpuKernel", "KernelError", "find_compiler", "kernel_names", "load_cpu_kernel"]

HEADER = Path(__file__).with_name("cuda_shim.h")
RUNTIME = Path(__file__).with_name("cuda_shim_runtime.cpp")
# -ffp-contract=off: no fused multiply-add, as the NMS kernel is compiled with --fmad=false.
CXXFLAGS = ("-std=c++20", "-O1", "-fPIC", "-pthread", "-fvisibility=hidden",
            "-ffp-contract=off")
SCHEDULES = ("parallel", "in_order", "reverse_order")  # as cuda_shim_runtime.cpp numbers them
GUARD_ELEMENTS = 64  # guard band on each side of an array the kernel may write
GUARD_BYTE = 0xA5

# Kernel parameter types of the subset (as cuda_shim.h names them) -> numpy dtype, ctypes type.
_SCALARS = {
    "int": (np.int32, ctypes.c_int32),
    "unsigned int": (np.uint32, ctypes.c_uint32),
    "long long": (np.int64, ctypes.c_int64),
    "unsigned long long": (np.uint64, ctypes.c_uint64),
    "float": (np.float32, ctypes.c_float),
    "double": (np.float64, ctypes.c_double),
}

_running = None  # the thread of a launch that timed out and may still run: the runtime runs one at a time


class KernelError(RuntimeError):
    """A source that does not compile, bad arguments, a launch CUDA would refuse, a barrier not reached by a
    whole block, or a write out of bounds."""


@functools.cache
def find_compiler() -> str | None:
    """Path of a C++ compiler (``$CXX``, default ``g++``) that builds the shim (C++20, <barrier>), or None."""
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        return None
    for path in (HEADER, RUNTIME):
        probe = subprocess.run([cxx, *CXXFLAGS, "-fsyntax-only", "-x", "c++", str(path)], capture_output=True)
        if probe.returncode != 0:
            return None
    return cxx


def kernel_names(source: str) -> tuple:
    """Names of the ``__global__`` functions of a CUDA source, in order."""
    return tuple(re.findall(r"__global__\s+void\s+(\w+)\s*\(", source))


def _compile(key_parts: tuple, stem: str, files: dict, args: tuple) -> Path:
    """Compile once into ``<cache>/<stem>-<hash>.so``: ``files`` (name -> text) are written to a scratch
    folder, then ``cxx CXXFLAGS -shared <args> -o lib`` runs there."""
    cxx = find_compiler()
    if cxx is None:
        raise RuntimeError("no C++20 compiler builds the CUDA shim (set CXX to g++ >= 11 or clang++ >= 15)")
    key = hashlib.sha256("\0".join((cxx, *CXXFLAGS, *key_parts)).encode()).hexdigest()[:24]
    cache = Path(os.environ.get("CUDA_SHIM_CACHE", Path(tempfile.gettempdir()) / f"cuda_shim-{os.getuid()}"))
    library = cache / f"{stem}-{key}.so"
    if library.exists():
        return library
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as work:
        for name, text in files.items():
            Path(work, name).write_text(text)
        built = Path(work, "built.so")
        result = subprocess.run([cxx, *CXXFLAGS, "-shared", *args, "-o", str(built)], cwd=work,
                                capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"})
        if result.returncode != 0:
            raise KernelError(f"the CUDA shim could not compile {stem}:\n{result.stderr}")
        os.replace(built, library)  # atomic: of two concurrent builds of one key, either wins
    return library


@functools.cache
def _runtime() -> Path:
    return _compile((RUNTIME.read_text(),), "cuda_shim_runtime", {}, (str(RUNTIME),))


@functools.cache
def _library(source: str) -> ctypes.CDLL:
    """The loaded library of every kernel of ``source`` (linked to the runtime by its absolute path)."""
    runtime = _runtime()
    exports = "".join(f"CUDA_SHIM_EXPORT({name})\n" for name in kernel_names(source))
    files = {"kernel.cu": source, "entry.cpp": f'#include "{HEADER}"\n#include "kernel.cu"\n{exports}'}
    path = _compile((runtime.name, HEADER.read_text(), source), "kernels", files, ("entry.cpp", str(runtime)))
    return ctypes.CDLL(str(path))


class CpuKernel:
    """Kernel ``name`` of a CUDA source, compiled for the CPU; call as ``kernel(grid, block, args)``.

    Attributes:
        name: the kernel's name.
        param_types: its parameter types in order, e.g. ``("int", "float", "const float*", "float*")``.
    """

    def __init__(self, library: ctypes.CDLL, name: str):
        self.name = name
        signature = getattr(library, f"cuda_shim_signature_{name}")
        signature.restype = ctypes.c_char_p
        text = signature().decode()
        self.param_types = tuple(text.split(",")) if text else ()
        self._launch = getattr(library, f"cuda_shim_launch_{name}")
        self._launch.restype = ctypes.c_int
        self._launch.argtypes = (
            ctypes.POINTER(ctypes.c_uint),
            ctypes.POINTER(ctypes.c_uint),
            ctypes.c_int,
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.c_char_p,
            ctypes.c_size_t,
        )

    def __call__(
        self, grid: tuple, block: tuple, args: tuple, schedule: str = "parallel", timeout: float = 60.0
    ) -> None:
        """Run the kernel on ``grid`` x ``block`` host threads, block by block; returns when it has finished.

        Args:
            grid, block: 1 to 3 positive ints, as for CuPy (missing sides are 1).
            args: one value per kernel parameter: a numpy scalar of the parameter's exact type, or a
                C-contiguous numpy array of the pointee's dtype for a pointer (written in place unless
                the pointer is ``const``).
            schedule: how the threads of a block interleave between barriers: ``"parallel"`` (as the OS
                schedules them), ``"in_order"`` or ``"reverse_order"`` (one thread at a time by increasing or
                decreasing thread index; deterministic, and a race shows up in one of the two).
            timeout: seconds before the launch is declared stuck (a kernel that never returns).

        Raises:
            KernelError: bad arguments, a launch CUDA would refuse, a ``__syncthreads()`` not reached by
                every thread of a block, or a write outside an array.
            TimeoutError: the kernel did not return within ``timeout``, or an earlier launch that timed out
                is still running ``timeout`` seconds later.
        """
        global _running
        if _running is not None:
            _running.join(timeout)
            if _running.is_alive():
                raise TimeoutError(f"an earlier launch ({_running.name}) is still stuck, {timeout} s later")
            _running = None
        if len(args) != len(self.param_types):
            raise KernelError(
                f"kernel {self.name!r} takes {len(self.param_types)} arguments {self.param_types}, "
                f"got {len(args)}"
            )
        if schedule not in SCHEDULES:
            raise KernelError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        values, guarded = [], []
        for i, (ctype, arg) in enumerate(zip(self.param_types, args, strict=True)):
            if ctype.endswith("*"):
                values.append(self._pointer(i, ctype, arg, guarded))
            else:
                values.append(self._scalar(i, ctype, arg))
        params = (ctypes.c_void_p * len(values))(*(ctypes.addressof(v) for v in values))
        grid_dims, block_dims = _dims(grid, "grid"), _dims(block, "block")
        error = ctypes.create_string_buffer(1024)
        outcome = {}

        def run():
            outcome["rc"] = self._launch(
                grid_dims, block_dims, SCHEDULES.index(schedule), params, error, len(error)
            )

        thread = threading.Thread(target=run, name=f"kernel {self.name!r}", daemon=True)
        thread.start()
        thread.join(timeout)
        if thread.is_alive():
            _running = thread  # the next launch waits for it
            raise TimeoutError(
                f"kernel {self.name!r} did not return within {timeout} s (grid {grid}, block {block}): "
                "a thread loops forever or waits for one that does"
            )
        if outcome["rc"] != 0:
            raise KernelError(f"kernel {self.name!r}: {error.value.decode()}")
        for i, arg, buffer in guarded:
            guards = np.concatenate((buffer[:GUARD_ELEMENTS], buffer[-GUARD_ELEMENTS:])).view(np.uint8)
            if np.any(guards != GUARD_BYTE):
                raise KernelError(
                    f"kernel {self.name!r} wrote outside argument {i} "
                    f"({self.param_types[i]}, shape {arg.shape})"
                )
            arg.reshape(-1)[:] = buffer[GUARD_ELEMENTS:-GUARD_ELEMENTS]

    def _scalar(self, i: int, ctype: str, arg):
        dtype, c_type = _SCALARS[ctype]
        if not (isinstance(arg, np.generic) and arg.dtype == dtype):
            raise KernelError(
                f"argument {i} of kernel {self.name!r} is a {ctype}: pass numpy.{np.dtype(dtype).name}(...) "
                f"as CuPy needs, not {type(arg).__name__}"
            )
        return c_type(arg.item())

    def _pointer(self, i: int, ctype: str, arg, guarded: list):
        dtype = np.dtype(_SCALARS[ctype.removeprefix("const ").removesuffix("*")][0])
        if not (isinstance(arg, np.ndarray) and arg.dtype == dtype and arg.flags.c_contiguous):
            if isinstance(arg, np.ndarray):
                got = f"a {arg.dtype} array" + ("" if arg.flags.c_contiguous else " (not C-contiguous)")
            else:
                got = type(arg).__name__
            raise KernelError(
                f"argument {i} of kernel {self.name!r} is a {ctype}: pass a C-contiguous {dtype} array, "
                f"got {got}"
            )
        if ctype.startswith("const "):
            return ctypes.c_void_p(arg.ctypes.data)
        # A copy of the array between two guard bands, copied back after the launch.
        buffer = np.empty(arg.size + 2 * GUARD_ELEMENTS, dtype=dtype)
        buffer.view(np.uint8)[:] = GUARD_BYTE
        buffer[GUARD_ELEMENTS:-GUARD_ELEMENTS] = arg.reshape(-1)
        guarded.append((i, arg, buffer))
        return ctypes.c_void_p(buffer[GUARD_ELEMENTS:].ctypes.data)


def _dims(dims: tuple, what: str):
    """A (x, y, z) ``unsigned int[3]`` from 1 to 3 positive ints."""
    dims = tuple(int(d) for d in dims)
    if not 1 <= len(dims) <= 3 or min(dims) < 1 or max(dims) >= 2**32:
        raise KernelError(f"{what} must be 1 to 3 positive 32-bit ints, got {dims}")
    return (ctypes.c_uint * 3)(*dims, *(1,) * (3 - len(dims)))


@functools.cache
def load_cpu_kernel(source: str, name: str) -> CpuKernel:
    """Kernel ``name`` of CUDA ``source`` compiled with the shim (once per source), ready to launch."""
    if name not in kernel_names(source):
        raise KernelError(f"no kernel {name!r} in the source; it has {kernel_names(source)}")
    return CpuKernel(_library(source), name)
