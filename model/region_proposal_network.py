"""Region Proposal Network: Ren et al., "Faster R-CNN: Towards Real-Time Object Detection with Region
Proposal Networks", NIPS 2015, section 3.1.

Shape symbols used below:

    N:      batch size.
    C:      channels of the feature map the RPN reads.
    H, W:   height and width of the (preprocessed) input image, in pixels.
    hh, ww: height and width of the feature map (about ``H / feat_stride``, ``W / feat_stride``).
    A:      anchors per feature-map location, ``len(ratios) * len(anchor_scales)``.
    S:      anchors in the image, ``hh * ww * A``; anchor ``(y * ww + x) * A + a`` is base anchor ``a``
            shifted to feature cell ``(y, x)``.
    R':     proposals of the whole batch.

Naming rules: ``bbox``/``anchor``/``roi`` are boxes in input-image pixels, ``(y_min, x_min, y_max, x_max)``;
``loc`` is the offset ``(t_y, t_x, t_h, t_w)`` that turns an anchor into a box (``utils/bbox_tools.py``).
"""

import inspect

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from model.utils import cpu_conv
from model.utils.bbox_tools import generate_anchor_base
from model.utils.creator_tool import ProposalCreator
from utils.array_tool import tonumpy

__all__ = ["RegionProposalNetwork", "full_proposal_params", "per_image"]


class RegionProposalNetwork(nn.Module):
    """Scores the anchors of a feature map and turns the best of them into proposals (RoIs).

    A 3x3 convolution (``in_channels -> mid_channels``, ReLU) feeds two 1x1 convolutions: ``loc`` predicts the
    ``4 A`` offsets and ``score`` the ``2 A`` background/foreground logits of the ``A`` anchors of every
    location. All three weights start from ``N(0, 0.01)``, biases from 0 (the original's initialisation).

    Args:
        in_channels: channels ``C`` of the input feature map.
        mid_channels: channels of the 3x3 convolution.
        ratios: anchor height / width ratios.
        anchor_scales: anchor sizes, in multiples of the 16-pixel base anchor.
        feat_stride: input-image pixels per feature-map cell.
        proposal_creator_params: keyword arguments of :class:`~model.utils.creator_tool.ProposalCreator`
            (NMS threshold, pre/post-NMS counts for training and test, minimum box size).
    """

    def __init__(
        self,
        in_channels: int = 512,
        mid_channels: int = 512,
        ratios: tuple[float, ...] = (0.5, 1, 2),
        anchor_scales: tuple[float, ...] = (8, 16, 32),
        feat_stride: int = 16,
        proposal_creator_params: dict | None = None,
    ):
        super().__init__()
        self.anchor_base = generate_anchor_base(anchor_scales=anchor_scales, ratios=ratios)  # (A, 4)
        self.feat_stride = feat_stride
        self.proposal_creator_params = full_proposal_params(proposal_creator_params)
        self.proposal_layer = ProposalCreator(**self.proposal_creator_params)
        n_anchor = self.anchor_base.shape[0]
        self.conv1 = cpu_conv.Conv2d(in_channels, mid_channels, 3, 1, 1)  # Winograd on the CPU where faster
        self.score = nn.Conv2d(mid_channels, n_anchor * 2, 1, 1, 0)
        self.loc = nn.Conv2d(mid_channels, n_anchor * 4, 1, 1, 0)
        for layer in (self.conv1, self.score, self.loc):
            nn.init.normal_(layer.weight, 0, 0.01)
            nn.init.zeros_(layer.bias)

    def forward(
        self, x: torch.Tensor, img_size, scale=1.0
    ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray, np.ndarray]:
        """Predict anchor offsets and scores, and the proposals they give.

        Args:
            x: ``(N, C, hh, ww)`` float feature map of a batch of (possibly padded) images.
            img_size: ``(H, W)`` of every image, or one ``(H, W)`` per image: each image's own size inside
                the padded batch (its proposals are clipped to it).
            scale: how much the input images were scaled from the original ones (one float, or one per
                image); the proposal layer drops boxes smaller than ``min_size * scale`` pixels.

        Returns:
            ``(rpn_locs, rpn_scores, rois, roi_indices, anchor)``:

            * ``rpn_locs``: ``(N, S, 4)`` float tensor of ``(t_y, t_x, t_h, t_w)`` per anchor.
            * ``rpn_scores``: ``(N, S, 2)`` float tensor of logits, ``[background, foreground]`` per anchor
              (the loss takes logits; proposals are ranked by the softmax foreground probability).
            * ``rois``: ``(R', 4)`` float32 numpy array of the proposals of all images, input-image pixels,
              ``(y_min, x_min, y_max, x_max)``; constants (no gradient flows through them).
            * ``roi_indices``: ``(R',)`` int32 numpy array, the image of each proposal (ascending).
            * ``anchor``: ``(S, 4)`` float32 numpy array of the anchors, input-image pixels (the same for
              every image of the batch).
        """
        n, _, hh, ww = x.shape
        img_sizes, scales = per_image(img_size, scale, n)
        anchor = _enumerate_shifted_anchor(self.anchor_base, self.feat_stride, hh, ww)  # (S, 4)
        n_anchor = self.anchor_base.shape[0]
        h = F.relu(self.conv1(x))

        rpn_locs = self.loc(h)  # (N, A*4, hh, ww)
        rpn_locs = rpn_locs.permute(0, 2, 3, 1).reshape(n, -1, 4)  # -> (N, hh, ww, A*4) -> (N, S, 4)

        rpn_scores = self.score(h)  # (N, A*2, hh, ww), per location [a0_bg, a0_fg, a1_bg, a1_fg, ...]
        rpn_scores = rpn_scores.permute(0, 2, 3, 1)  # -> (N, hh, ww, A*2)
        rpn_softmax_scores = F.softmax(rpn_scores.reshape(n, hh, ww, n_anchor, 2), dim=4)  # (N, hh, ww, A, 2)
        rpn_fg_scores = rpn_softmax_scores[..., 1].reshape(n, -1)  # (N, hh, ww, A) -> (N, S)
        rpn_scores = rpn_scores.reshape(n, -1, 2)  # (N, hh, ww, A*2) -> (N, S, 2)

        # The CPU island: the offsets and scores of the whole batch cross once, as float32 numpy.
        # (N, S, 4) + (N, S, 1) -> (N, S, 5)
        host = tonumpy(torch.cat((rpn_locs.detach(), rpn_fg_scores.detach()[..., None]), dim=2), np.float32)
        rois, roi_indices = [], []
        for i in range(n):
            roi = self.proposal_layer(host[i, :, :4], host[i, :, 4], anchor, img_sizes[i], scale=scales[i],
                                      training=self.training)
            rois.append(roi)
            roi_indices.append(np.full(len(roi), i, dtype=np.int32))
        rois = np.concatenate(rois, axis=0).astype(np.float32, copy=False)  # (R', 4)
        roi_indices = np.concatenate(roi_indices, axis=0)  # (R',)
        return rpn_locs, rpn_scores, rois, roi_indices, anchor


