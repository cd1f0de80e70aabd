"""Training wrapper: the four Faster R-CNN losses, the optimizer, loss meters and checkpoint I/O.

Shape symbols:

    S: number of anchors of the image (``H' W' A`` for a feature map of ``H' x W'`` cells).
    R: number of ground-truth boxes of the image (0 for an image without objects).
    M: number of RoIs sampled for the head (at most 128 by default).
    L: number of classes of the head, background included (``n_fg_class + 1``).

The target creators are numpy code: the ground truth, the anchors and the proposals cross to the CPU once per
step and the targets come back to the model's device once (the "CPU island" of the original).
"""

import math
from collections import namedtuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from model import arch_of
from model.utils.creator_tool import AnchorTargetCreator, ProposalTargetCreator
from utils.array_tool import tonumpy
from utils.checkpoint import (
    default_class_names,
    load_checkpoint,
    make_checkpoint,
    restore_checkpoint,
    save_checkpoint,
    to_plain,
)

__all__ = [
    "AverageValueMeter",
    "ConfusionMeter",
    "FasterRCNNTrainer",
    "LossTuple",
    "NonFiniteLossError",
    "fast_rcnn_loc_loss",
    "get_optimizer",
    "smooth_l1_loss",
]

LossTuple = namedtuple(
    "LossTuple", ["rpn_loc_loss", "rpn_cls_loss", "roi_loc_loss", "roi_cls_loss", "total_loss"]
)


class NonFiniteLossError(FloatingPointError):
    """A training step produced a NaN or infinite loss; the optimizer step was not taken."""


def smooth_l1_loss(x: torch.Tensor, t: torch.Tensor, in_weight: torch.Tensor, sigma: float) -> torch.Tensor:
    """Summed smooth L1 loss of ``in_weight * (x - t)`` (Fast R-CNN, eq. 3, with py-faster-rcnn's sigma).

    With ``d = in_weight * (x - t)``, each element contributes ``0.5 sigma^2 d^2`` where ``|d| < 1 / sigma^2``
    and ``|d| - 0.5 / sigma^2`` elsewhere; the sum over all elements is returned.

    Args:
        x, t, in_weight: tensors of one shape (predictions, targets, 0/1 weights).
        sigma: larger values make the quadratic zone narrower (3 for the RPN, 1 for the head).

    Returns:
        A 0-d tensor.
    """
    sigma2 = sigma**2
    diff = in_weight * (x - t)
    abs_diff = diff.abs()
    quadratic = abs_diff < (1.0 / sigma2)
    return torch.where(quadratic, (0.5 * sigma2) * diff**2, abs_diff - 0.5 / sigma2).sum()


def fast_rcnn_loc_loss(pred_loc: torch.Tensor, gt_loc: torch.Tensor, gt_label: torch.Tensor, sigma: float):
    """Localisation loss over positive samples, normalised by the number of non-ignored samples.

    As in the original (and ChainerCV), only rows with ``gt_label > 0`` contribute, but the sum is divided by
    the number of rows with ``gt_label >= 0`` (positives and negatives, ``-1`` ignored), not by the number of
    positives. With no non-ignored row the loss is 0.

    Args:
        pred_loc: ``(K, 4)`` float tensor, predicted ``(t_y, t_x, t_h, t_w)``.
        gt_loc: ``(K, 4)`` float tensor, target offsets.
        gt_label: ``(K,)`` integer tensor; ``-1`` ignored, ``0`` negative, ``> 0`` positive.
        sigma: smooth L1 parameter (see :func:`smooth_l1_loss`).

    Returns:
        A 0-d tensor.
    """
    in_weight = (gt_label > 0).to(pred_loc.dtype)[:, None].expand_as(gt_loc)
    loss = smooth_l1_loss(pred_loc, gt_loc, in_weight, sigma)
    n_valid = (gt_label >= 0).sum().clamp(min=1)
    return loss / n_valid.to(loss.dtype)


