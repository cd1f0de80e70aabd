"""Convert a chainercv ``FasterRCNNVGG16`` snapshot (``.npz``) into a checkpoint of ours.

    python misc/convert_chainercv.py CHAINERCV.npz OUT.pth [--class-names a,b,...]

The original offered a VOC07 model converted from chainercv's published one (chainercv reports 0.706 mAP,
0.7053 after conversion). ``OUT.pth`` loads like any checkpoint of ours (``FasterRCNNTrainer.load``,
``train.py eval --load-path``), and ``FasterRCNN.forward`` on our preprocessed image gives the outputs
chainercv's model gives on its own preprocessed image.

Key mapping (chainer's ``Convolution2D.W`` is ``(out, in, kh, kw)`` and ``Linear.W`` is ``(out, in)``, the
same layouts as torch, so every array is copied as is, except the first convolution, see below):

    extractor/conv{i}_{j}/conv/{W,b}      -> extractor.{0,2,5,7,10,12,14,17,19,21,24,26,28}.{weight,bias}
      (chainercv >= 0.8, its ``VGG16`` links; older snapshots, ``extractor/conv{i}_{j}/{W,b}``, work too)
    rpn/{conv1,score,loc}/{W,b}           -> rpn.{conv1,score,loc}.{weight,bias}
    head/fc6/{W,b}, head/fc7/{W,b}        -> head.classifier.0.*, head.classifier.2.*
    head/cls_loc/{W,b}, head/score/{W,b}  -> head.cls_loc.*, head.score.*

(a) Input convention. chainercv's ``FasterRCNN.prepare`` takes an RGB image in ``[0, 255]`` and subtracts
``mean = (122.7717, 115.9465, 102.9801)`` given in RGB order (R, G, B), so its network sees
``(R - 122.7717, G - 115.9465, B - 102.9801)``. Our ``normalize='caffe'`` gives
``(B - 102.9801, G - 115.9465, R - 122.7717)``: the same three planes in reverse order (and zero padding
is the same zero in both). So the converted model is a ``caffe`` model (``arch['normalize'] = 'caffe'``,
``config['caffe_pretrain'] = True``) whose conv1_1 weight has its input channels reversed
(``W[:, ::-1]``), which makes its output, and everything after it, exactly chainercv's. (The original's
``caffe_normalize`` swapped the R and B means, so its chainercv conversion was fed slightly shifted colours.)
Only the network input is matched: resizing (chainercv: PIL/OpenCV bilinear) may differ by rounding.

(b) Output layouts match ours as they are, because the original copied chainercv's: the RPN's ``score``
channels are ``(A, 2)`` per location after NCHW -> NHWC, ``(background, foreground)`` per anchor, and
``loc`` channels ``(A, 4)`` of ``(t_y, t_x, t_h, t_w)``, with the same anchors (base 16, ratios 0.5/1/2,
scales 8/16/32, centred at 8, cell-major, ``(y_min, x_min, y_max, x_max)``); the head's fc6 reads the
pooled ``(512, 7, 7)`` features flattened in ``(c, y, x)`` order (Caffe RoI pooling, 7x7 at 1/16, rois
swapped to ``(x, y)`` for the pooling in both), ``cls_loc`` is ``(n_class, 4)`` class-major with class 0 the
background, normalised by mean 0 and std ``(0.1, 0.1, 0.2, 0.2)`` like ours; there is no dropout at test time.
"""

import argparse
import os
import sys
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as `python misc/convert_chainercv.py`: import from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.voc_dataset import VOC_BBOX_LABEL_NAMES  # noqa: E402
from model import FasterRCNNVGG16, arch_of  # noqa: E402
from utils.checkpoint import make_checkpoint, save_checkpoint  # noqa: E402

__all__ = ["chainercv_key_map", "convert_chainercv", "main"]

_VGG16_CONVS = ("conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
                "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3")
# Index of each convolution in torchvision's ``vgg16().features`` (ReLUs and max-pools in between).
_VGG16_FEATURE_INDEX = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
_OTHER_LAYERS = {"rpn/conv1": "rpn.conv1", "rpn/score": "rpn.score", "rpn/loc": "rpn.loc",
                 "head/fc6": "head.classifier.0", "head/fc7": "head.classifier.2",
                 "head/cls_loc": "head.cls_loc", "head/score": "head.score"}
# chainercv >= 0.8 wraps each VGG convolution in a Conv2DActiv link (``conv1_1/conv/W``); older releases
# did not (``conv1_1/W``).
_OLD_FIRST_CONV = "extractor/conv1_1/W"


def chainercv_key_map(new_vgg_layout: bool = True) -> dict[str, str]:
    """Our state-dict key -> chainercv's ``.npz`` key, for every parameter of ``FasterRCNNVGG16``."""
    conv = "/conv" if new_vgg_layout else ""
    layers = {f"extractor/{name}{conv}": f"extractor.{index}"
              for name, index in zip(_VGG16_CONVS, _VGG16_FEATURE_INDEX, strict=True)}
    layers.update(_OTHER_LAYERS)
    return {f"{ours}.{param}": f"{theirs}/{letter}"
            for theirs, ours in layers.items() for param, letter in (("weight", "W"), ("bias", "b"))}


