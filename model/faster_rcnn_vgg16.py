"""Faster R-CNN with a VGG16 backbone (Simonyan and Zisserman, ICLR 2015), the original's only model.

Shape symbols used below:

    N:      batch size.
    H, W:   height and width of the preprocessed input image.
    hh, ww: height and width of the conv5_3 feature map (``H / 16``, ``W / 16``, floored at each of 4 pools).
    R:      RoIs.
    L:      classes of the RoI head, background included (``n_fg_class + 1``).

Naming rules: ``roi`` boxes are ``(y_min, x_min, y_max, x_max)`` in input-image pixels; ``loc`` offsets are
``(t_y, t_x, t_h, t_w)``.

State-dict keys are the original's: ``extractor.{0,2,5,...,28}``, ``rpn.{conv1,score,loc}``,
``head.classifier.{0,2}`` (``{0,3}`` with ``use_drop``), ``head.cls_loc``, ``head.score``.
"""

import os

import numpy as np
import torch
import torchvision
from torch import nn

from model.faster_rcnn import FasterRCNN, box_predictor
from model.region_proposal_network import RegionProposalNetwork
from model.roi_module import RoIPooling2D, roi_table
from model.utils import cpu_conv, cpu_linear
from model.utils.pretrained import PretrainedWeightsError, read_state_dict, torchvision_state_dict

__all__ = ["FasterRCNNVGG16", "VGG16RoIHead", "decom_vgg16"]

# features[:30] is conv1_1 ... relu5_3 (the last max-pool, index 30, is dropped: stride 16, 512 channels);
# features[:10] is conv1_1 ... pool2, kept frozen as in the original.
_N_EXTRACTOR_LAYERS = 30
_N_FROZEN_LAYERS = 10


def decom_vgg16(
    pretrained: str | os.PathLike | None = None, use_drop: bool = False
) -> tuple[nn.Sequential, nn.Sequential]:
    """Split torchvision's VGG16 into the extractor and the RoI head's classifier.

    Args:
        pretrained: ``None``: random initialisation (torchvision's). ``'torchvision'``: torchvision's ImageNet
            weights (``VGG16_Weights.IMAGENET1K_V1``, downloaded into torch hub's cache on first use; they
            want ``normalize='torchvision'``). A path: a torchvision-layout VGG16 state dict (keys
            ``features.N.*``, ``classifier.N.*``), e.g. the caffe-converted weights written by
            ``misc/convert_caffe_pretrain.py`` (they want ``normalize='caffe'``).
        use_drop: keep the two dropouts of fc6/fc7.

    Returns:
        ``(extractor, classifier)``. ``extractor``: conv1_1 ... relu5_3, ``(N, 3, H, W) -> (N, 512, hh, ww)``,
        conv1 and conv2 frozen (``requires_grad=False``), its convolutions
        :class:`model.utils.cpu_conv.Conv2d` (Winograd on the CPU where that is faster; the same parameters
        and keys). ``classifier``: fc6, ReLU, fc7, ReLU (with the dropouts after each ReLU when
        ``use_drop``), ``(R, 25088) -> (R, 4096)``.

    Raises:
        model.utils.pretrained.PretrainedWeightsError: ``'torchvision'`` and the weights cannot be downloaded
            (the message says where to put the file), or a file that does not hold VGG16 weights.
        FileNotFoundError: a path that does not exist.
    """
    if pretrained is None:
        model = torchvision.models.vgg16(weights=None)
    else:
        if isinstance(pretrained, str) and pretrained == "torchvision":
            state = torchvision_state_dict(
                torchvision.models.VGG16_Weights.IMAGENET1K_V1, "pretrained='torchvision' (ImageNet VGG16)",
                "Or pass pretrained=PATH to a torchvision-layout VGG16 state dict, e.g. the caffe-converted "
                "weights written by misc/convert_caffe_pretrain.py (--caffe-pretrain), or pretrained=None.")
            source = "torchvision's VGG16_Weights.IMAGENET1K_V1"
        else:
            state = read_state_dict(pretrained, "a torchvision-layout VGG16 state dict, e.g. from "
                                                "misc/convert_caffe_pretrain.py")
            source = f"pretrained={os.fspath(pretrained)!r}"
        with torch.device("meta"):  # no random init of weights that are about to be replaced
            model = torchvision.models.vgg16(weights=None)
        _check_vgg16_state_dict(state, model.state_dict(), source)
        model.load_state_dict({k: v.to(torch.float32).contiguous() for k, v in state.items()}, assign=True)

    extractor = cpu_conv.convert(nn.Sequential(*list(model.features)[:_N_EXTRACTOR_LAYERS]))
    for layer in extractor[:_N_FROZEN_LAYERS]:
        for p in layer.parameters():
            p.requires_grad_(False)

    classifier = list(model.classifier)[:6]  # Linear, ReLU, Dropout, Linear, ReLU, Dropout: no 1000-way fc8
    if not use_drop:
        del classifier[5], classifier[2]
    return extractor, nn.Sequential(*classifier)


