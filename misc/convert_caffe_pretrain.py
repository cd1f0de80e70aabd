"""Fetch the caffe VGG16 that the original trains from, and save it in torchvision's VGG16 layout.

    python misc/convert_caffe_pretrain.py [--src vgg16-00b39a1b.pth] [--out checkpoints/vgg16_caffe.pth]

The weights are the VGG team's caffe VGG16 (ILSVRC-2014) as converted to PyTorch by J. Johnson
(``vgg16-00b39a1b.pth``; the conversion script is credited to ruotianluo/pytorch-faster-rcnn in the
original). They expect BGR images in ``[0, 255]`` minus the per-channel pixel means, i.e. training with
``--caffe-pretrain`` (``normalize='caffe'``). torchvision's own ``vgg16-397923af.pth`` is not a substitute
(original issue #63): it wants RGB in ``[0, 1]`` normalised by the ImageNet mean/std
(``pretrained='torchvision'``).

Only two keys move: J. Johnson's classifier is ``[Dropout, Linear, ReLU, Dropout, Linear, ReLU, Linear]``,
torchvision's ``[Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear]``, so ``classifier.1.*`` (fc6) becomes
``classifier.0.*`` and ``classifier.4.*`` (fc7) becomes ``classifier.3.*``. The result is what
``decom_vgg16(pretrained='checkpoints/vgg16_caffe.pth')`` loads.
"""

import argparse
import os
import pickle
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
import torchvision

if __package__ in (None, ""):  # run as `python misc/convert_caffe_pretrain.py`: import from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.checkpoint import atomic_save  # noqa: E402

__all__ = ["CAFFE_VGG16_URL", "convert_caffe_state_dict", "main"]

CAFFE_VGG16_URL = "https://s3-us-west-2.amazonaws.com/jcjohns-models/vgg16-00b39a1b.pth"
DEFAULT_OUT = os.path.join("checkpoints", "vgg16_caffe.pth")

# J. Johnson's key prefix -> torchvision's.
_RENAMES = {"classifier.1.": "classifier.0.", "classifier.4.": "classifier.3."}


def convert_caffe_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the keys of J. Johnson's caffe VGG16 into torchvision's VGG16 layout.

    Args:
        state_dict: the contents of ``vgg16-00b39a1b.pth``: ``features.{0,2,5,...,28}.{weight,bias}``,
            ``classifier.{1,4,6}.{weight,bias}``.

    Returns:
        A new dict with torchvision's keys (``classifier.{0,3,6}``), in torchvision's order; the tensors
        themselves are not copied.

    Raises:
        ValueError: the input is already in torchvision's layout, or keys are missing or unexpected, or a
            tensor has the wrong shape; the message names the keys.
    """
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"expected a VGG16 state dict (a mapping of names to tensors), got a "
                         f"{type(state_dict).__name__}")
    if "classifier.0.weight" in state_dict and "classifier.1.weight" not in state_dict:
        raise ValueError(
            "this state dict is already in torchvision's layout (classifier.0.weight, no "
            "classifier.1.weight); if it is torchvision's vgg16-397923af.pth it wants RGB [0, 1] input: use "
            f"pretrained='torchvision' instead. The caffe weights are {CAFFE_VGG16_URL}")
    renamed = {_rename(key): value for key, value in state_dict.items()}
    expected = _vgg16_shapes()
    _check_layout(renamed, expected, "caffe VGG16 state dict (after renaming classifier.1/4 -> 0/3)")
    return {key: renamed[key] for key in expected}


def _rename(key: str) -> str:
    for old, new in _RENAMES.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


def _vgg16_shapes() -> dict[str, torch.Size]:
    """Keys and shapes of torchvision's VGG16 state dict (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        model = torchvision.models.vgg16(weights=None)
    return {key: value.shape for key, value in model.state_dict().items()}


def _check_layout(state: Mapping, expected: Mapping[str, torch.Size], what: str) -> None:
    """Raise a ``ValueError`` naming every missing, unexpected and mis-shaped key of ``state``."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape) if torch.is_tensor(state[k]) else type(state[k]).__name__} "
             f"instead of {tuple(shape)}"
             for k, shape in expected.items()
             if k in state and not (torch.is_tensor(state[k]) and state[k].shape == shape)]
    named = (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong))
    problems = [f"{name}: {', '.join(items)}" for name, items in named if items]
    if problems:
        raise ValueError(f"{what} does not match torchvision's VGG16: " + "; ".join(problems))


def _download() -> Mapping[str, torch.Tensor]:
    """The caffe VGG16 from its URL through torch hub's cache, or a ``SystemExit`` saying what to do."""
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(CAFFE_VGG16_URL))
    try:
        return torch.hub.load_state_dict_from_url(CAFFE_VGG16_URL, map_location="cpu", weights_only=True)
    except OSError as e:  # URLError, socket errors, a read-only cache...
        raise SystemExit(
            f"cannot download {CAFFE_VGG16_URL} ({e}).\nOn a machine with internet access, download that "
            f"file, then either copy it to {cached} and run this script again, or run\n"
            f"    python misc/convert_caffe_pretrain.py --src PATH/TO/vgg16-00b39a1b.pth") from e


def _read(path: str) -> Mapping[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise SystemExit(f"--src {path!r}: no such file (expected J. Johnson's vgg16-00b39a1b.pth)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise SystemExit(f"--src {path!r}: cannot read a state dict from this file ({e})") from e


def main(argv: list[str] | None = None) -> str:
    """Command line: download (or read ``--src``), convert, save atomically; returns the output path."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", help="a local copy of vgg16-00b39a1b.pth instead of downloading it")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"where to save (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)

    state = _read(args.src) if args.src else _download()
    try:
        state = convert_caffe_state_dict(state)
    except ValueError as e:
        raise SystemExit(f"{args.src or CAFFE_VGG16_URL}: {e}") from e
    path = atomic_save(state, args.out)
    print(f"wrote {path} ({len(state)} tensors, torchvision VGG16 layout); train with --caffe-pretrain "
          "(BGR 0-255 minus the pixel means)")
    return path


if __name__ == "__main__":
    main()
