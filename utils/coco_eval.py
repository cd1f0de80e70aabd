"""COCO box AP: our detections in COCO's results format, scored by pycocotools' ``COCOeval``.

A thin wrapper, so that our numbers are pycocotools' numbers: :func:`evaluate_coco` runs ``loadRes``,
``evaluate``, ``accumulate`` and ``summarize`` exactly as the COCO API's own example does, silencing their
prints (the CLI prints :func:`coco_table` instead), and reads ``COCOeval.stats``. Only two things are ours:
an empty list of detections is scored without ``loadRes`` (which fails on ``[]``) as a results set with no
annotation, and COCOeval's ``-1`` ("no ground truth in this area range") becomes NaN, as detectron2's
``COCOEvaluator`` reports it.

Results format (COCO's, the one detectron2 writes to ``coco_instances_results.json``): a list of
``{"image_id": int, "category_id": int, "bbox": [x, y, w, h], "score": float}`` with the box in continuous
0-based pixels of the original image and the json's own category ids.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from collections.abc import Mapping, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from utils.files import atomic_write

__all__ = ["COCO_METRICS", "coco_results", "evaluate_coco", "coco_table", "write_coco_results"]

# The names of COCOeval.stats[0:6], in its order.
COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def coco_results(
    image_ids: Sequence[int],
    bboxes: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    scores: Sequence[np.ndarray],
    label_to_category_id: Sequence[int] | Mapping[int, int],
) -> list[dict]:
    """Detections of several images in COCO's results format.

    Args:
        image_ids: the COCO image id of each image.
        bboxes: per image, ``(R, 4)`` float array, ``(y_min, x_min, y_max, x_max)`` in pixels of the original
            image (what ``FasterRCNN.predict`` returns).
        labels: per image, ``(R,)`` int array in ``[0, n_fg_class)``.
        scores: per image, ``(R,)`` float array.
        label_to_category_id: the COCO category id of each label (e.g. ``db.label_to_category_id``).

    Returns:
        A list of ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` dicts of plain Python
        numbers, image by image and in each image's order; ``x = x_min``, ``y = y_min``,
        ``w = x_max - x_min``, ``h = y_max - y_min`` computed in float64 from the given values.
    """
    results = []
    for image_id, bbox, label, score in zip(image_ids, bboxes, labels, scores, strict=True):
        bbox = np.asarray(bbox, dtype=np.float64).reshape(-1, 4)  # (R, 4) y_min, x_min, y_max, x_max
        xywh = np.stack((bbox[:, 1], bbox[:, 0], bbox[:, 3] - bbox[:, 1], bbox[:, 2] - bbox[:, 0]), axis=1)
        for box, lb, sc in zip(xywh.tolist(), np.asarray(label).tolist(), np.asarray(score).tolist(),
                               strict=True):
            results.append({"image_id": int(image_id), "category_id": int(label_to_category_id[int(lb)]),
                            "bbox": box, "score": float(sc)})
    return results


def _empty_results(coco_gt: COCO) -> COCO:
    """What ``coco_gt.loadRes`` would return for a results list without detections (it fails on ``[]``)."""
    res = COCO()
    res.dataset = {"info": copy.deepcopy(coco_gt.dataset.get("info", {})),
                   "images": list(coco_gt.dataset["images"]),
                   "categories": copy.deepcopy(coco_gt.dataset["categories"]),
                   "annotations": []}
    with contextlib.redirect_stdout(io.StringIO()):
        res.createIndex()
    return res


def _nan_if_missing(value: float) -> float:
    """COCOeval's ``-1`` (nothing to average: no ground truth there) -> NaN."""
    return float(value) if value > -1 else float("nan")


def evaluate_coco(
    coco_gt: COCO,
    results: list[dict],
    image_ids: Sequence[int] | None = None,
    label_to_category_id: Sequence[int] | None = None,
) -> dict:
    """COCO box AP of ``results`` against ``coco_gt`` (COCOeval, ``iouType='bbox'``, default parameters).

    Args:
        coco_gt: the ground truth (``COCOBboxDataset.coco``, or ``pycocotools.coco.COCO(path)``).
        results: detections as :func:`coco_results` makes them; not modified (``loadRes`` adds keys to the
            dicts it is given, so it gets copies).
        image_ids: the images evaluated (COCOeval's ``params.imgIds``); ``None``: every image of
            ``coco_gt``. Pass the ids actually run through the model when that is a subset (a
            ``test_num`` limit, bad samples left out): an image left out of the list is not scored, an
            image in it without detections counts its objects as missed.
        label_to_category_id: the categories evaluated, in label order (``params.catIds``, and the order
            of ``'ap'``); ``None``: every category of ``coco_gt``, in increasing id order.

    Returns:
        A dict:

        * ``'AP'``, ``'AP50'``, ``'AP75'``, ``'APs'``, ``'APm'``, ``'APl'``: floats in ``[0, 1]``,
          ``COCOeval.stats[0:6]`` (AP at IoU 0.50:0.95, at 0.50, at 0.75, for small, medium, large
          objects), NaN where COCOeval gives -1 (no ground truth object of that size). Without any
          detection they are 0 wherever there is ground truth.
        * ``'map'``: the same float as ``'AP'`` (so code that reads ``eval_detection_voc``'s ``'map'``
          selects checkpoints by COCO AP).
        * ``'ap'``: ``(K,)`` float64, the AP at IoU 0.50:0.95 of each category (area all, 100 detections),
          NaN for a category without ground truth; computed from ``COCOeval.eval['precision']`` as
          detectron2 computes its per-category AP.
        * ``'category_ids'``: ``(K,)`` tuple of the category ids of ``'ap'``.
        * ``'stats'``: list of the 12 floats of ``COCOeval.stats`` as they are (``-1`` kept; the last six
          are the average recalls).

    Raises:
        AssertionError: from pycocotools, when a result names an image id that ``coco_gt`` does not have.
    """
    if results:
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes([{**r, "bbox": list(r["bbox"])} for r in results])
    else:
        coco_dt = _empty_results(coco_gt)
    evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
    if image_ids is not None:
        evaluator.params.imgIds = sorted(int(i) for i in image_ids)
    if label_to_category_id is not None:
        category_ids = tuple(int(c) for c in label_to_category_id)
        evaluator.params.catIds = sorted(category_ids)
    else:
        category_ids = tuple(sorted(coco_gt.getCatIds()))
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = [float(s) for s in evaluator.stats]
    metrics = {name: _nan_if_missing(value) for name, value in zip(COCO_METRICS, stats[:6], strict=True)}
    metrics["map"] = metrics["AP"]

    # precision: (T IoUs, R recall points, K categories, A areas, M max-detections), -1 where undefined;
    # K follows the sorted params.catIds, area 0 is 'all', the last M is 100.
    precision = evaluator.eval["precision"]
    column = {c: k for k, c in enumerate(sorted(evaluator.params.catIds))}
    ap = np.full(len(category_ids), np.nan)
    for n, category_id in enumerate(category_ids):
        p = precision[:, :, column[category_id], 0, -1]  # (T, R)
        if (p > -1).any():
            ap[n] = float(np.mean(p[p > -1]))
    metrics.update(ap=ap, category_ids=category_ids, stats=stats)
    return metrics


def coco_table(metrics: dict, class_names: Sequence[str] | None = None) -> str:
    """The six COCO APs of :func:`evaluate_coco` as a text table, optionally with the per-class AP.

    Args:
        metrics: :func:`evaluate_coco`'s dict.
        class_names: names for the rows of ``metrics['ap']`` (same length); ``None``: no per-class rows.

    Returns:
        Two lines (names, then values with 4 decimals; NaN as ``nan``), then with ``class_names`` one line
        per class.
    """
    head = "  ".join(f"{name:>6}" for name in COCO_METRICS)
    values = "  ".join(f"{metrics[name]:>6.4f}" for name in COCO_METRICS)
    lines = [head, values]
    if class_names is not None:
        width = max(len("class"), *(len(n) for n in class_names))
        lines += ["", f"{'class':<{width}}  AP", "-" * (width + 8)]
        rows = zip(class_names, metrics["ap"], strict=True)
        lines += [f"{name:<{width}}  {value:.4f}" for name, value in rows]
    return "\n".join(lines)


def write_coco_results(path: str | os.PathLike, results: list[dict]) -> str:
    """Write detections as a COCO results json (what detectron2 names ``coco_instances_results.json``).

    Any COCO tool reads it back (``COCO(gt).loadRes(path)``). Written by :func:`utils.files.atomic_write`
    (a temporary file renamed into place), so a reader never sees half a file.

    Args:
        path: the json to write (its folder is created if needed).
        results: :func:`coco_results`'s list.

    Returns:
        ``path`` as a string.
    """
    data = json.dumps(results).encode()
    return atomic_write(path, lambda f: f.write(data))
