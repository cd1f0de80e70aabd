"""demo.py, demo.ipynb and the original's checkpoints.

The notebook runs headless (nbclient, the venv's kernel) on a toy checkpoint made here; demo.py runs as a
command on a real photo and on a folder; the original's checkpoint files are built here from its spec
(key names, numpy scalars pickled under numpy 2's and numpy 1's module names, its config keys), read with
weights-only loading, converted and run; a file carrying a pickle payload is refused without running it.
"""

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import types
import warnings
import zipfile

import nbformat
import numpy as np
import pytest
import torch
from nbclient import NotebookClient
from PIL import Image
from skimage import data as skdata
from torch.nn import functional as F

import demo
from data.dataset import inverse_normalize, preprocess
from data.toy_dataset import generate_toy_voc
from data.util import read_image
from data.voc_dataset import VOC_BBOX_LABEL_NAMES
from model import FasterRCNNVGG16, arch_of
from model.faster_rcnn_toy import FasterRCNNToy
from trainer import FasterRCNNTrainer
from utils.checkpoint import CHECKPOINT_FORMAT, CheckpointError, checkpoint_config, load_checkpoint
from utils.original_checkpoint import (
    ORIGINAL_CAFFE_MEAN_SHIFT,
    convert_original_checkpoint,
    is_original_checkpoint,
    torch_load_allowing_numpy,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY_NAMES = ["alpha", "beta", "gamma"]  # not the toy set's names: the demo must take them from the checkpoint
BOOSTED_LABEL = 1  # the toy model is made to see a "beta" in every RoI

# --- the original's checkpoint, from original-spec.md §2 and §10 --------------------------------------------

# (index in extractor, in channels, out channels) of VGG16's 13 convolutions
_VGG16_CONVS = ((0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256),
                (14, 256, 256), (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512),
                (26, 512, 512), (28, 512, 512))

ORIGINAL_CONFIG = {  # opt._state_dict() of the original, dead options included
    "voc_data_dir": "/home/cy/.chainer/dataset/pfnet/chainercv/voc/VOCdevkit/VOC2007/",
    "min_size": 600, "max_size": 1000, "num_workers": 8, "test_num_workers": 8, "rpn_sigma": 3.0,
    "roi_sigma": 1.0, "weight_decay": 0.0005, "lr_decay": 0.1, "lr": 1e-3, "env": "faster-rcnn", "port": 8097,
    "plot_every": 40, "data": "voc", "pretrained_model": "vgg16", "epoch": 14, "use_adam": False,
    "use_chainer": False, "use_drop": False, "debug_file": "/tmp/debugf", "test_num": 10000,
    "load_path": None, "caffe_pretrain": False, "caffe_pretrain_path": "checkpoints/vgg16_caffe.pth",
}
ORIGINAL_VIS_INFO = {"index": {"rpn_loc_loss": 125, "total_loss": 125}, "vis_kw": {},
                     "log_text": "[1222_2105] lr:0.001, map:0.7126 <br>", "env": "fasterrcnn-caffe"}


def original_shapes(n_fg_class: int, use_drop: bool) -> dict[str, tuple]:
    """Key -> shape of the original's FasterRCNNVGG16 state dict (spec §9, §10), written out independently."""
    shapes = {}
    for index, c_in, c_out in _VGG16_CONVS:
        shapes[f"extractor.{index}.weight"] = (c_out, c_in, 3, 3)
        shapes[f"extractor.{index}.bias"] = (c_out,)
    shapes.update({"rpn.conv1.weight": (512, 512, 3, 3), "rpn.conv1.bias": (512,),
                   "rpn.score.weight": (18, 512, 1, 1), "rpn.score.bias": (18,),
                   "rpn.loc.weight": (36, 512, 1, 1), "rpn.loc.bias": (36,)})
    fc7 = 3 if use_drop else 2
    n_class = n_fg_class + 1
    shapes.update({"head.classifier.0.weight": (4096, 25088), "head.classifier.0.bias": (4096,),
                   f"head.classifier.{fc7}.weight": (4096, 4096), f"head.classifier.{fc7}.bias": (4096,),
                   "head.cls_loc.weight": (n_class * 4, 4096), "head.cls_loc.bias": (n_class * 4,),
                   "head.score.weight": (n_class, 4096), "head.score.bias": (n_class,)})
    return shapes


def original_checkpoint(state: dict, caffe: bool = False, best_map: float = 0.7126) -> dict:
    """What the original's ``trainer.save(save_optimizer=True, best_map=...)`` pickled."""
    return {
        "model": state,
        "config": {**ORIGINAL_CONFIG, "caffe_pretrain": caffe},
        "other_info": {"best_map": np.float64(best_map)},  # eval_detection_voc's nanmean
        "vis_info": dict(ORIGINAL_VIS_INFO),
        # one parameter group per tensor, as the original's get_optimizer made them
        "optimizer": {"state": {0: {"momentum_buffer": torch.zeros(2)}},
                      "param_groups": [{"lr": 1e-3, "momentum": 0.9, "weight_decay": 5e-4, "params": [0]},
                                       {"lr": 2e-3, "momentum": 0.9, "weight_decay": 0, "params": [1]}]},
    }


def empty_state(n_fg_class: int, use_drop: bool) -> dict:
    """A state dict of the original's keys and shapes; ``torch.empty``: no memory is touched."""
    return {key: torch.empty(shape) for key, shape in original_shapes(n_fg_class, use_drop).items()}


def numpy1_pickle_module():
    """A ``pickle_module`` for ``torch.save`` that names numpy's constructors as numpy 1.x did.

    numpy 2 pickles ``numpy._core.multiarray.scalar``/``_reconstruct``; the original's files, written under
    numpy 1, reference ``numpy.core.multiarray.*``. The pure-Python pickler writes those names instead.
    """
    from numpy._core.multiarray import _reconstruct, scalar

    renamed = {id(scalar): "scalar", id(_reconstruct): "_reconstruct"}

    class Numpy1Pickler(pickle._Pickler):
        def save_global(self, obj, name=None):
            if id(obj) not in renamed:
                return super().save_global(obj, name)
            assert self.proto < 4  # torch.save's protocol 2: a text GLOBAL opcode
            self.write(pickle.GLOBAL + f"numpy.core.multiarray\n{renamed[id(obj)]}\n".encode())
            self.memoize(obj)

    module = types.ModuleType("numpy1_pickle")
    module.Pickler, module.dump = Numpy1Pickler, pickle.dump
    return module


def save_original(obj, path, numpy1: bool = False, legacy: bool = False) -> None:
    kwargs = {"pickle_module": numpy1_pickle_module()} if numpy1 else {}
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy, **kwargs)


