"""Robustness and safety (issue 5): bad data, interrupted training, hostile checkpoints, CLI errors, visdom
failures. Training runs use tiny toy trees and a small preset so an epoch takes a second or two."""

import ast
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import types
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image

import train as train_module
import trainer as trainer_module
from data.check import BadSampleWarning, DataCheckError, check_dataset, check_sample, check_splits
from data.dataset import Dataset, TestDataset
from data.toy_dataset import TOY_LABEL_NAMES, generate_toy_voc
from data.voc_dataset import VOCBboxDataset
from trainer import NonFiniteLossError
from utils.checkpoint import SAVE_PAUSE_ENV, load_checkpoint, remove_stale_temp_files
from utils.config import TOY_PRESET, Config
from utils.interrupt import StopRequested, StopSignals
from utils.vis_tool import VisdomUnavailableWarning, Visualizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ("cat", "dog")


# --- a tiny VOC tree written by hand ------------------------------------------------------------------------
def write_sample(root, image_id, size=(40, 60), objects=(("cat", 5, 6, 30, 20, 0),), mode="RGB", fmt="JPEG"):
    """One image (``size = (H, W)``, PIL ``mode``, saved as ``fmt`` under a ``.jpg`` name, as some real data
    sets do) and its XML; ``objects``: ``(name, xmin, ymin, xmax, ymax, difficult)`` as written in the XML."""
    for sub in ("Annotations", "JPEGImages", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    height, width = size
    rgb = np.random.default_rng(len(image_id)).integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert(mode).save(os.path.join(root, "JPEGImages", f"{image_id}.jpg"), fmt)
    xml = [f"<annotation><size><width>{width}</width><height>{height}</height></size>"]
    for name, xmin, ymin, xmax, ymax, difficult in objects:
        xml.append(f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{xmin}</xmin>"
                   f"<ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>")
    with open(os.path.join(root, "Annotations", f"{image_id}.xml"), "w") as f:
        f.write("".join(xml) + "</annotation>")


def write_split(root, split, ids):
    with open(os.path.join(root, "ImageSets", "Main", f"{split}.txt"), "w") as f:
        f.write("".join(f"{i}\n" for i in ids))


def by_id(report):
    """``{image id: [its problems]}``."""
    grouped = {}
    for p in report.problems:
        grouped.setdefault(p.image_id, []).append(p)
    return grouped


# --- 1. data check ------------------------------------------------------------------------------------------
def test_check_finds_every_kind_of_bad_sample_and_names_the_file(tmp_path):
    root = str(tmp_path / "voc")
    write_sample(root, "good")
    write_sample(root, "border", objects=(("cat", 1, 1, 60, 40, 0),))  # the whole 60x40 image
    write_sample(root, "zero_based", objects=(("dog", 0, 0, 61, 41, 0),))  # one pixel of tolerance
    write_sample(root, "empty", objects=())
    write_sample(root, "only_difficult", objects=(("cat", 2, 2, 9, 9, 1),))
    write_sample(root, "truncated")
    path = os.path.join(root, "JPEGImages", "truncated.jpg")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    write_sample(root, "not_image")
    open(os.path.join(root, "JPEGImages", "not_image.jpg"), "w").write("<html>404 Not Found</html>")
    write_sample(root, "no_image")
    os.remove(os.path.join(root, "JPEGImages", "no_image.jpg"))
    write_sample(root, "no_xml")
    os.remove(os.path.join(root, "Annotations", "no_xml.xml"))
    write_sample(root, "bad_xml")
    open(os.path.join(root, "Annotations", "bad_xml.xml"), "w").write("<annotation><object>")
    write_sample(root, "unknown_class", objects=(("cat", 2, 2, 9, 9, 0), ("zebra", 2, 2, 9, 9, 0)))
    write_sample(root, "difficult_unknown", objects=(("zebra", 2, 2, 9, 9, 1),))
    write_sample(root, "no_area", objects=(("cat", 10, 5, 10, 20, 0),))
    write_sample(root, "inverted", objects=(("cat", 2, 30, 20, 10, 0),))
    write_sample(root, "outside", objects=(("cat", 5, 5, 62, 20, 0), ("dog", 5, 5, 20, 20, 0)))
    write_sample(root, "negative", objects=(("cat", -1, 5, 20, 20, 0),))
    write_sample(root, "nan", objects=(("dog", "nan", 5, 20, 20, 0),))
    write_sample(root, "both_bad", objects=(("cat", 5, 5, 5, 20, 0), ("dog", 5, 5, 20, 50, 0)))
    ids = ["good", "border", "zero_based", "empty", "only_difficult", "truncated", "not_image", "no_image",
           "no_xml", "bad_xml", "unknown_class", "difficult_unknown", "no_area", "inverted", "outside",
           "negative", "nan", "both_bad"]
    write_split(root, "trainval", ids)
    report = check_dataset(VOCBboxDataset(root, label_names=NAMES), progress=False)

    assert report.n_checked == len(ids) and not report.ok
    bad = by_id(report)
    assert set(bad) == set(ids) - {"good", "border", "zero_based", "empty", "only_difficult"}
    assert report.bad_indices == sorted(ids.index(i) for i in bad)
    assert report.empty == ["empty", "only_difficult"]  # difficult objects are left out of training

    def single(image_id, folder, *words):
        (problem,) = bad[image_id]
        assert problem.path == os.path.join(root, folder, image_id + (".jpg" if folder == "JPEGImages"
                                                                        else ".xml"))
        for word in words:
            assert word in problem.reason, (image_id, problem.reason)

    single("truncated", "JPEGImages", "truncated")
    single("not_image", "JPEGImages", "cannot read image")
    single("no_image", "JPEGImages", "no such file")
    single("no_xml", "Annotations", "no such file")
    single("bad_xml", "Annotations", "cannot parse XML")
    single("unknown_class", "Annotations", "unknown class name 'zebra'")
    single("difficult_unknown", "Annotations", "unknown class name 'zebra'")  # every object is checked
    single("no_area", "Annotations", "object 1 ('cat')", "xmin=10", "xmax=10", "no area")
    single("inverted", "Annotations", "no area")
    single("outside", "Annotations", "object 1", "xmax=62", "outside the 60x40")
    single("negative", "Annotations", "xmin=-1", "outside")
    single("nan", "Annotations", "not a finite number")
    assert [p.reason.split(":")[0] for p in bad["both_bad"]] == [
        "object 1 ('cat') box xmin=5 ymin=5 xmax=5 ymax=20",
        "object 2 ('dog') box xmin=5 ymin=5 xmax=20 ymax=50",
    ]

    text = report.format()
    assert text.splitlines()[0] == report.summary()
    assert "18 samples checked" in text and "13 bad" in text and "2 without objects" in text
    for problems in bad.values():
        for p in problems:
            assert f"  {p.path}: {p.reason}" in text


def test_check_is_the_same_with_threads(tmp_path):
    root = str(tmp_path / "voc")
    ids = [f"{i:03d}" for i in range(80)]
    for i, image_id in enumerate(ids):
        write_sample(root, image_id, objects=(("cat", 5, 5, 70 if i % 7 == 0 else 20, 20, 0),))
    write_split(root, "trainval", ids)
    db = VOCBboxDataset(root, label_names=NAMES)
    serial = check_dataset(db, progress=False, n_threads=1)
    threaded = check_dataset(db, progress=False, n_threads=4)
    assert serial.problems == threaded.problems and serial.bad_indices == list(range(0, 80, 7))


@pytest.mark.parametrize(("mode", "fmt"), [("L", "JPEG"), ("CMYK", "JPEG"), ("P", "PNG"), ("RGBA", "PNG"),
                                           ("1", "PNG")])
def test_grayscale_cmyk_palette_images_pass_and_load_as_rgb(tmp_path, mode, fmt):
    root = str(tmp_path / "voc")
    write_sample(root, "a", size=(48, 64), mode=mode, fmt=fmt)
    write_split(root, "trainval", ["a"])
    write_split(root, "test", ["a"])
    assert Image.open(os.path.join(root, "JPEGImages", "a.jpg")).mode == mode
    assert check_dataset(VOCBboxDataset(root, label_names=NAMES), progress=False).ok
    opt = types.SimpleNamespace(data="voc", voc_data_dir=root, toy_data_dir="", label_names=NAMES,
                                min_size=96, max_size=128, caffe_pretrain=False, seed=0)
    img, bbox, label, scale = Dataset(opt)[0]
    assert img.shape == (3, 96, 128) and img.dtype == np.float32 and scale == 2.0
    img, size, _, _, _ = TestDataset(opt)[0]
    assert img.shape == (3, 96, 128) and size == (48, 64)


def test_check_splits_stops_with_one_report_or_skips_with_warnings(tmp_path):
    root = str(tmp_path / "voc")
    for image_id in ("a", "b", "c", "t1", "t2"):
        write_sample(root, image_id)
    write_sample(root, "bad_box", objects=(("cat", 5, 5, 99, 20, 0),))
    write_sample(root, "bad_name", objects=(("cow", 5, 5, 20, 20, 0),))
    open(os.path.join(root, "JPEGImages", "b.jpg"), "w").write("garbage")
    write_split(root, "trainval", ["a", "bad_box", "b", "c"])
    write_split(root, "test", ["t1", "bad_name", "t2"])
    opt = types.SimpleNamespace(data="voc", voc_data_dir=root, toy_data_dir="", label_names=NAMES,
                                min_size=40, max_size=60, caffe_pretrain=False, seed=0)

    datasets = [Dataset(opt), TestDataset(opt)]
    with pytest.raises(DataCheckError) as info:
        check_splits(datasets, progress=False)
    message = str(info.value)
    assert message.startswith("3 bad sample(s), nothing was trained") and "--skip-bad-samples" in message
    for name in ("JPEGImages/b.jpg", "Annotations/bad_box.xml", "Annotations/bad_name.xml"):
        assert os.path.join(root, name) in message
    assert len(datasets[0]) == 4 and len(datasets[1]) == 3  # nothing dropped

    with pytest.warns(BadSampleWarning) as record:
        reports = check_splits(datasets, skip_bad_samples=True, progress=False)
    assert sorted(str(w.message).split("'")[1] for w in record) == ["b", "bad_box", "bad_name"]
    assert [r.bad_indices for r in reports] == [[1, 2], [1]]
    train, test = datasets
    assert train.ids == ["a", "c"] and test.ids == ["t1", "t2"] and len(train) == 2 and len(test) == 2
    for i in range(len(train)):
        assert train[i][0].shape == (3, 40, 60)
    assert test[1][1] == (40, 60)


def test_check_splits_with_nothing_left_is_an_error(tmp_path):
    root = str(tmp_path / "voc")
    write_sample(root, "good")
    write_sample(root, "bad", objects=(("cow", 5, 5, 20, 20, 0),))
    write_split(root, "trainval", ["good"])
    write_split(root, "test", ["bad"])
    write_split(root, "empty", [])
    opt = types.SimpleNamespace(data="voc", voc_data_dir=root, toy_data_dir="", label_names=NAMES,
                                min_size=40, max_size=60, caffe_pretrain=False, seed=0)
    with pytest.raises(DataCheckError, match="no good sample left in test"):
        check_splits([Dataset(opt), TestDataset(opt)], skip_bad_samples=True, progress=False)
    report = check_dataset(VOCBboxDataset(root, split="empty", label_names=NAMES), progress=False)
    assert not report.ok and "empty.txt: lists no image id" in report.format()


def test_check_sample_of_the_toy_set_is_clean(tmp_path):
    root = generate_toy_voc(tmp_path / "toy", n_trainval=6, n_test=3, seed=3)
    db = VOCBboxDataset(root, "test", label_names=TOY_LABEL_NAMES)
    assert all(check_sample(db, i)[0] == [] for i in range(len(db)))


# --- the signal handling ------------------------------------------------------------------------------------
def test_first_signal_requests_a_stop_second_quits():
    before = signal.getsignal(signal.SIGINT)
    with StopSignals() as stop:
        stop.check()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signum == signal.SIGTERM
        with pytest.raises(StopRequested) as info:
            stop.check()
        assert info.value.exit_code == 143
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs here at the latest
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def test_signals_during_a_critical_section_wait_for_its_end(capfd):
    written = []
    with StopSignals() as stop:
        with stop.critical():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C again during the write
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            written.append("complete")
        assert written == ["complete"] and stop.signum == signal.SIGINT
        with pytest.raises(StopRequested):
            stop.check()
    err = capfd.readouterr().err
    assert err.count("stopping after the current step") == 1 and err.count("being written") == 2


def test_worker_init_ignores_stop_signals():
    code = ("import os, signal; from utils.interrupt import ignore_stop_signals; ignore_stop_signals(0); "
            "os.kill(os.getpid(), signal.SIGINT); os.kill(os.getpid(), signal.SIGTERM); print('alive')")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "alive"


# --- training runs on a tiny tree ---------------------------------------------------------------------------
N_TRAIN, N_TEST = 6, 3


@pytest.fixture(scope="module")
def tiny_voc(tmp_path_factory):
    """A toy tree of N_TRAIN training and N_TEST test images, read as VOC data with the toy class names."""
    root = tmp_path_factory.mktemp("tiny") / "voc"
    return generate_toy_voc(root, n_trainval=N_TRAIN, n_test=N_TEST, seed=2)


def tiny_options(voc_dir, save_dir, epochs=2, **overrides) -> dict:
    """The toy preset, made smaller: an epoch of the tiny tree takes about a second."""
    options = {**TOY_PRESET, "data": "voc", "voc_data_dir": str(voc_dir), "label_names": TOY_LABEL_NAMES,
               "save_dir": str(save_dir), "run_name": "run", "epoch": epochs, "lr_decay_epoch": 0,
               "num_workers": 0, "test_num_workers": 0, "test_num": N_TEST, "min_size": 96, "max_size": 128,
               "n_train_pre_nms": 600, "n_train_post_nms": 100, "n_test_pre_nms": 300, "n_test_post_nms": 50,
               "plot_every": 4, "use_visdom": False, "seed": 0}
    options.update(overrides)
    return options


def as_flags(options: dict) -> list:
    """``{key: value}`` -> ``['--key=value', ...]`` as typed on a command line."""
    flags = []
    for key, value in options.items():
        if isinstance(value, (tuple, list)):
            value = ",".join(map(str, value))
        flags.append(f"--{key.replace('_', '-')}={value}")
    return flags


def run_cli(*args, cwd, env=None, timeout=300):
    return subprocess.run([sys.executable, os.path.join(REPO, "train.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=cli_env(env))


def cli_env(extra=None):
    return {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", **(extra or {})}


def model_state(path):
    return load_checkpoint(path)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


class SignalAtStep:
    """Monkeypatches ``FasterRCNNTrainer.train_step`` to send ``signum`` to this process after step ``at``."""

    def __init__(self, monkeypatch, at, signum=signal.SIGINT):
        self.calls = 0
        original = trainer_module.FasterRCNNTrainer.train_step

        def train_step(trainer, *args):
            losses = original(trainer, *args)
            self.calls += 1
            if self.calls == at:
                os.kill(os.getpid(), signum)
            return losses

        monkeypatch.setattr(trainer_module.FasterRCNNTrainer, "train_step", train_step)


# --- 2. training faults -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("lr_decay_epoch", "position", "batch_size"), [
    (0, 2, 1),  # stopped in epoch 1 after the lr decay of epoch 0
    (1, 2, 1),  # stopped in epoch 1, whose end decays the lr (after the resume)
    (1, N_TRAIN, 1),  # stopped after the last step of epoch 1: the resumed run starts with its evaluation
    (1, 1, 2),  # batches of two: stopped after the first step of epoch 1
])
def test_sigint_mid_epoch_saves_and_the_resumed_run_equals_an_uninterrupted_one(
        tiny_voc, tmp_path, monkeypatch, one_thread, lr_decay_epoch, position, batch_size):
    epochs = 3
    steps = -(-N_TRAIN // batch_size)  # per epoch
    reference = tiny_options(tiny_voc, tmp_path, epochs, run_name="reference", lr_decay_epoch=lr_decay_epoch,
                             batch_size=batch_size)
    train_module.train(**reference)

    stop_at = steps + position
    SignalAtStep(monkeypatch, stop_at, signal.SIGTERM if position == steps else signal.SIGINT)
    options = tiny_options(tiny_voc, tmp_path, epochs, lr_decay_epoch=lr_decay_epoch, batch_size=batch_size)
    with pytest.raises(StopRequested) as info:
        train_module.train(**options)
    assert info.value.exit_code == (143 if position == steps else 130)
    last = tmp_path / "run" / "last.pth"
    info = load_checkpoint(last)["other_info"]
    assert info["epoch"] == 1 and info["iteration"] == stop_at and info["epoch_position"] == position
    assert sorted(i for batch in info["epoch_batches"] for i in batch) == list(range(N_TRAIN))
    assert {len(batch) for batch in info["epoch_batches"]} == {batch_size}
    lr = TOY_PRESET["lr"] * batch_size  # the toy preset scales the lr with the images per step
    assert info["lr"] == pytest.approx(lr * (0.1 if lr_decay_epoch == 0 else 1))
    monkeypatch.undo()

    train_module.train(**options, load_path=str(last))
    info = load_checkpoint(last)["other_info"]
    assert info["epoch"] == epochs and info["iteration"] == epochs * steps and "epoch_batches" not in info
    reference_info = load_checkpoint(tmp_path / "reference" / "last.pth")["other_info"]
    assert info["best_map"] == reference_info["best_map"] and info["lr"] == reference_info["lr"]
    # same weights, momentum, random draws (creators, flips, shuffles): bit-identical to the uninterrupted run
    assert_same_weights(model_state(last), model_state(tmp_path / "reference" / "last.pth"))
    assert_same_weights(model_state(tmp_path / "run" / "best.pth"),
                        model_state(tmp_path / "reference" / "best.pth"))


def test_an_older_checkpoint_s_epoch_order_resumes_as_batches_of_one():
    from utils.run_state import RunState

    state = RunState.from_other_info({"epoch": 2, "epoch_order": [2, 0, 1], "epoch_position": 1}, 3, 9)
    assert state.batches == [[2], [0], [1]] and state.position == 1 and state.epoch == 2
    with pytest.warns(UserWarning, match="restarts from its beginning"):
        state = RunState.from_other_info({"epoch": 2, "epoch_batches": [[0, 1]], "epoch_position": 1}, 3, 9)
    assert state.batches is None and state.position == 0


def test_resuming_from_the_best_checkpoint_written_before_the_lr_decay(tiny_voc, tmp_path, one_thread):
    """At the decay epoch best.pth is written before the decay and last.pth after it; a kill between the two
    leaves best.pth the newest checkpoint: resuming from it must still decay the lr (once)."""
    reference = tmp_path / "reference"
    train_module.train(**tiny_options(tiny_voc, tmp_path, epochs=1, run_name="reference", lr_decay_epoch=0))
    (tmp_path / "killed").mkdir()
    best = str(tmp_path / "killed" / "best.pth")
    os.replace(reference / "best.pth", best)  # as if killed before last.pth: resume from this one
    info = load_checkpoint(best)["other_info"]
    assert info["epoch"] == 1 and not info["lr_decayed"] and info["lr"] == TOY_PRESET["lr"]
    for run_name, load_path in (("reference", reference / "last.pth"), ("killed", best)):
        train_module.train(**tiny_options(tiny_voc, tmp_path, epochs=2, run_name=run_name, lr_decay_epoch=0),
                           load_path=str(load_path))
    ours, theirs = (load_checkpoint(tmp_path / name / "last.pth") for name in ("killed", "reference"))
    assert ours["other_info"]["lr"] == theirs["other_info"]["lr"] == pytest.approx(TOY_PRESET["lr"] * 0.1)
    assert_same_weights(ours["model"], theirs["model"])


def test_second_sigint_during_the_save_does_not_corrupt_it(tiny_voc, tmp_path, monkeypatch, capfd):
    SignalAtStep(monkeypatch, 3)
    original_save = trainer_module.save_checkpoint
    saves = []

    def save_checkpoint(obj, path):
        saves.append(obj["other_info"].get("epoch_position"))
        os.kill(os.getpid(), signal.SIGINT)  # the impatient user presses Ctrl-C again
        time.sleep(0.05)
        return original_save(obj, path)

    monkeypatch.setattr(trainer_module, "save_checkpoint", save_checkpoint)
    options = tiny_options(tiny_voc, tmp_path, epochs=2)
    with pytest.raises(StopRequested):
        train_module.train(**options)
    assert saves == [3]  # the interrupt checkpoint only, written completely
    info = load_checkpoint(tmp_path / "run" / "last.pth")["other_info"]
    assert info["epoch"] == 0 and info["epoch_position"] == 3 and info["iteration"] == 3
    assert not [f for f in os.listdir(tmp_path / "run") if f.endswith(".tmp")]
    err = capfd.readouterr().err
    assert "SIGINT: stopping after the current step" in err and "being written" in err


def test_non_finite_loss_names_the_image_and_iteration_and_keeps_the_checkpoints(tiny_voc, tmp_path,
                                                                                monkeypatch):
    """A poisoned image (NaN pixels) in epoch 1: the run stops before the step; epoch 0's files are intact."""
    run = tmp_path / "run"
    fetched, poisoned, snapshot = [], {}, {}
    original = Dataset.__getitem__

    def getitem(dataset, i):
        item = original(dataset, i)
        fetched.append(dataset.ids[i])
        if len(fetched) == N_TRAIN + 4:  # the fourth image of epoch 1
            poisoned.update(id=dataset.ids[i], iteration=len(fetched))
            snapshot.update({name: (run / name).read_bytes() for name in ("best.pth", "last.pth")})
            item[0][:, :8, :8] = np.nan
        return item

    monkeypatch.setattr(Dataset, "__getitem__", getitem)
    with pytest.raises(NonFiniteLossError) as info:
        train_module.train(**tiny_options(tiny_voc, tmp_path, epochs=3))
    message = str(info.value)
    assert f"iteration {poisoned['iteration']} " in message and "epoch 1" in message
    assert f"image id {poisoned['id']!r}" in message and f"{poisoned['id']}.jpg" in message
    assert "nan" in message and str(run / "last.pth") in message
    for name, data in snapshot.items():  # untouched, and they load
        assert (run / name).read_bytes() == data
        ckpt = load_checkpoint(run / name)
        assert ckpt["other_info"]["epoch"] == 1 and ckpt["other_info"]["iteration"] == N_TRAIN
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


# --- 3. checkpoints are read safely everywhere --------------------------------------------------------------
def _repo_sources():
    """``(path, source)`` of every Python file of the project and of the notebook's code cells (tests left
    out: they call ``torch.load(weights_only=False)`` on purpose, to show what a payload would do)."""
    for folder, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("tests", "__pycache__", "build")]
        for name in files:
            path = os.path.join(folder, name)
            if name.endswith(".py"):
                yield path, open(path, encoding="utf-8").read()
            elif name.endswith(".ipynb"):
                cells = json.load(open(path, encoding="utf-8"))["cells"]
                code = [
                    "".join(c["source"]) for c in cells if c["cell_type"] == "code"]
                lines = "\n".join(code).splitlines()
                yield path, "\n".join(line for line in lines if not line.lstrip().startswith(("%", "!")))


def _unsafe_loads(tree: ast.AST) -> list[str]:
    """Calls in ``tree`` that could unpickle code: ``torch.load`` without ``weights_only=True``, any
    ``pickle.load(s)``/``Unpickler``, ``numpy.load(allow_pickle=True)``."""
    found = []
    loads = {"torch.load"}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("torch", "pickle", "dill", "joblib"):
            for alias in node.names:
                if alias.name in ("load", "loads", "Unpickler"):
                    found.append((node.lineno, f"from {node.module} import {alias.name}"))
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        keywords = {k.arg: k.value for k in node.keywords}
        if name in loads:
            value = keywords.get("weights_only")
            if not (isinstance(value, ast.Constant) and value.value is True):
                found.append((node.lineno, ast.unparse(node)))
        elif name.split(".")[-1] in ("load", "loads", "Unpickler") and name.split(".")[0] in (
                "pickle", "cPickle", "dill", "joblib", "_pickle"):
            found.append((node.lineno, ast.unparse(node)))
        elif name in ("np.load", "numpy.load"):
            value = keywords.get("allow_pickle")
            if value is not None and not (isinstance(value, ast.Constant) and value.value is False):
                found.append((node.lineno, ast.unparse(node)))
    return [f"line {lineno}: {code}" for lineno, code in sorted(found)]


def test_the_scan_catches_unsafe_loads():
    lines = ["torch.load(p)", "torch.load(p, weights_only=False)", "torch.load(p, weights_only=flag)",
             "torch.load(p, map_location='cpu', weights_only=True)", "pickle.loads(b)",
             "np.load(p, allow_pickle=True)", "np.load(p)", "from torch import load", "x.load(p)"]
    found = _unsafe_loads(ast.parse("\n".join(lines)))
    assert [f.split(":")[0] for f in found] == ["line 1", "line 2", "line 3", "line 5", "line 6", "line 8"]


def test_no_checkpoint_is_loaded_without_weights_only():
    sources = dict(_repo_sources())
    assert os.path.join(REPO, "demo.ipynb") in sources and os.path.join(REPO, "train.py") in sources
    assert any("misc" in path for path in sources)
    unsafe = {path: found for path, source in sources.items() if (found := _unsafe_loads(ast.parse(source)))}
    assert unsafe == {}
    # and the checkpoint readers go through the one safe entry point
    for name in ("utils/run_state.py", "utils/evaluation.py", "trainer.py", "demo.py", "demo.ipynb"):
        source = sources[os.path.join(REPO, name)]
        assert "load_checkpoint(" in source or "trainer.load(" in source, name


def _writes_a_file(func: str) -> bool:
    writers = ("torch.save", "save", "mkstemp", "tempfile.mkstemp", "os.replace")
    return func in writers or func.endswith("savefig")


def test_checkpoints_and_run_files_are_written_only_through_atomic_write():
    writers = {}
    for path, source in _repo_sources():
        calls = [ast.unparse(node) for node in ast.walk(ast.parse(source))
                 if isinstance(node, ast.Call) and _writes_a_file(ast.unparse(node.func))]
        if calls:
            writers[os.path.relpath(path, REPO)] = sorted(calls)
    assert writers == {
        os.path.join("utils", "checkpoint.py"): ["torch.save(obj, f)"],
        os.path.join("utils", "files.py"): [
            "os.replace(tmp_path, path)",
            "tempfile.mkstemp(dir=folder, prefix=f'.{os.path.basename(path)}.{os.getpid()}.', "
            "suffix='.tmp')"],
        os.path.join("utils", "vis_tool.py"): ["fig.savefig(f, format='png')"],  # inside atomic_write
        "demo.py": ["draw_detections(img, bbox, label, score, class_names).savefig(os.path.join(out, stem + "
                    "ext))"],  # a picture for the user, not run state
    }


def test_stale_temp_files_of_killed_saves_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    names = [f".last.pth.{dead}.k2j4.tmp", f".best.pth.{dead}.x_9q.tmp",  # a killed process's
             f".history.jsonl.{dead}.x8a_.tmp", f".curves.png.{dead}.0q1w.tmp",
             f".last.pth.{os.getpid()}.abcd.tmp",  # a save in progress in a live process
             "last.pth", "notes.tmp"]  # not temp files of atomic_write
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    removed = remove_stale_temp_files(tmp_path)
    assert sorted(removed) == sorted(str(tmp_path / n) for n in names[:4])
    assert sorted(os.listdir(tmp_path)) == sorted(names[4:])
    assert remove_stale_temp_files(tmp_path / "missing") == []


def test_a_kill_during_a_history_write_leaves_a_temp_file_the_next_run_removes(tmp_path):
    """The dashboard's files go through the same atomic writer as checkpoints: a SIGKILL inside the write of
    history.jsonl leaves the old file whole and a temp file that the start of the next run cleans up."""
    from utils.run_state import TrainingRun
    from utils.vis_tool import Visualizer

    run = tmp_path / "run"
    Visualizer(log_dir=run, use_visdom=False).plot("loss", 1.0)  # history.jsonl with one point
    before = (run / "history.jsonl").read_bytes()
    script = ("from utils.vis_tool import Visualizer; import sys; vis = Visualizer(log_dir=sys.argv[1], "
              "use_visdom=False, flush_every=1e9); vis.plot('loss', 2.0); vis.flush()")
    proc = subprocess.Popen([sys.executable, "-c", script, str(run)], cwd=REPO,
                            env=cli_env({SAVE_PAUSE_ENV: "30"}))
    try:
        assert wait_for(lambda: [f for f in os.listdir(run) if f.startswith(".history.jsonl.")], proc,
                        timeout=60)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    leftovers = [f for f in os.listdir(run) if f.endswith(".tmp")]
    assert leftovers and (run / "history.jsonl").read_bytes() == before
    TrainingRun(None, None, None, None, str(run), 0, 0.1)  # a run starting in this folder
    assert [f for f in os.listdir(run) if f.endswith(".tmp")] == []


class Payload:
    """Unpickling this creates ``marker`` (what a hostile checkpoint would do, harmlessly)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def toy_checkpoint(path, n_fg_class=None, payload_marker=None):
    """A checkpoint of the tiny run's model (``n_fg_class`` classes), optionally with a pickle payload."""
    cfg = Config.parse(tiny_options(".", "."))
    names = TOY_LABEL_NAMES if n_fg_class is None else [f"c{i}" for i in range(n_fg_class)]
    model = train_module.build_model(cfg, len(names))
    trainer = trainer_module.FasterRCNNTrainer.from_config(model, cfg, class_names=names)
    trainer.save(path, epoch=1, best_map=0.5, iteration=6)
    if payload_marker is not None:
        ckpt = torch.load(path, weights_only=True)
        ckpt["other_info"]["best_map"] = Payload(payload_marker)
        torch.save(ckpt, path)
    return str(path)


@pytest.mark.slow
def test_cli_refuses_hostile_and_mismatched_checkpoints(tiny_voc, tmp_path):
    marker = tmp_path / "payload_ran"
    evil = toy_checkpoint(tmp_path / "evil.pth", payload_marker=marker)
    three = toy_checkpoint(tmp_path / "three_classes.pth", n_fg_class=3)
    flags = as_flags(tiny_options(tiny_voc, tmp_path, epochs=1))
    commands = {
        "train_evil": ["train", *flags, f"--load-path={evil}"],
        "eval_evil": ["eval", f"--load-path={evil}", f"--voc-data-dir={tiny_voc}", "--test-num-workers=0"],
        "train_three": ["train", *flags, f"--load-path={three}"],
    }
    results = run_cli_many(commands, cwd=tmp_path)
    for name in ("train_evil", "eval_evil"):
        proc = results[name]
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr + proc.stdout
        assert f"train.py: error: checkpoint {evil!r} was refused" in proc.stderr
        assert "nothing in it was executed" in proc.stderr
    assert not marker.exists()
    proc = results["train_three"]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout
    assert f"checkpoint {three!r} was trained for 3 classes" in proc.stderr
    assert f"this model has {len(TOY_LABEL_NAMES)} classes" in proc.stderr
    assert not os.path.exists(tmp_path / "run" / "last.pth")  # nothing was trained
    # the payload is live: unrestricted loading would have run it
    torch.load(evil, weights_only=False)
    assert marker.exists()


def run_cli_many(commands: dict, cwd, env=None) -> dict:
    """Run ``python train.py <args>`` for each entry at once; ``{name: CompletedProcess}``."""
    procs = {name: subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), *map(str, args)],
                                    cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env=cli_env(env))
             for name, args in commands.items()}
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return results


