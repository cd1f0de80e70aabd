"""Evaluating a detector on a test split: detections of every image, scored by the data set's metric.

:func:`evaluate` runs ``predict`` over a test loader and scores the detections with the VOC07 11-point mAP
(``utils/eval_tool.py``, the devkit's numbers); :func:`ap_table` prints the per-class result;
:func:`evaluate_checkpoint` is the whole of ``python train.py eval``: the model, its class names, sizes and
normalisation from a checkpoint, the test split from the options.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from utils.eval_tool import eval_detection_voc

__all__ = ["ap_table", "evaluate", "evaluate_checkpoint"]


@torch.no_grad()
def evaluate(dataloader, faster_rcnn, test_num: int = 10000, progress: bool = True, stop=None) -> dict:
    """VOC07 11-point AP of ``faster_rcnn`` on the first ``test_num`` images of ``dataloader``.

    Args:
        dataloader: batches of one :class:`data.dataset.TestDataset` item.
        faster_rcnn: the model (its current preset is used: ``'evaluate'`` unless changed).
        test_num: how many images to evaluate (the original evaluated ``test_num + 1``).
        progress: show a tqdm bar.
        stop: a :class:`utils.interrupt.StopSignals`, checked after each image (its ``check`` raises
            ``StopRequested``).

    Returns:
        ``eval_detection_voc``'s dict: ``'ap'`` ``(n_fg_class,)`` (NaN for a class without ground truth)
        and ``'map'``.
    """
    pred_bboxes, pred_labels, pred_scores = [], [], []
    gt_bboxes, gt_labels, gt_difficults = [], [], []
    total = min(test_num, len(dataloader))
    batches = itertools.islice(dataloader, test_num)
    for imgs, sizes, gt_bbox, gt_label, gt_difficult in tqdm(
        batches, total=total, desc="eval", disable=not progress, leave=False, dynamic_ncols=True
    ):
        size = (int(sizes[0][0]), int(sizes[1][0]))
        bboxes, labels, scores = faster_rcnn.predict(imgs, [size])
        pred_bboxes += bboxes
        pred_labels += labels
        pred_scores += scores
        gt_bboxes.append(gt_bbox[0].numpy())
        gt_labels.append(gt_label[0].numpy())
        gt_difficults.append(gt_difficult[0].numpy())
        if stop is not None:
            stop.check()
    return eval_detection_voc(
        pred_bboxes, pred_labels, pred_scores, gt_bboxes, gt_labels, gt_difficults, use_07_metric=True
    )


def ap_table(ap: np.ndarray, class_names, eval_map: float) -> str:
    """The per-class AP and the mAP as an aligned text table."""
    width = max(len("mAP"), *(len(n) for n in class_names))
    lines = [f"{'class':<{width}}  AP", "-" * (width + 8)]
    lines += [f"{name:<{width}}  {value:.4f}" for name, value in zip(class_names, ap, strict=True)]
    lines += ["-" * (width + 8), f"{'mAP':<{width}}  {eval_map:.4f}"]
    return "\n".join(lines)


def evaluate_checkpoint(load_path: str, options: dict) -> tuple[dict, list[str], int]:
    """Evaluate the checkpoint at ``load_path`` on its test split (``python train.py eval``).

    The model, its class names, input sizes, normalisation and proposal settings come from the checkpoint;
    ``options`` (``--voc-data-dir``, ``--test-num``, ``--device``...) override the checkpoint's training
    options for the data.

    Returns:
        ``(result, class_names, n_images)``: :func:`evaluate`'s dict, the names in label order, and how many
        test images were evaluated.

    Raises:
        FileNotFoundError, utils.checkpoint.CheckpointError, utils.config.ConfigError: no such file, a
            refused or malformed checkpoint, bad options.
        data.check.DataCheckError: bad test samples (without ``skip_bad_samples``).
    """
    from data.check import check_splits
    from data.dataset import TestDataset
    from utils.checkpoint import checkpoint_config, load_checkpoint, model_from_checkpoint
    from utils.config import Config
    from utils.interrupt import ignore_stop_signals

    ckpt = load_checkpoint(load_path)
    arch = ckpt["arch"]
    from_checkpoint = {"label_names": ckpt["class_names"], "min_size": arch["min_size"],
                       "max_size": arch["max_size"], "caffe_pretrain": arch["normalize"] == "caffe"}
    cfg = Config.parse({**from_checkpoint, **options}, base=checkpoint_config(ckpt))
    model = model_from_checkpoint(ckpt, load_path).to(cfg.torch_device())
    testset = TestDataset(cfg)
    (report,) = check_splits([testset], skip_bad_samples=cfg.skip_bad_samples)
    print(report.summary())
    loader = DataLoader(testset, batch_size=1, shuffle=False, num_workers=cfg.test_num_workers,
                        worker_init_fn=ignore_stop_signals)
    result = evaluate(loader, model, cfg.test_num)
    return result, list(testset.label_names), min(cfg.test_num, len(testset))
