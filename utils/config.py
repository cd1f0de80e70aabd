"""Options of training and evaluation: one documented dataclass of defaults that users edit.

``Config`` holds every option with its default and a one-line doc. ``train.py`` builds one from the command
line (:meth:`Config.parse`) and hands its values on: ``trainer.FasterRCNNTrainer.from_config`` takes the
training settings, the model and the data sets take plain arguments or the ``Config`` object itself.
Nothing in ``model/`` or ``data/`` imports this module. ``opt = Config()`` is kept for the original's
``from utils.config import opt`` (the defaults; nothing here reads it).

From the command line (fire turns ``--plot-every=100`` into ``plot_every=100``)::

    opt = Config.parse(kwargs)     # a new Config: defaults, then the data set's preset, then kwargs
    opt._parse(kwargs)             # the original's spelling: updates the instance in place and prints it

An unknown option or a value of the wrong type raises :class:`ConfigError` (a ``ValueError``) whose message
names the option, the expected type and the value, and suggests the closest valid option.

``--data=toy`` (and ``--data=toy-coco``) applies :data:`TOY_PRESET` to every option the user did not set
explicitly, so that the embedded synthetic data set trains quickly on a CPU.

Changes from the original's options: ``use_chainer``, ``pretrained_model`` and ``debug_file`` (unused, or an
``ipdb`` hook) are gone; ``port`` and ``data`` now take effect; the lr-decay epoch, the device, the seed, the
toy data set, the RPN proposal counts and visdom's server are options instead of constants in the code.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = ["Config", "ConfigError", "TOY_PRESET", "opt", "resolve_device"]


class ConfigError(ValueError):
    """An unknown option or a value that does not fit its option."""


def _default_toy_data_dir(name: str = "toy_voc") -> str:
    """The toy data set's cache folder: ``$XDG_CACHE_HOME/simple-faster-rcnn/<name>`` (``~/.cache`` default).

    A per-user cache rather than ``./.cache``: the set is generated once and found again whatever folder
    ``train.py``, ``demo.py`` or the notebook is started from, and it stays out of the source tree.
    """
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "simple-faster-rcnn", name)


def option(default: Any = dataclasses.MISSING, doc: str = "", *, choices: tuple = (), path: bool = False,
           factory=None):
    """A dataclass field with its one-line ``doc`` (shown by ``--help``) and its allowed ``choices``.

    ``path=True`` marks a file or folder: a leading ``~`` is expanded (shells leave ``--key=~/x`` alone).
    """
    metadata = {"doc": doc, "choices": tuple(choices), "path": path}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class Config:
    """Every option of ``train.py``; edit the defaults here for your experiments.

    Boxes, images and labels follow DESIGN.md §3. Epochs are counted from 0.
    """

    # --- data -------------------------------------------------------------------------------------------
    data: str = option("voc", "data set: 'voc' (Pascal VOC 2007 at voc_data_dir), 'coco' (COCO's layout at "
                              "coco_dir), 'toy' or 'toy-coco' (generated, as VOC or as COCO)",
                       choices=("voc", "coco", "toy", "toy-coco"))
    voc_data_dir: str = option("data/VOCdevkit/VOC2007",
                               "VOC2007 folder holding ImageSets/Main, Annotations and JPEGImages", path=True)
    toy_data_dir: str = option(doc="cache folder of the generated toy data set (made on first use)",
                               path=True, factory=_default_toy_data_dir)
    coco_dir: str = option("data/coco", "COCO folder: annotations/instances_<split>.json and <split>/ images",
                           path=True)
    coco_train: str = option("train2017", "COCO split to train on")
    coco_val: str = option("val2017", "COCO split to evaluate on")
    coco_skip_empty: bool = option(False, "leave COCO training images without (non-crowd) objects out, as "
                                          "torchvision and detectron2 do")
    toy_coco_dir: str = option(doc="cache folder of the toy data set in COCO's layout (made on first use)",
                               path=True, factory=functools.partial(_default_toy_data_dir, "toy_coco"))
    label_names: tuple[str, ...] = option((), "class names in label order; empty: the data set's own names")
    min_size: int = option(600, "images are resized so that their shorter side is min_size...")
    max_size: int = option(1000, "...and their longer side at most max_size (pixels)")
    num_workers: int = option(8, "DataLoader worker processes for training (0: load in the main process)")
    test_num_workers: int = option(8, "DataLoader worker processes for evaluation")
    skip_bad_samples: bool = option(False, "skip unreadable or invalid samples with a warning instead of "
                                           "stopping with a report")

    # --- model ------------------------------------------------------------------------------------------
    backbone: str = option("vgg16", "feature extractor: 'vgg16' (the original), 'resnet50' or 'resnet101' "
                                    "(C4 layout), or 'toy' (small, for CPUs)",
                           choices=("vgg16", "resnet50", "resnet101", "toy"))
    backbone_weights: str | None = option(None, "torchvision-layout ImageNet weights file of the backbone "
                                                "(None: torchvision's, downloaded on first use)", path=True)
    ratios: tuple[float, ...] = option((0.5, 1.0, 2.0), "anchor aspect ratios (height / width)")
    anchor_scales: tuple[float, ...] = option((8.0, 16.0, 32.0),
                                              "anchor sizes in units of the 16-pixel base anchor")
    use_drop: bool = option(False, "keep the dropout layers of VGG16's classifier in the RoI head")
    caffe_pretrain: bool = option(False, "start from caffe VGG16 weights (BGR 0-255 input) instead of "
                                         "torchvision's (RGB, ImageNet mean/std)")
    caffe_pretrain_path: str = option("checkpoints/vgg16_caffe.pth",
                                      "converted caffe VGG16 weights (misc/convert_caffe_pretrain.py)",
                                      path=True)
    rpn_nms_thresh: float = option(0.7, "IoU threshold of the NMS over RPN proposals")
    n_train_pre_nms: int = option(12000, "RPN proposals kept before NMS, training")
    n_train_post_nms: int = option(2000, "RPN proposals kept after NMS, training")
    n_test_pre_nms: int = option(6000, "RPN proposals kept before NMS, evaluation")
    n_test_post_nms: int = option(300, "RPN proposals kept after NMS, evaluation")
    proposal_min_size: float = option(16.0, "RPN proposals smaller than this (original-image pixels) are "
                                            "dropped")

    # --- training ---------------------------------------------------------------------------------------
    epoch: int = option(14, "number of training epochs")
    batch_size: int = option(1, "images per training step (per process with torchrun); images of similar "
                                "aspect ratio are grouped, padded to one size")
    test_batch_size: int = option(1, "images per forward pass in evaluation (only images of one size go "
                                     "together: the detections do not depend on it)")
    lr: float = option(1e-3, "learning rate (biases get twice this); see scale_lr")
    scale_lr: bool = option(False, "multiply lr by the images per step (batch_size x processes), the linear "
                                   "scaling rule, so that lr stays the rate of one image")
    amp: bool = option(False, "mixed precision: float16 autocast and a gradient scaler on CUDA, bfloat16 "
                              "autocast on the CPU (fast only with AVX512_BF16/AMX)")
    lr_decay: float = option(0.1, "factor applied once to the learning rate after epoch lr_decay_epoch")
    lr_decay_epoch: int = option(9, "after this epoch (0-based) the best checkpoint is reloaded and the lr "
                                    "decays")
    weight_decay: float = option(5e-4, "weight decay of the non-bias parameters (tf-faster-rcnn uses 1e-4)")
    use_adam: bool = option(False, "Adam instead of SGD with momentum 0.9")
    rpn_sigma: float = option(3.0, "sigma of the RPN's smooth L1 localisation loss")
    roi_sigma: float = option(1.0, "sigma of the RoI head's smooth L1 localisation loss")
    seed: int | None = option(None, "seed of every random generator (None: a different run each time)")
    memory_format: str = option("auto", "CPU memory format of the extractor: 'auto' (measured once per "
                                        "machine, phase, precision (--amp) and size, then cached), "
                                        "'channels_last' or 'contiguous'",
                                choices=("auto", "channels_last", "contiguous"))
    cpu_conv: str = option("auto", "CPU 3x3 convolutions: 'auto' (Winograd F(2x2, 3x3) for layers of >= 128 "
                                   "channels on maps of >= 1500 pixels; on AMD CPUs in training only), "
                                   "'winograd' or 'native' (PyTorch's stock kernels); see "
                                   "model/utils/cpu_conv.py",
                           choices=("auto", "winograd", "native"))
    device: str = option("auto", "'auto' (cuda when available, else cpu), 'cpu', 'cuda' or 'cuda:N' (under "
                                 "torchrun: one GPU per process, cuda:LOCAL_RANK)")
    dist_timeout: float = option(1800.0, "under torchrun: seconds a process waits for the others before the "
                                         "job fails, naming the ranks that stopped answering")
    test_num: int = option(10000, "evaluate each epoch on at most this many test images")
    eval_every: int = option(1, "evaluate every eval_every epochs (and always after the lr-decay epoch and "
                                "the last one)")
    save_dir: str = option("checkpoints", "folder of the run folders (checkpoints, history, curves)",
                           path=True)
    run_name: str = option("", "run folder under save_dir; empty: the folder of --load-path when it is one, "
                               "else <backbone>_<data>_<date-time>")
    load_path: str | None = option(None, "checkpoint to start from (resumes its epoch, lr and optimizer)",
                                   path=True)
    results: str | None = option(None, "eval: also write the detections to this json in COCO's results "
                                       "format (image_id, category_id, bbox [x, y, w, h], score)", path=True)

    # --- visualisation ----------------------------------------------------------------------------------
    use_visdom: bool = option(True, "send curves and pictures to a visdom server (a warning if none answers)")
    visdom_server: str = option("http://localhost", "address of the visdom server")
    port: int = option(8097, "port of the visdom server")
    env: str = option("faster-rcnn", "visdom environment")
    tensorboard: bool | None = option(None, "write TensorBoard event files into the run folder (None: when "
                                            "tensorboard is installed); tensorboard --logdir checkpoints")
    plot_every: int = option(40, "plot losses and pictures every plot_every iterations")

    # Options ignored without a word when found in an old checkpoint's config (the original's dead options).
    OBSOLETE: ClassVar[frozenset] = frozenset({"use_chainer", "pretrained_model", "debug_file"})

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, _convert(f.name, getattr(self, f.name)))
        self._check()

    # --- building ---------------------------------------------------------------------------------------
    @classmethod
    def parse(cls, kwargs: dict[str, Any], base: Config | None = None) -> Config:
        """A new ``Config``: ``base`` (default: the defaults), the data set's preset, then ``kwargs``.

        Args:
            kwargs: ``{option: value}``; option names may use ``-`` for ``_`` and any case
                (``plot-every``, ``use_Adam``). Values may be strings as typed on a command line.
                ``data='toy'`` (given here or in ``base``) applies :data:`TOY_PRESET` to every option that
                is not in ``kwargs`` and still has its default value in ``base``.
            base: the options to start from (e.g. a checkpoint's config: its values win over the preset).

        Raises:
            ConfigError: an unknown option, a value of the wrong type, a value out of range.
        """
        given = {_option_name(key): value for key, value in kwargs.items()}
        defaults = dataclasses.asdict(cls())
        values = dataclasses.asdict(base) if base is not None else dict(defaults)
        values.update({key: _convert(key, value) for key, value in given.items()})
        if values["data"] in TOY_DATA:
            values.update({key: value for key, value in TOY_PRESET.items()
                           if key not in given and values[key] == defaults[key]})
        return cls(**values)

    def _parse(self, kwargs: dict[str, Any]) -> None:
        """The original's ``opt._parse(kwargs)``: update this instance in place, then print the options."""
        parsed = self.parse(kwargs, base=self)
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(parsed, f.name))
        print("======user config========")
        print(self)
        print("==========end============")

    def to_dict(self) -> dict[str, Any]:
        """The options as plain values (tuples become lists), suitable for a checkpoint."""
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        """The ``Config`` stored by :meth:`to_dict`, from this or another version.

        Missing options take the data set's preset (``data='toy'``) or the defaults; the original's dead
        options are ignored; other unknown options and values that no longer fit are dropped with one
        warning each (a checkpoint stays loadable).
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names - cls.OBSOLETE)
        if unknown:
            warnings.warn(f"config: ignoring unknown options {unknown} (from another version?)", stacklevel=2)
        values = dataclasses.asdict(cls())
        if d.get("data", values["data"]) in TOY_DATA:
            values.update(TOY_PRESET)
        for key in names & set(d):
            try:
                values[key] = _convert(key, d[key])
            except ConfigError as e:
                warnings.warn(f"config: {e}; using {values[key]!r}", stacklevel=2)
        return cls(**values)

    # --- reading ----------------------------------------------------------------------------------------
    def torch_device(self):
        """The ``torch.device`` that ``device`` names (:func:`resolve_device`)."""
        return resolve_device(self.device)

    def __str__(self) -> str:
        width = max(len(f.name) for f in dataclasses.fields(self))
        return "\n".join(f"{f.name:<{width}} = {getattr(self, f.name)!r}" for f in dataclasses.fields(self))

    @classmethod
    def option_rows(cls) -> list[dict[str, str]]:
        """One row per option: ``name``, ``flag``, ``type``, ``default``, ``toy`` (preset or ''), ``doc``."""
        defaults = cls()
        rows = []
        for f in dataclasses.fields(cls):
            rows.append({
                "name": f.name,
                "flag": "--" + f.name.replace("_", "-"),
                "type": _type_name(_field_type(f.name)),
                "default": _show(getattr(defaults, f.name)),
                "toy": _show(TOY_PRESET[f.name]) if f.name in TOY_PRESET else "",
                "doc": f.metadata["doc"],
            })
        return rows

    @classmethod
    def help_text(cls) -> str:
        """The options with their types, defaults and docs, for ``python train.py train --help``."""
        rows = cls.option_rows()
        width = max(len(r["flag"]) + len(r["type"]) for r in rows) + 3
        lines = ["Options (--key=value; '-' and '_' are the same; bool options: --key or --key=false):", ""]
        for r in rows:
            toy = f"; toy: {r['toy']}" if r["toy"] else ""
            lines.append(f"  {r['flag'] + ' ' + r['type']:<{width}}{r['doc']} (default: {r['default']}{toy})")
        lines += ["", "With --data=toy the 'toy' values replace the defaults of the options not given."]
        return "\n".join(lines)

    @classmethod
    def markdown_table(cls) -> str:
        """The options as a Markdown table (the README's config table)."""
        lines = ["| option | type | default | toy preset | meaning |", "| --- | --- | --- | --- | --- |"]
        for r in cls.option_rows():
            lines.append(f"| `{r['flag']}` | {r['type']} | `{r['default']}` | "
                         f"{'`' + r['toy'] + '`' if r['toy'] else ''} | {r['doc']} |")
        return "\n".join(lines)

    # --- checks -----------------------------------------------------------------------------------------
    def _check(self) -> None:
        """Range checks that a type alone cannot express (choices are checked by ``_convert``)."""
        positive = ("min_size", "max_size", "lr", "lr_decay", "test_num", "eval_every", "plot_every",
                    "batch_size", "test_batch_size", "dist_timeout",
                    "rpn_sigma", "roi_sigma", "n_train_pre_nms", "n_train_post_nms", "n_test_pre_nms",
                    "n_test_post_nms")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"option {_flag(name)} must be > 0, got {getattr(self, name)!r}")
        non_negative = ("epoch", "num_workers", "test_num_workers", "lr_decay_epoch", "weight_decay",
                        "proposal_min_size")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ConfigError(f"option {_flag(name)} must be >= 0, got {getattr(self, name)!r}")
        if self.min_size > self.max_size:
            raise ConfigError(f"option --min-size ({self.min_size}) must not exceed --max-size "
                              f"({self.max_size})")
        if not 0 < self.port < 65536:
            raise ConfigError(f"option --port must be in [1, 65535], got {self.port}")
        if not 0 <= self.rpn_nms_thresh <= 1:
            raise ConfigError(f"option --rpn-nms-thresh must be in [0, 1], got {self.rpn_nms_thresh}")
        if not (self.ratios and self.anchor_scales and min(self.ratios + self.anchor_scales) > 0):
            raise ConfigError(f"options --ratios and --anchor-scales need positive values, got "
                              f"{self.ratios} and {self.anchor_scales}")
        if self.caffe_pretrain and self.backbone != "vgg16":
            raise ConfigError(f"option --caffe-pretrain loads caffe VGG16 weights: it needs "
                              f"--backbone=vgg16, not {self.backbone!r}")
        if not re.fullmatch(r"auto|cpu|mps|(cuda|xpu)(:\d+)?", self.device):
            raise ConfigError(f"option --device must be 'auto', 'cpu', 'cuda' or 'cuda:N', "
                              f"got {self.device!r}")


