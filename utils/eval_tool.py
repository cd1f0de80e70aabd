"""Pascal VOC detection metrics: per-class precision/recall and average precision (a ChainerCV port).

Symbols: ``N`` images; ``R`` predicted boxes of an image, ``G`` its ground-truth boxes; ``n_class``
foreground classes. Boxes are ``(y_min, x_min, y_max, x_max)`` in pixels of the original image; labels are
ints in ``[0, n_class)``.

Matching follows the VOC devkit: within each image and class, predictions are taken by decreasing score;
each goes to the ground-truth box of highest IoU; if that IoU is at least ``iou_thresh``, the prediction is
a true positive when the box is not yet taken and a false positive (a duplicate) when it is; if the box is
marked difficult, the prediction is ignored (neither true nor false positive). Any other prediction is a
false positive. Difficult boxes do not count in the number of positives. The IoU here, and only here in the
project, treats boxes as inclusive integer pixel ranges: the devkit's "+1" on widths and heights.
"""

import itertools
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence, Sized

import numpy as np

__all__ = ["eval_detection_voc", "calc_detection_voc_prec_rec", "calc_detection_voc_ap"]

# Recall thresholds of the VOC2007 11-point metric: the floating-point sequence np.arange(0., 1.1, 0.1) of
# py-faster-rcnn's voc_eval.py, ChainerCV and the original simple-faster-rcnn-pytorch, not k / 10 exactly.
# Its values 3, 6 and 7 are 0.30000000000000004, 0.6000000000000001 and 0.7000000000000001, so a recall of
# exactly 3/10, 6/10 or 7/10 does not reach that point. The benchmark is defined by the evaluation code that
# produced the published figures, quirks included (exact k / 10 would be a corrected variant, and would not
# compare with them). The MATLAB devkit's `for t=0:0.1:1` (VOCevaldet.m) has the same 0.30000000000000004;
# MATLAB's colon operator builds the upper half of a range down from its end, which by MathWorks' description
# of it gives 0.6 and 0.7 there (it differs from these thresholds only for a recall of exactly 0.6 or 0.7).
_VOC07_RECALL_THRESHOLDS = np.arange(0.0, 1.1, 0.1)


def eval_detection_voc(
    pred_bboxes: Iterable[np.ndarray],
    pred_labels: Iterable[np.ndarray],
    pred_scores: Iterable[np.ndarray],
    gt_bboxes: Iterable[np.ndarray],
    gt_labels: Iterable[np.ndarray],
    gt_difficults: Iterable[np.ndarray] | None = None,
    iou_thresh: float = 0.5,
    use_07_metric: bool = False,
    n_class: int | None = None,
) -> dict:
    """Average precision of each class and their mean, as the Pascal VOC devkit computes them.

    Each image-wise input is an iterable of ``N`` arrays, one per image, in the same image order: a list, a
    tuple, or a generator (read once, image by image, so predictions can be made while evaluating).

    Args:
        pred_bboxes: iterable of ``N`` arrays ``(R, 4)``, predicted boxes of each image.
        pred_labels: iterable of ``N`` int arrays ``(R,)``.
        pred_scores: iterable of ``N`` float arrays ``(R,)``, higher is more confident.
        gt_bboxes: iterable of ``N`` arrays ``(G, 4)``, ground-truth boxes.
        gt_labels: iterable of ``N`` int arrays ``(G,)``.
        gt_difficults: iterable of ``N`` bool arrays ``(G,)``; ``None`` means nothing is difficult.
        iou_thresh: smallest IoU of a true positive.
        use_07_metric: VOC2007's 11-point AP instead of the area under the precision/recall curve
            (VOC2010 and later). Its recall thresholds are the reference evaluators' floating-point ones,
            see :func:`calc_detection_voc_ap`.
        n_class: number of classes; ``None`` means one more than the largest label among predictions and
            ground truth. Given, every class in ``range(n_class)`` gets an entry, also one that appears
            nowhere (its AP is NaN), and larger labels are an error.

    Returns:
        ``{'ap': (n_class,) float64 array, 'map': float}``. A class without ground truth (difficult
        boxes aside) has AP NaN and is left out of the mean; ``map`` is NaN when every class is.

    Raises:
        ValueError: inputs holding different numbers of images (inputs with a length are compared before
            any image is read; an iterator that ends early is found when it ends), inconsistent shapes, a
            negative label, or a label ``>= n_class``.
    """
    prec, rec = calc_detection_voc_prec_rec(
        pred_bboxes, pred_labels, pred_scores, gt_bboxes, gt_labels, gt_difficults,
        iou_thresh=iou_thresh, n_class=n_class)
    ap = calc_detection_voc_ap(prec, rec, use_07_metric=use_07_metric)
    valid = ap[~np.isnan(ap)]
    return {"ap": ap, "map": float(valid.mean()) if valid.size else float("nan")}


