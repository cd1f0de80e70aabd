"""Checkpoints of the original simple-faster-rcnn-pytorch, read without running code and converted to ours.

The original's ``trainer.save`` wrote ``torch.save`` of a dict::

    {'model': FasterRCNNVGG16 state dict, 'config': opt._state_dict(), 'other_info': {'best_map': np.float64},
     'vis_info': {...}, 'optimizer': ...}             # 'optimizer' only with save_optimizer=True

and older files hold the bare model state dict (its ``trainer.load`` reads both). The state-dict keys are
ours one to one (``extractor.N``, ``rpn.{conv1,score,loc}``, ``head.classifier.{0,2}`` or ``{0,3}`` with
``use_drop``, ``head.cls_loc``, ``head.score``), so converting is a matter of the other entries.

Reading. The numpy scalars in ``other_info`` make ``torch.load(weights_only=True)`` refuse the file, and
``weights_only=False`` would let any code in a downloaded file run. :func:`torch_load_allowing_numpy` reads
with ``weights_only=True`` and allows, besides tensors and plain containers, only what a numpy scalar or
numeric array pickles to: ``numpy.dtype``, ``numpy.ndarray``, the constructors ``scalar`` and
``_reconstruct`` under numpy 2's module name (``numpy._core.multiarray``) and numpy 1's
(``numpy.core.multiarray``, what the original's files reference), and the dtype classes of booleans,
integers, floats and complex numbers (the unpickler must be allowed to restore a dtype's state). Object and
structured dtypes stay refused. Anything else in a file (a class whose ``__reduce__`` runs code) is refused
before it is called.

Converting (:func:`convert_original_checkpoint`) gives a checkpoint of ours (``utils/checkpoint.py``):

* ``arch``: VGG16 with ``n_fg_class`` from ``head.score.weight`` and ``use_drop`` from the classifier's key
  indices; the original's fixed anchors (ratios 0.5/1/2, scales 8/16/32) and inference sizes (600/1000:
  its ``predict`` and evaluation always used these, whatever ``min_size``/``max_size`` said).
* normalisation from the config's ``caffe_pretrain``; a bare state dict has no config and is taken as a
  caffe model (the original's bare file was its chainercv-converted model, demoed with
  ``caffe_pretrain=True``), with a warning.
* Caffe models: the original subtracted the means ``(122.7717, 115.9465, 102.9801)`` from the B, G, R planes,
  the R and B means swapped (see ``data/dataset.py``); its network saw our caffe input plus
  ``delta = (-19.7916, 0, +19.7916)`` on (B, G, R). That constant is folded into conv1_1's bias,
  ``b'[o] = b[o] + sum_{c, i, j} W[o, c, i, j] delta[c]``, so our correctly normalised input gives the
  original's activations, exactly except on the one-pixel border ring of conv1_1's output, where the
  original's zero padding did not see the shift.
* ``class_names``: VOC's 20 names for 20 classes; otherwise ``class_<i>`` with a warning (the original's
  files do not store names).
* ``config``: the original's options that ours still has (dead ones such as ``use_chainer`` and the paths on
  the machine that trained it dropped), ``backbone='vgg16'``, ``caffe_pretrain`` and ``use_drop`` as above.
* ``other_info`` and ``vis_info`` as plain Python values (``best_map`` a ``float``), plus
  ``converted_from`` and ``conversion_notes``.
* no ``optimizer``: the original made one parameter group per tensor, which does not map onto ours.
"""

import dataclasses
import functools
import os
import warnings
from collections.abc import Mapping

import numpy as np
import torch
from numpy._core.multiarray import _reconstruct, scalar

from data.voc_dataset import VOC_BBOX_LABEL_NAMES
from model import FasterRCNNVGG16, arch_of
from utils.checkpoint import CheckpointError, default_class_names, make_checkpoint, to_plain

__all__ = [
    "ORIGINAL_CAFFE_MEAN_SHIFT",
    "convert_original_checkpoint",
    "is_original_checkpoint",
    "numpy_safe_globals",
    "torch_load_allowing_numpy",
]

# dtype characters whose dtype classes may be restored: bool, signed/unsigned integers, floats, complex.
_NUMERIC_DTYPE_CHARS = "?bBhHiIlLqQefdgFDG"

# The original network's caffe input minus ours, per (B, G, R) plane: it subtracted (122.7717, 115.9465,
# 102.9801) where the right means are (102.9801, 115.9465, 122.7717).
ORIGINAL_CAFFE_MEAN_SHIFT = (102.9801 - 122.7717, 0.0, 122.7717 - 102.9801)