# The toy data set (data/toy_dataset.py) on 2 CPU cores: best VOC07 mAP 0.914 on its test split in 14 epochs
# (under 8 minutes with an evaluation after each, bench/train.py); the lr decays after epoch 10 (0-based) for
# the last three. Longer runs at the high lr plateau near 0.89 (16 epochs with the decay after 12: 0.904), and
# four times the training images at the same iteration count do no better (0.900): the head's channels do
# (FasterRCNNToy's head_channels 64 rather than 32: 0.904 -> 0.914 at the same time).
# Inputs of 224 px (the toy images are 128-192 px) keep the smallest shapes (10-20 px) apart on the 'toy'
# backbone's stride-8 map; anchors of 28, 56 and 112 px (scales x 16 px) cover the shapes' 14-137 px at that
# size; fewer proposals than VGG16's for small images; a light weight decay since the small model underfits
# rather than overfits. Losses and, with TensorBoard or visdom, the training pictures every 100 steps: one
# plot step draws two matplotlib pictures, predicts and encodes three PNGs (0.45 s, six steps' worth), 12% of
# the run at the preset's former 50 steps, 6% at 100. The best mAP sits close to 0.90 because the VOC07 metric
# caps a class's AP at 10/11 = 0.909 when one of its test objects is never found (the last of its 11 recall
# points): the best runs find every object of a few classes.
TOY_DATA = ("toy", "toy-coco")  # the data sets TOY_PRESET applies to
TOY_PRESET: dict[str, Any] = {
    "backbone": "toy",
    "min_size": 224,
    "max_size": 352,
    "anchor_scales": (1.75, 3.5, 7.0),
    "n_train_pre_nms": 3000,
    "n_train_post_nms": 500,
    "n_test_pre_nms": 1000,
    "n_test_post_nms": 300,
    "proposal_min_size": 4.0,
    "epoch": 14,
    "lr": 1.5e-2,
    "scale_lr": True,
    "lr_decay_epoch": 10,
    "weight_decay": 1e-4,
    "num_workers": 0,
    "test_num_workers": 0,
    "seed": 0,
    "plot_every": 100,
    "use_visdom": False,
    "env": "faster-rcnn-toy",
}