def _check_image(i: int, pred_bbox, pred_label, pred_score, gt_bbox, gt_label, gt_difficult) -> None:
    if pred_bbox.shape != (len(pred_label), 4) or pred_score.shape != pred_label.shape:
        raise ValueError(
            f"image {i}: predictions want bbox (R, 4), label (R,), score (R,); got shapes "
            f"{pred_bbox.shape}, {pred_label.shape}, {pred_score.shape}")
    if gt_bbox.shape != (len(gt_label), 4) or gt_difficult.shape != gt_label.shape:
        raise ValueError(
            f"image {i}: ground truth wants bbox (G, 4), label (G,), difficult (G,); got shapes "
            f"{gt_bbox.shape}, {gt_label.shape}, {gt_difficult.shape}")
    if (pred_label < 0).any() or (gt_label < 0).any():
        raise ValueError(f"image {i}: negative label")


def _devkit_iou(bbox_a: np.ndarray, bbox_b: np.ndarray) -> np.ndarray:
    """``(R, 4)``, ``(G, 4)`` float64 boxes -> ``(R, G)`` IoU of inclusive integer pixel ranges.

    A box ``(0, 0, 9, 9)`` covers 10 x 10 pixels: sides are ``max - min + 1`` (VOCevaldet.m). This is the
    only IoU of the project with the "+1"; ``model.utils.bbox_tools.bbox_iou`` has none (and importing
    ``model`` here would load the whole network code).
    """
    tl = np.maximum(bbox_a[:, None, :2], bbox_b[:, :2])  # (R, G, 2)
    br = np.minimum(bbox_a[:, None, 2:], bbox_b[:, 2:])
    area_i = np.prod(np.clip(br - tl + 1, 0, None), axis=2)
    area_a = np.prod(bbox_a[:, 2:] - bbox_a[:, :2] + 1, axis=1)
    area_b = np.prod(bbox_b[:, 2:] - bbox_b[:, :2] + 1, axis=1)
    union = area_a[:, None] + area_b - area_i
    return np.divide(area_i, union, out=np.zeros_like(area_i), where=union > 0)


def _match_image(pred_bbox, pred_score, gt_bbox, gt_difficult, iou_thresh) -> np.ndarray:
    """Match the predictions of one class in one image.

    Returns:
        ``(R,)`` int8 in the order of ``pred_score`` (not sorted): 1 true positive, 0 false positive,
        -1 ignored (matched to a difficult box).
    """
    match = np.zeros(len(pred_bbox), dtype=np.int8)
    if len(gt_bbox) == 0 or len(pred_bbox) == 0:
        return match
    iou = _devkit_iou(pred_bbox.astype(np.float64), gt_bbox.astype(np.float64))  # (R, G)
    best_gt = iou.argmax(axis=1)
    best_gt[iou.max(axis=1) < iou_thresh] = -1

    taken = np.zeros(len(gt_bbox), dtype=bool)
    for r in np.argsort(-pred_score, kind="stable"):  # decreasing score, ties in input order
        g = best_gt[r]
        if g < 0:
            continue  # no overlap: false positive
        if gt_difficult[g]:
            match[r] = -1
        elif not taken[g]:
            match[r] = 1
        taken[g] = True
    return match