# Options of the original's config that name files on the machine that trained the model: dropped so that
# this machine's defaults apply.
_MACHINE_PATH_OPTIONS = ("voc_data_dir", "caffe_pretrain_path", "load_path", "toy_data_dir", "save_dir")

_CONVERTED_FROM = "chenyuntc/simple-faster-rcnn-pytorch checkpoint"


@functools.cache
def numpy_safe_globals() -> tuple:
    """The numpy globals (with the names pickles reference them by) that numpy scalars and arrays need.

    Entries are objects or ``(object, "module.name")`` pairs, as ``torch.serialization.safe_globals`` takes.
    """
    dtype_classes = tuple(dict.fromkeys(type(np.dtype(c)) for c in _NUMERIC_DTYPE_CHARS))
    return (
        np.dtype,
        np.ndarray,
        (scalar, "numpy._core.multiarray.scalar"),
        (_reconstruct, "numpy._core.multiarray._reconstruct"),
        (scalar, "numpy.core.multiarray.scalar"),  # numpy < 2
        (_reconstruct, "numpy.core.multiarray._reconstruct"),
        *dtype_classes,
    )


def torch_load_allowing_numpy(path: str | os.PathLike, map_location="cpu"):
    """``torch.load(path, weights_only=True)`` that also accepts numpy scalars and numeric arrays.

    Errors are ``torch.load``'s: ``pickle.UnpicklingError`` for a file that references anything else (it is
    refused before anything in it is called), ``RuntimeError``/``EOFError`` for a file torch cannot read.
    """
    with torch.serialization.safe_globals(list(numpy_safe_globals())):
        return torch.load(path, map_location=map_location, weights_only=True)


def is_original_checkpoint(obj) -> bool:
    """Whether ``obj`` (a loaded file) is the original's checkpoint dict or bare VGG16 model state dict."""
    if not isinstance(obj, Mapping) or "arch" in obj or "format" in obj:
        return False
    state = obj.get("model", obj)
    return isinstance(state, Mapping) and all(
        key in state for key in ("extractor.0.weight", "rpn.conv1.weight", "head.classifier.0.weight",
                                 "head.score.weight")
    )


def convert_original_checkpoint(obj: Mapping, path: str | os.PathLike = "") -> dict:
    """Our checkpoint dict (``utils/checkpoint.py``) from a loaded original checkpoint (module docstring).

    Args:
        obj: what :func:`torch_load_allowing_numpy` read from the original's file: its checkpoint dict or
            its bare model state dict.
        path: the file, named in errors and warnings.

    Returns:
        ``{'format', 'model', 'arch', 'class_names', 'config', 'other_info'}`` plus ``'vis_info'`` when the
        file had one. Tensors are shared with ``obj`` except conv1_1's bias of a caffe model (a new tensor).

    Raises:
        CheckpointError: the state dict is not the original's VGG16 Faster R-CNN (the message lists the
            missing, unexpected or misshapen keys).
    """
    where = f"checkpoint {os.fspath(path)!r}" if path else "the checkpoint"
    bare = "model" not in obj
    state = dict(obj if bare else obj["model"])
    config = {} if bare else dict(obj.get("config") or {})
    notes = []

    n_fg_class, use_drop = _head_layout(state, where)
    if bare:
        caffe = True
        notes.append("bare state dict without a config: taken as a caffe-normalised model")
        warnings.warn(f"{where} is a bare state dict without a config: assuming it expects caffe "
                      "normalisation (BGR 0-255, the original's chainercv-converted model); a model trained "
                      "from torchvision's VGG16 would need normalize='torchvision'", stacklevel=2)
    else:
        caffe = bool(config.get("caffe_pretrain", False))
    normalize = "caffe" if caffe else "torchvision"

    arch, expected = _vgg16_template(n_fg_class, use_drop, normalize)
    _check_state_dict(state, expected, where)
    if caffe:
        conv1_1 = state["extractor.0.weight"], state["extractor.0.bias"]
        state["extractor.0.bias"] = _fold_caffe_mean_shift(*conv1_1)
        notes.append("caffe means: the original's swapped R/B means folded into conv1_1's bias")

    class_names = default_class_names(n_fg_class)
    if n_fg_class != len(VOC_BBOX_LABEL_NAMES):
        notes.append(f"{n_fg_class} classes without names: named class_0 ... class_{n_fg_class - 1}")
        warnings.warn(f"{where} has {n_fg_class} classes and the original stored no class names: "
                      f"they are named class_0 ... class_{n_fg_class - 1}", stacklevel=2)
    if not bare and "optimizer" in obj:
        notes.append("optimizer state dropped (one parameter group per tensor in the original)")

    other_info = to_plain(dict(obj.get("other_info") or {})) if not bare else {}
    other_info.update(converted_from=_CONVERTED_FROM, conversion_notes=notes)
    vis_info = None if bare else obj.get("vis_info")
    return make_checkpoint(state, arch, class_names, config=_config_of(config, caffe, use_drop),
                           other_info=other_info, vis_info=vis_info)


