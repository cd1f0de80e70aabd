"""Pretrained backbone weights: torchvision's through its weights API, or a state-dict file, with one clear
error when they cannot be had.

Every backbone (``model/faster_rcnn_vgg16.py``, ``model/faster_rcnn_resnet.py``) reads its ImageNet weights
through these two functions, so an offline machine or a wrong file gives the same kind of message: what was
asked for, why it failed, and where to put the file.
"""

import os
import pickle

import torch

__all__ = ["PretrainedWeightsError", "read_state_dict", "torchvision_state_dict"]


class PretrainedWeightsError(ValueError):
    """Pretrained weights that cannot be downloaded, read or used; the message says what to do instead."""


def torchvision_state_dict(weights, what: str, alternatives: str = "") -> dict[str, torch.Tensor]:
    """The state dict of torchvision's ``weights`` (a ``WeightsEnum`` member), downloaded into torch hub's
    cache on first use.

    Args:
        weights: e.g. ``torchvision.models.VGG16_Weights.IMAGENET1K_V1``.
        what: how the caller's option names these weights, for the message (``"pretrained='torchvision'"``).
        alternatives: a sentence appended to the message (other ways to get the weights).

    Raises:
        PretrainedWeightsError: the download failed (offline, a read-only cache...); the message, without a
            chained traceback, names the URL, the file to place in the cache and the alternatives.
    """
    try:
        return weights.get_state_dict(progress=True)
    except OSError as e:  # URLError, socket errors, a read-only cache...
        reason = getattr(e, "reason", None) or e
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
        message = (f"{what}: cannot download {weights.url} ({reason}). Without network access, copy that "
                   f"file to {path} (torch hub's cache, see torch.hub.get_dir()).")
        error = PretrainedWeightsError(f"{message} {alternatives}".strip())
    raise error  # outside the except block: no "during handling of the above exception" chain


def read_state_dict(path: str | os.PathLike, what: str) -> dict:
    """``torch.load(path, weights_only=True)`` with errors that name the file.

    Args:
        path: a state-dict file.
        what: what the file should hold, for the messages (``"a torchvision-layout VGG16 state dict"``).

    Raises:
        FileNotFoundError: no file at ``path``.
        PretrainedWeightsError: the file cannot be read as a state dict (or holds pickled objects).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained={path!r}: no such file (expected {what})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise PretrainedWeightsError(f"pretrained={path!r}: cannot read {what} from this file ({reason})")
