"""CuPy glue shared by the CUDA kernels of NMS and RoI pooling.

CuPy is optional. It is imported behind a guard, so this module (and everything that imports it) loads where
CuPy is missing, where its CUDA libraries are missing, and where it imports but no GPU is present
(``cupy.is_available()`` is then False and creating an array would raise). Callers ask :func:`cupy_available`
before taking a CUDA path and fall back to their CPU implementation otherwise.

Tensors cross to CuPy without a copy (DLPack), and kernels are launched on torch's current CUDA stream of the
tensor's device, so they are ordered with the surrounding torch work without any synchronisation.
"""

import functools

try:  # ImportError where CuPy is missing; other errors where its CUDA libraries are broken.
    import cupy
except Exception:  # noqa: BLE001 - any failure to import means "no CuPy"
    cupy = None

__all__ = ["cupy", "cupy_available", "load_kernel", "to_cupy", "to_torch", "torch_stream"]


@functools.cache
def cupy_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    if cupy is None:
        return False
    try:
        return bool(cupy.is_available())
    except Exception:  # noqa: BLE001 - a broken driver reads as "not available"
        return False


@functools.cache
def load_kernel(source: str, name: str, device_id: int, options: tuple[str, ...] = ("--std=c++14",)):
    """Compile ``source`` once per device with NVRTC and return its ``extern "C"`` kernel ``name``.

    ``options`` are NVRTC options (NMS adds ``--fmad=false`` so its IoUs round like its CPU path's).
    The cache is keyed by the source string itself, so two different kernels never share an entry.
    """
    with cupy.cuda.Device(device_id):
        return cupy.RawModule(code=source, options=options).get_function(name)


def to_cupy(tensor):
    """A CUDA ``torch.Tensor`` as a CuPy array sharing its memory (made contiguous first if needed)."""
    return cupy.from_dlpack(tensor.detach().contiguous())


def to_torch(array):
    """A CuPy array as a ``torch.Tensor`` sharing its memory."""
    import torch

    return torch.from_dlpack(array)


def torch_stream(device):
    """CuPy handle of torch's current CUDA stream on ``device`` (a ``torch.device`` or an index).

    Launch inside ``with torch_stream(dev):`` so the kernel runs after the torch work that produced its
    inputs and before the torch work that reads its outputs.
    """
    import torch

    stream = torch.cuda.current_stream(device)
    return cupy.cuda.ExternalStream(stream.cuda_stream, stream.device_index)