def per_image(img_size, scale, n: int) -> tuple[list[tuple[int, int]], list[float]]:
    """``img_size`` and ``scale`` as one ``(H, W)`` and one float per image of a batch of ``n``.

    Args:
        img_size: one ``(H, W)`` for every image, or a sequence of ``n`` of them.
        scale: one number (or one-element tensor) for every image, or a sequence of ``n``.

    Raises:
        ValueError: a sequence of another length than ``n``.
    """
    if len(img_size) == 2 and all(np.ndim(v) == 0 for v in img_size):
        sizes = [(int(img_size[0]), int(img_size[1]))] * n
    else:
        sizes = [(int(h), int(w)) for h, w in img_size]
    values = np.asarray(scale.tolist() if torch.is_tensor(scale) else scale, dtype=np.float64).reshape(-1)
    scales = values.tolist() * n if values.size == 1 else values.tolist()
    if len(sizes) != n or len(scales) != n:
        raise ValueError(f"{n} images but {len(sizes)} sizes and {len(scales)} scales")
    return sizes, scales


def full_proposal_params(params: dict | None = None) -> dict:
    """Every keyword argument of :class:`~model.utils.creator_tool.ProposalCreator`: ``params``, then its
    defaults (the original's: NMS 0.7, 12000/2000 boxes in training, 6000/300 at test, 16-pixel minimum).

    A model records this full dict in its ``arch``, so a checkpoint says which proposals it was trained and
    is evaluated with, and an ``arch`` written before a setting existed means the default.

    Raises:
        ValueError: a key that ``ProposalCreator`` does not take.
    """
    defaults = {name: p.default for name, p in inspect.signature(ProposalCreator).parameters.items()}
    params = dict(params or {})
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ValueError(f"proposal_creator_params: unknown keys {unknown}; ProposalCreator takes "
                         f"{sorted(defaults)}")
    return {**defaults, **params}



def _enumerate_shifted_anchor(
    anchor_base: np.ndarray, feat_stride: int, height: int, width: int
) -> np.ndarray:
    """Place the base anchors on every cell of a ``height x width`` feature map.

    The shift of cell ``(y, x)`` is its top-left input pixel ``(feat_stride * y, feat_stride * x)``, so the
    anchors of a cell are centred on ``feat_stride * (y, x) + base centre`` (``(8, 8)`` for a 16-pixel
    base).

    Args:
        anchor_base: ``(A, 4)`` base anchors, ``(y_min, x_min, y_max, x_max)`` around the origin cell.
        feat_stride: input pixels per feature-map cell.
        height, width: feature-map size ``hh, ww``.

    Returns:
        ``(hh * ww * A, 4)`` float32 anchors; row ``(y * ww + x) * A + a`` is base anchor ``a`` at cell
        ``(y, x)`` (x varies fastest, then y; the layout of the RPN's permuted outputs).
    """
    shift_y = np.arange(height, dtype=np.float32) * feat_stride  # (hh,)
    shift_x = np.arange(width, dtype=np.float32) * feat_stride  # (ww,)
    shift_x, shift_y = np.meshgrid(shift_x, shift_y)  # (hh, ww) each, x varying fastest
    shift = np.stack((shift_y, shift_x, shift_y, shift_x), axis=2)  # (hh, ww, 4)
    shift = shift.reshape(-1, 1, 4)  # (hh, ww, 4) -> (K, 1, 4), K = hh * ww
    anchor = anchor_base.astype(np.float32)[None] + shift  # (1, A, 4) + (K, 1, 4) -> (K, A, 4)
    return anchor.reshape(-1, 4)  # (K, A, 4) -> (K*A, 4)