def calc_detection_voc_prec_rec(
    pred_bboxes: Iterable[np.ndarray],
    pred_labels: Iterable[np.ndarray],
    pred_scores: Iterable[np.ndarray],
    gt_bboxes: Iterable[np.ndarray],
    gt_labels: Iterable[np.ndarray],
    gt_difficults: Iterable[np.ndarray] | None = None,
    iou_thresh: float = 0.5,
    n_class: int | None = None,
) -> tuple[list, list]:
    """Precision and recall of each class at every rank of its predictions (all images pooled).

    Arguments as in :func:`eval_detection_voc` (iterables of arrays, generators included).

    Returns:
        ``(prec, rec)``, two lists of ``n_class`` entries. For class ``l`` with ``K`` predictions (ranked
        by decreasing score over all images, ties keeping image and input order), ``prec[l]`` and
        ``rec[l]`` are ``(K,)`` float64: ``tp / (tp + fp)`` and ``tp / n_pos`` after each rank, where
        ignored predictions count in neither (so a precision is NaN until the first non-ignored one).
        ``rec[l]`` is ``None`` when the class has no non-difficult ground truth; both are ``None`` for a
        class that appears nowhere.

    Raises:
        ValueError: see :func:`eval_detection_voc`.
    """
    inputs = {"pred_bboxes": pred_bboxes, "pred_labels": pred_labels, "pred_scores": pred_scores,
              "gt_bboxes": gt_bboxes, "gt_labels": gt_labels}
    if gt_difficults is not None:
        inputs["gt_difficults"] = gt_difficults

    n_pos = defaultdict(int)
    scores = defaultdict(list)
    matches = defaultdict(list)
    max_label = -1
    for i, arrays in enumerate(_per_image(inputs)):
        pred_bbox, pred_label, pred_score, gt_bbox, gt_label, *difficult = (np.asarray(a) for a in arrays)
        gt_difficult = difficult[0] if difficult else np.zeros(len(gt_label), dtype=bool)
        # An empty image may come as a (0,) array; make it (0, 4).
        pred_bbox = pred_bbox.reshape(-1, 4) if pred_bbox.size == 0 else pred_bbox
        gt_bbox = gt_bbox.reshape(-1, 4) if gt_bbox.size == 0 else gt_bbox
        gt_difficult = gt_difficult.astype(bool)
        _check_image(i, pred_bbox, pred_label, pred_score, gt_bbox, gt_label, gt_difficult)
        labels = np.unique(np.concatenate((pred_label, gt_label)).astype(np.int64))
        if labels.size:
            max_label = max(max_label, int(labels[-1]))
        for label in labels.tolist():
            pred_mask = pred_label == label
            gt_mask = gt_label == label
            n_pos[label] += int(np.count_nonzero(~gt_difficult[gt_mask]))
            scores[label].append(pred_score[pred_mask].astype(np.float64))
            matches[label].append(
                _match_image(pred_bbox[pred_mask], pred_score[pred_mask], gt_bbox[gt_mask],
                             gt_difficult[gt_mask], iou_thresh))

    if n_class is None:
        n_class = max_label + 1
    elif max_label >= n_class:
        raise ValueError(f"label {max_label} found but n_class={n_class}")

    prec, rec = [None] * n_class, [None] * n_class
    for label in scores:
        score = np.concatenate(scores[label])
        match = np.concatenate(matches[label])
        order = np.argsort(-score, kind="stable")
        match = match[order]
        tp = np.cumsum(match == 1)
        fp = np.cumsum(match == 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            prec[label] = tp / (tp + fp)  # NaN while only ignored predictions have been seen
        if n_pos[label] > 0:
            rec[label] = tp / n_pos[label]
    return prec, rec


def _per_image(inputs: dict[str, Iterable]) -> Iterator[tuple]:
    """The inputs' arrays image by image, as ``zip`` does, raising on inputs of different lengths.

    Args:
        inputs: name -> iterable of per-image arrays.

    Yields:
        One tuple per image, an array of each input in ``inputs``' order.

    Raises:
        ValueError: the inputs hold different numbers of images, naming them. Those with a length are
            compared before anything is read; an iterator that ends before the others is found when it ends
            (the others are not read to the end to count them: they may be running a model).
    """
    lengths = {name: len(x) for name, x in inputs.items() if isinstance(x, Sized)}
    if len(set(lengths.values())) > 1:
        counts = ", ".join(f"{name} {n}" for name, n in lengths.items())
        raise ValueError(f"the inputs hold different numbers of images: {counts}")
    end = object()
    for i, arrays in enumerate(itertools.zip_longest(*inputs.values(), fillvalue=end)):
        ended = [name for name, a in zip(inputs, arrays, strict=True) if a is end]
        if ended:
            more = [name for name in inputs if name not in ended]
            raise ValueError(f"the inputs hold different numbers of images: {', '.join(ended)} {i}, "
                             f"{', '.join(more)} more than {i}")
        yield arrays


def calc_detection_voc_ap(prec: Sequence, rec: Sequence, use_07_metric: bool = False) -> np.ndarray:
    """Average precision of each class from its precision/recall curve.

    * VOC2007 (``use_07_metric=True``): the mean over the 11 recall thresholds ``t = 0, 0.1, ..., 1`` of
      the largest precision at a recall ``>= t`` (0 when no rank reaches ``t``). The thresholds are those of
      the reference evaluators (py-faster-rcnn's voc_eval.py, ChainerCV, the original),
      ``np.arange(0., 1.1, 0.1)``, whose 0.3, 0.6 and 0.7 lie just above those numbers: a recall of exactly
      3/10 does not reach ``t = 0.3``, as in the figures they published (see ``_VOC07_RECALL_THRESHOLDS``).
    * Otherwise (VOC2010 and later): the area under the curve after making precision non-increasing in
      recall, ``sum_k (r_k - r_{k-1}) * max_{j >= k} p_j`` with ``r_0 = 0``.

    NaN precisions (ranks before the first non-ignored prediction) count as 0.

    Args:
        prec: ``n_class`` entries, each ``(K,)`` float array or ``None``.
        rec: ``n_class`` entries, each ``(K,)`` float array or ``None``.
        use_07_metric: the 11-point metric.

    Returns:
        ``(n_class,)`` float64; NaN for a class whose ``prec`` or ``rec`` is ``None``.
    """
    if len(prec) != len(rec):
        raise ValueError(f"prec and rec have different lengths: {len(prec)} and {len(rec)}")
    ap = np.full(len(prec), np.nan)
    for label, (p, r) in enumerate(zip(prec, rec, strict=True)):
        if p is None or r is None:
            continue
        p = np.nan_to_num(np.asarray(p, dtype=np.float64))
        r = np.asarray(r, dtype=np.float64)
        if use_07_metric:
            ap[label] = np.mean([p[r >= t].max() if (r >= t).any() else 0.0
                                 for t in _VOC07_RECALL_THRESHOLDS])
        else:
            mpre = np.concatenate(([0.0], p, [0.0]))
            mrec = np.concatenate(([0.0], r, [1.0]))
            mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope, non-increasing
            step = np.flatnonzero(mrec[1:] != mrec[:-1])  # where recall changes
            ap[label] = np.sum((mrec[step + 1] - mrec[step]) * mpre[step + 1])
    return ap