# --- 4. command line ----------------------------------------------------------------------------------------
def assert_short_error(returncode, err, text):
    assert returncode == 2, (returncode, err)
    assert err.startswith("train.py: error: ") and text in err, err
    assert "Traceback" not in err and len(err.splitlines()) <= 2, err


@pytest.mark.slow
def test_cli_errors_are_short_and_help_lists_the_options(tmp_path):
    """In a real process: what reaches the terminal (no traceback from the interpreter), the exit status."""
    commands = {
        "unknown": ["train", "--epoh=3"],
        "type": ["train", "--epoch=abc"],
        "folder": ["train", f"--voc-data-dir={tmp_path / 'nowhere'}"],
        "help": ["train", "--help"],
    }
    results = run_cli_many(commands, cwd=tmp_path)
    for name, text in [("unknown", "unknown option --epoh (did you mean --epoch?)"),
                       ("type", "option --epoch expects int, got 'abc'"),
                       ("folder", f"data folder not found: {tmp_path / 'nowhere'}")]:
        proc = results[name]
        assert proc.stdout == "" or "Traceback" not in proc.stdout
        assert_short_error(proc.returncode, proc.stderr, text)

    proc = results["help"]
    assert proc.returncode == 0 and proc.stderr == ""
    assert Config.help_text() in proc.stdout
    for flag, default in (("--epoch", "14"), ("--lr", "0.001"), ("--skip-bad-samples", "False"),
                          ("--load-path", "None"), ("--use-visdom", "True")):
        (line,) = [row for row in proc.stdout.splitlines() if row.strip().startswith(flag + " ")]
        assert f"(default: {default}" in line, line


