"""Training really learns: a seeded run on the toy data set reaches a mAP threshold after a fixed number of
iterations (counted, never timed), and ``train.py train`` / ``eval`` / resume work end to end in a
subprocess on a tiny VOC tree written by the toy generator."""

import itertools
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader

from data.dataset import Dataset, TestDataset
from data.toy_dataset import TOY_LABEL_NAMES, ensure_toy_voc, generate_toy_voc
from train import build_model, evaluates_after
from trainer import FasterRCNNTrainer
from utils.checkpoint import load_checkpoint
from utils.config import TOY_PRESET, Config
from utils.evaluation import eval_loader, evaluate

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The learning test: this many training iterations of the toy preset (one thread), then VOC07 mAP on the first
# LEARN_TEST_NUM test images must reach LEARN_MIN_MAP. Seeded, so the run is the same every time: it reaches
# 0.427 on the x86_64 CPU this was written on (an untrained model scores about 0.01); the threshold leaves
# room for other CPUs' float rounding.
LEARN_ITERATIONS = 1000
LEARN_TEST_NUM = 60
LEARN_MIN_MAP = 0.25


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    """The default toy data set (650 images, a few seconds to generate)."""
    return ensure_toy_voc(tmp_path_factory.mktemp("toy") / "toy_voc")


def test_seeded_toy_training_reaches_the_map_threshold(toy_root, one_thread):
    torch.manual_seed(0)
    cfg = Config.parse({"data": "toy", "toy_data_dir": toy_root, "seed": 0, "num_workers": 0})
    dataset = Dataset(cfg)
    model = build_model(cfg, len(dataset.label_names))
    trainer = FasterRCNNTrainer.from_config(model, cfg, class_names=dataset.label_names)
    loader = DataLoader(dataset, batch_size=1, shuffle=True, generator=torch.Generator().manual_seed(0))
    batches = itertools.islice(itertools.chain.from_iterable(itertools.repeat(loader)), LEARN_ITERATIONS)
    totals = [trainer.train_step(img, bbox, label, scale).total_loss.item()
              for img, bbox, label, scale in batches]
    first, last = sum(totals[:20]) / 20, sum(totals[-100:]) / 100
    print(f"mean total loss: first 20 iterations {first:.3f}, last 100 {last:.3f}")
    assert last < 0.7 * first
    result = evaluate(eval_loader(TestDataset(cfg), test_num=LEARN_TEST_NUM), model, progress=False)
    print(f"mAP after {LEARN_ITERATIONS} iterations: {result['map']:.4f}, AP {result['ap']}")
    assert result["map"] >= LEARN_MIN_MAP


# --- train.py end to end ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_voc(tmp_path_factory):
    """A toy tree of 12 training and 6 test images, read as VOC data with the toy class names."""
    return generate_toy_voc(tmp_path_factory.mktemp("tiny") / "voc", n_trainval=12, n_test=6, seed=1)


def _cli(*args, cwd):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _tiny_options(tiny_voc, save_dir, epochs):
    """The toy preset on the tiny tree: ``--data=voc`` with the toy class names and backbone."""
    preset = {**TOY_PRESET, "epoch": epochs, "lr_decay_epoch": 0, "num_workers": 0, "test_num_workers": 0,
              "plot_every": 5}
    options = [f"--{key.replace('_', '-')}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
               for key, v in preset.items()]
    return options + [
        "--data=voc", f"--voc-data-dir={tiny_voc}", f"--label-names={','.join(TOY_LABEL_NAMES)}",
        f"--save-dir={save_dir}", "--run-name=run", "--test-num=5"]


def test_train_eval_and_resume_from_the_command_line(tiny_voc, tmp_path):
    out = _cli("train", *_tiny_options(tiny_voc, tmp_path, epochs=2), cwd=tmp_path)
    run = tmp_path / "run"
    assert {"best.pth", "last.pth", "history.jsonl", "curves.png"} <= set(os.listdir(run))
    assert "epoch 0: test mAP" in out and "epoch 1: test mAP" in out
    assert "final test mAP:" in out and str(run / "best.pth") in out
    last = load_checkpoint(run / "last.pth")
    assert last["other_info"]["epoch"] == 2 and last["other_info"]["iteration"] == 24
    assert last["arch"]["name"] == "toy" and last["class_names"] == list(TOY_LABEL_NAMES)
    # the lr decayed once, after epoch 0
    assert last["other_info"]["lr"] == pytest.approx(TOY_PRESET["lr"] * 0.1)
    names = {json.loads(line)["name"] for line in (run / "history.jsonl").read_text().splitlines()}
    assert {"total_loss", "test_map"} <= names

    out = _cli("eval", f"--load-path={run / 'best.pth'}", f"--voc-data-dir={tiny_voc}", "--test-num=5",
               "--test-num-workers=0", cwd=tmp_path)
    for name in TOY_LABEL_NAMES:
        assert name in out
    assert "mAP:" in out and "5 test images" in out

    out = _cli("train", *_tiny_options(tiny_voc, tmp_path, epochs=3), f"--load-path={run / 'last.pth'}",
               cwd=tmp_path)
    assert "resumed from" in out and "epoch 2" in out
    assert "epoch 0: test mAP" not in out and "epoch 2: test mAP" in out
    last = load_checkpoint(run / "last.pth")
    assert last["other_info"]["epoch"] == 3 and last["other_info"]["iteration"] == 36
    assert last["other_info"]["lr"] == pytest.approx(TOY_PRESET["lr"] * 0.1)  # no second decay


