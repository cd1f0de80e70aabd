"""Training: the four Faster R-CNN losses of a batch, the optimizer, mixed precision, meters, checkpoints.

Shape symbols:

    N: images of a batch.
    S: number of anchors of an image (``hh ww A`` for a feature map of ``hh x ww`` cells).
    R: number of ground-truth boxes of an image (0 for an image without objects).
    M: number of RoIs sampled for the head (at most 128 per image by default).
    L: number of classes of the head, background included (``n_fg_class + 1``).

The target creators are numpy code, the "CPU island" of the original, with one named crossing each way per
step: the RPN's offsets and scores of the whole batch cross to the host together (in the RPN), and every
target of the batch comes back to the device in one copy (:func:`utils.array_tool.to_device`); the loss
values cross once more, for the non-finite check.
"""

import math
from collections import namedtuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from model import arch_of
from model.region_proposal_network import per_image
from model.utils.creator_tool import AnchorTargetCreator, ProposalTargetCreator
from utils.amp import autocast, grad_scaler
from utils.array_tool import to_device, tonumpy
from utils.checkpoint import (
    default_class_names,
    load_checkpoint,
    make_checkpoint,
    restore_checkpoint,
    save_checkpoint,
    to_plain,
)
from utils.distributed import ddp_progress_hook, gather_flags, get_world_size