def convert_chainercv(arrays: Mapping[str, np.ndarray], class_names: Sequence[str] | None = None,
                      source: str = "chainercv snapshot") -> dict:
    """Build our checkpoint dict from chainercv's arrays.

    Args:
        arrays: a mapping of chainercv's ``.npz`` keys to arrays (an opened ``np.load`` file or a dict).
        class_names: the ``n_fg_class`` foreground names; ``None``: the 20 Pascal VOC names, which need a
            21-class head.
        source: what to call the input in errors; its base name goes to ``other_info['converted_from']``.

    Returns:
        A checkpoint dict (``'format'``, ``'model'``, ``'arch'``, ``'class_names'``, ``'config'``,
        ``'other_info'``); ``'model'`` holds float32 tensors that ``FasterRCNNVGG16(n_fg_class,
        normalize='caffe').load_state_dict`` accepts with ``strict=True``.

    Raises:
        ValueError: a missing, unexpected or mis-shaped key (named), or class names that do not fit the head.
    """
    keys = set(arrays.keys())
    key_map = chainercv_key_map(new_vgg_layout=_OLD_FIRST_CONV not in keys)
    missing = sorted(v for v in key_map.values() if v not in keys)
    unexpected = sorted(keys - set(key_map.values()))
    if missing or unexpected:
        problems = [f"{name}: {', '.join(items)}" for name, items in
                    (("missing keys", missing), ("unexpected keys", unexpected)) if items]
        raise ValueError(f"{source} is not a chainercv FasterRCNNVGG16 snapshot: " + "; ".join(problems))

    score_shape = np.shape(arrays["head/score/W"])
    n_fg_class = score_shape[0] - 1 if len(score_shape) == 2 else 0
    if n_fg_class < 1:
        raise ValueError(f"{source}: head/score/W has shape {score_shape}, expected (n_fg_class + 1, 4096)")
    class_names = list(VOC_BBOX_LABEL_NAMES if class_names is None else class_names)
    if len(class_names) != n_fg_class:
        raise ValueError(f"{source} has {n_fg_class} foreground classes (head/score/W {score_shape}) but "
                         f"{len(class_names)} class names were given")

    with torch.device("meta"):  # only the keys, shapes and arch: no memory, no random init
        model = FasterRCNNVGG16(n_fg_class=n_fg_class, normalize="caffe")
    expected = model.state_dict()
    if set(key_map) != set(expected):  # a bug here, not in the input
        raise RuntimeError(f"chainercv_key_map and FasterRCNNVGG16 disagree on "
                           f"{sorted(set(key_map) ^ set(expected))}")
    state = {}
    for ours, theirs in key_map.items():
        array = np.require(arrays[theirs], np.float32, "W")  # no copy of np.load's float32 arrays
        if array.shape != tuple(expected[ours].shape):
            raise ValueError(f"{source}: {theirs} has shape {array.shape}, expected "
                             f"{tuple(expected[ours].shape)} (for {ours})")
        tensor = torch.from_numpy(array)
        if ours == "extractor.0.weight":
            tensor = tensor.flip(1)  # conv1_1 input channels: chainercv's (R, G, B) -> our caffe (B, G, R)
        state[ours] = tensor

    # Not evaluated here: best_map 0.0 means "none recorded".
    other_info = {"epoch": 0, "iteration": 0, "best_map": 0.0, "converted_from": os.path.basename(source)}
    return make_checkpoint({key: state[key] for key in expected}, arch_of(model), class_names,
                           config={"caffe_pretrain": True}, other_info=other_info)


def _load_npz(path: str):
    if not os.path.isfile(path):
        raise SystemExit(f"{path!r}: no such file (expected a chainercv FasterRCNNVGG16 .npz snapshot)")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise SystemExit(f"{path!r}: cannot read it as an .npz file ({e})") from e


def main(argv: list[str] | None = None) -> str:
    """Command line: read the ``.npz``, convert, save atomically; returns the output path."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("npz", help="chainercv FasterRCNNVGG16 snapshot (.npz)")
    parser.add_argument("out", help="checkpoint to write (.pth)")
    parser.add_argument("--class-names", help="comma-separated foreground class names (default: the 20 VOC "
                        "classes)")
    args = parser.parse_args(argv)

    class_names = args.class_names.split(",") if args.class_names else None
    with _load_npz(args.npz) as arrays:
        try:
            ckpt = convert_chainercv(arrays, class_names, source=args.npz)
        except ValueError as e:
            raise SystemExit(str(e)) from e
    path = save_checkpoint(ckpt, args.out)
    print(f"wrote {path}: {ckpt['arch']['n_fg_class']} classes, caffe normalisation (BGR 0-255 minus the "
          "pixel means)")
    return path


if __name__ == "__main__":
    main()
