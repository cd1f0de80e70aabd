"""Training targets of the RoI head: which proposals to train on, their class and their offsets.

Shape symbols used below:

    R: number of proposals (RoIs) from the region proposal network.
    G: number of ground-truth boxes of the image (may be 0).
    S: number of sampled RoIs returned (at most ``n_sample``).

Boxes are float32 ``(y_min, x_min, y_max, x_max)`` in pixels of the resized input image. Ground-truth
labels are foreground labels in ``[0, n_fg_class)``; the head's labels add 1, and 0 is background.
"""

import numpy as np

from model.utils.target_helpers import check_boxes, encode_loc, match_to_gt, sample_balanced

__all__ = ["ProposalTargetCreator"]


class ProposalTargetCreator:
    """Sample RoIs and assign them ground truth (Girshick, "Fast R-CNN", ICCV 2015, section 2.3).

    The ground-truth boxes are added to the proposals first (so every image has positives). Then:

    * positives: IoU with some ground truth at least ``pos_iou_thresh``; at most
      ``round(n_sample * pos_ratio)`` are kept at random; their label is that ground truth's label + 1;
    * negatives: highest IoU in ``[neg_iou_thresh_lo, neg_iou_thresh_hi)``, kept at random to fill up to
      ``n_sample``; label 0 (background). The original uses ``lo = 0.0`` (py-faster-rcnn uses 0.1).

    Fewer than ``n_sample`` RoIs come back when candidates are scarce (no padding, as in the original). An
    image without ground truth (``G == 0``) gets only negatives, with zero offsets.

    Args:
        n_sample: the most RoIs sampled per image.
        pos_ratio: the largest share of positives among the samples.
        pos_iou_thresh: IoU from which a RoI is positive.
        neg_iou_thresh_hi: IoU below which a RoI may be negative.
        neg_iou_thresh_lo: IoU from which a RoI may be negative.
        seed: seed of the creator's own ``numpy.random.Generator``, used when a call passes no ``rng``.
    """

    def __init__(self, n_sample: int = 128, pos_ratio: float = 0.25, pos_iou_thresh: float = 0.5,
                 neg_iou_thresh_hi: float = 0.5, neg_iou_thresh_lo: float = 0.0, seed: int | None = None):
        self.n_sample = n_sample
        self.pos_ratio = pos_ratio
        self.pos_iou_thresh = pos_iou_thresh
        self.neg_iou_thresh_hi = neg_iou_thresh_hi
        self.neg_iou_thresh_lo = neg_iou_thresh_lo
        self.rng = np.random.default_rng(seed)

    def __call__(self, roi: np.ndarray, bbox: np.ndarray, label: np.ndarray,
                 loc_normalize_mean=(0.0, 0.0, 0.0, 0.0), loc_normalize_std=(0.1, 0.1, 0.2, 0.2),
                 rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sample RoIs with their targets.

        Args:
            roi: ``(R, 4)`` float32 proposals, ``(y_min, x_min, y_max, x_max)``.
            bbox: ``(G, 4)`` float32 ground-truth boxes, same order.
            label: ``(G,)`` int32 foreground labels in ``[0, n_fg_class)``.
            loc_normalize_mean: 4 floats subtracted from the offsets ``(t_y, t_x, t_h, t_w)``.
            loc_normalize_std: 4 floats dividing them afterwards.
            rng: generator for the random sampling; ``None`` uses the creator's own.

        Returns:
            ``(sample_roi, gt_roi_loc, gt_roi_label)``: ``(S, 4)`` float32 boxes (positives first),
            ``(S, 4)`` float32 normalised offsets to their ground truth, ``(S,)`` int32 labels in
            ``[0, n_fg_class]`` with 0 = background.
        """
        roi, bbox = check_boxes(roi, "roi"), check_boxes(bbox, "bbox")
        label = np.asarray(label).reshape(-1)
        if len(label) != len(bbox):
            raise ValueError(f"label has {len(label)} entries for {len(bbox)} ground-truth boxes")
        rng = self.rng if rng is None else rng

        roi = np.concatenate((roi, bbox), axis=0).astype(np.float32, copy=False)
        match = match_to_gt(roi, bbox)
        pos_index = np.flatnonzero(match.max_iou >= self.pos_iou_thresh)
        neg_index = np.flatnonzero(
            (match.max_iou < self.neg_iou_thresh_hi) & (match.max_iou >= self.neg_iou_thresh_lo))
        pos_keep, neg_keep = sample_balanced(
            pos_index, neg_index, int(np.round(self.n_sample * self.pos_ratio)), self.n_sample, rng)
        keep = np.concatenate((pos_keep, neg_keep)).astype(np.int64)

        sample_roi = roi[keep]
        gt_roi_label = np.zeros(len(keep), np.int32)
        if len(bbox) == 0:
            return sample_roi, np.zeros((len(keep), 4), np.float32), gt_roi_label
        gt_roi_label[:len(pos_keep)] = label[match.gt_index[pos_keep]] + 1
        gt_roi_loc = encode_loc(sample_roi, bbox[match.gt_index[keep]], loc_normalize_mean, loc_normalize_std)
        return sample_roi, gt_roi_loc, gt_roi_label
