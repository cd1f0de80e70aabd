"""Faster R-CNN: a feature extractor, a Region Proposal Network and a RoI head, plus ``predict``.

Ren et al., "Faster R-CNN: Towards Real-Time Object Detection with Region Proposal Networks", NIPS 2015.

Shape symbols used below:

    N:    batch size (images of a batch may have their own sizes inside a padded ``(N, 3, H', W')`` tensor).
    H, W: height and width of an input image; ``H', W'`` after preprocessing.
    R:    RoIs of an image (at most 300 at test time).
    L:    classes of the RoI head, background included (``n_class = n_fg_class + 1``; class 0 is background).
    K:    detections kept in an image.

Naming rules: ``bbox``/``roi`` are boxes in pixels, ``(y_min, x_min, y_max, x_max)``; ``loc`` is the offset
``(t_y, t_x, t_h, t_w)`` that turns a RoI into a box; ``label`` is a foreground label in ``[0, n_fg_class)``
outside the head (head class = label + 1).
"""

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from data.dataset import preprocess
from data.sampler import size_batches
from model.utils.nms import non_maximum_suppression
from utils.array_tool import tonumpy

__all__ = ["FasterRCNN", "box_predictor"]


def box_predictor(n_features: int, n_class: int) -> tuple[nn.Linear, nn.Linear]:
    """The last layers of an RoI head, ``(cls_loc, score)``: ``(R, n_features)`` -> ``(R, n_class * 4)``
    per-class offsets and ``(R, n_class)`` class logits, initialised as the original's: weights drawn from
    N(0, 0.001) and N(0, 0.01), biases 0 (small offsets and near-uniform class scores at the start)."""
    cls_loc = nn.Linear(n_features, n_class * 4)
    score = nn.Linear(n_features, n_class)
    nn.init.normal_(cls_loc.weight, 0, 0.001)
    nn.init.zeros_(cls_loc.bias)
    nn.init.normal_(score.weight, 0, 0.01)
    nn.init.zeros_(score.bias)
    return cls_loc, score

# name -> (nms_thresh, score_thresh) of the per-class suppression in ``predict``
_PRESETS = {"visualize": (0.3, 0.7), "evaluate": (0.3, 0.05)}


