"""The proposal layer: turns the region proposal network's anchor offsets and scores into RoIs.

Shape symbols used below:

    S: number of anchors of the image (``hh * ww * A`` for an ``hh x ww`` feature map).
    R: number of proposals returned.

Boxes are float32 ``(y_min, x_min, y_max, x_max)`` in pixels of the resized input image.
"""

import numpy as np
import torch

from model.utils.nms import non_maximum_suppression
from model.utils.target_helpers import check_boxes, decode_loc
from utils.array_tool import tonumpy

__all__ = ["ProposalCreator"]


class ProposalCreator:
    """Decode, clip, filter, rank and suppress anchor proposals (Ren et al., "Faster R-CNN", NIPS 2015).

    For one image:

    1. decode each anchor with its offsets (not normalised by a mean/std, as in the original);
    2. clip to the image: y to ``[0, H]``, x to ``[0, W]``;
    3. drop boxes whose height or width is below ``min_size * scale``, i.e. ``min_size`` pixels of the
       original image when ``scale`` is the resize factor (the original's rule, its issue #145);
    4. keep the ``n_pre_nms`` boxes of highest score (equal scores: lower anchor index first);
    5. non-maximum suppression at ``nms_thresh`` (suppress at IoU >= thresh) in that order, keep the first
       ``n_post_nms`` survivors.

    ``n_*_pre_nms`` / ``n_*_post_nms`` apply when the caller says it is training / testing; a count <= 0
    means "no limit".

    Args:
        nms_thresh: IoU threshold of the suppression.
        n_train_pre_nms, n_train_post_nms: box counts before / after NMS in training.
        n_test_pre_nms, n_test_post_nms: the same at test time.
        min_size: the smallest height and width kept, in original-image pixels.
    """

    def __init__(self, nms_thresh: float = 0.7, n_train_pre_nms: int = 12000, n_train_post_nms: int = 2000,
                 n_test_pre_nms: int = 6000, n_test_post_nms: int = 300, min_size: float = 16):
        self.nms_thresh = nms_thresh
        self.n_train_pre_nms = n_train_pre_nms
        self.n_train_post_nms = n_train_post_nms
        self.n_test_pre_nms = n_test_pre_nms
        self.n_test_post_nms = n_test_post_nms
        self.min_size = min_size

    def __call__(self, loc, score, anchor: np.ndarray, img_size: tuple[int, int], scale: float = 1.0,
                 training: bool = False) -> np.ndarray:
        """Proposals of one image.

        Args:
            loc: ``(S, 4)`` float ``(t_y, t_x, t_h, t_w)`` per anchor, a numpy array or a torch tensor on
                any device (the box math runs in float32 numpy).
            score: ``(S,)`` float foreground probability per anchor, numpy or torch.
            anchor: ``(S, 4)`` float32 anchors, ``(y_min, x_min, y_max, x_max)``.
            img_size: ``(H, W)`` of the input image.
            scale: the factor the original image was resized by to give the input image.
            training: use the training box counts instead of the test ones.

        Returns:
            ``(R, 4)`` float32 numpy proposals, best first; ``R <= n_post_nms`` (``(0, 4)`` when every box
            is filtered out).
        """
        n_pre_nms, n_post_nms = ((self.n_train_pre_nms, self.n_train_post_nms) if training
                                 else (self.n_test_pre_nms, self.n_test_post_nms))
        device = loc.device if isinstance(loc, torch.Tensor) and loc.is_cuda else None
        # The CPU island: one crossing each for the offsets and the scores.
        loc, score = tonumpy(loc, np.float32), tonumpy(score, np.float32).reshape(-1)
        anchor = check_boxes(anchor, "anchor")
        if not len(loc) == len(score) == len(anchor):
            raise ValueError(f"loc, score and anchor must have one row per anchor, got {len(loc)}, "
                             f"{len(score)} and {len(anchor)}")

        roi = decode_loc(anchor, check_boxes(loc, "loc"))  # (S, 4), a fresh array: clipped in place
        height, width = img_size
        np.clip(roi[:, 0::2], 0, height, out=roi[:, 0::2])
        np.clip(roi[:, 1::2], 0, width, out=roi[:, 1::2])

        min_size = self.min_size * scale
        valid = ((roi[:, 2] - roi[:, 0]) >= min_size) & ((roi[:, 3] - roi[:, 1]) >= min_size)
        order = _rank(score, np.flatnonzero(valid), n_pre_nms)  # best first, ties by index
        roi = np.take(roi, order, axis=0)  # (R', 4) contiguous; take copies rows ~10x faster than roi[order]
        if len(roi) == 0:
            return roi

        # Input order is the priority: no scores are passed (the boxes are already sorted).
        limit = n_post_nms if n_post_nms > 0 else None
        if device is None:
            keep = non_maximum_suppression(roi, self.nms_thresh, limit=limit)
        else:
            keep = non_maximum_suppression(
                torch.from_numpy(roi).to(device), self.nms_thresh, limit=limit).cpu().numpy()
        return np.take(roi, keep, axis=0)


def _rank(score: np.ndarray, index: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` entries of ``index`` of highest ``score``, best first; equal scores: lower index first.

    The same as ``index[np.argsort(-score[index], kind="stable")[:n]]`` (NaN scores last), at a fraction of
    its cost: each candidate gets one unique 64-bit key, its score's rank in the high 32 bits (the float32
    bits mapped to an unsigned order, descending; -0.0 counted as 0.0, NaN after everything) and its index in
    the low 32 bits. Unique keys order alike under any sort, so an unstable (vectorised) sort of the keys, or
    a partition and a sort of the ``n`` smallest, gives exactly the stable order.

    Args:
        score: ``(S,)`` float32 scores.
        index: ``(P,)`` int, ascending indices into ``score`` of the candidates (``P < 2**32``).
        n: the most entries returned; ``<= 0`` means all.

    Returns:
        ``(min(n, P),)`` intp indices into ``score``, best first.
    """
    bits = (score[index] + np.float32(0)).view(np.uint32)  # + 0: -0.0 -> 0.0, as the comparison sees them
    # Descending unsigned order of the floats: positives (sign bit 0) count down from 0x7FFFFFFF (+0.0),
    # negatives count up from 0x80000000 by magnitude; NaN (exponent all ones, mantissa not 0) goes last.
    rank = np.where(bits >> np.uint32(31), bits, np.uint32(0x7FFFFFFF) - bits)
    rank[(bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)] = np.uint32(0xFFFFFFFF)
    key = (rank.astype(np.uint64) << np.uint64(32)) | index.astype(np.uint64)  # (P,) unique
    if 0 < n < len(key):
        key = np.partition(key, n - 1)[:n]  # the n smallest keys, in any order
    key.sort()
    return (key & np.uint64(0xFFFFFFFF)).astype(np.intp)
