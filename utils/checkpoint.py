"""Checkpoint files: the one place that builds, writes and reads them, and rebuilds models from them.

:func:`make_checkpoint` builds the dictionary (the trainer, the reader of the original's files and the
chainercv converter all call it), :func:`save_checkpoint` writes it atomically (``utils/files.py``: temp file,
fsync, rename; the permissions of a plain ``torch.save`` under the user's umask), :func:`load_checkpoint`
reads any checkpoint safely and :func:`restore_checkpoint` puts one into a model, an optimizer and a
gradient scaler. A checkpoint is a ``dict`` of plain containers and tensors only, so
``torch.load(path, weights_only=True)`` reads it and no code stored in the file ever runs:

    {
      'format': 'simple-faster-rcnn-pytorch/1',
      'model': FasterRCNN state_dict,
      'arch': {'name': 'vgg16', 'n_fg_class': 20, 'ratios': [...], 'anchor_scales': [...],
               'proposal_creator_params': {...}, ...},
      'class_names': [n_fg_class names],
      'config': {the training Config as plain values; may be partial},
      'other_info': {'epoch': int, 'best_map': float, 'iteration': int, 'lr': float, ...},
      'optimizer': optimizer.state_dict(),   # optional
      'scaler': GradScaler.state_dict(),     # optional: float16 mixed-precision training on CUDA
      'vis_info': {...},                      # optional
    }

Unlike the original (``torch.save`` straight onto the final path, numpy scalars inside), a crash or a kill at
any moment leaves either the old checkpoint or the new one, never a half-written file.
"""

import dataclasses
import os
import pickle
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from utils.files import SAVE_PAUSE_ENV, atomic_write, remove_stale_temp_files

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "SAVE_PAUSE_ENV",
    "atomic_save",
    "check_arch",
    "checkpoint_config",
    "default_class_names",
    "load_checkpoint",
    "make_checkpoint",
    "model_from_checkpoint",
    "remove_stale_temp_files",
    "restore_checkpoint",
    "save_checkpoint",
    "to_plain",
]

CHECKPOINT_FORMAT = "simple-faster-rcnn-pytorch/1"
_REQUIRED_KEYS = ("model", "arch")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: unreadable, unsafe, malformed or for another model."""


def to_plain(value):
    """``value`` with numpy scalars/arrays turned into Python numbers/lists and tuples into lists.

    Tensors, ``str``, ``bool``, ``int``, ``float`` and ``None`` pass through; dicts and sequences are
    converted recursively. Anything else (a Path, a dataclass, a custom object) raises ``TypeError``: it would
    make the file unreadable with ``weights_only=True``.
    """
    if isinstance(value, np.generic):  # before float: np.float64 is a float subclass, pickled as numpy
        return value.item()
    if value is None or isinstance(value, (str, bool, int, float, torch.Tensor)):
        return value
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_plain(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {to_plain(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, Sequence):
        return [to_plain(v) for v in value]
    raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint (plain values and tensors only)")


def default_class_names(n_fg_class: int) -> list[str]:
    """The class names of a model or checkpoint that has none: VOC's 20 names for 20 classes (the
    original's model), ``class_0, class_1, ...`` otherwise."""
    if n_fg_class == 20:
        from data.voc_dataset import VOC_BBOX_LABEL_NAMES

        return list(VOC_BBOX_LABEL_NAMES)
    return [f"class_{i}" for i in range(n_fg_class)]


def make_checkpoint(
    model_state: Mapping[str, torch.Tensor],
    arch: Mapping,
    class_names: Sequence[str] | None = None,
    *,
    config: Mapping | None = None,
    other_info: Mapping | None = None,
    optimizer: Mapping | None = None,
    scaler: Mapping | None = None,
    vis_info: Mapping | None = None,
) -> dict:
    """The checkpoint dictionary of the module docstring, of plain values and tensors only.

    Args:
        model_state: the model's ``state_dict()``.
        arch: the model's ``arch`` (``model.arch_of``); stored completed (``model.canonical_arch``).
        class_names: the ``n_fg_class`` names in label order; ``None``: :func:`default_class_names`.
        config: the training options (a ``Config`` or its dict).
        other_info: run state (``epoch``, ``best_map``, ``iteration``, ``lr``, ...).
        optimizer, scaler: ``state_dict()`` of the optimizer and of the gradient scaler, to resume.
        vis_info: the visualizer's state.

    Raises:
        TypeError: a value that ``torch.load(weights_only=True)`` could not read back (see :func:`to_plain`).
        ValueError: ``class_names`` does not have one name per foreground class.
    """
    from model import canonical_arch

    arch = to_plain(canonical_arch(arch))
    n_fg_class = arch.get("n_fg_class")
    names = default_class_names(n_fg_class) if class_names is None else [str(n) for n in class_names]
    if n_fg_class is not None and len(names) != n_fg_class:
        raise ValueError(f"{len(names)} class names for a model of {n_fg_class} classes")
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "model": dict(model_state),
        "arch": arch,
        "class_names": names,
        "config": to_plain(config) if config is not None else {},
        "other_info": to_plain(dict(other_info or {})),
    }
    for key, value in (("optimizer", optimizer), ("scaler", scaler)):
        if value is not None:
            ckpt[key] = value
    if vis_info is not None:
        ckpt["vis_info"] = to_plain(vis_info)
    return ckpt


def save_checkpoint(ckpt: Mapping, path: str | os.PathLike) -> str:
    """Write a checkpoint (:func:`make_checkpoint`) to ``path`` atomically; returns ``path`` as a string."""
    return atomic_save(ckpt, path)