class FasterRCNN(nn.Module):
    """Faster R-CNN on top of any extractor/RPN/head triple.

    ``forward`` runs the three parts on a batch of preprocessed images; ``predict`` goes from images to
    detections in original-image pixels. Subclasses (``FasterRCNNVGG16``) build the parts.

    The device and the memory format follow the model: ``model.to(device)`` moves everything, and
    ``model.to(memory_format=torch.channels_last)`` makes ``forward`` hand the extractor a ``channels_last``
    input too (on the CPU this cuts the VGG16 convolutions by about a quarter: ``bench/inference.py``).

    Args:
        extractor: module mapping ``(N, 3, H', W')`` images to ``(N, C, hh, ww)`` features.
        rpn: a :class:`~model.region_proposal_network.RegionProposalNetwork`.
        head: module mapping ``(features, rois (R, 4), roi_indices (R,))`` to ``(roi_cls_locs (R, L*4),
            roi_scores (R, L))``; it has an ``n_class`` attribute (``L``).
        loc_normalize_mean, loc_normalize_std: the head's ``loc`` targets are ``(loc - mean) / std``;
            ``predict`` undoes it.
        min_size, max_size, normalize: how ``predict(visualize=True)`` preprocesses raw images
            (:func:`data.dataset.preprocess`): shorter side to ``min_size``, longer at most ``max_size``,
            ``'torchvision'`` or ``'caffe'`` normalisation (the one the backbone weights want).
    """

    def __init__(
        self,
        extractor: nn.Module,
        rpn: nn.Module,
        head: nn.Module,
        loc_normalize_mean: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0),
        loc_normalize_std: tuple[float, float, float, float] = (0.1, 0.1, 0.2, 0.2),
        min_size: int = 600,
        max_size: int = 1000,
        normalize: str = "torchvision",
    ):
        super().__init__()
        self.extractor = extractor
        self.rpn = rpn
        self.head = head
        self.loc_normalize_mean = tuple(float(v) for v in loc_normalize_mean)
        self.loc_normalize_std = tuple(float(v) for v in loc_normalize_std)
        # buffers follow .to(device) but stay out of the state dict (its keys are the original's)
        self.register_buffer("_loc_mean", torch.tensor(self.loc_normalize_mean), persistent=False)
        self.register_buffer("_loc_std", torch.tensor(self.loc_normalize_std), persistent=False)
        self.min_size = min_size
        self.max_size = max_size
        self.normalize = normalize
        self.use_preset("evaluate")

    @property
    def n_class(self) -> int:
        """Classes of the RoI head, background included."""
        return self.head.n_class

    @property
    def feat_stride(self) -> int:
        """Input-image pixels per feature-map cell."""
        return self.rpn.feat_stride

    def forward(
        self, x: torch.Tensor, scale=1.0, sizes=None
    ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
        """Run extractor, RPN and head on a batch of preprocessed images.

        Args:
            x: ``(N, 3, H', W')`` float preprocessed images, padded at the bottom and right when their sizes
                differ (``data.dataset.pad_images``).
            scale: how much the images were scaled from the originals, one float or one per image (the RPN
                drops proposals smaller than ``16 * scale`` pixels).
            sizes: each image's ``(H', W')`` inside ``x`` (its proposals are clipped to it); ``None``: every
                image fills ``x``.

        Returns:
            ``(roi_cls_locs, roi_scores, rois, roi_indices)``:

            * ``roi_cls_locs``: ``(R, L * 4)`` float tensor, normalised offsets of every RoI for every class.
            * ``roi_scores``: ``(R, L)`` float tensor of class logits.
            * ``rois``: ``(R, 4)`` float32 numpy array, ``(y_min, x_min, y_max, x_max)`` in ``x``'s pixels.
            * ``roi_indices``: ``(R,)`` int32 numpy array, the image of each RoI (ascending).
        """
        if sizes is None:
            sizes = (x.shape[2], x.shape[3])
        h = self.extractor(x.contiguous(memory_format=self._extractor_memory_format()))
        _, _, rois, roi_indices, _ = self.rpn(h, sizes, scale)
        roi_cls_locs, roi_scores = self.head(h, rois, roi_indices)
        return roi_cls_locs, roi_scores, rois, roi_indices

    def _extractor_memory_format(self) -> torch.memory_format:
        """``channels_last`` when the extractor's first convolution weight is in that format."""
        weight = next((p for p in self.extractor.parameters() if p.dim() == 4), None)
        if weight is not None and weight.is_contiguous(memory_format=torch.channels_last):
            return torch.channels_last
        return torch.contiguous_format

    def faster_rcnn_arch(self) -> dict:
        """This class's constructor arguments (all but the three parts) as plain values; a subclass adds
        them to its ``arch`` dict (see ``model/__init__.py``)."""
        return {
            "loc_normalize_mean": list(self.loc_normalize_mean),
            "loc_normalize_std": list(self.loc_normalize_std),
            "min_size": int(self.min_size),
            "max_size": int(self.max_size),
            "normalize": str(self.normalize),
        }

    def use_preset(self, preset: str) -> None:
        """Set the thresholds of ``predict``'s per-class suppression.

        ``'visualize'``: NMS IoU 0.3, score 0.7 (few confident boxes to draw). ``'evaluate'``: NMS IoU 0.3,
        score 0.05 (recall for mAP). Sets ``self.nms_thresh`` and ``self.score_thresh``.
        """
        if preset not in _PRESETS:
            raise ValueError(f"preset must be one of {sorted(_PRESETS)}, got {preset!r}")
        self.nms_thresh, self.score_thresh = _PRESETS[preset]

    @torch.no_grad()
    def predict(
        self, imgs, sizes=None, visualize: bool = False, score_thresh: float | None = None,
        batch_size: int = 1,
    ) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        """Detect objects in images.

        Runs in eval mode (test-time proposal counts) without gradients, on the model's device; the
        train/eval mode and the thresholds found on entry are restored on exit (the original always left the
        model in train mode with the ``'evaluate'`` preset). Under ``torch.autocast`` the network runs in the
        autocast dtype and the decoding and suppression in float32.

        Batches: up to ``batch_size`` images *of the same preprocessed size* go through the network
        together, in order of first appearance; images are never padded here, so every image's detections
        are those of predicting it alone (padding changes the features near the border, and with the toy
        backbone's GroupNorm everywhere). ``data.sampler.size_grouped_batches`` orders a test set so that
        images of one size come together.

        Args:
            imgs: a sequence (or an ``(N, 3, H, W)`` array/tensor) of images. With ``visualize=True``: raw
                ``(3, H, W)`` RGB images in [0, 255], preprocessed here with this model's ``min_size``,
                ``max_size`` and ``normalize``, and the ``'visualize'`` preset is used for this call only.
                Otherwise: ``(3, H', W')`` images already preprocessed, with the current preset.
            sizes: with ``visualize=False``, the original ``(H, W)`` of each image (ints or 0-d tensors).
            visualize: see ``imgs``.
            score_thresh: keep detections whose class probability is above this, for this call only;
                ``None``: the preset's (0.7 with ``visualize=True``, else the current one).
            batch_size: the most images per forward pass.

        Returns:
            ``(bboxes, labels, scores)``, lists with one entry per image, in the order of ``imgs``:

            * ``bboxes[i]``: ``(K, 4)`` float32, ``(y_min, x_min, y_max, x_max)`` in original-image pixels,
              clipped to ``[0, H] x [0, W]``.
            * ``labels[i]``: ``(K,)`` int32 foreground labels in ``[0, n_class - 1)``.
            * ``scores[i]``: ``(K,)`` float32 class probabilities in ``[0, 1]``.

            Detections come class by class (label ascending), best score first within a class.
        """
        if batch_size < 1:
            raise ValueError(f"predict: batch_size must be >= 1, got {batch_size}")
        was_training = self.training
        thresholds = (self.nms_thresh, self.score_thresh)
        self.eval()
        try:
            if visualize:
                self.use_preset("visualize")
                sizes = [tuple(img.shape[1:]) for img in imgs]
                imgs = [preprocess(tonumpy(img, np.float32), self.min_size, self.max_size, self.normalize)
                        for img in imgs]
            elif sizes is None:
                raise ValueError("predict(visualize=False) takes preprocessed images and needs their "
                                 "original sizes: pass sizes=[(H, W), ...]")
            if score_thresh is not None:
                self.score_thresh = float(score_thresh)
            sizes = [(int(size[0]), int(size[1])) for size in sizes]
            if len(sizes) != len(imgs):
                raise ValueError(f"predict: {len(imgs)} images but {len(sizes)} sizes")
            results = [None] * len(imgs)
            for batch in size_batches([tuple(img.shape[-2:]) for img in imgs], batch_size):
                x = torch.stack([torch.as_tensor(imgs[i], dtype=self._loc_mean.dtype) for i in batch])
                detections = self._predict_batch(x.to(self._loc_mean.device), [sizes[i] for i in batch])
                for i, detection in zip(batch, detections, strict=True):
                    results[i] = detection
        finally:
            self.train(was_training)
            self.nms_thresh, self.score_thresh = thresholds
        if not results:
            return [], [], []
        bboxes, labels, scores = (list(column) for column in zip(*results, strict=True))
        return bboxes, labels, scores

    def _predict_batch(self, x: torch.Tensor, sizes: list[tuple[int, int]]) -> list[tuple]:
        """Detections of the ``(N, 3, H', W')`` preprocessed images ``x`` (one size) whose original sizes are
        ``sizes``: one ``(bbox, label, score)`` numpy triple per image."""
        # the RPN's size filter takes the height ratio, as the training pipeline does (data/dataset.py)
        scales = [x.shape[2] / height for height, _ in sizes]
        roi_cls_loc, roi_score, rois, roi_indices = self(x, scale=scales)
        roi_cls_loc, roi_score = roi_cls_loc.float(), roi_score.float()  # decoding in float32 under autocast
        rois = torch.as_tensor(rois, device=roi_cls_loc.device)  # (R, 4)
        bounds = np.searchsorted(roi_indices, np.arange(len(sizes) + 1))  # image i: rows bounds[i:i + 2]
        kept = [self._detect(roi_cls_loc[a:b], roi_score[a:b], rois[a:b], x.shape[2:], size)
                for a, b, size in zip(bounds[:-1], bounds[1:], sizes, strict=True)]
        # the one device -> host crossing of the batch: every image's (K_i, 6) detections, end to end
        counts = [len(k) for k in kept]
        host = torch.cat(kept).cpu().numpy() if kept else np.zeros((0, 6), np.float32)
        detections = []
        for part in np.split(host, np.cumsum(counts)[:-1]):
            detections.append(
                (np.ascontiguousarray(part[:, :4]), part[:, 4].astype(np.int32), part[:, 5].copy()))
        return detections

    def _detect(self, roi_cls_loc, roi_score, rois, input_size, size) -> torch.Tensor:
        """One image's detections on the device: ``(K, 6)`` rows ``(y_min, x_min, y_max, x_max, label,
        score)`` in original-image pixels, from its ``(R, L*4)`` offsets, ``(R, L)`` logits and ``(R, 4)``
        RoIs in pixels of the ``input_size`` network input; ``size = (H, W)`` is the original size."""
        height, width = size
        scale_y, scale_x = input_size[0] / height, input_size[1] / width
        # back to original-image pixels, axis by axis (the exact inverse of the resize)
        roi = rois / roi_cls_loc.new_tensor((scale_y, scale_x, scale_y, scale_x))  # (R, 4)
        roi_cls_loc = roi_cls_loc.view(-1, self.n_class, 4)  # (R, L*4) -> (R, L, 4)
        roi_cls_loc = roi_cls_loc * self._loc_std + self._loc_mean  # undo the target normalisation
        cls_bbox = _loc2bbox(roi[:, None, :], roi_cls_loc)  # (R, L, 4)
        cls_bbox[..., 0::2] = cls_bbox[..., 0::2].clamp(0, height)
        cls_bbox[..., 1::2] = cls_bbox[..., 1::2].clamp(0, width)
        prob = F.softmax(roi_score, dim=1)  # (R, L)

        # background (class 0) out; foreground label = head class - 1
        fg_bbox, fg_prob = cls_bbox[:, 1:, :], prob[:, 1:]  # (R, L-1, 4), (R, L-1)
        fg_label = torch.arange(self.n_class - 1, device=prob.device).expand_as(fg_prob)  # (R, L-1)
        mask = fg_prob > self.score_thresh
        bbox, score, label = fg_bbox[mask], fg_prob[mask], fg_label[mask]  # (K', 4), (K',), (K',)
        keep = _batched_nms(bbox, score, label, self.nms_thresh, max_coord=max(height, width))  # (K,)
        return torch.cat((bbox[keep], label[keep, None].to(bbox.dtype), score[keep, None]), dim=1)  # (K, 6)


def _loc2bbox(src_bbox: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
    """Torch twin of :func:`model.utils.bbox_tools.loc2bbox` for ``predict``: decoding stays on the device.

    ``src_bbox`` ``(..., 4)`` and ``loc`` ``(..., 4)`` broadcast against each other; returns ``(..., 4)``
    boxes ``(y_min, x_min, y_max, x_max)`` from ``g_y = p_h t_y + p_y``, ``g_h = p_h exp(t_h)`` (same for x,
    w).
    """
    src_size = src_bbox[..., 2:] - src_bbox[..., :2]  # (..., 2) heights, widths
    src_ctr = src_bbox[..., :2] + 0.5 * src_size  # (..., 2) centre y, x
    ctr = loc[..., :2] * src_size + src_ctr
    size = torch.exp(loc[..., 2:]) * src_size
    return torch.cat((ctr - 0.5 * size, ctr + 0.5 * size), dim=-1)


def _batched_nms(
    bbox: torch.Tensor, score: torch.Tensor, label: torch.Tensor, thresh: float, max_coord: float
) -> torch.Tensor:
    """NMS within each class, all classes in one call of :func:`non_maximum_suppression`.

    Each box is shifted by ``label * (max_coord + 1)`` along both axes, so boxes of different classes lie in
    disjoint squares: their IoU is 0 and, since ``thresh > 0``, they never suppress each other. (The shift
    costs float32 precision, about ``1e-7`` of the largest shifted coordinate, so a pair whose IoU is within
    that of ``thresh`` may be decided differently than by unshifted boxes.)

    Args:
        bbox: ``(K', 4)`` float boxes, coordinates in ``[0, max_coord]``.
        score: ``(K',)`` float scores.
        label: ``(K',)`` int64 labels (``>= 0``).
        thresh: IoU threshold, ``> 0``; a box is suppressed by a better one of its class at IoU ``>= thresh``.
        max_coord: upper bound of the coordinates.

    Returns:
        ``(K,)`` int64 indices into the inputs, class by class (label ascending), best score first within a
        class; equal scores keep input order.
    """
    if not thresh > 0:
        raise ValueError(f"per-class NMS needs an IoU threshold > 0, got {thresh}")
    shifted = bbox + (label.to(bbox.dtype) * (max_coord + 1))[:, None]  # (K', 4)
    keep = non_maximum_suppression(shifted, thresh, score)  # (K,) best first, on bbox's device
    order = torch.argsort(label[keep], stable=True)  # class by class, keeping best-first within a class
    return keep[order]
