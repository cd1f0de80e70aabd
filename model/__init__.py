"""Faster R-CNN models, and rebuilding one from the ``'arch'`` entry of a checkpoint.

A model class records its constructor arguments as plain values in ``self.arch``, with ``'name'`` its key in
``_ARCHS`` (``FasterRCNNVGG16`` and ``FasterRCNNResNet`` do). Adding a backbone = one entry in ``_ARCHS`` plus
that ``self.arch``.

An ``arch`` is the one record of a model's settings: :func:`canonical_arch` completes one written before a
setting existed with that setting's default (the original's), so old checkpoints rebuild the model they
were trained as, and two archs compare equal exactly when they build the same model.
"""

import copy
import functools
import inspect
from collections.abc import Callable

from model.faster_rcnn import FasterRCNN
from model.faster_rcnn_resnet import FasterRCNNResNet
from model.faster_rcnn_toy import FasterRCNNToy
from model.faster_rcnn_vgg16 import FasterRCNNVGG16
from model.region_proposal_network import full_proposal_params

__all__ = [
    "FasterRCNN", "FasterRCNNResNet", "FasterRCNNVGG16", "arch_of", "build_faster_rcnn", "canonical_arch",
]

# arch['name'] -> constructor taking the other entries of arch as keyword arguments
_ARCHS: dict[str, Callable[..., FasterRCNN]] = {
    "vgg16": FasterRCNNVGG16,
    "resnet50": functools.partial(FasterRCNNResNet, depth=50),  # the depth is in the name, not the arch
    "resnet101": functools.partial(FasterRCNNResNet, depth=101),
    "toy": FasterRCNNToy,
}


def build_faster_rcnn(arch: dict, **overrides) -> FasterRCNN:
    """Build a randomly initialised model of the architecture ``arch`` (weights come from the checkpoint).

    Args:
        arch: the checkpoint's ``'arch'`` dict: ``'name'`` (a key of the registry: ``'vgg16'``,
            ``'resnet50'``, ``'resnet101'``, ``'toy'``) and the constructor's keyword arguments, e.g.
            ``{'name': 'vgg16', 'n_fg_class': 20, 'ratios': [0.5, 1, 2], 'anchor_scales': [8, 16, 32],
            'use_drop': False}``.
        **overrides: keyword arguments that replace entries of ``arch`` (e.g. ``normalize='caffe'``).

    Raises:
        ValueError: an unknown name, or entries the named constructor does not take (checked before anything
            is built).
    """
    kwargs = {**canonical_arch(arch), **overrides}
    name = kwargs.pop("name", None)
    if name not in _ARCHS:
        raise ValueError(f"arch['name'] must be one of {sorted(_ARCHS)}, got {name!r}")
    unknown = sorted(set(kwargs) - _accepted_keywords(_ARCHS[name]))
    if unknown:
        raise ValueError(f"arch {name!r} has entries its constructor does not take: {unknown}")
    return _ARCHS[name](**kwargs)


def _accepted_keywords(constructor: Callable[..., FasterRCNN]) -> set[str]:
    """The keyword arguments ``constructor`` takes: its own (less those a ``functools.partial`` fixes) and,
    where it has ``**faster_rcnn_kwargs``, :class:`FasterRCNN`'s (all but the three parts)."""
    params = inspect.signature(constructor).parameters
    accepted = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        accepted |= set(inspect.signature(FasterRCNN).parameters) - {"extractor", "rpn", "head"}
    if isinstance(constructor, functools.partial):
        accepted -= set(constructor.keywords)
    return accepted


def arch_of(model: FasterRCNN) -> dict:
    """The ``'arch'`` dict of ``model`` (plain values), such that ``build_faster_rcnn`` rebuilds it."""
    arch = getattr(model, "arch", None)
    if arch is None:
        raise ValueError(f"{type(model).__name__} does not record its architecture "
                         "(self.arch, see model/__init__.py)")
    return copy.deepcopy(arch)


def canonical_arch(arch: dict) -> dict:
    """``arch`` with the settings it predates filled in: the RPN's ``proposal_creator_params`` (absent from
    VGG16 archs written before they were recorded: the original's counts) completed with
    ``ProposalCreator``'s defaults. Other entries are kept as they are; the input is not modified.
    """
    arch = copy.deepcopy(dict(arch))
    if arch.get("name") in _ARCHS:
        arch["proposal_creator_params"] = full_proposal_params(arch.get("proposal_creator_params"))
    return arch