def atomic_save(obj, path: str | os.PathLike) -> str:
    """``torch.save(obj)`` to ``path`` through :func:`utils.files.atomic_write`; returns ``path``."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a checkpoint safely (``weights_only=True``) and check its layout.

    Args:
        path: a file written by :meth:`trainer.FasterRCNNTrainer.save`, or one of the original
            simple-faster-rcnn-pytorch's checkpoints (its dict, numpy scalars included, or a bare state dict),
            converted to this format by :mod:`utils.original_checkpoint`.
        map_location: where tensors land (``torch.load``'s argument); the CPU by default.

    Returns:
        The checkpoint dict, with its ``arch`` completed (``model.canonical_arch``: an arch written before a
        setting existed means that setting's default) and the optional keys filled: ``class_names``
        (:func:`default_class_names` when absent), ``config`` and ``other_info`` (empty dicts when absent).

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file is not a readable checkpoint of this project, or holds Python objects
            other than tensors and plain containers (refused; nothing in it was executed).
    """
    from utils.original_checkpoint import (
        convert_original_checkpoint,
        is_original_checkpoint,
        torch_load_allowing_numpy,
    )

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        # weights_only=True, plus the numpy scalars/arrays that the original's files hold
        ckpt = torch_load_allowing_numpy(path, map_location=map_location)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"checkpoint {path!r} was refused: it holds Python objects other than tensors and plain "
            f"containers, which could run code when loaded (nothing in it was executed). Details: {e}"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(
            f"checkpoint {path!r} cannot be read (truncated, or not a torch file?): {e}"
        ) from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path!r} holds a {type(ckpt).__name__}, expected a dict")
    if is_original_checkpoint(ckpt):
        ckpt = convert_original_checkpoint(ckpt, path)
    missing = [k for k in _REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(
            f"checkpoint {path!r} has no {missing} entry: not a checkpoint of this project "
            f"(keys: {sorted(ckpt)})"
        )
    if ckpt.get("format", CHECKPOINT_FORMAT) != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"checkpoint {path!r} has format {ckpt['format']!r}; this code reads {CHECKPOINT_FORMAT!r}"
        )
    from model import canonical_arch

    try:
        ckpt["arch"] = canonical_arch(ckpt["arch"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path!r} has an unusable 'arch' entry: {e}") from e
    if not ckpt.get("class_names"):
        ckpt["class_names"] = default_class_names(ckpt["arch"].get("n_fg_class"))
    ckpt.setdefault("config", {})
    ckpt.setdefault("other_info", {})
    return ckpt


def check_arch(ckpt_arch: Mapping, model_arch: Mapping, path: str = "") -> None:
    """Raise ``CheckpointError`` naming both sides when a checkpoint does not fit a model.

    Both archs are compared completed (``model.canonical_arch``). The class count and the backbone name
    come first in the message (the usual mistake); any other differing architecture value (anchor
    ratios/scales, dropout, proposal settings...) is listed after them.
    """
    from model import canonical_arch

    ckpt_arch, model_arch = to_plain(canonical_arch(ckpt_arch)), to_plain(canonical_arch(model_arch))
    differing = sorted(k for k in set(ckpt_arch) | set(model_arch) if ckpt_arch.get(k) != model_arch.get(k))
    if not differing:
        return
    where = f"checkpoint {path!r}" if path else "the checkpoint"
    message = (
        f"{where} was trained for {ckpt_arch.get('n_fg_class')} classes with backbone "
        f"{ckpt_arch.get('name')!r}; this model has {model_arch.get('n_fg_class')} classes, backbone "
        f"{model_arch.get('name')!r}"
    )
    others = [k for k in differing if k not in ("n_fg_class", "name")]
    if others:
        message += "; other differences: " + ", ".join(
            f"{k}: checkpoint {ckpt_arch.get(k)!r} vs model {model_arch.get(k)!r}" for k in others
        )
    raise CheckpointError(message)


def restore_checkpoint(ckpt: Mapping, model, optimizer=None, scaler=None, path: str = "") -> None:
    """Load a checkpoint read by :func:`load_checkpoint` into ``model`` (and ``optimizer``, ``scaler``).

    Args:
        ckpt: the checkpoint dict.
        model: a ``FasterRCNN`` of the checkpoint's architecture (compared with :func:`check_arch` first).
        optimizer: receives ``ckpt['optimizer']`` when both exist.
        scaler: a ``torch.amp.GradScaler``; receives ``ckpt['scaler']`` when both exist.
        path: the file, named in errors.

    Raises:
        CheckpointError: another architecture (the message names both sides), or weights that do not fit.
    """
    from model import arch_of

    check_arch(ckpt["arch"], to_plain(arch_of(model)), path)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        where = f"checkpoint {path!r}" if path else "the checkpoint"
        raise CheckpointError(f"{where} does not fit its own architecture: {e}") from e
    if optimizer is not None and "optimizer" in ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and "scaler" in ckpt:
        scaler.load_state_dict(ckpt["scaler"])


def checkpoint_config(ckpt: Mapping):
    """The training ``utils.config.Config`` stored in ``ckpt`` (missing options from the defaults)."""
    from utils.config import Config

    return Config.from_dict(dict(ckpt.get("config", {})))


def model_from_checkpoint(ckpt: Mapping, path: str = ""):
    """Build the ``FasterRCNN`` described by ``ckpt['arch']`` and load its weights (on the CPU).

    The arch holds the image sizes, the normalisation and the proposal settings the model was trained with,
    so ``predict`` and evaluation work as in training.
    """
    from model import build_faster_rcnn

    model = build_faster_rcnn(dict(ckpt["arch"]))
    restore_checkpoint(ckpt, model, path=path)
    return model