def _head_layout(state: Mapping, where: str) -> tuple[int, bool]:
    """``(n_fg_class, use_drop)`` from the head's keys: fc7 is ``classifier.2`` (no dropout) or ``.3``."""
    score = state.get("head.score.weight")
    if not torch.is_tensor(score) or score.dim() != 2 or score.shape[0] < 2:
        raise CheckpointError(f"{where}: 'head.score.weight' should be an (n_fg_class + 1, 4096) tensor, got "
                              f"{getattr(score, 'shape', type(score).__name__)}")
    has_fc7 = {index: f"head.classifier.{index}.weight" in state for index in (2, 3)}
    if has_fc7[2] == has_fc7[3]:
        raise CheckpointError(f"{where}: cannot tell where fc7 is: expected exactly one of "
                              "'head.classifier.2.weight' (use_drop=False) and 'head.classifier.3.weight' "
                              "(use_drop=True)")
    return int(score.shape[0]) - 1, has_fc7[3]


def _vgg16_template(n_fg_class: int, use_drop: bool, normalize: str) -> tuple[dict, dict[str, torch.Size]]:
    """The ``arch`` of our VGG16 Faster R-CNN with these settings and its state-dict shapes.

    Built on the meta device: no memory, no initialisation, and exactly what ``build_faster_rcnn`` rebuilds.
    """
    with torch.device("meta"):
        model = FasterRCNNVGG16(n_fg_class=n_fg_class, use_drop=use_drop, normalize=normalize)
    return arch_of(model), {key: value.shape for key, value in model.state_dict().items()}


def _check_state_dict(state: Mapping, expected: Mapping[str, torch.Size], where: str) -> None:
    """Raise ``CheckpointError`` unless ``state`` has exactly ``expected``'s keys, tensors of its shapes."""
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    misshapen = [
        f"{key}: {tuple(getattr(state[key], 'shape', ()))} instead of {tuple(shape)}"
        for key, shape in expected.items()
        if key in state and (not torch.is_tensor(state[key]) or state[key].shape != shape)
    ]
    if missing or unexpected or misshapen:
        problems = "; ".join(
            f"{name}: {', '.join(items[:5])}{', ...' if len(items) > 5 else ''}"
            for name, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen))
            if items
        )
        raise CheckpointError(f"{where} is not the original's VGG16 Faster R-CNN ({problems})")


def _fold_caffe_mean_shift(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """conv1_1's bias plus the response of ``weight`` to the constant input ``ORIGINAL_CAFFE_MEAN_SHIFT``.

    Args:
        weight: ``(64, 3, 3, 3)`` conv1_1 weight; input channels in B, G, R order.
        bias: ``(64,)`` conv1_1 bias.

    Returns:
        ``(64,)`` bias of ``bias``'s dtype, computed in float64.
    """
    shift = torch.tensor(ORIGINAL_CAFFE_MEAN_SHIFT, dtype=torch.float64, device=weight.device)
    response = (weight.to(torch.float64) * shift[None, :, None, None]).sum(dim=(1, 2, 3))  # (64,)
    return (bias.to(torch.float64) + response).to(bias.dtype)


def _config_of(original: Mapping, caffe: bool, use_drop: bool) -> dict:
    """The original's options that ours has (plain values), without paths of the training machine; the
    normalisation and dropout the weights imply."""
    from utils.config import Config

    names = {f.name for f in dataclasses.fields(Config)} - set(_MACHINE_PATH_OPTIONS)
    config = {key: value for key, value in to_plain(dict(original)).items() if key in names}
    config.update(backbone="vgg16", data="voc", caffe_pretrain=caffe, use_drop=use_drop)
    return config
