"""Training targets of the region proposal network: one label and one offset per anchor.

Shape symbols used below:

    S: number of anchors of the image (``hh * ww * A`` for an ``hh x ww`` feature map).
    R: number of ground-truth boxes of the image (may be 0).

Boxes are float32 ``(y_min, x_min, y_max, x_max)`` in pixels of the resized input image.
"""

import numpy as np

from model.utils.target_helpers import check_boxes, encode_loc, match_to_gt, sample_balanced

__all__ = ["AnchorTargetCreator"]


class AnchorTargetCreator:
    """Assign ground-truth boxes to anchors (Ren et al., "Faster R-CNN", NIPS 2015, section 3.1.2).

    Only anchors lying fully inside the image take part. Among them:

    * negative (0): IoU with every ground truth below ``neg_iou_thresh``;
    * positive (1): IoU with some ground truth at least ``pos_iou_thresh``, or tied for some ground
      truth's highest IoU (that rule overrides "negative"; a ground truth that overlaps no inside anchor
      at all marks nothing, a fix of the original, which then made every non-overlapping anchor positive);
    * then at most ``int(pos_ratio * n_sample)`` positives are kept at random, and negatives at random up
      to ``n_sample`` samples in all; the others, and every anchor not fully inside, are ignored (-1).

    The offset target of an inside anchor encodes its ground truth of highest IoU (not normalised, as in
    the original); anchors outside the image get zeros. An image without ground truth gets only
    negatives; an image without inside anchors gets only -1 (the original crashed, its issue #20).

    Args:
        n_sample: the most anchors sampled per image.
        pos_iou_thresh: IoU from which an anchor is positive.
        neg_iou_thresh: IoU below which an anchor is negative.
        pos_ratio: the largest share of positives among the samples.
        seed: seed of the creator's own ``numpy.random.Generator``, used when a call passes no ``rng``.
    """

    def __init__(self, n_sample: int = 256, pos_iou_thresh: float = 0.7, neg_iou_thresh: float = 0.3,
                 pos_ratio: float = 0.5, seed: int | None = None):
        self.n_sample = n_sample
        self.pos_iou_thresh = pos_iou_thresh
        self.neg_iou_thresh = neg_iou_thresh
        self.pos_ratio = pos_ratio
        self.rng = np.random.default_rng(seed)

    def __call__(self, bbox: np.ndarray, anchor: np.ndarray, img_size: tuple[int, int],
                 rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Label and offset targets of every anchor.

        Args:
            bbox: ``(R, 4)`` float32 ground-truth boxes, ``(y_min, x_min, y_max, x_max)``.
            anchor: ``(S, 4)`` float32 anchors, same order.
            img_size: ``(H, W)`` of the input image.
            rng: generator for the random sampling; ``None`` uses the creator's own.

        Returns:
            ``(loc, label)``: ``(S, 4)`` float32 ``(t_y, t_x, t_h, t_w)`` targets and ``(S,)`` int32 labels
            in ``{-1, 0, 1}`` (ignored, negative, positive).
        """
        bbox, anchor = check_boxes(bbox, "bbox"), check_boxes(anchor, "anchor")
        rng = self.rng if rng is None else rng
        inside = _inside_index(anchor, img_size)
        # np.take: the row gathers here copy ~10x faster than fancy indexing of an (N, 4) array.
        inside_loc, inside_label = self._targets(bbox, np.take(anchor, inside, axis=0), rng)

        loc = np.zeros((len(anchor), 4), np.float32)
        label = np.full(len(anchor), -1, np.int32)
        loc[inside] = inside_loc
        label[inside] = inside_label
        return loc, label

    def _targets(self, bbox, anchor, rng):
        """Targets of the inside anchors: ``(N, 4)`` float32 locs, ``(N,)`` int32 labels."""
        match = match_to_gt(anchor, bbox)
        label = np.full(len(anchor), -1, np.int32)
        label[match.max_iou < self.neg_iou_thresh] = 0
        label[match.is_gt_best] = 1
        label[match.max_iou >= self.pos_iou_thresh] = 1

        pos_keep, neg_keep = sample_balanced(
            np.flatnonzero(label == 1), np.flatnonzero(label == 0),
            int(self.pos_ratio * self.n_sample), self.n_sample, rng)
        label[:] = -1
        label[pos_keep] = 1
        label[neg_keep] = 0

        if len(bbox) == 0:
            return np.zeros((len(anchor), 4), np.float32), label
        return encode_loc(anchor, np.take(bbox, match.gt_index, axis=0)), label


def _inside_index(anchor, img_size):
    """``(N,)`` indices of the anchors lying fully inside an ``(H, W)`` image (edges included)."""
    height, width = img_size
    return np.flatnonzero(
        (anchor[:, 0] >= 0) & (anchor[:, 1] >= 0) & (anchor[:, 2] <= height) & (anchor[:, 3] <= width))