def get_optimizer(
    model: nn.Module,
    lr: float = 1e-3,
    weight_decay: float = 5e-4,
    use_adam: bool = False,
    momentum: float = 0.9,
) -> torch.optim.Optimizer:
    """The original's optimizer: biases get twice the lr and no weight decay; everything else ``lr``, ``wd``.

    Only parameters with ``requires_grad`` are optimised (VGG16's frozen conv1/conv2 are left out). The
    weight group comes first, so ``param_groups[0]['lr']`` is the base lr as the original's logs report it.

    The fused implementation (one pass over each parameter for weight decay, momentum and update: about 5x
    faster than the default on a CPU, where VGG16's 120M fc6/fc7 weights make the step memory-bound) is used
    when every parameter is a float tensor on the CPU or a CUDA device; it computes the same update.

    Returns:
        ``torch.optim.SGD(momentum=momentum)``, or ``torch.optim.Adam`` when ``use_adam``.
    """
    weights, biases = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (biases if "bias" in name else weights).append(param)
    groups = [
        {"params": weights, "lr": lr, "weight_decay": weight_decay},
        {"params": biases, "lr": 2 * lr, "weight_decay": 0.0},
    ]
    params = weights + biases
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    if use_adam:
        return torch.optim.Adam(groups, fused=fused or None)
    return torch.optim.SGD(groups, momentum=momentum, fused=fused or None)


class AverageValueMeter:
    """Running mean of scalar values (what torchnet's meter of the same name was used for)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.n = 0
        self.sum = 0.0

    def add(self, value: float) -> None:
        self.n += 1
        self.sum += float(value)

    def value(self) -> float:
        """The mean of the values added since the last reset; NaN when none was."""
        return self.sum / self.n if self.n else math.nan


class ConfusionMeter:
    """``(K, K)`` counts of (true class, predicted class) pairs; row = truth, column = prediction."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.reset()

    def reset(self) -> None:
        self.conf = np.zeros((self.k, self.k), dtype=np.int64)

    def add(self, scores: torch.Tensor, target: torch.Tensor) -> None:
        """Count the arg-max of ``scores`` ``(N, K)`` against ``target`` ``(N,)`` ints in ``[0, K)``.

        Counting runs on the tensors' device; one ``(K, K)`` array crosses to the host.
        """
        if scores.shape[1] != self.k:
            raise ValueError(f"scores have {scores.shape[1]} columns, the meter counts {self.k} classes")
        pred = scores.argmax(dim=1)
        counts = torch.bincount(target.long() * self.k + pred, minlength=self.k**2)
        self.conf += counts.reshape(self.k, self.k).cpu().numpy()

    def value(self) -> np.ndarray:
        """``(K, K)`` int64 counts."""
        return self.conf


