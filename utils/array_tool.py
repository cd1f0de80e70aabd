"""Conversions between numpy arrays, torch tensors and Python numbers (the original's ``array_tool``).

Device-agnostic: nothing here moves data to a GPU unless a ``device`` is named (the original's
``totensor(data, cuda=True)`` always did).
"""

from __future__ import annotations

import numbers

import numpy as np
import torch

__all__ = ["scalar", "to_device", "tonumpy", "totensor"]

_TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64,
                 np.dtype(np.int32): torch.int32, np.dtype(np.int64): torch.int64, np.dtype(bool): torch.bool}


def tonumpy(data, dtype=None) -> np.ndarray:
    """``data`` as a numpy array: arrays pass through; a tensor is detached and copied to the CPU (one
    crossing, converted to ``dtype`` on its device first when it has a torch equivalent, so a bfloat16 tensor
    becomes float32 before numpy, which has no bfloat16).

    Args:
        data: a numpy array or a torch tensor on any device.
        dtype: the numpy dtype of the result (``None``: keep the data's own; an array of that dtype passes
            through without a copy).

    Raises:
        TypeError: ``data`` is neither, or a bfloat16 tensor without a ``dtype``.
    """
    if not isinstance(data, (np.ndarray, torch.Tensor)):
        raise TypeError(f"tonumpy expects a numpy array or a torch tensor, got {type(data).__name__}")
    if isinstance(data, torch.Tensor):
        data = data.detach()
        if dtype is not None:
            data = data.to(_TORCH_DTYPES.get(np.dtype(dtype), data.dtype))
        elif data.dtype == torch.bfloat16:
            raise TypeError("tonumpy: numpy has no bfloat16; pass dtype=np.float32")
        data = data.cpu().numpy()
    return np.asarray(data, dtype=dtype)


def totensor(data: np.ndarray | torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """``data`` as a detached tensor, on ``device`` when given (else where it is).

    A numpy array shares its memory with the result (``torch.from_numpy``) unless a device other than the
    CPU is named.

    Raises:
        TypeError: ``data`` is neither an array nor a tensor.
    """
    if isinstance(data, np.ndarray):
        tensor = torch.from_numpy(data)
    elif isinstance(data, torch.Tensor):
        tensor = data.detach()
    else:
        raise TypeError(f"totensor expects a numpy array or a torch tensor, got {type(data).__name__}")
    return tensor if device is None else tensor.to(device)


def scalar(data: np.ndarray | np.generic | torch.Tensor | numbers.Number) -> int | float | bool:
    """The single value held by a one-element array or tensor, as a Python number (never a numpy scalar,
    which ``torch.load(weights_only=True)`` refuses in checkpoints).

    Raises:
        ValueError: ``data`` holds more or fewer than one element.
        TypeError: ``data`` is not an array, a tensor or a number.
    """
    if isinstance(data, (np.ndarray, torch.Tensor)):
        n_element = data.size if isinstance(data, np.ndarray) else data.numel()
        if n_element != 1:
            raise ValueError(f"scalar expects one element, got an array of shape {tuple(data.shape)}")
        return data.item()
    if isinstance(data, np.generic):
        return data.item()
    if isinstance(data, numbers.Number):
        return data
    raise TypeError(f"scalar expects an array, a tensor or a number, got {type(data).__name__}")


def to_device(arrays: list[np.ndarray], device: torch.device | str) -> list[torch.Tensor]:
    """Numpy arrays as float32 tensors on ``device``, in one host-to-device copy.

    The arrays are flattened end to end into one float32 buffer, copied once, and split back into their
    shapes on the device (a single crossing, where one ``.to(device)`` per array would be several). Integer
    arrays come back as float32 tensors holding the same values (exact below ``2**24``): cast them on the
    device (``.long()``).

    Args:
        arrays: numpy arrays of any shapes and numeric dtypes.
        device: where the tensors go.

    Returns:
        One float32 tensor per array, of its shape, on ``device``.
    """
    flat = [np.asarray(a, dtype=np.float32).ravel() for a in arrays]
    buffer = torch.from_numpy(np.concatenate(flat) if flat else np.zeros(0, np.float32)).to(device)
    parts = torch.split(buffer, [int(np.size(a)) for a in arrays])
    return [part.view(np.shape(a)) for part, a in zip(parts, arrays, strict=True)]
