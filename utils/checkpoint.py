"""Checkpoint files: atomic writes, safe reads with clear errors, and models rebuilt from them.

One format, written by :meth:`trainer.FasterRCNNTrainer.save` and read by ``train.py eval``, ``demo.py`` and
the notebook through :func:`load_checkpoint` (the single entry point for reading). A checkpoint is a ``dict``
of plain containers and tensors only, so ``torch.load(path, weights_only=True)`` reads it and no code stored
in the file ever runs:

    {
      'format': 'simple-faster-rcnn-pytorch/1',
      'model': FasterRCNN state_dict,
      'arch': {'name': 'vgg16', 'n_fg_class': 20, 'ratios': [...], 'anchor_scales': [...], ...},
      'class_names': [n_fg_class names],
      'config': {the training Config as plain values; may be partial},
      'other_info': {'epoch': int, 'best_map': float, 'iteration': int, 'lr': float, ...},
      'optimizer': optimizer.state_dict(),   # optional
      'vis_info': {...},                      # optional
    }

Unlike the original (``torch.save`` straight onto the final path, numpy scalars inside), a file is written to
a temporary name in the same folder, flushed to disk and renamed over the destination, so a crash or a kill
at any moment leaves either the old checkpoint or the new one, never a half-written file. A kill can leave the
temporary file (``.<name>.<pid>.<random>.tmp``, which no reader looks at); :func:`remove_stale_temp_files`
deletes those of processes that are gone.
"""

import dataclasses
import os
import pickle
import re
import tempfile
import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "atomic_save",
    "check_arch",
    "checkpoint_config",
    "load_checkpoint",
    "model_from_checkpoint",
    "remove_stale_temp_files",
    "to_plain",
]

CHECKPOINT_FORMAT = "simple-faster-rcnn-pytorch/1"
_REQUIRED_KEYS = ("model", "arch")
# Test-only: seconds atomic_save waits with the complete temp file before renaming it, so that a test can
# kill the process inside the write window (tests/test_robustness.py). Unset in normal use.
SAVE_PAUSE_ENV = "SIMPLE_FASTER_RCNN_TEST_SAVE_PAUSE"
_TEMP_NAME = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.[^.]+\.tmp")


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


def atomic_save(obj, path: str | os.PathLike) -> str:
    """``torch.save(obj)`` to ``path`` atomically: temp file in the same folder, fsync, ``os.replace``.

    If anything fails (serialisation, a full disk, an exception), the temporary file is removed and an
    existing file at ``path`` is left untouched; after a kill, only the temporary file may remain (see
    :func:`remove_stale_temp_files`). The folder is created when missing.

    Returns:
        ``path`` as a string.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.{os.getpid()}.",
                                    suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if os.environ.get(SAVE_PAUSE_ENV):
            time.sleep(float(os.environ[SAVE_PAUSE_ENV]))
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    _fsync_folder(folder)
    return path


def remove_stale_temp_files(folder: str | os.PathLike) -> list[str]:
    """Delete the temp files that killed :func:`atomic_save` calls left in ``folder``.

    Only files named as :func:`atomic_save` names them, by a process that no longer runs on this machine,
    are removed (a save in progress in another process is left alone). A missing folder is fine.

    Returns:
        The paths removed.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return []
    removed = []
    for name in os.listdir(folder):
        match = _TEMP_NAME.fullmatch(name)
        if match and not _process_exists(int(match["pid"])):
            path = os.path.join(folder, name)
            try:
                os.remove(path)
            except FileNotFoundError:
                continue
            removed.append(path)
    return removed


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _fsync_folder(folder: str) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a checkpoint safely (``weights_only=True``) and check its layout.

    Args:
        path: a file written by :meth:`trainer.FasterRCNNTrainer.save`, or one of the original
            simple-faster-rcnn-pytorch's checkpoints (its dict, numpy scalars included, or a bare state dict),
            converted to this format by :mod:`utils.original_checkpoint`.
        map_location: where tensors land (``torch.load``'s argument); the CPU by default.

    Returns:
        The checkpoint dict, with the optional keys filled: ``class_names`` (``None`` when absent),
        ``config`` and ``other_info`` (empty dicts when absent).

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
    ckpt.setdefault("class_names", None)
    ckpt.setdefault("config", {})
    ckpt.setdefault("other_info", {})
    return ckpt


def check_arch(ckpt_arch: Mapping, model_arch: Mapping, path: str = "") -> None:
    """Raise ``CheckpointError`` naming both sides when a checkpoint does not fit a model.

    The class count and the backbone name come first in the message (the usual mistake); any other differing
    architecture value (anchor ratios/scales, dropout...) is listed after them.
    """
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


def checkpoint_config(ckpt: Mapping):
    """The training ``utils.config.Config`` stored in ``ckpt`` (missing options from the defaults)."""
    from utils.config import Config

    return Config.from_dict(dict(ckpt.get("config", {})))


def model_from_checkpoint(ckpt: Mapping, path: str = ""):
    """Build the ``FasterRCNN`` described by ``ckpt['arch']`` and load its weights (on the CPU).

    The arch holds the image sizes and the normalisation the model was trained with, so ``predict``
    preprocesses images the same way.
    """
    from model import build_faster_rcnn

    model = build_faster_rcnn(dict(ckpt["arch"]))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        where = f"checkpoint {path!r}" if path else "the checkpoint"
        raise CheckpointError(f"{where} does not fit its own architecture {ckpt['arch']}: {e}") from e
    return model
