"""misc/convert_caffe_pretrain.py and misc/convert_chainercv.py on weights the tests write (no network).

Real VGG16 shapes are kept everywhere (the converters check them), but the big matrices repeat one random
row through a stride-0 view, so a "550 MB" state dict takes a few MB and every value is still compared
exactly.
"""

import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data.voc_dataset import VOC_BBOX_LABEL_NAMES
from misc.convert_caffe_pretrain import CAFFE_VGG16_URL, convert_caffe_state_dict
from misc.convert_caffe_pretrain import main as caffe_main
from misc.convert_chainercv import convert_chainercv
from misc.convert_chainercv import main as chainercv_main
from model import FasterRCNNVGG16
from model.faster_rcnn_vgg16 import decom_vgg16

REPO = Path(__file__).resolve().parents[1]

# VGG16's 13 convolutions: chainer names, (in, out) channels, index in torchvision's ``features``.
CONV_NAMES = ("conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
              "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3")
CONV_CHANNELS = ((3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
                 (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512))
FEATURE_INDEX = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
# Caffe pixel means per channel (py-faster-rcnn), the numbers both chainercv and our 'caffe' mode use.
MEAN_R, MEAN_G, MEAN_B = 122.7717, 115.9465, 102.9801


def real_shaped(rng, shape):
    """float32 random array of ``shape``; above 1M values, one random row repeated (stride 0, writable)."""
    if np.prod(shape) <= 2**20:
        return rng.standard_normal(shape, dtype=np.float32)
    row = rng.standard_normal(shape[1:], dtype=np.float32)
    return np.lib.stride_tricks.as_strided(row, shape, (0,) + row.strides, writeable=True)


# --------------------------------------------------------------------------------------- caffe VGG16


def caffe_layout_state_dict(seed=0):
    """J. Johnson's vgg16-00b39a1b.pth layout; his classifier: Dropout, fc6, ReLU, Dropout, fc7, ReLU, fc8."""
    rng = np.random.default_rng(seed)
    shapes = {}
    for index, (c_in, c_out) in zip(FEATURE_INDEX, CONV_CHANNELS, strict=True):
        shapes[f"features.{index}.weight"], shapes[f"features.{index}.bias"] = (c_out, c_in, 3, 3), (c_out,)
    for index, (c_in, c_out) in ((1, (25088, 4096)), (4, (4096, 4096)), (6, (4096, 1000))):
        shapes[f"classifier.{index}.weight"], shapes[f"classifier.{index}.bias"] = (c_out, c_in), (c_out,)
    return {key: torch.from_numpy(real_shaped(rng, shape)) for key, shape in shapes.items()}


def test_caffe_keys_renamed_into_torchvision_layout():
    caffe = caffe_layout_state_dict()
    converted = convert_caffe_state_dict(caffe)
    moved = {"classifier.0.weight": "classifier.1.weight", "classifier.0.bias": "classifier.1.bias",
             "classifier.3.weight": "classifier.4.weight", "classifier.3.bias": "classifier.4.bias"}
    expected_keys = [k for k in caffe if k.startswith("features.")] + [
        "classifier.0.weight", "classifier.0.bias", "classifier.3.weight", "classifier.3.bias",
        "classifier.6.weight", "classifier.6.bias"]
    assert list(converted) == expected_keys  # torchvision's order
    for key, tensor in converted.items():
        assert tensor is caffe[moved.get(key, key)], key


def test_caffe_main_writes_what_decom_vgg16_loads(tmp_path):
    caffe = caffe_layout_state_dict(1)
    src, out = tmp_path / "vgg16-00b39a1b.pth", tmp_path / "sub" / "vgg16_caffe.pth"
    torch.save(caffe, src, _use_new_zipfile_serialization=False)  # the 2017 file predates torch's zip format
    assert caffe_main(["--src", str(src), "--out", str(out)]) == str(out)
    saved = torch.load(out, weights_only=True)
    assert torch.equal(saved["classifier.3.weight"], caffe["classifier.4.weight"])
    assert [p.name for p in out.parent.iterdir()] == ["vgg16_caffe.pth"]  # no temporary file left

    extractor, classifier = decom_vgg16(pretrained=str(out))
    for position, index in enumerate(FEATURE_INDEX):
        assert torch.equal(extractor[index].weight, caffe[f"features.{index}.weight"]), position
        assert torch.equal(extractor[index].bias, caffe[f"features.{index}.bias"]), position
    assert torch.equal(classifier[0].weight, caffe["classifier.1.weight"])
    assert torch.equal(classifier[2].bias, caffe["classifier.4.bias"])


@pytest.mark.parametrize("damage, message", [
    (lambda sd: sd.pop("features.28.bias"), "missing keys: features.28.bias"),
    (lambda sd: sd.__setitem__("features.30.weight", torch.zeros(1)), "unexpected keys: features.30.weight"),
    (lambda sd: sd.__setitem__("classifier.1.weight", torch.zeros(4096, 100)),
     r"wrong shapes: classifier.0.weight \(4096, 100\) instead of \(4096, 25088\)"),
    (lambda sd: sd.__setitem__("classifier.0.weight", sd.pop("classifier.1.weight")), "torchvision"),
])
def test_caffe_bad_state_dicts_name_the_problem(damage, message):
    caffe = caffe_layout_state_dict()
    damage(caffe)
    with pytest.raises(ValueError, match=message):
        convert_caffe_state_dict(caffe)
    with pytest.raises(ValueError, match="mapping"):
        convert_caffe_state_dict([1, 2])


def test_caffe_main_offline_says_what_to_do(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    out = tmp_path / "vgg16_caffe.pth"
    with pytest.raises(SystemExit, match="--src") as info:
        caffe_main(["--out", str(out)])
    assert CAFFE_VGG16_URL in str(info.value) and not out.exists()
    with pytest.raises(SystemExit, match="no such file"):
        caffe_main(["--src", str(tmp_path / "missing.pth"), "--out", str(out)])


# ------------------------------------------------------------------------------------------ chainercv


# Our key -> chainercv's key, written out from the two layouts (original-spec §10; chainercv's VGG16 links).
OTHER_LAYERS = {"rpn.conv1": "rpn/conv1", "rpn.score": "rpn/score", "rpn.loc": "rpn/loc",
                "head.classifier.0": "head/fc6", "head.classifier.2": "head/fc7",
                "head.cls_loc": "head/cls_loc", "head.score": "head/score"}


def expected_mapping(new_layout=True):
    conv = "/conv" if new_layout else ""
    layers = {f"extractor.{i}": f"extractor/{name}{conv}"
              for i, name in zip(FEATURE_INDEX, CONV_NAMES, strict=True)}
    layers.update(OTHER_LAYERS)
    return {f"{ours}.weight": f"{theirs}/W" for ours, theirs in layers.items()} | {
        f"{ours}.bias": f"{theirs}/b" for ours, theirs in layers.items()}


def chainercv_arrays(seed=0, n_class=21, new_layout=True):
    """A chainercv FasterRCNNVGG16 snapshot's arrays (real key names and shapes, random values)."""
    rng = np.random.default_rng(seed)
    conv = "/conv" if new_layout else ""
    shapes = {}
    for name, (c_in, c_out) in zip(CONV_NAMES, CONV_CHANNELS, strict=True):
        shapes[f"extractor/{name}{conv}/W"] = (c_out, c_in, 3, 3)
        shapes[f"extractor/{name}{conv}/b"] = (c_out,)
    for name, shape in (("rpn/conv1", (512, 512, 3, 3)), ("rpn/score", (18, 512, 1, 1)),
                        ("rpn/loc", (36, 512, 1, 1)), ("head/fc6", (4096, 25088)), ("head/fc7", (4096, 4096)),
                        ("head/cls_loc", (n_class * 4, 4096)), ("head/score", (n_class, 4096))):
        shapes[f"{name}/W"], shapes[f"{name}/b"] = shape, shape[:1]
    return {key: real_shaped(rng, shape) for key, shape in shapes.items()}


@pytest.mark.parametrize("new_layout", [True, False])
def test_chainercv_every_tensor_lands_in_place(new_layout):
    arrays = chainercv_arrays(new_layout=new_layout)
    ckpt = convert_chainercv(arrays, source="/some/where/voc07.npz")
    model = ckpt["model"]
    mapping = expected_mapping(new_layout)
    assert set(model) == set(mapping) and len(model) == 40
    for ours, theirs in mapping.items():
        expected = arrays[theirs]
        if ours == "extractor.0.weight":
            expected = np.ascontiguousarray(expected[:, ::-1])  # (R, G, B) input planes -> (B, G, R)
        assert model[ours].dtype == torch.float32
        assert torch.equal(model[ours], torch.from_numpy(expected)), ours
    unflipped = torch.from_numpy(arrays[mapping["extractor.0.weight"]])
    assert not torch.equal(model["extractor.0.weight"], unflipped)

    assert ckpt["format"] == "simple-faster-rcnn-pytorch/1"
    assert ckpt["arch"]["name"] == "vgg16" and ckpt["arch"]["n_fg_class"] == 20
    assert ckpt["arch"]["normalize"] == "caffe" and ckpt["config"] == {"caffe_pretrain": True}
    assert ckpt["class_names"] == list(VOC_BBOX_LABEL_NAMES)
    assert ckpt["other_info"]["converted_from"] == "voc07.npz"


def test_chainercv_checkpoint_fits_our_model():
    ckpt = convert_chainercv(chainercv_arrays(1))
    with torch.device("meta"):  # keys and shapes only
        model = FasterRCNNVGG16(n_fg_class=20, normalize="caffe")
    model.load_state_dict(ckpt["model"], strict=True, assign=True)
    assert ckpt["arch"] == model.arch


def test_chainercv_first_conv_sees_chainercv_input_on_our_caffe_input():
    """conv1_1 after conversion, on our caffe input, equals chainercv's conv1_1 on chainercv's input."""
    rng = np.random.default_rng(2)
    arrays = chainercv_arrays(2)
    model = convert_chainercv(arrays)["model"]
    rgb = rng.uniform(0, 255, (3, 24, 32))
    chainercv_input = rgb - np.array([MEAN_R, MEAN_G, MEAN_B])[:, None, None]  # its prepare: RGB - mean
    caffe_input = rgb[::-1] - np.array([MEAN_B, MEAN_G, MEAN_R])[:, None, None]  # ours: BGR - own means
    theirs = F.conv2d(torch.from_numpy(chainercv_input)[None],
                      torch.from_numpy(arrays["extractor/conv1_1/conv/W"]).double(),
                      torch.from_numpy(arrays["extractor/conv1_1/conv/b"]).double(), padding=1)
    ours = F.conv2d(torch.from_numpy(caffe_input.copy())[None], model["extractor.0.weight"].double(),
                    model["extractor.0.bias"].double(), padding=1)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-9)


def test_chainercv_other_class_count():
    names = [f"thing{i}" for i in range(3)]
    ckpt = convert_chainercv(chainercv_arrays(3, n_class=4), class_names=names)
    assert ckpt["arch"]["n_fg_class"] == 3 and ckpt["class_names"] == names
    assert ckpt["model"]["head.cls_loc.weight"].shape == (16, 4096)
    with pytest.raises(ValueError, match="3 foreground classes .* 20 class names"):
        convert_chainercv(chainercv_arrays(3, n_class=4))


@pytest.mark.parametrize("damage, message", [
    (lambda a: a.pop("rpn/loc/b"), "missing keys: rpn/loc/b"),
    (lambda a: a.__setitem__("head/fc8/W", np.zeros((2, 2), np.float32)), "unexpected keys: head/fc8/W"),
    (lambda a: a.__setitem__("rpn/score/W", np.zeros((10, 512, 1, 1), np.float32)),
     r"rpn/score/W has shape \(10, 512, 1, 1\), expected \(18, 512, 1, 1\)"),
])
def test_chainercv_bad_snapshots_name_the_key(damage, message):
    arrays = chainercv_arrays()
    damage(arrays)
    with pytest.raises(ValueError, match=message):
        convert_chainercv(arrays)


def test_chainercv_main_reports_bad_files(tmp_path):
    # The right keys with the wrong shapes.
    small = {key: np.zeros((2,), np.float32) for key in expected_mapping().values()}
    np.savez(tmp_path / "small.npz", **small)
    out = tmp_path / "out.pth"
    with pytest.raises(SystemExit, match=r"small.npz: head/score/W has shape \(2,\)"):
        chainercv_main([str(tmp_path / "small.npz"), str(out)])
    (tmp_path / "not.npz").write_text("hello")
    with pytest.raises(SystemExit, match="cannot read it as an .npz"):
        chainercv_main([str(tmp_path / "not.npz"), str(out)])
    with pytest.raises(SystemExit, match="no such file"):
        chainercv_main([str(tmp_path / "missing.npz"), str(out)])
    assert not out.exists()


@pytest.mark.slow
def test_chainercv_command_line_end_to_end(tmp_path):
    """A full-size .npz on disk -> OUT.pth -> our checkpoint loader and a real FasterRCNNVGG16."""
    from utils.checkpoint import load_checkpoint, model_from_checkpoint

    arrays = chainercv_arrays(4)
    np.savez(tmp_path / "faster_rcnn_vgg16_voc07.npz", **arrays)  # ~550 MB
    out = tmp_path / "converted.pth"
    assert chainercv_main([str(tmp_path / "faster_rcnn_vgg16_voc07.npz"), str(out)]) == str(out)
    torch.load(out, weights_only=True)
    # FasterRCNNVGG16(**arch).load_state_dict(ckpt['model']), strict
    model = model_from_checkpoint(load_checkpoint(out), str(out))
    assert isinstance(model, FasterRCNNVGG16) and model.normalize == "caffe"
    assert torch.equal(model.head.classifier[0].weight, torch.from_numpy(arrays["head/fc6/W"]))
    assert torch.equal(model.rpn.score.bias, torch.from_numpy(arrays["rpn/score/b"]))
    flipped = arrays["extractor/conv1_1/conv/W"][:, ::-1].copy()
    assert torch.equal(model.extractor[0].weight, torch.from_numpy(flipped))


def test_scripts_run_from_the_command_line(tmp_path):
    """Both run as ``python misc/<script>.py`` from anywhere (they make the repository root importable)."""
    for script, args in (("convert_caffe_pretrain.py", ["--src", "missing.pth"]),
                         ("convert_chainercv.py", ["missing.npz", "out.pth"])):
        result = subprocess.run([sys.executable, str(REPO / "misc" / script), *args], cwd=tmp_path,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 1 and "no such file" in result.stderr, (script, result.stderr)