__all__ = [
    "AverageValueMeter",
    "ConfusionMeter",
    "FasterRCNNLoss",
    "FasterRCNNTrainer",
    "LossTuple",
    "NonFiniteLossError",
    "confusion_counts",
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
    """``(K, K)`` counts of (true class, predicted class) pairs; row = truth, column = prediction.

    Counts accumulate on the device of the scores (no host crossing per step); :meth:`value` brings them to
    the host.
    """

    def __init__(self, k: int) -> None:
        self.k = k
        self.reset()

    def reset(self) -> None:
        self._counts = None  # (K*K,) int64 tensor on the device of the first add

    def add(self, scores: torch.Tensor, target: torch.Tensor) -> None:
        """Count the arg-max of ``scores`` ``(N, K)`` against ``target`` ``(N,)`` ints in ``[0, K)``."""
        if scores.shape[1] != self.k:
            raise ValueError(f"scores have {scores.shape[1]} columns, the meter counts {self.k} classes")
        self.add_counts(confusion_counts(scores, target, self.k))

    def add_counts(self, counts: torch.Tensor) -> None:
        """Add ``(K, K)`` counts (e.g. from :func:`confusion_counts`)."""
        counts = counts.reshape(-1).to(torch.int64)
        if self._counts is None:
            self._counts = counts.clone()
        else:
            self._counts += counts.to(self._counts.device)

    def value(self) -> np.ndarray:
        """``(K, K)`` int64 counts."""
        if self._counts is None:
            return np.zeros((self.k, self.k), dtype=np.int64)
        return self._counts.cpu().numpy().reshape(self.k, self.k)


def confusion_counts(scores: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    """``(K, K)`` int64 counts of (``target``, arg-max of ``scores``) pairs, on the scores' device.

    Args:
        scores: ``(N, K)`` float scores or logits.
        target: ``(N,)`` integer classes in ``[0, K)``.
    """
    pred = scores.argmax(dim=1)
    return torch.bincount(target.long() * k + pred, minlength=k**2).reshape(k, k)


class FasterRCNNLoss(nn.Module):
    """The four Faster R-CNN losses of a batch of images, each image with its own targets.

    A module of its own, with ``forward`` a function of the batch, so that ``DistributedDataParallel``
    can wrap it (``trainer.FasterRCNNTrainer`` holds it, the optimizer and the meters).

    Per image, as in the original: the anchors inside *its* image, ``AnchorTargetCreator``, the proposals
    clipped to its size, ``ProposalTargetCreator``; the RoI head pools each sampled RoI from its own image.
    Each loss is the mean over the images of that image's loss (batch 1: the original's value).

    The creators are numpy code: the RPN's outputs cross to the host once per batch (inside the RPN) and the
    targets come back to the device once (:func:`utils.array_tool.to_device`).

    Args:
        faster_rcnn: the ``FasterRCNN`` to train.
        rpn_sigma, roi_sigma: smooth L1 sigmas of the RPN and head localisation losses.
        anchor_target_params, proposal_target_params: keyword arguments of the two target creators.
        amp: run the network under ``torch.autocast`` (float16 on CUDA, bfloat16 on the CPU); the creators
            and the losses stay float32.
    """

    def __init__(self, faster_rcnn: nn.Module, rpn_sigma: float = 3.0, roi_sigma: float = 1.0,
                 anchor_target_params: dict | None = None, proposal_target_params: dict | None = None,
                 amp: bool = False) -> None:
        super().__init__()
        self.faster_rcnn = faster_rcnn
        self.rpn_sigma = rpn_sigma
        self.roi_sigma = roi_sigma
        self.amp = amp
        self.anchor_target_creator = AnchorTargetCreator(**(anchor_target_params or {}))
        self.proposal_target_creator = ProposalTargetCreator(**(proposal_target_params or {}))

    def forward(self, imgs, bboxes, labels, scales, sizes=None, rngs=None):
        """Losses of a batch.

        Args:
            imgs: ``(N, 3, H, W)`` float tensor of preprocessed images, padded at the bottom and right when
                their sizes differ.
            bboxes: ``N`` ground truths ``(R_i, 4)`` ``(y_min, x_min, y_max, x_max)`` in pixels of each
                resized image (arrays or tensors; a ``(1, R, 4)`` batch for ``N = 1``); ``R_i`` may be 0.
            labels: ``N`` integer ``(R_i,)`` foreground labels in ``[0, n_fg_class)``.
            scales: each image's resize factor from its original (a float for all, or ``N``).
            sizes: each image's ``(H_i, W_i)`` inside ``imgs``; ``None``: every image fills it.
            rngs: ``N`` ``numpy.random.Generator`` the creators sample each image's targets with (the same
                generator may repeat); they are drawn from in image order, proposal targets first.

        Returns:
            ``(losses, rpn_counts, roi_counts)``: a ``(5,)`` float32 tensor (RPN loc, RPN cls, RoI loc, RoI
            cls, total), and the ``(2, 2)`` and ``(L, L)`` confusion counts of the step's sampled anchors and
            RoIs.
        """
        model = self.faster_rcnn
        device = next(model.parameters()).device
        imgs = torch.as_tensor(imgs).to(device, torch.float32)
        n = imgs.shape[0]
        sizes, scales = per_image(tuple(imgs.shape[2:]) if sizes is None else sizes, scales, n)
        bboxes = [tonumpy(b, np.float32).reshape(-1, 4) for b in bboxes]  # the ground truth, on the host
        labels = [tonumpy(lb, np.int32).reshape(-1) for lb in labels]
        if not len(bboxes) == len(labels) == len(rngs) == n:
            raise ValueError(f"{n} images but {len(bboxes)} box sets, {len(labels)} label sets and "
                             f"{len(rngs)} generators")

        with autocast(device, self.amp):
            features = model.extractor(imgs)
            rpn_locs, rpn_scores, rois, roi_indices, anchor = model.rpn(features, sizes, scales)
        targets = self._targets(rois, roi_indices, anchor, bboxes, labels, sizes, rngs)
        gt_rpn_loc, gt_rpn_label, sample_roi, sample_index, gt_roi_loc, gt_roi_label = to_device(
            targets, device)
        with autocast(device, self.amp):
            roi_cls_loc, roi_score = model.head(features, sample_roi, sample_index)  # (M, L*4), (M, L)

        rpn_locs, rpn_scores = rpn_locs.float(), rpn_scores.float()  # (N, S, 4), (N, S, 2)
        roi_cls_loc, roi_score = roi_cls_loc.float(), roi_score.float()
        gt_rpn_label, gt_roi_label = gt_rpn_label.long(), gt_roi_label.long()
        bounds = np.searchsorted(targets[3], np.arange(n + 1))  # image i's RoIs: rows bounds[i:i + 2]
        per_image_losses = []
        for i in range(n):
            a, b = bounds[i], bounds[i + 1]
            per_image_losses.append(self._image_losses(
                rpn_locs[i], rpn_scores[i], gt_rpn_loc[i], gt_rpn_label[i], bool((targets[1][i] >= 0).any()),
                roi_cls_loc[a:b], roi_score[a:b], gt_roi_loc[a:b], gt_roi_label[a:b]))
        # (N, 4) -> mean over the images (one image: its own values, bit for bit)
        losses = per_image_losses[0] if n == 1 else torch.stack(per_image_losses).mean(dim=0)
        total = losses[0] + losses[1] + losses[2] + losses[3]  # summed in this order, as the original did
        losses = torch.cat((losses, total[None]))

        sampled = gt_rpn_label > -1
        rpn_counts = confusion_counts(rpn_scores[sampled].detach(), gt_rpn_label[sampled], 2)
        roi_counts = confusion_counts(roi_score.detach(), gt_roi_label, model.n_class)
        return losses, rpn_counts, roi_counts

    def _targets(self, rois, roi_indices, anchor, bboxes, labels, sizes, rngs) -> list[np.ndarray]:
        """The creators' targets of every image, on the host: ``gt_rpn_loc`` ``(N, S, 4)``, ``gt_rpn_label``
        ``(N, S)``, and for the ``M`` sampled RoIs of the batch ``sample_roi`` ``(M, 4)``,
        ``sample_index`` ``(M,)`` (ascending), ``gt_roi_loc`` ``(M, 4)``, ``gt_roi_label`` ``(M,)``."""
        model = self.faster_rcnn
        rpn_loc, rpn_label, roi, index, roi_loc, roi_label = [], [], [], [], [], []
        for i, (bbox, label, size, rng) in enumerate(zip(bboxes, labels, sizes, rngs, strict=True)):
            sample_roi, gt_roi_loc, gt_roi_label = self.proposal_target_creator(
                rois[roi_indices == i], bbox, label, model.loc_normalize_mean, model.loc_normalize_std,
                rng=rng)
            gt_rpn_loc, gt_rpn_label = self.anchor_target_creator(bbox, anchor, size, rng=rng)
            rpn_loc.append(gt_rpn_loc)
            rpn_label.append(gt_rpn_label)
            roi.append(sample_roi)
            index.append(np.full(len(sample_roi), i, dtype=np.int32))
            roi_loc.append(gt_roi_loc)
            roi_label.append(gt_roi_label)
        return [np.stack(rpn_loc), np.stack(rpn_label), np.concatenate(roi), np.concatenate(index),
                np.concatenate(roi_loc), np.concatenate(roi_label)]

    def _image_losses(self, rpn_loc, rpn_score, gt_rpn_loc, gt_rpn_label, any_anchor, roi_cls_loc, roi_score,
                      gt_roi_loc, gt_roi_label) -> torch.Tensor:
        """``(4,)``: RPN loc, RPN cls, RoI loc, RoI cls losses of one image (``S`` anchors, ``M_i`` RoIs).

        ``any_anchor``: whether some anchor was sampled; without one (an image smaller than every anchor)
        the RPN's classification loss is 0 instead of the NaN of an empty mean.
        """
        rpn_loc_loss = fast_rcnn_loc_loss(rpn_loc, gt_rpn_loc, gt_rpn_label, self.rpn_sigma)
        if any_anchor:
            rpn_cls_loss = F.cross_entropy(rpn_score, gt_rpn_label, ignore_index=-1)
        else:
            rpn_cls_loss = rpn_score.sum() * 0.0
        n_sample = roi_cls_loc.shape[0]
        if n_sample == 0:  # no RoI at all (no proposal and no ground truth): nothing for the head to learn
            roi_loc_loss = roi_cls_loss = roi_score.sum() * 0.0
        else:
            roi_cls_loc = roi_cls_loc.view(n_sample, -1, 4)  # (M_i, L*4) -> (M_i, L, 4)
            roi_loc = roi_cls_loc[torch.arange(n_sample, device=roi_cls_loc.device), gt_roi_label]  # (M_i, 4)
            roi_loc_loss = fast_rcnn_loc_loss(roi_loc, gt_roi_loc, gt_roi_label, self.roi_sigma)
            roi_cls_loss = F.cross_entropy(roi_score, gt_roi_label)
        return torch.stack((rpn_loc_loss, rpn_cls_loss, roi_loc_loss, roi_cls_loss))


class FasterRCNNTrainer(nn.Module):
    """Wraps a ``FasterRCNN`` for training: the losses (:class:`FasterRCNNLoss`), optimizer, gradient
    scaler, meters, checkpoints.

    ``FasterRCNNTrainer(model)`` uses the original's settings. The trainer's tensors follow the model: move
    the model (or the trainer, which holds it) to a device before training (and before ``amp``: the gradient
    scaler is made for the model's device).

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
        amp: mixed precision (:func:`utils.amp.autocast`): float16 with a gradient scaler on CUDA (its state
            is saved in checkpoints), bfloat16 on the CPU.
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
        amp: bool = False,
    ) -> None:
        super().__init__()
        self.faster_rcnn = faster_rcnn
        self.loss = FasterRCNNLoss(faster_rcnn, rpn_sigma, roi_sigma, anchor_target_params,
                                   proposal_target_params, amp)
        self.loss_fn = self.loss  # what computes the losses: the module, or DistributedDataParallel of it
        self.rng = np.random.default_rng(seed)
        self.optimizer = get_optimizer(faster_rcnn, lr, weight_decay, use_adam, momentum)
        self.scaler = grad_scaler(self.device, amp)
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
    def from_config(cls, faster_rcnn: nn.Module, cfg, class_names=None, lr: float | None = None,
                    seed: int | None = None) -> "FasterRCNNTrainer":
        """A trainer with the hyper-parameters of a ``utils.config.Config`` (stored in its checkpoints);
        ``lr`` and ``seed`` replace the config's (a scaled lr, a per-process seed)."""
        return cls(
            faster_rcnn,
            rpn_sigma=cfg.rpn_sigma,
            roi_sigma=cfg.roi_sigma,
            lr=cfg.lr if lr is None else lr,
            weight_decay=cfg.weight_decay,
            use_adam=cfg.use_adam,
            seed=cfg.seed if seed is None else seed,
            class_names=class_names,
            config=to_plain(cfg),
            amp=cfg.amp,
        )

    @property
    def device(self) -> torch.device:
        return next(self.faster_rcnn.parameters()).device

    @property
    def amp(self) -> bool:
        return self.loss.amp

    def forward(self, imgs, bboxes, labels, scale, sizes=None, rngs=None) -> LossTuple:
        """Losses of a batch (:meth:`FasterRCNNLoss.forward`); counts the confusion meters.

        Args:
            imgs, bboxes, labels, sizes: see :meth:`FasterRCNNLoss.forward` (``imgs`` ``(N, 3, H, W)``).
            scale: each image's resize factor (a float or one-element tensor for all, or ``N`` values).
            rngs: ``N`` generators for the creators; ``None``: the trainer's own generator for every image,
                in image order.

        Returns:
            ``LossTuple`` of 0-d float32 tensors: RPN loc, RPN cls, RoI loc, RoI cls and their sum.
        """
        if rngs is None:
            rngs = [self.rng] * len(imgs)
        losses, rpn_counts, roi_counts = self.loss_fn(imgs, bboxes, labels, scale, sizes, rngs)
        self.rpn_cm.add_counts(rpn_counts)
        self.roi_cm.add_counts(roi_counts)
        return LossTuple(*losses.unbind())

    def train_step(self, imgs, bboxes, labels, scale, sizes=None, rngs=None) -> LossTuple:
        """One optimizer step on a batch: forward, loss check, backward (scaled under float16), optimizer
        step, meters. Arguments as :meth:`forward`.

        Raises:
            NonFiniteLossError: a loss is NaN or infinite; the weights and the optimizer are left unchanged.
        """
        self.optimizer.zero_grad(set_to_none=True)
        losses = self.forward(imgs, bboxes, labels, scale, sizes, rngs)
        values = torch.stack([loss.detach() for loss in losses]).tolist()  # one sync for all five
        # under torchrun every process learns whether any loss of the step is non-finite, before backward
        bad = gather_flags(not all(math.isfinite(v) for v in values), self.device)
        if any(bad):
            check_losses(values)  # raises on the process that has one
            raise NonFiniteLossError(f"non-finite loss on rank(s) {[r for r, b in enumerate(bad) if b]}")
        self.scaler.scale(losses.total_loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
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

    def distribute(self) -> None:
        """Under torchrun, average the gradients of every process in the backward pass: the losses run
        through ``DistributedDataParallel`` (which also gives every process rank 0's weights now). A no-op
        in a single process."""
        if get_world_size() > 1 and self.loss_fn is self.loss:
            device_ids = [self.device] if self.device.type == "cuda" else None
            self.loss_fn = DistributedDataParallel(self.loss, device_ids=device_ids)
            self.loss_fn.register_comm_hook(None, ddp_progress_hook)  # the default all-reduce, counted

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
            save_optimizer: also store the optimizer state (momentum buffers, lrs) and the gradient scaler's
                (float16 mixed precision), needed to resume.
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
            scaler=self.scaler.state_dict() if save_optimizer and self.scaler.is_enabled() else None,
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
        restore_checkpoint(ckpt, self.faster_rcnn, self.optimizer if load_optimizer else None,
                           self.scaler if load_optimizer else None, path=str(path))
        self.class_names = list(ckpt["class_names"])
        return ckpt


def check_losses(values) -> None:
    """Raise ``NonFiniteLossError`` when any of a step's loss values is NaN or infinite."""
    if not all(math.isfinite(v) for v in values):
        named = ", ".join(f"{name}={value}" for name, value in zip(LossTuple._fields, values, strict=True))
        raise NonFiniteLossError(f"non-finite loss: {named}")
