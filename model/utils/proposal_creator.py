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
        loc, score = _to_numpy(loc), _to_numpy(score).reshape(-1)
        anchor = check_boxes(anchor, "anchor")
        if not len(loc) == len(score) == len(anchor):
            raise ValueError(f"loc, score and anchor must have one row per anchor, got {len(loc)}, "
                             f"{len(score)} and {len(anchor)}")

        roi = decode_loc(anchor, check_boxes(loc, "loc"))
        height, width = img_size
        roi[:, 0::2] = np.clip(roi[:, 0::2], 0, height)
        roi[:, 1::2] = np.clip(roi[:, 1::2], 0, width)

        min_size = self.min_size * scale
        keep = np.flatnonzero(((roi[:, 2] - roi[:, 0]) >= min_size) & ((roi[:, 3] - roi[:, 1]) >= min_size))
        roi, score = roi[keep], score[keep]

        order = np.argsort(-score, kind="stable")  # descending, ties by index
        if n_pre_nms > 0:
            order = order[:n_pre_nms]
        roi = np.ascontiguousarray(roi[order], dtype=np.float32)
        if len(roi) == 0:
            return roi

        # Input order is the priority: no scores are passed (the boxes are already sorted).
        limit = n_post_nms if n_post_nms > 0 else None
        if device is None:
            keep = non_maximum_suppression(roi, self.nms_thresh, limit=limit)
        else:
            keep = non_maximum_suppression(
                torch.from_numpy(roi).to(device), self.nms_thresh, limit=limit).cpu().numpy()
        return roi[keep]


def _to_numpy(x) -> np.ndarray:
    """A numpy array or a torch tensor (any device and dtype, grad or not) as a float32 numpy array."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(device="cpu", dtype=torch.float32).numpy()
    return np.asarray(x, dtype=np.float32)