def pickle_bytes(path) -> bytes:
    """The pickle stream(s) of a torch file (``data.pkl`` of a zip file; the whole legacy file)."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            return z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    with open(path, "rb") as f:
        return f.read()


class Payload:
    """Unpickling this runs ``touch <marker>``: the kind of code a hostile checkpoint carries."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# --- fixtures -----------------------------------------------------------------------------------------------


def make_toy_model(seed: int = 0) -> FasterRCNNToy:
    """A random toy model whose head puts nearly all probability on label ``BOOSTED_LABEL``: detections
    everywhere, made deterministic without training."""
    torch.manual_seed(seed)
    model = FasterRCNNToy(n_fg_class=len(TOY_NAMES), anchor_scales=(2, 4, 8), min_size=160, max_size=256,
                          proposal_creator_params={"n_test_pre_nms": 1000, "n_test_post_nms": 100,
                                                   "min_size": 4})
    with torch.no_grad():
        model.head.score.bias[BOOSTED_LABEL + 1] = 8.0  # head class = label + 1
    return model


@pytest.fixture(scope="module")
def toy_tree(tmp_path_factory):
    """``(root, checkpoint)``: ``root/checkpoints/`` with an older ``old/last.pth`` and the newest
    ``run/best.pth``, a toy checkpoint whose config points at a small toy data set under ``root/toy``."""
    root = tmp_path_factory.mktemp("toy_tree")
    toy_dir = generate_toy_voc(root / "toy", n_trainval=1, n_test=2)
    trainer = FasterRCNNTrainer(make_toy_model(), class_names=TOY_NAMES,
                                config={"data": "toy", "toy_data_dir": toy_dir})
    old = trainer.save(root / "checkpoints" / "old" / "last.pth", epoch=1, best_map=0.1)
    best = trainer.save(root / "checkpoints" / "run" / "best.pth", epoch=2, best_map=0.5)
    os.utime(old, (1_000_000_000, 1_000_000_000))  # 2001: clearly older
    return root, best


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """scikit-image's astronaut (512 x 512 RGB photo, public domain) as a JPEG file."""
    path = tmp_path_factory.mktemp("photo") / "astronaut.jpg"
    Image.fromarray(skdata.astronaut()).save(path, quality=95)
    return str(path)


