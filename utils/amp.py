"""Mixed precision: the autocast dtype of a device, the autocast context, and the gradient scaler.

``--amp`` runs the network under ``torch.autocast``: float16 on CUDA, where a ``GradScaler`` keeps small
gradients from underflowing (its state is part of a resumable checkpoint); bfloat16 on the CPU, which has
float32's range and needs no scaler (fast on CPUs with AVX512_BF16 or AMX, slower than float32 elsewhere:
``bench/train.py --amp`` measures it). The target creators, the losses, the box decoding and NMS stay
float32 in every case.
"""

import contextlib

import torch

__all__ = ["autocast", "autocast_dtype", "grad_scaler"]


def autocast_dtype(device: torch.device | str) -> torch.dtype:
    """The reduced precision of ``--amp`` on ``device``: float16 on CUDA, bfloat16 elsewhere."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.bfloat16


def autocast(device: torch.device | str, enabled: bool):
    """``torch.autocast`` on ``device``'s type in :func:`autocast_dtype`, or a no-op when not ``enabled``."""
    if not enabled:
        return contextlib.nullcontext()
    device = torch.device(device)
    return torch.autocast(device.type, dtype=autocast_dtype(device))


def grad_scaler(device: torch.device | str, enabled: bool) -> torch.amp.GradScaler:
    """A ``GradScaler`` for float16 training on CUDA; elsewhere (or not ``enabled``) a disabled one, whose
    ``scale``/``step``/``update`` are the plain backward and optimizer step."""
    device = torch.device(device)
    return torch.amp.GradScaler(device.type, enabled=enabled and device.type == "cuda")