def test_evaluates_after_every_n_epochs_the_decay_epoch_and_the_last():
    cfg = Config.parse({"epoch": 13, "lr_decay_epoch": 10, "eval_every": 3})
    assert [e for e in range(13) if evaluates_after(e, cfg)] == [2, 5, 8, 10, 11, 12]
    cfg = Config.parse({"epoch": 4, "lr_decay_epoch": 9})
    assert [e for e in range(4) if evaluates_after(e, cfg)] == [0, 1, 2, 3]


def test_eval_every_skips_evaluations_and_keeps_the_best_of_those_made(tiny_voc, tmp_path):
    options = _tiny_options(tiny_voc, tmp_path, epochs=4)
    out = _cli("train", *options, "--lr-decay-epoch=1", "--eval-every=3", cwd=tmp_path)
    assert "epoch 0: train loss" in out and "(evaluated every 3 epochs)" in out
    assert "epoch 0: test mAP" not in out
    assert all(f"epoch {e}: test mAP" in out for e in (1, 2, 3))
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    maps = [h for h in history if h["name"] == "test_map"]
    assert [h["step"] for h in maps] == [24, 36, 48]  # 12 images per epoch
    best = load_checkpoint(tmp_path / "run" / "best.pth")
    assert best["other_info"]["best_map"] == pytest.approx(max(h["value"] for h in maps))


# --- the COCO path and TensorBoard, end to end --------------------------------------------------------------
def test_coco_data_trains_evaluates_with_coco_ap_and_writes_results_and_tensorboard(tmp_path):
    """The toy set in COCO's layout (non-contiguous category ids, crowd regions) through ``--data=coco``:
    training, COCO AP each epoch (kept in the history), ``eval --results`` in COCO's results format scored
    again by pycocotools to the same AP, and TensorBoard event files holding the scalars at their steps and
    the training pictures."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    from test_vis_tool import read_tensorboard

    from data.toy_coco import TOY_COCO_CATEGORY_IDS, ensure_toy_coco

    coco = ensure_toy_coco(tmp_path / "coco", n_trainval=10, n_test=6, seed=3)
    preset = {**TOY_PRESET, "epoch": 2, "lr_decay_epoch": 0, "plot_every": 4}
    options = [f"--{key.replace('_', '-')}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
               for key, v in preset.items()]
    options += ["--data=coco", f"--coco-dir={coco}", "--coco-train=trainval", "--coco-val=test",
                f"--save-dir={tmp_path}", "--run-name=run", "--tensorboard=true"]
    out = _cli("train", *options, cwd=tmp_path)
    assert "epoch 0: test COCO AP" in out and "best test COCO AP" in out
    run = tmp_path / "run"
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    for name in ("test_map", "test_AP50", "total_loss", "lr"):
        assert name in {h["name"] for h in history}, name
    scalars, images = read_tensorboard(run)
    assert [step for step, _ in scalars["test_map"]] == [10, 20]  # the end of each epoch
    assert [step for step, _ in scalars["total_loss"]] == [4, 8, 12, 16, 20]  # every plot_every steps
    assert {"gt_img", "pred_img"} <= set(images) and [s for s, _ in images["gt_img"]] == [4, 8, 12, 16, 20]

    # a model sure of class 4 everywhere (a barely trained one detects nothing above 0.05)
    ckpt = load_checkpoint(run / "best.pth")
    ckpt["model"]["head.score.bias"][5] += 8.0  # head class 5 = label 4
    torch.save(ckpt, tmp_path / "sure.pth")
    results = tmp_path / "coco_instances_results.json"
    out = _cli("eval", f"--load-path={tmp_path / 'sure.pth'}", f"--results={results}", "--test-num-workers=0",
               cwd=tmp_path)
    assert "COCO AP:" in out and "AP50" in out
    detections = json.loads(results.read_text())
    assert detections and {d["category_id"] for d in detections} == {TOY_COCO_CATEGORY_IDS[4]}
    gt = COCO(os.path.join(coco, "annotations", "instances_test.json"))
    evaluator = COCOeval(gt, gt.loadRes(str(results)), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    printed = float(out.split("COCO AP: ")[1].split()[0])
    assert evaluator.stats[0] == pytest.approx(printed, abs=5e-5)  # printed with 4 decimals