# --- which checkpoint, default image ------------------------------------------------------------------------


def test_find_checkpoint_takes_best_first_then_the_newest_pth(tmp_path):
    def touch(rel, mtime):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
        os.utime(tmp_path / rel, (mtime, mtime))

    touch("a/best.pth", 1_000_005)
    touch("b/c/last.pth", 1_000_030)  # the newest file
    touch("a/last.pth", 1_000_020)
    touch("d/best.pth", 1_000_010)  # the newest best.pth
    (tmp_path / "b" / "notes.txt").write_text("newer, not a checkpoint")
    # a run folder: its best.pth, even though its last.pth is newer
    assert demo.find_checkpoint(tmp_path / "a") == str(tmp_path / "a" / "best.pth")
    # a folder of runs: the newest best.pth under it, not the newest last.pth
    assert demo.find_checkpoint(tmp_path) == str(tmp_path / "d" / "best.pth")
    # no best.pth at all: the newest *.pth
    assert demo.find_checkpoint(tmp_path / "b") == str(tmp_path / "b" / "c" / "last.pth")
    assert demo.find_checkpoint(tmp_path / "a" / "last.pth") == str(tmp_path / "a" / "last.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="train.py train --data=toy"):
        demo.find_checkpoint(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        demo.find_checkpoint(tmp_path / "nowhere")


def test_demo_image_fits_the_checkpoint(toy_tree):
    _, best = toy_tree
    ckpt = load_checkpoint(best)
    img, source = demo.demo_image(ckpt)
    toy_dir = ckpt["config"]["toy_data_dir"]
    assert source == os.path.join(toy_dir, "JPEGImages", "000002.jpg")  # the first test image
    assert img.shape[0] == 3 and img.dtype == np.float32
    rendered, rendered_source = demo.demo_image({**ckpt, "config": {"data": "toy", "toy_data_dir": "/gone"}})
    assert "rendered" in rendered_source and rendered.shape == img.shape
    assert np.abs(rendered - img).mean() < 8  # the same scene, before JPEG compression
    photo_img, photo_source = demo.demo_image({"arch": {"name": "vgg16"}, "config": {"data": "voc"}})
    assert photo_source == "skimage.data.astronaut()" and photo_img.shape == (3, 512, 512)


# --- the notebook -------------------------------------------------------------------------------------------


def test_notebook_is_saved_without_outputs():
    nb = nbformat.read(os.path.join(REPO, "demo.ipynb"), as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code)
    assert "CHECKPOINT = None" in code[0].source and "IMAGE = None" in code[0].source
    assert "weights_only=False" not in "".join(cell.source for cell in nb.cells)


@pytest.mark.slow
def test_notebook_runs_headless_on_the_newest_checkpoint(toy_tree, monkeypatch):
    root, best = toy_tree
    monkeypatch.setenv("DEMO_CHECKPOINT", str(root / "checkpoints"))
    monkeypatch.delenv("DEMO_IMAGE", raising=False)
    venv_kernels = os.path.join(sys.prefix, "share", "jupyter")
    if os.path.isdir(os.path.join(venv_kernels, "kernels", "python3")):
        monkeypatch.setenv("JUPYTER_PATH", venv_kernels)  # this interpreter's kernel before any user's
    nb = nbformat.read(os.path.join(REPO, "demo.ipynb"), as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": REPO}}).execute()

    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    assert f"{best}: toy, classes {TOY_NAMES}" in text  # the newest checkpoint, its own class names
    assert "000002.jpg" in text  # the toy test image from the checkpoint's data folder
    pictures = [out.data["image/png"] for out in outputs if "image/png" in out.get("data", {})]
    assert len(pictures) == 2
    import base64

    picture = np.asarray(Image.open(io.BytesIO(base64.b64decode(pictures[0]))).convert("RGB"))
    assert picture.shape[0] > 100 and picture.std() > 10  # a drawn image, not a blank figure
    kernel_python = nb.cells[-1].outputs[0].text.strip()
    assert os.path.realpath(kernel_python) == os.path.realpath(sys.executable)


# --- demo.py ------------------------------------------------------------------------------------------------


def check_record(record: dict, image_path: str, score_thresh: float = 0.7) -> None:
    """The JSON of one image: its size, boxes inside it, labels in range, names from the checkpoint."""
    height, width = Image.open(image_path).size[::-1]
    assert record["image"] == image_path
    assert record["size"] == [height, width]
    assert record["bbox_order"] == "y_min, x_min, y_max, x_max"
    assert record["detections"], "the boosted toy model finds something everywhere"
    for det in record["detections"]:
        y_min, x_min, y_max, x_max = det["bbox"]
        assert 0 <= y_min <= y_max <= height and 0 <= x_min <= x_max <= width
        assert det["label"] in range(len(TOY_NAMES))
        assert det["class_name"] == TOY_NAMES[det["label"]]
        assert score_thresh < det["score"] <= 1


@pytest.mark.slow
def test_demo_command_on_a_photo_and_a_folder(toy_tree, photo, tmp_path):
    root, best = toy_tree
    folder = tmp_path / "images"
    folder.mkdir()
    toy_jpg = root / "toy" / "JPEGImages"
    shutil.copy(toy_jpg / "000002.jpg", folder / "000002.jpg")
    Image.open(toy_jpg / "000003.jpg").save(folder / "000003.png")  # a PNG input gives a PNG picture
    (folder / "broken.jpg").write_text("not a JPEG")
    (folder / "notes.txt").write_text("ignored: not an image")
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "demo.py", photo, str(folder), str(tmp_path / "missing.jpg"), f"--load-path={best}",
         f"--out={out}", "--device=cpu"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1, result.stderr  # two inputs failed, the others were done
    assert "Traceback" not in result.stderr
    assert "missing.jpg: no such file or folder" in result.stderr
    assert f"{folder / 'broken.jpg'}: cannot read image" in result.stderr
    assert sorted(os.listdir(out)) == ["000002.jpg", "000002.json", "000003.json", "000003.png",
                                       "astronaut.jpg", "astronaut.json"]
    inputs = {"astronaut": photo, "000002": str(folder / "000002.jpg"), "000003": str(folder / "000003.png")}
    for stem, image_path in inputs.items():
        with open(out / f"{stem}.json") as f:
            check_record(json.load(f), image_path)
    picture = Image.open(out / "astronaut.jpg")
    assert picture.size == (640, 640)  # the 512 x 512 photo, enlarged to a 640-pixel side
    assert Image.open(out / "000003.png").format == "PNG"


def test_load_model_takes_the_best_checkpoint_of_a_folder_and_says_which(toy_tree, tmp_path, capsys):
    _, best = toy_tree
    folder = tmp_path / "checkpoints"
    (folder / "old_run").mkdir(parents=True)
    (folder / "new_run").mkdir()
    shutil.copy(best, folder / "old_run" / "best.pth")
    shutil.copy(best, folder / "new_run" / "best.pth")
    shutil.copy(best, folder / "new_run" / "last.pth")
    os.utime(folder / "old_run" / "best.pth", (1, 1))
    os.utime(folder / "new_run" / "best.pth", (2, 2))  # last.pth is the newest file
    model, class_names, ckpt = demo.load_model(folder, device="cpu")
    err = capsys.readouterr().err
    assert f"checkpoint: {folder / 'new_run' / 'best.pth'} (the newest best.pth under {folder})" in err
    assert class_names == list(ckpt["class_names"]) and not model.training
    demo.load_model(folder / "new_run", device="cpu")
    assert f"checkpoint: {folder / 'new_run' / 'best.pth'} (the folder's best.pth)" in capsys.readouterr().err


def test_demo_detections_match_predict_and_score_thresh(toy_tree, photo):
    _, best = toy_tree
    model, names, _ = demo.load_model(best, device="cpu")
    assert names == TOY_NAMES
    img = read_image(photo)
    bbox, label, score = demo.detect(model, img)
    p_bbox, p_label, p_score = model.predict([img], visualize=True)
    np.testing.assert_array_equal(bbox, p_bbox[0])
    np.testing.assert_array_equal(label, p_label[0])
    assert len(bbox) > 1 and set(label.tolist()) == {BOOSTED_LABEL} and (score > 0.7).all()
    # the override path gives the preset's result at 0.7...
    for got, want in zip(demo.detect(model, img, score_thresh=0.7), (bbox, label, score), strict=True):
        np.testing.assert_array_equal(got, want)
    assert (model.nms_thresh, model.score_thresh) == (0.3, 0.05)  # thresholds restored
    # ...which is predict's own score_thresh: the visualize preset's NMS with another score threshold
    x = preprocess(img, model.min_size, model.max_size, model.normalize)
    model.use_preset("visualize")
    model.score_thresh = 1e-4
    by_hand = model.predict([x], sizes=[img.shape[1:]])
    model.use_preset("evaluate")
    for got, want in zip(model.predict([img], visualize=True, score_thresh=1e-4), by_hand, strict=True):
        np.testing.assert_array_equal(got[0], want[0])
    assert (model.nms_thresh, model.score_thresh) == (0.3, 0.05)
    # ...and a lower threshold keeps a superset: exactly the old detections among those above 0.7
    low = demo.detect(model, img, score_thresh=1e-4)
    assert len(low[0]) > len(bbox) and set(low[1].tolist()) > {BOOSTED_LABEL}
    above = low[2] > 0.7
    np.testing.assert_array_equal(low[0][above], bbox)
    record = demo.detections_record(photo, img.shape[1:], *low, names)
    assert json.loads(demo._record_json(record)) == record


def test_demo_bad_inputs_are_clear_errors(toy_tree, photo, tmp_path, capsys):
    _, best = toy_tree
    out = tmp_path / "out"
    cases = [
        ([photo], str(tmp_path / "nope.pth"), "nope.pth' does not exist"),
        ([photo], photo, "astronaut.jpg"),  # not a checkpoint
        ([photo], str(tmp_path), "no *.pth checkpoint under"),
        ([], best, "no image given"),
        ([photo], None, "--load-path=CKPT is required"),
    ]
    for inputs, load_path, message in cases:
        assert demo.run_demo(inputs, load_path, out=str(out)) == 2
        err = capsys.readouterr().err
        assert err.startswith("demo.py: error: ") and message in err, err
    assert demo.run_demo([photo], best, out=str(out), score_thresh=1.5) == 2
    assert "--score-thresh" in capsys.readouterr().err
    assert demo.run_demo([photo], best, out=str(out), device="tpu:x") == 2
    assert "--device" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # a misspelt option stops before any work
        demo.main(photo, load_path=best, out=str(out), score_tresh=0.5)
    assert exit_info.value.code == 2 and "unknown option --score-tresh" in capsys.readouterr().err
    assert not out.exists()  # nothing was started
    (tmp_path / "empty").mkdir()
    assert demo.run_demo([str(tmp_path / "empty")], best, out=str(out)) == 1
    assert "no .jpg/.jpeg/.png/.bmp images in this folder" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_command_bad_checkpoint_exits_without_traceback(photo, tmp_path):
    result = subprocess.run([sys.executable, "demo.py", photo, f"--load-path={tmp_path / 'missing.pth'}"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    missing = str(tmp_path / "missing.pth")
    assert result.stderr.strip() == f"demo.py: error: checkpoint {missing!r} does not exist"


# --- the original's checkpoints: reading --------------------------------------------------------------------

NUMPY_VALUES = {"best_map": np.float64(0.7126), "lr": np.float32(1e-4), "epoch": np.int64(13),
                "n": np.int32(7), "flag": np.bool_(True), "ap": np.array([0.5, np.nan, 0.25]),
                "counts": np.arange(6, dtype=np.int64).reshape(2, 3), "u8": np.array([1, 255], np.uint8)}


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("numpy1", [False, True], ids=["numpy2-names", "numpy1-names"])
def test_numpy_scalars_and_arrays_load_weights_only(tmp_path, numpy1, legacy):
    path = tmp_path / "numpy.pth"
    save_original({"other_info": dict(NUMPY_VALUES), "w": torch.arange(3.0)}, path, numpy1, legacy)
    module = b"numpy.core.multiarray" if numpy1 else b"numpy._core.multiarray"
    stream = pickle_bytes(path)
    assert module + b"\nscalar\n" in stream and module + b"\n_reconstruct\n" in stream
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # plain weights-only loading refuses numpy
    loaded = torch_load_allowing_numpy(path)
    torch.testing.assert_close(loaded["w"], torch.arange(3.0))
    for key, value in NUMPY_VALUES.items():
        got = loaded["other_info"][key]
        assert type(got) is type(value) and got.dtype == value.dtype
        np.testing.assert_array_equal(got, value)


def test_object_arrays_and_other_globals_stay_refused(tmp_path):
    for i, hostile in enumerate([np.array([{"a": 1}, None], dtype=object), np.dtype([("x", "f4")]),
                                 np.random.default_rng(0)]):
        path = tmp_path / f"h{i}.pth"
        torch.save({"other_info": {"x": hostile}}, path)
        with pytest.raises(pickle.UnpicklingError):
            torch_load_allowing_numpy(path)


def test_hostile_pickle_is_refused_and_never_runs(tmp_path, capsys):
    marker = tmp_path / "payload_ran"
    state = {"head.score.weight": torch.zeros(4, 8)}  # enough to look like a checkpoint
    path = tmp_path / "fasterrcnn_12211511_0.7126.pth"
    torch.save({"model": state, "config": dict(ORIGINAL_CONFIG), "other_info": {"best_map": Payload(marker)}},
               path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "refused" in message and "system" in message
    assert not marker.exists()
    assert demo.run_demo([str(path)], str(path), out=str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert err.startswith("demo.py: error: ") and str(path) in err and "refused" in err
    assert not marker.exists()
    # the payload is live: unrestricted loading would have run it
    torch.load(path, weights_only=False)
    assert marker.exists()


# --- the original's checkpoints: converting -----------------------------------------------------------------


@pytest.mark.parametrize(("n_fg_class", "use_drop", "caffe"), [(20, False, False), (3, True, True)])
def test_convert_original_checkpoint(n_fg_class, use_drop, caffe):
    state = empty_state(n_fg_class, use_drop)
    original = original_checkpoint(state, caffe=caffe)
    assert is_original_checkpoint(original) and is_original_checkpoint(state)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt = convert_original_checkpoint(original, "orig.pth")
    assert ckpt["format"] == CHECKPOINT_FORMAT and not is_original_checkpoint(ckpt)
    normalize = "caffe" if caffe else "torchvision"
    with torch.device("meta"):
        reference = FasterRCNNVGG16(n_fg_class=n_fg_class, use_drop=use_drop, normalize=normalize)
    assert ckpt["arch"] == arch_of(reference)
    assert ckpt["arch"]["min_size"] == 600 and ckpt["arch"]["max_size"] == 1000
    assert set(ckpt["model"]) == set(original_shapes(n_fg_class, use_drop)) == set(reference.state_dict())
    unchanged = [key for key in state if ckpt["model"][key] is state[key]]
    assert unchanged == [key for key in state if not (caffe and key == "extractor.0.bias")]
    if n_fg_class == 20:
        assert ckpt["class_names"] == list(VOC_BBOX_LABEL_NAMES) and not caught
    else:
        assert ckpt["class_names"] == ["class_0", "class_1", "class_2"]
        assert any("no class names" in str(w.message) for w in caught)

    dropped = {"voc_data_dir", "caffe_pretrain_path", "load_path", "pretrained_model", "use_chainer",
               "debug_file"}
    assert ckpt["config"] == {**{k: v for k, v in ORIGINAL_CONFIG.items() if k not in dropped},
                              "caffe_pretrain": caffe, "use_drop": use_drop, "backbone": "vgg16"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = checkpoint_config(ckpt)  # our Config takes every kept option without a warning
    assert (config.caffe_pretrain, config.use_drop, config.backbone) == (caffe, use_drop, "vgg16")
    assert config.epoch == 14

    info = ckpt["other_info"]
    assert type(info["best_map"]) is float and info["best_map"] == 0.7126
    assert info["converted_from"].startswith("chenyuntc/simple-faster-rcnn-pytorch")
    assert any("optimizer" in note for note in info["conversion_notes"])
    assert ckpt["vis_info"] == ORIGINAL_VIS_INFO and "optimizer" not in ckpt
    # everything but the weights is plain: loadable with plain weights-only loading
    buffer = io.BytesIO()
    torch.save({k: v for k, v in ckpt.items() if k != "model"}, buffer)
    buffer.seek(0)
    torch.load(buffer, weights_only=True)


def test_convert_bare_state_dict_assumes_caffe_with_a_warning():
    state = empty_state(20, False)
    with pytest.warns(UserWarning, match="bare state dict"):
        ckpt = convert_original_checkpoint(state, "chainer_best_model_converted_to_pytorch_0.7053.pth")
    assert ckpt["arch"]["normalize"] == "caffe" and ckpt["config"]["caffe_pretrain"] is True
    assert ckpt["class_names"] == list(VOC_BBOX_LABEL_NAMES) and "vis_info" not in ckpt


@pytest.mark.parametrize("damage", ["missing", "unexpected", "shape", "both_fc7", "no_fc7", "score"])
def test_convert_rejects_other_state_dicts(damage):
    state = empty_state(20, False)
    if damage == "missing":
        del state["rpn.loc.bias"]
    elif damage == "unexpected":
        state["head.extra.weight"] = torch.zeros(1)
    elif damage == "shape":
        state["rpn.score.weight"] = torch.empty(30, 512, 1, 1)  # 15 anchors, not the original's 9
    elif damage == "both_fc7":
        state["head.classifier.3.weight"] = state["head.classifier.2.weight"]
    elif damage == "no_fc7":
        del state["head.classifier.2.weight"]
    else:
        state["head.score.weight"] = torch.empty(4096)
    expected = {"missing": "rpn.loc.bias", "unexpected": "head.extra.weight", "shape": "rpn.score.weight",
                "both_fc7": "fc7", "no_fc7": "fc7", "score": "head.score.weight"}[damage]
    with pytest.raises(CheckpointError, match="orig.pth") as info:
        convert_original_checkpoint({"model": state, "config": {}}, "orig.pth")
    assert expected in str(info.value)


def test_caffe_mean_fix_gives_the_original_first_layer():
    """conv1_1 of a converted caffe model on our input == the original's conv1_1 on its swapped-mean input,
    except on the border ring that its zero padding kept unshifted."""
    rng = np.random.default_rng(0)
    img = rng.uniform(0, 255, size=(3, 40, 56)).astype(np.float32)
    ours = preprocess(img, min_size=40, max_size=56, normalize="caffe")  # (3, 40, 56) BGR - right means
    rgb = inverse_normalize(ours, "caffe")  # the resized pixels, RGB 0-255
    # the original's caffe_normalize (spec §3.3): to BGR, then minus [122.7717, 115.9465, 102.9801]
    theirs = rgb[::-1] - np.array([122.7717, 115.9465, 102.9801], np.float32).reshape(3, 1, 1)
    weight = torch.randn(64, 3, 3, 3, dtype=torch.float64) * 0.1
    bias = torch.randn(64, dtype=torch.float64)
    state = {**empty_state(20, False), "extractor.0.weight": weight.float(), "extractor.0.bias": bias.float()}
    ckpt = convert_original_checkpoint({"model": state, "config": {"caffe_pretrain": True}})
    folded = ckpt["model"]["extractor.0.bias"]

    def conv(x, b):
        x = torch.from_numpy(np.ascontiguousarray(x)).double()[None]  # (1, 3, H, W)
        return F.conv2d(x, weight, b.double(), padding=1)[0]

    original = conv(theirs, bias)
    converted = conv(ours, folded)
    interior = (slice(None), slice(1, -1), slice(1, -1))
    torch.testing.assert_close(converted[interior], original[interior], rtol=0, atol=1e-4)
    assert (converted[interior] - conv(ours, bias)[interior]).abs().max() > 1  # the fix matters
    ring = (converted - original).abs()
    ring[interior] = 0
    assert ring.max() > 1e-3  # the border differs, by at most the padded taps' share of the shift
    bound = (weight.abs() * torch.tensor(ORIGINAL_CAFFE_MEAN_SHIFT).abs().view(1, 3, 1, 1)).sum(dim=(1, 2, 3))
    assert (ring <= bound.view(64, 1, 1) + 1e-4).all()


@pytest.mark.slow
def test_original_checkpoint_file_loads_and_predicts_like_its_model(tmp_path, photo):
    """A full-size original checkpoint (numpy 1 names, torch's legacy file format, as the published files)
    goes through load_checkpoint, and demo.py finds with it exactly what the original weights find."""
    torch.manual_seed(1)
    source = FasterRCNNVGG16(n_fg_class=3)
    with torch.no_grad():
        source.head.score.bias[2] = 12.0  # detections everywhere, label 1
    path = tmp_path / "fasterrcnn_12211511_0.701052458187_torchvision_pretrain.pth"
    save_original(original_checkpoint(source.state_dict(), caffe=False, best_map=0.701052458187), path,
                  numpy1=True, legacy=True)
    want_bbox, want_label, want_score = (r[0] for r in source.predict([read_image(photo)], visualize=True))
    assert len(want_bbox) > 0 and set(want_label.tolist()) == {1}
    del source

    with pytest.warns(UserWarning, match="no class names"):
        ckpt = load_checkpoint(path)
    assert ckpt["class_names"] == ["class_0", "class_1", "class_2"]
    assert ckpt["other_info"]["best_map"] == 0.701052458187 and ckpt["arch"]["normalize"] == "torchvision"
    del ckpt

    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert demo.run_demo([photo], str(path), out=str(out), device="cpu") == 0
    with open(out / "astronaut.json") as f:
        detections = json.load(f)["detections"]
    assert [d["class_name"] for d in detections] == ["class_1"] * len(want_bbox)
    # the demo runs the extractor in this CPU's fastest memory format: the same detections, to float rounding
    np.testing.assert_allclose(np.array([d["bbox"] for d in detections], np.float32), want_bbox, rtol=1e-5)
    np.testing.assert_allclose(np.array([d["score"] for d in detections], np.float32), want_score, rtol=1e-5)
