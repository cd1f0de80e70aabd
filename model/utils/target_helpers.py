"""The steps the three creators share: matching boxes to ground truth, balanced sampling, the box coder.

Shape symbols used below:

    N: number of boxes being labelled (inside anchors, or RoIs plus ground-truth boxes).
    G: number of ground-truth boxes of the image (may be 0).

Boxes are float arrays ``(y_min, x_min, y_max, x_max)`` in pixels of the (resized) input image; ``loc`` is
``(t_y, t_x, t_h, t_w)`` as in :mod:`model.utils.bbox_tools`.
"""

from typing import NamedTuple

import numpy as np

from model.utils.bbox_tools import bbox2loc, bbox_iou, loc2bbox

__all__ = ["Match", "check_boxes", "match_to_gt", "sample_balanced", "encode_loc", "decode_loc"]


def check_boxes(bbox, name: str) -> np.ndarray:
    """``bbox`` as an ``(N, 4)`` array (an empty array of any shape reads as ``(0, 4)``).

    Raises:
        ValueError: naming ``name`` when the array is not ``(N, 4)``.
    """
    bbox = np.asarray(bbox)
    if bbox.size == 0:
        return bbox.reshape(0, 4)
    if bbox.ndim != 2 or bbox.shape[1] != 4:
        raise ValueError(f"{name} must be an (N, 4) array of (y_min, x_min, y_max, x_max), got shape "
                         f"{bbox.shape}")
    return bbox


class Match(NamedTuple):
    """The result of :func:`match_to_gt` for ``N`` boxes against ``G`` ground-truth boxes.

    Attributes:
        gt_index: ``(N,)`` int64, the ground truth of highest IoU for each box (0 when ``G == 0``; first
            one on ties, like ``argmax``).
        max_iou: ``(N,)`` float, that IoU (0 when ``G == 0``).
        is_gt_best: ``(N,)`` bool, True for every box tied for some ground truth's best IoU, when that best
            IoU is above 0.
    """

    gt_index: np.ndarray
    max_iou: np.ndarray
    is_gt_best: np.ndarray


def match_to_gt(bbox: np.ndarray, gt_bbox: np.ndarray) -> Match:
    """Match every box to its ground truth of highest IoU, and find each ground truth's best boxes.

    The "best box per ground truth" rule is the one of py-faster-rcnn and the original: for each ground
    truth, every box whose IoU equals that ground truth's highest IoU is marked (ties included), so a
    ground truth that no box overlaps well still gets positive samples.

    Unlike the original (original-spec §17.5), a ground truth whose best IoU is 0, i.e. one that overlaps
    no box at all, marks nothing: there, every non-overlapping box "ties" at 0 and would all become
    positive.

    Args:
        bbox: ``(N, 4)`` float array, ``(y_min, x_min, y_max, x_max)``.
        gt_bbox: ``(G, 4)`` float array, same order and coordinates.

    Returns:
        A :class:`Match`.
    """
    n, g = len(bbox), len(gt_bbox)
    if n == 0 or g == 0:
        return Match(np.zeros(n, np.int64), np.zeros(n, np.float32), np.zeros(n, bool))
    iou = bbox_iou(bbox, gt_bbox)  # (N, G)
    gt_index = iou.argmax(axis=1)
    max_iou = iou[np.arange(n), gt_index]
    # Per ground truth along contiguous rows: numpy reduces the short axis G of (N, G) slowly.
    iou_t = np.ascontiguousarray(iou.T)  # (N, G) -> (G, N)
    gt_max_iou = iou_t.max(axis=1)  # (G,)
    overlapped = gt_max_iou > 0
    is_gt_best = (iou_t[overlapped] == gt_max_iou[overlapped, None]).any(axis=0)
    return Match(gt_index, max_iou, is_gt_best)


def sample_balanced(pos_index: np.ndarray, neg_index: np.ndarray, n_pos_max: int, n_sample: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw at most ``n_pos_max`` positives, then fill up to ``n_sample`` with negatives.

    Draws are uniform without replacement from ``rng``; a side with no more candidates than its quota is
    kept whole and in its given order.

    Args:
        pos_index: ``(P,)`` int, indices of the positive candidates.
        neg_index: ``(Q,)`` int, indices of the negative candidates.
        n_pos_max: the most positives to keep.
        n_sample: the most samples to keep in all.
        rng: the generator the draws come from.

    Returns:
        ``(pos_keep, neg_keep)``: ``(min(P, n_pos_max),)`` and ``(min(Q, n_sample - len(pos_keep)),)``
        index arrays, subsets of ``pos_index`` and ``neg_index``.
    """
    pos_keep = _draw(pos_index, n_pos_max, rng)
    neg_keep = _draw(neg_index, n_sample - len(pos_keep), rng)
    return pos_keep, neg_keep


def _draw(index, n_max, rng):
    """At most ``max(n_max, 0)`` elements of ``index``, drawn without replacement."""
    n_max = max(int(n_max), 0)
    if len(index) <= n_max:
        return index
    return rng.choice(index, size=n_max, replace=False)


def encode_loc(src_bbox: np.ndarray, dst_bbox: np.ndarray, mean=(0.0, 0.0, 0.0, 0.0),
               std=(1.0, 1.0, 1.0, 1.0)) -> np.ndarray:
    """Offsets from ``src_bbox`` to ``dst_bbox``, normalised: ``(bbox2loc(src, dst) - mean) / std``.

    Args:
        src_bbox: ``(N, 4)`` float array, ``(y_min, x_min, y_max, x_max)``.
        dst_bbox: ``(N, 4)`` float array, the target of each source box.
        mean: 4 floats, subtracted from ``(t_y, t_x, t_h, t_w)``.
        std: 4 floats, dividing the result.

    Returns:
        ``(N, 4)`` float32 ``(t_y, t_x, t_h, t_w)``.
    """
    loc = bbox2loc(src_bbox, dst_bbox)
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    # Passes that change no bit are skipped: x - (+0.0) and x / 1 are x exactly (not x - (-0.0): -0.0 - -0.0
    # is +0.0).
    if not _is_positive_zero(mean):
        loc = loc - mean
    if (std != 1).any():
        loc = loc / std
    return loc.astype(np.float32, copy=False)


def decode_loc(src_bbox: np.ndarray, loc: np.ndarray, mean=(0.0, 0.0, 0.0, 0.0),
               std=(1.0, 1.0, 1.0, 1.0)) -> np.ndarray:
    """The inverse of :func:`encode_loc`: ``loc2bbox(src, loc * std + mean)``.

    Args:
        src_bbox: ``(N, 4)`` float array, ``(y_min, x_min, y_max, x_max)``.
        loc: ``(N, 4)`` float array of normalised ``(t_y, t_x, t_h, t_w)``.
        mean, std: the 4-float normalisation of :func:`encode_loc`.

    Returns:
        ``(N, 4)`` boxes ``(y_min, x_min, y_max, x_max)`` in ``loc``'s dtype.
    """
    mean, std = np.asarray(mean, loc.dtype), np.asarray(std, loc.dtype)
    if (std != 1).any():  # x * 1 is x exactly
        loc = loc * std
    # A +0.0 mean is added as one scalar: the same sums (-0.0 + 0.0 is +0.0 either way), without numpy's slow
    # (N, 4) + (4,) broadcast.
    loc = loc + (loc.dtype.type(0) if _is_positive_zero(mean) else mean)
    return loc2bbox(src_bbox, loc)


def _is_positive_zero(value: np.ndarray) -> bool:
    """Whether every element is +0.0 (not -0.0)."""
    return not (value.any() or np.signbit(value).any())
