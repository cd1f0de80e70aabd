"""Evaluating a detector on a test split: detections of every image, scored by the data set's metric.

:func:`detect` runs ``predict`` over a test loader (batches of one image size, :func:`eval_loader`) and
keeps every image's detections with its ground truth; :func:`score` scores them with the data set's
metric: VOC07 11-point mAP (``utils/eval_tool.py``, the devkit's numbers) for VOC-layout data, COCO AP
(``utils/coco_eval.py``, pycocotools) for COCO-layout data; :func:`evaluate` does both. :func:`ap_table`
prints a result; :func:`evaluate_checkpoint` is the whole of ``python train.py eval``: the model, its class
names, sizes and normalisation from a checkpoint, the test split from the options.

Under torchrun each process detects its share of the test images (:func:`eval_loader`) and :func:`score` is
given the detections of all of them (``utils.distributed``); the detections of an image do not depend on the
batch it was in (``FasterRCNN.predict``), so the score is that of one process.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from data.dataset import collate_test
from data.sampler import size_batches
from utils.amp import autocast
from utils.distributed import (
    all_gather_objects,
    broadcast_object,
    cleanup,
    get_rank,
    get_world_size,
    init_distributed,
    is_main_process,
)
from utils.eval_tool import eval_detection_voc

__all__ = ["Detections", "ap_table", "detect", "evaluate", "evaluate_checkpoint", "score", "eval_loader"]


@dataclasses.dataclass
class Detections:
    """One image's detections and ground truth.

    Attributes:
        index: the item of the test set.
        bbox, label, score: ``(K, 4)`` float32 ``(y_min, x_min, y_max, x_max)`` in original pixels,
            ``(K,)`` int32, ``(K,)`` float32 (``predict``'s output).
        gt_bbox, gt_label, gt_difficult: ``(G, 4)``, ``(G,)``, ``(G,)`` ground truth of the image.
    """

    index: int
    bbox: np.ndarray
    label: np.ndarray
    score: np.ndarray
    gt_bbox: np.ndarray
    gt_label: np.ndarray
    gt_difficult: np.ndarray


def eval_loader(testset, test_num: int = 10000, batch_size: int = 1, num_workers: int = 0,
                pin_memory: bool = False, worker_init_fn=None) -> DataLoader:
    """A loader of this process's share of the first ``test_num`` items of ``testset`` (a
    ``data.dataset.TestDataset``), in batches of at most ``batch_size`` images of one preprocessed size
    (``data.sampler.size_batches``); under torchrun, process ``r`` of ``K`` takes every ``K``-th batch from
    the ``r``-th (all of them in a single process)."""
    sizes = testset.input_sizes()[:min(test_num, len(testset))]
    batches = size_batches(sizes, batch_size)[get_rank()::get_world_size()]
    return DataLoader(testset, batch_sampler=batches, collate_fn=collate_test, num_workers=num_workers,
                      pin_memory=pin_memory, worker_init_fn=worker_init_fn)


@torch.no_grad()
def detect(loader: DataLoader, faster_rcnn, amp: bool = False, progress: bool = True,
           stop=None) -> list[Detections]:
    """Every image's detections (``faster_rcnn``'s current preset: ``'evaluate'`` unless changed).

    Args:
        loader: from :func:`eval_loader`.
        faster_rcnn: the model.
        amp: predict under ``torch.autocast`` (``utils.amp``).
        progress: show a tqdm bar (images).
        stop: a :class:`utils.interrupt.StopSignals`, checked after each batch (its ``check`` raises
            ``StopRequested``).

    Returns:
        One :class:`Detections` per image, in the loader's order.
    """
    device = next(faster_rcnn.parameters()).device
    batches = list(loader.batch_sampler)
    bar = tqdm(total=sum(map(len, batches)), desc="eval", disable=not progress, leave=False,
               dynamic_ncols=True)
    found = []
    for batch, (imgs, sizes, gt_bboxes, gt_labels, gt_difficults) in zip(batches, loader, strict=True):
        with autocast(device, amp):
            bboxes, labels, scores = faster_rcnn.predict(imgs, sizes, batch_size=len(imgs))
        for item in zip(batch, bboxes, labels, scores, gt_bboxes, gt_labels, gt_difficults, strict=True):
            found.append(Detections(*item))
        bar.update(len(batch))
        if stop is not None:
            stop.check()
    bar.close()
    return found


def score(detections: list[Detections], testset) -> dict:
    """The test set's metric of ``detections`` (its images in any order; each image once).

    Returns:
        VOC data: ``eval_detection_voc``'s dict with the 11-point metric: ``'ap'`` ``(n_fg_class,)`` (NaN
        for a class without ground truth) and ``'map'``. COCO data: ``utils.coco_eval.evaluate_coco``'s
        dict (``AP``, ``AP50``, ``AP75``, ``APs``, ``APm``, ``APl``, per-class ``ap``, and ``map`` = ``AP``).
        Both carry ``'metric'`` (``'voc'`` or ``'coco'``).
    """
    detections = sorted(detections, key=lambda d: d.index)
    if testset.metric == "coco":
        from utils.coco_eval import coco_results, evaluate_coco

        db = testset.db
        image_ids = [db.ids[d.index] for d in detections]
        results = coco_results(image_ids, [d.bbox for d in detections], [d.label for d in detections],
                               [d.score for d in detections], db.label_to_category_id)
        metrics = evaluate_coco(db.coco, results, image_ids=image_ids,
                                label_to_category_id=db.label_to_category_id)
        return {**metrics, "metric": "coco", "results": results}
    columns = {field: [getattr(d, field) for d in detections]
               for field in ("bbox", "label", "score", "gt_bbox", "gt_label", "gt_difficult")}
    result = eval_detection_voc(*columns.values(), use_07_metric=True, n_class=len(testset.label_names))
    return {**result, "metric": "voc"}


def evaluate(loader: DataLoader, faster_rcnn, testset=None, amp: bool = False, progress: bool = True,
             stop=None) -> dict:
    """:func:`detect` then :func:`score` (``testset``: the loader's data set by default).

    Under torchrun every process detects its share (:func:`eval_loader`), rank 0 scores the detections of
    all and every process gets the result (without COCO's ``'results'`` list, which rank 0 alone keeps).
    """
    found = detect(loader, faster_rcnn, amp, progress and is_main_process(), stop)
    found = [d for share in all_gather_objects(found) for d in share]
    result = score(found, testset or loader.dataset) if is_main_process() else None
    shared = broadcast_object(None if result is None else {k: v for k, v in result.items() if k != "results"})
    return result if result is not None else shared


def ap_table(result: dict, class_names) -> str:
    """A result of :func:`score` as an aligned text table: per-class AP and the mean (VOC), or COCO's six
    numbers and per-class AP."""
    if result["metric"] == "coco":
        from utils.coco_eval import coco_table

        return coco_table(result, class_names)
    ap, eval_map = result["ap"], result["map"]
    width = max(len("mAP"), *(len(n) for n in class_names))
    lines = [f"{'class':<{width}}  AP", "-" * (width + 8)]
    lines += [f"{name:<{width}}  {value:.4f}" for name, value in zip(class_names, ap, strict=True)]
    lines += ["-" * (width + 8), f"{'mAP':<{width}}  {eval_map:.4f}"]
    return "\n".join(lines)


def evaluate_checkpoint(load_path: str, options: dict) -> tuple[dict, list[str], int]:
    """Evaluate the checkpoint at ``load_path`` on its test split (``python train.py eval``).

    The model, its class names, input sizes, normalisation and proposal settings come from the checkpoint;
    ``options`` (``--voc-data-dir``, ``--test-num``, ``--device``...) override the checkpoint's training
    options for the data. Under torchrun the processes share the test images and every one returns the
    result.

    With ``--results=PATH`` (COCO data), the detections are also written to ``PATH`` in COCO's results
    format (detectron2's ``coco_instances_results.json``), and ``result['results_path']`` names it.

    Returns:
        ``(result, class_names, n_images)``: :func:`score`'s dict, the names in label order, and how many
        test images were evaluated.

    Raises:
        FileNotFoundError, utils.checkpoint.CheckpointError, utils.config.ConfigError: no such file, a
            refused or malformed checkpoint, bad options (``--results`` with VOC data).
        data.check.DataCheckError: bad test samples (without ``skip_bad_samples``).
    """
    from data.check import check_splits
    from data.dataset import TestDataset
    from utils.checkpoint import checkpoint_config, load_checkpoint, model_from_checkpoint
    from utils.config import Config, ConfigError
    from utils.interrupt import ignore_stop_signals
    from utils.memory_format import choose_memory_format

    ckpt = load_checkpoint(load_path)
    arch = ckpt["arch"]
    from_checkpoint = {"label_names": ckpt["class_names"], "min_size": arch["min_size"],
                       "max_size": arch["max_size"], "caffe_pretrain": arch["normalize"] == "caffe"}
    cfg = Config.parse({**from_checkpoint, **options}, base=checkpoint_config(ckpt))
    device = init_distributed(cfg.torch_device(), cfg.dist_timeout)  # torchrun: each process a share
    try:
        model = model_from_checkpoint(ckpt, load_path).to(device)
        testset = TestDataset(cfg)
        size = testset.input_sizes()[0] if len(testset) else (cfg.min_size, cfg.min_size)
        memory_format = broadcast_object(
            choose_memory_format(model, "inference", size, cfg.memory_format, amp=cfg.amp)
            if is_main_process() else None)
        model.to(memory_format=memory_format)
        if cfg.results and testset.metric != "coco":
            raise ConfigError(f"--results writes COCO's results format, for COCO data (--data=coco or "
                              f"--data=toy-coco); this checkpoint evaluates on --data={cfg.data}")
        (report,) = check_splits([testset], skip_bad_samples=cfg.skip_bad_samples, progress=is_main_process())
        if is_main_process():
            print(report.summary())
        loader = eval_loader(testset, cfg.test_num, cfg.test_batch_size, cfg.test_num_workers,
                             pin_memory=device.type == "cuda", worker_init_fn=ignore_stop_signals)
        result = evaluate(loader, model, testset, amp=cfg.amp)
        if cfg.results and is_main_process():
            from utils.coco_eval import write_coco_results

            result["results_path"] = write_coco_results(cfg.results, result["results"])
    finally:
        cleanup()
    return result, list(testset.label_names), min(cfg.test_num, len(testset))