class FasterRCNNTrainer(nn.Module):
    """Wraps a ``FasterRCNN`` for training: targets, losses, optimizer, meters, checkpoints.

    ``FasterRCNNTrainer(model)`` uses the original's settings. The trainer's tensors follow the model: move
    the model (or the trainer, which holds it) to a device before training.

    Args:
        faster_rcnn: a ``model.faster_rcnn.FasterRCNN``; its ``arch`` dict is stored in checkpoints.
        rpn_sigma, roi_sigma: smooth L1 sigmas of the RPN and head localisation losses.
        lr, weight_decay, use_adam, momentum: optimizer settings (see :func:`get_optimizer`).
        seed: seeds the ``numpy.random.Generator`` that the target creators sample with; ``None`` draws
            fresh entropy.
        class_names: the ``n_fg_class`` names stored in checkpoints (default: VOC's names for 20 classes,
            ``class_0, class_1, ...`` otherwise).
        config: plain values stored as the checkpoint's ``config`` (the training ``Config``).
        anchor_target_params, proposal_target_params: keyword arguments of the two target creators.
    """

    def __init__(
        self,
        faster_rcnn: nn.Module,
        *,
        rpn_sigma: float = 3.0,
        roi_sigma: float = 1.0,
        lr: float = 1e-3,
        weight_decay: float = 5e-4,
        use_adam: bool = False,
        momentum: float = 0.9,
        seed: int | None = None,
        class_names: tuple | list | None = None,
        config: dict | None = None,
        anchor_target_params: dict | None = None,
        proposal_target_params: dict | None = None,
    ) -> None:
        super().__init__()
        self.faster_rcnn = faster_rcnn
        self.rpn_sigma = rpn_sigma
        self.roi_sigma = roi_sigma
        self.anchor_target_creator = AnchorTargetCreator(**(anchor_target_params or {}))
        self.proposal_target_creator = ProposalTargetCreator(**(proposal_target_params or {}))
        self.rng = np.random.default_rng(seed)
        self.loc_normalize_mean = tuple(faster_rcnn.loc_normalize_mean)
        self.loc_normalize_std = tuple(faster_rcnn.loc_normalize_std)
        self.optimizer = get_optimizer(faster_rcnn, lr, weight_decay, use_adam, momentum)
        n_fg_class = faster_rcnn.n_class - 1
        if class_names is None:
            class_names = default_class_names(n_fg_class)
        if len(class_names) != n_fg_class:
            raise ValueError(f"{len(class_names)} class names given for a model of {n_fg_class} classes")
        self.class_names = list(class_names)
        self.config = dict(config or {})
        self.meters = {name: AverageValueMeter() for name in LossTuple._fields}
        self.rpn_cm = ConfusionMeter(2)
        self.roi_cm = ConfusionMeter(faster_rcnn.n_class)

    @classmethod
    def from_config(cls, faster_rcnn: nn.Module, cfg, class_names=None) -> "FasterRCNNTrainer":
        """A trainer with the hyper-parameters of a ``utils.config.Config`` (stored in its checkpoints)."""
        return cls(
            faster_rcnn,
            rpn_sigma=cfg.rpn_sigma,
            roi_sigma=cfg.roi_sigma,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            use_adam=cfg.use_adam,
            seed=cfg.seed,
            class_names=class_names,
            config=to_plain(cfg),
        )

    @property
    def device(self) -> torch.device:
        return next(self.faster_rcnn.parameters()).device

    def forward(self, imgs, bboxes, labels, scale) -> LossTuple:
        """Losses of one image.

        Args:
            imgs: ``(1, 3, H, W)`` float tensor, a preprocessed image (``H, W`` after resizing).
            bboxes: ``(1, R, 4)`` float tensor or array, ground truth ``(y_min, x_min, y_max, x_max)`` in
                pixels of the resized image; ``R`` may be 0 (background-only image).
            labels: ``(1, R)`` integer tensor or array of foreground labels in ``[0, n_fg_class)``.
            scale: resize factor from the original image to ``imgs`` (float or one-element tensor).

        Returns:
            ``LossTuple`` of 0-d tensors: RPN loc, RPN cls, RoI loc, RoI cls and their sum.
        """
        if imgs.shape[0] != 1 or len(bboxes) != 1:
            raise ValueError("Currently only batch size 1 is supported.")
        model = self.faster_rcnn
        device = self.device
        imgs = torch.as_tensor(imgs).to(device, torch.float32)
        img_size = tuple(imgs.shape[2:])
        scale = float(scale)
        # The CPU island: ground truth as numpy for the creators.
        bbox = tonumpy(bboxes[0], np.float32).reshape(-1, 4)
        label = tonumpy(labels[0], np.int32).reshape(-1)

        features = model.extractor(imgs)
        rpn_locs, rpn_scores, rois, _, anchor = model.rpn(features, img_size, scale)
        rpn_loc, rpn_score = rpn_locs[0], rpn_scores[0]  # (S, 4), (S, 2)

        sample_roi, gt_roi_loc, gt_roi_label = self.proposal_target_creator(
            rois, bbox, label, self.loc_normalize_mean, self.loc_normalize_std, rng=self.rng
        )
        sample_roi_index = np.zeros(len(sample_roi), dtype=np.int32)
        roi_cls_loc, roi_score = model.head(features, sample_roi, sample_roi_index)  # (M, L*4), (M, L)

        gt_rpn_loc, gt_rpn_label = self.anchor_target_creator(bbox, anchor, img_size, rng=self.rng)
        # Targets back to the device, one crossing each.
        gt_rpn_loc = torch.from_numpy(gt_rpn_loc).to(device)
        gt_rpn_label = torch.from_numpy(gt_rpn_label).to(device, torch.long)
        gt_roi_loc = torch.from_numpy(gt_roi_loc).to(device)
        gt_roi_label = torch.from_numpy(gt_roi_label).to(device, torch.long)

        rpn_loc_loss = fast_rcnn_loc_loss(rpn_loc, gt_rpn_loc, gt_rpn_label, self.rpn_sigma)
        rpn_cls_loss = F.cross_entropy(rpn_score, gt_rpn_label, ignore_index=-1)
        sampled = gt_rpn_label > -1
        self.rpn_cm.add(rpn_score[sampled].detach(), gt_rpn_label[sampled])

        n_sample = roi_cls_loc.shape[0]
        roi_cls_loc = roi_cls_loc.view(n_sample, -1, 4)  # (M, L*4) -> (M, L, 4)
        roi_loc = roi_cls_loc[torch.arange(n_sample, device=device), gt_roi_label]  # (M, 4), own class's row
        roi_loc_loss = fast_rcnn_loc_loss(roi_loc, gt_roi_loc, gt_roi_label, self.roi_sigma)
        roi_cls_loss = F.cross_entropy(roi_score, gt_roi_label)
        self.roi_cm.add(roi_score.detach(), gt_roi_label)

        losses = [rpn_loc_loss, rpn_cls_loss, roi_loc_loss, roi_cls_loss]
        return LossTuple(*losses, sum(losses))

    def train_step(self, imgs, bboxes, labels, scale) -> LossTuple:
        """One SGD step on one image: forward, loss check, backward, optimizer step, meters.

        Raises:
            NonFiniteLossError: a loss is NaN or infinite; the weights and the optimizer are left unchanged.
        """
        self.optimizer.zero_grad(set_to_none=True)
        losses = self.forward(imgs, bboxes, labels, scale)
        values = torch.stack([loss.detach() for loss in losses]).tolist()  # one sync for all five
        check_losses(values)
        losses.total_loss.backward()
        self.optimizer.step()
        self.update_meters(values)
        return losses

    def rng_state(self) -> dict:
        """The state of the target creators' generator (plain values), for a resumable checkpoint."""
        return self.rng.bit_generator.state

    def set_rng_state(self, state: dict) -> None:
        """Continue the target creators' generator from :meth:`rng_state`."""
        self.rng.bit_generator.state = state

    def scale_lr(self, decay: float = 0.1) -> None:
        """Multiply the lr of every parameter group by ``decay``."""
        for group in self.optimizer.param_groups:
            group["lr"] *= decay

    @property
    def lr(self) -> float:
        """The base lr (the weight group's; biases get twice this)."""
        return self.optimizer.param_groups[0]["lr"]

    def update_meters(self, values) -> None:
        """Add one step's five loss values (floats, ``LossTuple`` order) to the meters."""
        for name, value in zip(LossTuple._fields, values, strict=True):
            self.meters[name].add(value)

    def reset_meters(self) -> None:
        for meter in self.meters.values():
            meter.reset()
        self.rpn_cm.reset()
        self.roi_cm.reset()

    def get_meter_data(self) -> dict:
        """``{loss name: mean since the last reset}``."""
        return {name: meter.value() for name, meter in self.meters.items()}

    def save(self, path, save_optimizer: bool = True, vis_info: dict | None = None, **other_info) -> str:
        """Write a checkpoint of the model (and optimizer) atomically to ``path`` (``utils/checkpoint.py``).

        Args:
            path: destination file; its folder is created when missing.
            save_optimizer: also store the optimizer state (momentum buffers, lrs), needed to resume.
            vis_info: the visualizer's state (plain values), optional.
            other_info: plain values stored under ``other_info``, e.g. ``epoch``, ``best_map``,
                ``iteration``; ``lr`` defaults to the current base lr.

        Returns:
            ``path`` as a string.
        """
        other_info.setdefault("lr", self.lr)
        ckpt = make_checkpoint(
            self.faster_rcnn.state_dict(), arch_of(self.faster_rcnn), self.class_names, config=self.config,
            other_info=other_info, optimizer=self.optimizer.state_dict() if save_optimizer else None,
            vis_info=vis_info)
        return save_checkpoint(ckpt, path)

    def load(self, path, load_optimizer: bool = True) -> dict:
        """Load a checkpoint's weights (and optimizer state) into this trainer.

        The file is read with ``weights_only=True``. Tensors land on the model's device.

        Returns:
            The checkpoint dict (``other_info``, ``config``, ``class_names``... for the caller).

        Raises:
            utils.checkpoint.CheckpointError: unreadable file, or a checkpoint for another class count,
                backbone or anchor set (the message names both sides).
        """
        ckpt = load_checkpoint(path, map_location=self.device)
        restore_checkpoint(ckpt, self.faster_rcnn, self.optimizer if load_optimizer else None, path=str(path))
        self.class_names = list(ckpt["class_names"])
        return ckpt


def check_losses(values) -> None:
    """Raise ``NonFiniteLossError`` when any of a step's loss values is NaN or infinite."""
    if not all(math.isfinite(v) for v in values):
        named = ", ".join(f"{name}={value}" for name, value in zip(LossTuple._fields, values, strict=True))
        raise NonFiniteLossError(f"non-finite loss: {named}")