@pytest.mark.parametrize(("argv", "text"), [
    (["eval"], "eval needs --load-path=CHECKPOINT"),
    (["eval", "--load-path=/nowhere/missing.pth"], "checkpoint '/nowhere/missing.pth' does not exist"),
    (["fit"], "unknown command 'fit' (commands: train, eval"),
    (["train", "--lr=-1"], "option --lr must be > 0"),
    (["train", "--data=cocoa"], "option --data must be one of ['voc', 'coco', 'toy', 'toy-coco']"),
])
def test_cli_usage_errors(capsys, argv, text):
    returncode = train_module.main(argv)
    out, err = capsys.readouterr()
    assert_short_error(returncode, err, text)


def test_a_newcomer_without_voc_data_is_told_where_to_get_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no data/VOCdevkit here
    returncode = train_module.main(["train"])
    err = capsys.readouterr().err
    assert_short_error(returncode, err, "data folder not found: data/VOCdevkit/VOC2007")
    assert "README" in err and "Train on Pascal VOC 2007" in err and "--data=toy" in err


def test_offline_imagenet_weights_are_one_line_not_three_tracebacks(tiny_voc, tmp_path, monkeypatch, capsys):
    def no_download(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    options = tiny_options(tiny_voc, tmp_path, epochs=1, backbone="vgg16")
    returncode = train_module.main(["train", *as_flags(options)])
    err = capsys.readouterr().err
    last = err.rstrip().splitlines()[-1].split("\r")[-1]  # after the data check's progress bars
    assert_short_error(returncode, last + "\n", "pretrained='torchvision' (ImageNet VGG16): cannot download")
    assert "Traceback" not in err and "During handling" not in err
    assert str(tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth") in last and "--caffe-pretrain" in last


def test_cli_help_lists_the_commands(capsys):
    assert train_module.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "eval" in out and "train.py train --help" in out
    assert train_module.main([]) == 2  # no command: the same text, as an error
    assert "python train.py COMMAND" in capsys.readouterr().err
    assert train_module.main(["eval", "-h"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python train.py eval") and "--load-path" in out


@pytest.mark.slow
def test_cli_bad_data_is_one_report_or_skipped(tmp_path):
    root = tmp_path / "voc"
    generate_toy_voc(root, n_trainval=N_TRAIN, n_test=N_TEST, seed=2)
    ids = [line.strip() for line in open(root / "ImageSets" / "Main" / "trainval.txt")]
    test_ids = [line.strip() for line in open(root / "ImageSets" / "Main" / "test.txt")]
    jpeg = root / "JPEGImages" / f"{ids[1]}.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:300])  # truncated
    xml = root / "Annotations" / f"{test_ids[0]}.xml"
    xml.write_text(xml.read_text().replace("<name>", "<name>x", 1))  # unknown class
    flags = as_flags(tiny_options(root, tmp_path, epochs=1))
    results = run_cli_many({"stop": ["train", *flags], "skip": ["train", *flags, "--skip-bad-samples"]},
                           cwd=tmp_path)
    proc = results["stop"]
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr
    assert "train.py: error: 2 bad sample(s), nothing was trained" in proc.stderr
    assert f"{jpeg}: cannot read image" in proc.stderr and f"{xml}: unknown class name 'x" in proc.stderr

    proc = results["skip"]
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    for bad in (ids[1], test_ids[0]):
        assert f"warning: skipping sample '{bad}'" in proc.stderr
    assert f"trainval ({root}): {N_TRAIN} samples checked" in proc.stdout
    info = load_checkpoint(tmp_path / "run" / "last.pth")["other_info"]
    assert info["iteration"] == N_TRAIN - 1  # the bad sample was left out


# --- 5. visdom down or dying --------------------------------------------------------------------------------
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_training_with_no_visdom_server_warns_once_and_completes(tiny_voc, tmp_path):
    options = tiny_options(tiny_voc, tmp_path, epochs=1, use_visdom=True, port=free_port(),
                           visdom_server="http://127.0.0.1")
    with pytest.warns(VisdomUnavailableWarning) as record:
        train_module.train(**options)
    assert len([w for w in record if w.category is VisdomUnavailableWarning]) == 1
    assert load_checkpoint(tmp_path / "run" / "last.pth")["other_info"]["epoch"] == 1


@pytest.mark.slow
def test_training_survives_the_visdom_server_dying_mid_run(tiny_voc, tmp_path, monkeypatch):
    from test_vis_tool import VisdomServer

    (tmp_path / "visdom").mkdir()
    server = VisdomServer(tmp_path / "visdom")
    plots = []
    original = Visualizer.plot_many

    def plot_many(vis, *args, **kwargs):
        plots.append(vis.connected)
        if len(plots) == 2:
            server.stop()  # dies between two plot steps
        return original(vis, *args, **kwargs)

    monkeypatch.setattr(Visualizer, "plot_many", plot_many)
    options = tiny_options(tiny_voc, tmp_path, epochs=2, use_visdom=True, port=server.port,
                           visdom_server="http://127.0.0.1", plot_every=2)
    try:
        with pytest.warns(VisdomUnavailableWarning) as record:
            train_module.train(**options)
    finally:
        server.stop()
    assert len([w for w in record if w.category is VisdomUnavailableWarning]) == 1
    assert "stopped answering" in str(record[0].message)
    assert plots[:2] == [True, True] and not any(plots[2:]) and len(plots) == 2 * N_TRAIN // 2
    assert load_checkpoint(tmp_path / "run" / "last.pth")["other_info"]["epoch"] == 2
    history = [json.loads(line) for line in open(tmp_path / "run" / "history.jsonl")]
    assert sum(r["name"] == "test_map" for r in history) == 2


# --- 6. kills at any moment ---------------------------------------------------------------------------------
def checkpoints_by_age(run):
    """The ``*.pth`` files of ``run``, oldest first (the last one is the newest checkpoint)."""
    if not os.path.isdir(run):
        return []
    return sorted((os.path.join(run, f) for f in os.listdir(run) if f.endswith(".pth")), key=os.path.getmtime)


def checkpoint_temp_files(run):
    return [f for f in os.listdir(run) if f.endswith(".tmp") and ".pth." in f] if os.path.isdir(run) else []


def wait_for(condition, proc, timeout=120):
    """Poll ``condition()`` until true; False if ``proc`` ended first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
    return True


def wait_for_write(run, proc, n):
    """Wait until the ``n``-th checkpoint temp file of ``proc``'s run appears; False if ``proc`` ended."""
    seen = set()
    while len(seen) < n:
        if not wait_for(lambda known=seen: set(checkpoint_temp_files(run)) - known, proc):
            return False
        seen |= set(checkpoint_temp_files(run))
    return True


def start_training(args, log_dir, name, env=None):
    out = open(os.path.join(log_dir, f"{name}.out"), "w")
    err = open(os.path.join(log_dir, f"{name}.err"), "w")
    env = {"PYTHONUNBUFFERED": "1", **(env or {})}  # a killed process leaves all its output
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), "train", *args], cwd=log_dir,
                            stdout=out, stderr=err, env=cli_env(env), start_new_session=True)
    proc.logs = (out, err)
    return proc


def finish(proc):
    """Wait for ``proc``; ``(returncode, stdout, stderr)``."""
    returncode = proc.wait(timeout=300)
    for f in proc.logs:
        f.close()
    out, err = (open(f.name).read() for f in proc.logs)
    return returncode, out, err


@pytest.mark.slow
def test_sigkill_at_random_moments_never_leaves_a_bad_checkpoint_and_resumes(tiny_voc, tmp_path):
    """Kills at seeded random moments and inside checkpoint writes (held open by a test-only pause); after
    each, every checkpoint loads and the next run resumes from the newest; the last run finishes the job with
    the very weights of an uninterrupted run."""
    rng = random.Random(7)
    epochs = 12  # about a second each: the kills spread over the job
    run = tmp_path / "run"
    options = tiny_options(tiny_voc, tmp_path, epochs, lr_decay_epoch=1)
    env = {SAVE_PAUSE_ENV: "0.3"}
    newest, epochs_seen, kinds = None, [], []
    for attempt in range(8):
        args = as_flags(options) + ([f"--load-path={newest}"] if newest else [])
        proc = start_training(args, tmp_path, f"attempt{attempt}", env)
        if attempt % 2:  # inside the 1st, 2nd, 3rd... write of the run: temp file complete, not renamed
            if wait_for_write(run, proc, attempt // 2 + 1):
                kinds.append("write")
        else:
            time.sleep(rng.uniform(2.0, 6.0))
            kinds.append("random")
        os.killpg(proc.pid, signal.SIGKILL)
        returncode, out, err = finish(proc)
        assert returncode == -signal.SIGKILL, err[-3000:]
        files = checkpoints_by_age(run)
        for path in files:
            load_checkpoint(path)  # never corrupt, never half-written
        if newest is not None and "resumed from" in out:
            resumed = rf"resumed from {re.escape(str(newest))}: (the start of )?epoch {epochs_seen[-1]},"
            assert re.search(resumed, out), out[-2000:]
        newest = files[-1] if files else None
        epochs_seen.append(load_checkpoint(newest)["other_info"]["epoch"] if newest else 0)
    assert kinds.count("write") == 4 and epochs_seen == sorted(epochs_seen) and epochs_seen[-1] >= 1

    final = start_training(as_flags(options) + [f"--load-path={newest}"], tmp_path, "final")
    reference = start_training(as_flags({**options, "run_name": "reference"}), tmp_path, "reference")
    for proc in (final, reference):
        returncode, out, err = finish(proc)
        assert returncode == 0, err[-3000:]
    assert re.search(rf"resumed from {re.escape(str(newest))}: (the start of )?epoch {epochs_seen[-1]},",
                     open(tmp_path / "final.out").read())
    info = load_checkpoint(run / "last.pth")["other_info"]
    assert info["epoch"] == epochs and info["iteration"] == epochs * N_TRAIN
    assert_same_weights(model_state(run / "last.pth"), model_state(tmp_path / "reference" / "last.pth"))
    assert checkpoint_temp_files(run) == []  # the killed writes' temp files were cleaned up


@pytest.mark.slow
def test_ctrl_c_reaching_the_data_loader_workers_too_saves_and_resumes(tiny_voc, tmp_path):
    """Ctrl-C in a terminal signals the whole process group: the main process and its DataLoader workers."""
    run = tmp_path / "run"
    flags = as_flags(tiny_options(tiny_voc, tmp_path, epochs=3, num_workers=1, test_num_workers=1))
    proc = start_training(flags, tmp_path, "interrupted")
    assert wait_for(lambda: os.path.exists(run / "last.pth"), proc)  # epoch 0 is done
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGINT)
    returncode, out, err = finish(proc)
    assert returncode == 130, err[-3000:]
    assert "Traceback" not in out + err
    assert "SIGINT: stopping after the current step" in err
    assert f"--load-path={run / 'last.pth'}" in out
    info = load_checkpoint(run / "last.pth")["other_info"]
    assert info["epoch"] >= 1

    returncode, out, err = finish(start_training(flags + [f"--load-path={run / 'last.pth'}"], tmp_path,
                                                 "resumed"))
    assert returncode == 0, err[-3000:]
    info = load_checkpoint(run / "last.pth")["other_info"]
    assert info["epoch"] == 3 and info["iteration"] == 3 * N_TRAIN