def _check_vgg16_state_dict(state, expected: dict[str, torch.Tensor], source: str) -> None:
    """Raise a ``PretrainedWeightsError`` naming ``source`` unless ``state`` has ``expected``'s keys and
    shapes."""
    if not isinstance(state, dict):
        raise PretrainedWeightsError(f"{source}: expected a VGG16 state dict, found a {type(state).__name__}")
    if "model" in state:
        raise PretrainedWeightsError(
            f"{source}: this is a Faster R-CNN checkpoint, not VGG16 backbone weights; load it with "
            "FasterRCNNTrainer.load (or build_faster_rcnn + load_state_dict) instead")
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: {tuple(state[k].shape)} instead of {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and (not torch.is_tensor(state[k]) or state[k].shape != v.shape)
    ]
    if missing or unexpected or mismatched:
        problems = [
            f"{name} ({len(items)}): {', '.join(items[:6])}{', ...' if len(items) > 6 else ''}"
            for name, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                ("shape mismatches", mismatched))
            if items
        ]
        raise PretrainedWeightsError(
            f"{source} is not a torchvision-layout VGG16 state dict (keys features.N.weight/bias and "
            f"classifier.N.weight/bias): {'; '.join(problems)}. A caffe VGG16 must first be converted with "
            "misc/convert_caffe_pretrain.py."
        )


class VGG16RoIHead(nn.Module):
    """RoI pooling, VGG16's fc6/fc7, and the class-specific box regressor and classifier.

    Args:
        n_class: classes ``L``, background included.
        roi_size: height and width of the pooled RoI features (7 for VGG16's fc6).
        spatial_scale: feature-map cells per input pixel (``1 / 16``).
        classifier: ``(R, 512 * roi_size**2) -> (R, 4096)`` module (fc6, fc7 from :func:`decom_vgg16`).
    """

    def __init__(self, n_class: int, roi_size: int, spatial_scale: float, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier
        self.cls_loc, self.score = box_predictor(4096, n_class)
        self.n_class = n_class
        self.roi_size = roi_size
        self.spatial_scale = spatial_scale
        self.roi = RoIPooling2D(roi_size, roi_size, spatial_scale)

    def forward(self, x: torch.Tensor, rois, roi_indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Classify and refine RoIs.

        Args:
            x: ``(N, 512, hh, ww)`` float feature map.
            rois: ``(R, 4)`` numpy array or tensor, ``(y_min, x_min, y_max, x_max)`` in input-image pixels.
            roi_indices: ``(R,)`` numpy array or tensor, the image of each RoI in ``x``.

        Returns:
            ``(roi_cls_locs, roi_scores)``: ``(R, L * 4)`` normalised offsets ``(t_y, t_x, t_h, t_w)`` per
            class, ``(R, L)`` class logits.
        """
        pool = self.roi(x, roi_table(rois, roi_indices, x))  # (R, 512, roi_size, roi_size)
        pool = pool.flatten(1)  # -> (R, 512 * roi_size**2), fc6's (c, y, x) order
        # fc6/fc7 on oneDNN where it beats the CPU's BLAS (2x on AMD EPYC: model/utils/cpu_linear.py)
        fc7 = cpu_linear.sequential(self.classifier, pool)  # (R, 4096)
        return self.cls_loc(fc7), self.score(fc7)


class FasterRCNNVGG16(FasterRCNN):
    """Faster R-CNN on VGG16: the original's model.

    Args:
        n_fg_class: foreground classes (20 for Pascal VOC); the head has ``n_fg_class + 1``.
        ratios: anchor height / width ratios.
        anchor_scales: anchor sizes in multiples of 16 pixels.
        pretrained, use_drop: the backbone (:func:`decom_vgg16`).
        proposal_creator_params: keyword arguments of the RPN's ``ProposalCreator`` (NMS threshold, box
            counts before/after NMS in training and test, minimum size); missing ones take the original's
            values. Recorded in full in ``arch``, so evaluating or resuming a checkpoint uses its own.
        **faster_rcnn_kwargs: :class:`~model.faster_rcnn.FasterRCNN`'s ``loc_normalize_mean``,
            ``loc_normalize_std``, ``min_size``, ``max_size``, ``normalize``.

    ``self.arch`` holds the constructor arguments as plain values (``model.arch_of``,
    ``model.build_faster_rcnn``) so a checkpoint can rebuild the same architecture.
    """

    feat_stride = 16  # VGG16's conv5_3 has stride 16 (4 max-pools)

    def __init__(
        self,
        n_fg_class: int = 20,
        ratios: tuple[float, ...] = (0.5, 1, 2),
        anchor_scales: tuple[float, ...] = (8, 16, 32),
        pretrained: str | os.PathLike | None = None,
        use_drop: bool = False,
        proposal_creator_params: dict | None = None,
        **faster_rcnn_kwargs,
    ):
        extractor, classifier = decom_vgg16(pretrained, use_drop)
        rpn = RegionProposalNetwork(
            512, 512, ratios=ratios, anchor_scales=anchor_scales, feat_stride=self.feat_stride,
            proposal_creator_params=proposal_creator_params,
        )
        head = VGG16RoIHead(n_fg_class + 1, roi_size=7, spatial_scale=1.0 / self.feat_stride,
                            classifier=classifier)
        super().__init__(extractor, rpn, head, **faster_rcnn_kwargs)
        self.arch = {
            "name": "vgg16",
            "n_fg_class": int(n_fg_class),
            "ratios": np.asarray(ratios, dtype=np.float64).tolist(),
            "anchor_scales": np.asarray(anchor_scales, dtype=np.float64).tolist(),
            "use_drop": bool(use_drop),
            "proposal_creator_params": dict(rpn.proposal_creator_params),
            **self.faster_rcnn_arch(),
        }
