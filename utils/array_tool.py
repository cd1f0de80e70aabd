"""Conversions between numpy arrays, torch tensors and Python numbers (the original's ``array_tool``).

Device-agnostic: nothing here moves data to a GPU unless a ``device`` is named (the original's
``totensor(data, cuda=True)`` always did).
"""

from __future__ import annotations

import numbers

import numpy as np
import torch

__all__ = ["scalar", "tonumpy", "totensor"]


def tonumpy(data: np.ndarray | torch.Tensor) -> np.ndarray:
    """``data`` as a numpy array: arrays pass through; a tensor is detached and copied to the CPU.

    Raises:
        TypeError: ``data`` is neither.
    """
    if isinstance(data, np.ndarray):
        return data
    if isinstance(data, torch.Tensor):
        return data.detach().cpu().numpy()
    raise TypeError(f"tonumpy expects a numpy array or a torch tensor, got {type(data).__name__}")


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