def resolve_device(name: str):
    """The ``torch.device`` a ``--device`` value names: ``'auto'`` is cuda when available, else cpu.

    Raises:
        ConfigError: not a device name, or a CUDA device on a machine without CUDA.
    """
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"--device={name!r} is not a device: use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device={name!r}: CUDA is not available on this machine (try --device=cpu)")
    return device


# --- value conversion ---------------------------------------------------------------------------------------
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _option_name(key: str) -> str:
    """The option that ``key`` names (``--plot-every``, ``plot-every``, ``Plot_Every``), or ConfigError."""
    name = key.lstrip("-").replace("-", "_").lower()
    names = [f.name for f in dataclasses.fields(Config)]
    if name in names:
        return name
    close = difflib.get_close_matches(name, names, n=1)
    hint = f" (did you mean {_flag(close[0])}?)" if close else ""
    raise ConfigError(f"unknown option {_flag(key.lstrip('-'))}{hint}. "
                      f"Valid options: {', '.join(_flag(n) for n in names)}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@functools.cache
def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(Config)


def _field_type(name: str):
    return _field_types()[name]


def _convert(name: str, value: Any) -> Any:
    """``value`` as the type of option ``name`` (a str from a command line is parsed), or ConfigError."""
    tp = _field_type(name)
    try:
        converted = _to_type(tp, value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"option {_flag(name)} expects {_type_name(tp)}, got {value!r} "
                          f"({type(value).__name__})") from e
    metadata = Config.__dataclass_fields__[name].metadata
    if metadata["choices"] and converted not in metadata["choices"]:
        raise ConfigError(f"option {_flag(name)} must be one of {list(metadata['choices'])}, got {value!r}")
    if metadata["path"] and converted is not None:
        converted = os.path.expanduser(converted)
    return converted


def _to_type(tp, value: Any) -> Any:
    """Convert ``value`` to ``tp`` (bool, int, float, str, ``X | None``, ``tuple[X, ...]``) or raise."""
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType):  # X | None
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _to_type(inner, value)
    if typing.get_origin(tp) is tuple:
        if isinstance(value, str):
            items = (v.strip().strip("'\"") for v in value.strip().strip("()[]").split(","))
            value = [v for v in items if v]
        elif not isinstance(value, (tuple, list)):
            value = [value]
        return tuple(_to_type(args[0], v) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ValueError(value)
    if tp is int:
        if isinstance(value, bool):
            raise TypeError(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, (int, str)):
            return int(value)
        raise TypeError(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise TypeError(value)
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(value)
        return number
    if tp is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise TypeError(value)
        return str(value)  # fire turns --env=123 into an int
    raise TypeError(f"unsupported option type {tp}")


def _type_name(tp) -> str:
    if isinstance(tp, types.UnionType):
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_type_name(inner)}|None"
    if typing.get_origin(tp) is tuple:
        return f"{_type_name(typing.get_args(tp)[0])},..."
    return tp.__name__


def _show(value: Any) -> str:
    """A default as it would be typed on the command line."""
    if isinstance(value, tuple):
        return ",".join(_show(v) for v in value) if value else "()"
    home = os.path.expanduser("~")
    if isinstance(value, str) and value.startswith(home + os.sep):
        return "~" + value[len(home):]
    return str(value)


opt = Config()
