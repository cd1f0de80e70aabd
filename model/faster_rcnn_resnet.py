"""Faster R-CNN with a ResNet-50/101 backbone in the C4 layout (He et al., "Deep Residual Learning for Image
Recognition", CVPR 2016, appendix A).

Shape symbols used below:

    N:      batch size.
    H, W:   height and width of the preprocessed input image.
    hh, ww: height and width of the layer3 feature map (``ceil(H / 16)``, ``ceil(W / 16)``: conv1, the
            max-pool, layer2 and layer3 each halve, rounding up).
    R:      RoIs.
    L:      classes of the RoI head, background included (``n_fg_class + 1``).

Naming rules: ``roi`` boxes are ``(y_min, x_min, y_max, x_max)`` in input-image pixels; ``loc`` offsets are
``(t_y, t_x, t_h, t_w)``.

The C4 layout: torchvision's ResNet up to layer3 (res2 ... res4: stride 16, 1024 channels) is the extractor
the RPN reads, as VGG16's conv5_3 is; each RoI is pooled to 14x14 on it, and layer4 (res5, whose first block
has stride 2: 14x14 -> 7x7, 2048 channels) plus global average pooling replace VGG16's fc6/fc7 in the head.
This is the recipe of the C4 detectors the numbers are compared with (detectron2's R50-C4/R101-C4,
jwyang/faster-rcnn.pytorch, ruotianluo/pytorch-faster-rcnn): conv1 and layer1 frozen, every BatchNorm frozen
(statistics and affine, ``FrozenBatchNorm2d``: training runs one image at a time, too few for batch
statistics), the RPN on layer3.

State-dict keys: ``extractor.{0,1,4,5,6}.*`` (conv1, bn1, layer1, layer2, layer3; 2 and 3 are the ReLU and
the max-pool), ``rpn.{conv1,score,loc}``, ``head.top.*`` (layer4), ``head.cls_loc``, ``head.score``. BatchNorm
entries are ``weight``, ``bias``, ``running_mean``, ``running_var`` buffers (no ``num_batches_tracked``).
"""

import os

import numpy as np
import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from model.faster_rcnn import FasterRCNN, box_predictor
from model.region_proposal_network import RegionProposalNetwork
from model.roi_module import RoIPooling2D, roi_table
from model.utils import cpu_conv
from model.utils.pretrained import PretrainedWeightsError, read_state_dict, torchvision_state_dict

__all__ = ["FasterRCNNResNet", "ResNetRoIHead", "decom_resnet"]

# depth -> (torchvision builder, ImageNet weights of pretrained='torchvision')
_RESNETS = {
    50: (torchvision.models.resnet50, torchvision.models.ResNet50_Weights.IMAGENET1K_V1),
    101: (torchvision.models.resnet101, torchvision.models.ResNet101_Weights.IMAGENET1K_V1),
}
_EXTRACTOR_LAYERS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3")  # stride 16, 1024 ch.
_FROZEN_LAYERS = ("conv1", "layer1")  # requires_grad=False, as in the C4 peers (bn1 has no parameters)
_IGNORED_KEYS = ("fc.",)  # the 1000-way ImageNet classifier: not part of the detector


def decom_resnet(
    depth: int = 101, pretrained: str | os.PathLike | None = None
) -> tuple[nn.Sequential, nn.Sequential]:
    """Split torchvision's ResNet-50/101 (frozen BatchNorm) into the extractor and the RoI head's layer4.

    Args:
        depth: 50 or 101.
        pretrained: ``None``: random initialisation (torchvision's; with frozen identity BatchNorm the
            activations grow through the residual stages, about 1e4 at layer3 for ResNet-101, so this is for
            tests and for loading a detector checkpoint over it, not for training). ``'torchvision'``:
            torchvision's ImageNet weights ``ResNet{50,101}_Weights.IMAGENET1K_V1``, downloaded into torch
            hub's cache on first use; they want ``normalize='torchvision'``. V1 (76.1 / 77.4% top-1), not V2
            (80.9 / 81.9% from a long recipe with heavy augmentation), because V1 is trained with the 2015
            recipe of the MSRA models the C4 peers start from (detectron2's ``R-101.pkl``, jwyang's
            caffe-converted ``resnet101_caffe.pth``), and it is what torchvision's own detectors take
            (``fasterrcnn_resnet50_fpn`` and ``_v2`` both), so results compare with theirs. A path: a
            torchvision-layout ResNet state dict (keys ``conv1.weight``, ``bn1.*``, ``layer{1..4}.*``, with
            or without ``fc.*`` and ``num_batches_tracked``), e.g. a torchvision ResNet's ``state_dict()``
            saved with ``torch.save``. (jwyang's caffe-converted ResNets have the same keys but put each
            stage's stride in the first 1x1 convolution of a block and want caffe normalisation;
            torchvision's blocks put it in the 3x3, so such a file loads but does not compute what it was
            trained as.)

    Returns:
        ``(extractor, top)``. ``extractor``: conv1, bn1, ReLU, max-pool, layer1, layer2, layer3,
        ``(N, 3, H, W) -> (N, 1024, hh, ww)`` at stride 16, conv1 and layer1 frozen (``requires_grad=False``).
        ``top``: layer4, ``(R, 1024, 14, 14) -> (R, 2048, 7, 7)``. Every normalisation layer is a
        ``FrozenBatchNorm2d`` (statistics and affine are buffers: no training-mode difference, no gradient).
        The convolutions are :class:`model.utils.cpu_conv.Conv2d` (Winograd on the CPU where that is faster).

    Raises:
        ValueError: a depth other than 50 or 101.
        model.utils.pretrained.PretrainedWeightsError: ``'torchvision'`` and the weights cannot be downloaded
            (the message says where to put the file), or a file that does not hold ResNet-``depth`` weights.
        FileNotFoundError: a path that does not exist.
    """
    if depth not in _RESNETS:
        raise ValueError(f"depth must be one of {sorted(_RESNETS)}, got {depth!r}")
    build, weights = _RESNETS[depth]
    if pretrained is None:
        model = build(weights=None, norm_layer=FrozenBatchNorm2d)
    else:
        if isinstance(pretrained, str) and pretrained == "torchvision":
            state = torchvision_state_dict(
                weights, f"pretrained='torchvision' (ImageNet ResNet-{depth})",
                f"Or pass pretrained=PATH to a torchvision-layout ResNet-{depth} state dict, or "
                "pretrained=None.")
            source = f"torchvision's {type(weights).__name__}.{weights.name}"
        else:
            state = read_state_dict(pretrained, f"a torchvision-layout ResNet-{depth} state dict")
            source = f"pretrained={os.fspath(pretrained)!r}"
        with torch.device("meta"):  # no random init of weights that are about to be replaced
            model = build(weights=None, norm_layer=FrozenBatchNorm2d)
            expected = build(weights=None).state_dict()  # nn.BatchNorm2d keys: the layout files have
        state = _check_resnet_state_dict(state, expected, source, depth)
        model.fc = nn.Identity()  # the ImageNet classifier is dropped below; its weights are not loaded
        model.load_state_dict({k: v.to(torch.float32).contiguous() for k, v in state.items()}, assign=True)

    extractor = cpu_conv.convert(nn.Sequential(*(getattr(model, name) for name in _EXTRACTOR_LAYERS)))
    for name in _FROZEN_LAYERS:
        getattr(model, name).requires_grad_(False)
    return extractor, cpu_conv.convert(model.layer4)


def _check_resnet_state_dict(state, expected: dict[str, torch.Tensor], source: str, depth: int) -> dict:
    """The entries of ``state`` to load into a ``FrozenBatchNorm2d`` ResNet (no ``fc.*``, no
    ``num_batches_tracked``); a ``PretrainedWeightsError`` naming ``source`` unless ``state`` has the keys and
    shapes of ``expected`` (a torchvision ResNet's state dict), those two kinds of entries being optional."""
    if not isinstance(state, dict):
        raise PretrainedWeightsError(
            f"{source}: expected a ResNet state dict, found a {type(state).__name__}")
    if "model" in state:
        raise PretrainedWeightsError(
            f"{source}: this is a Faster R-CNN checkpoint, not ResNet backbone weights; load it with "
            "FasterRCNNTrainer.load (or build_faster_rcnn + load_state_dict) instead")

    def optional(key: str) -> bool:
        return key.startswith(_IGNORED_KEYS) or key.endswith("num_batches_tracked")

    missing = [k for k in expected if not optional(k) and k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: {tuple(getattr(state[k], 'shape', ()))} instead of {tuple(v.shape)}"
        for k, v in expected.items()
        if not optional(k) and k in state and (not torch.is_tensor(state[k]) or state[k].shape != v.shape)
    ]
    if missing or unexpected or mismatched:
        problems = [
            f"{name} ({len(items)}): {', '.join(items[:6])}{', ...' if len(items) > 6 else ''}"
            for name, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                ("shape mismatches", mismatched))
            if items
        ]
        raise PretrainedWeightsError(
            f"{source} is not a torchvision-layout ResNet-{depth} state dict (keys conv1.weight, bn1.*, "
            f"layer1.* ... layer4.*; fc.* and num_batches_tracked optional): {'; '.join(problems)}"
        )
    return {k: v for k, v in state.items() if not optional(k)}


class ResNetRoIHead(nn.Module):
    """RoI pooling to 14x14, ResNet's layer4 and global average pooling, then the class-specific box
    regressor and classifier.

    The pooling is the project's Caffe RoI max pooling (``RoIPooling2D``), the one of the VGG16 model and of
    jwyang's and ruotianluo's RoIPool modes; detectron2's R-C4 pools with RoIAlign (``ROIAlignV2``) at the
    same 14x14. At 14x14 layer4's stride-2 first block gives 7x7, the resolution it has in ImageNet training
    (jwyang's faster-rcnn.pytorch pools at 7, so its layer4 sees 4x4).

    Args:
        n_class: classes ``L``, background included.
        roi_size: height and width of the pooled RoI features (14).
        spatial_scale: feature-map cells per input pixel (``1 / 16``).
        top: ResNet's layer4 from :func:`decom_resnet` (a sequence of torchvision ``Bottleneck`` blocks),
            ``(R, 1024, roi_size, roi_size) -> (R, C, roi_size / 2, roi_size / 2)``, ``C = 2048``.
    """

    def __init__(self, n_class: int, roi_size: int, spatial_scale: float, top: nn.Sequential):
        super().__init__()
        self.top = top
        n_features = top[-1].conv3.out_channels  # 2048
        self.cls_loc, self.score = box_predictor(n_features, n_class)
        self.n_class = n_class
        self.roi_size = roi_size
        self.spatial_scale = spatial_scale
        self.roi = RoIPooling2D(roi_size, roi_size, spatial_scale)

    def forward(self, x: torch.Tensor, rois, roi_indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Classify and refine RoIs.

        Args:
            x: ``(N, 1024, hh, ww)`` float feature map.
            rois: ``(R, 4)`` numpy array or tensor, ``(y_min, x_min, y_max, x_max)`` in input-image pixels.
            roi_indices: ``(R,)`` numpy array or tensor, the image of each RoI in ``x``.

        Returns:
            ``(roi_cls_locs, roi_scores)``: ``(R, L * 4)`` normalised offsets ``(t_y, t_x, t_h, t_w)`` per
            class, ``(R, L)`` class logits.
        """
        pool = self.roi(x, roi_table(rois, roi_indices, x))  # (R, 1024, roi_size, roi_size)
        h = self.top(pool)  # (R, 2048, roi_size / 2, roi_size / 2)
        h = h.mean(dim=(2, 3))  # global average pooling: -> (R, 2048)
        return self.cls_loc(h), self.score(h)


class FasterRCNNResNet(FasterRCNN):
    """Faster R-CNN on a ResNet-50/101 in the C4 layout (see the module docstring).

    Args:
        n_fg_class: foreground classes (20 for Pascal VOC, 80 for COCO); the head has ``n_fg_class + 1``.
        depth: 50 or 101 (``arch['name']`` is ``'resnet50'`` / ``'resnet101'``).
        ratios: anchor height / width ratios.
        anchor_scales: anchor sizes in multiples of 16 pixels.
        pretrained: the backbone weights (:func:`decom_resnet`): ``None``, ``'torchvision'`` or a path.
        rpn_channels: channels of the RPN's 3x3 convolution on layer3's 1024. 512 as jwyang's and
            ruotianluo's C4 models (and the VGG16 model); detectron2's ``StandardRPNHead`` keeps the input's
            1024 (twice the parameters and cost of this convolution).
        proposal_creator_params: keyword arguments of the RPN's ``ProposalCreator`` (NMS threshold, box
            counts before/after NMS in training and test, minimum size); missing ones take the original's
            values. Recorded in full in ``arch``, so evaluating or resuming a checkpoint uses its own.
        **faster_rcnn_kwargs: :class:`~model.faster_rcnn.FasterRCNN`'s ``loc_normalize_mean``,
            ``loc_normalize_std``, ``min_size``, ``max_size``, ``normalize`` (``'torchvision'``, the default,
            is the one torchvision's ResNet weights want).

    ``self.arch`` holds the constructor arguments as plain values (``model.arch_of``,
    ``model.build_faster_rcnn``; the depth is in the name, ``pretrained`` is not recorded: a checkpoint
    brings its own weights).
    """

    feat_stride = 16  # layer3: conv1, the max-pool, layer2 and layer3 each halve

    def __init__(
        self,
        n_fg_class: int = 20,
        depth: int = 101,
        ratios: tuple[float, ...] = (0.5, 1, 2),
        anchor_scales: tuple[float, ...] = (8, 16, 32),
        pretrained: str | os.PathLike | None = None,
        rpn_channels: int = 512,
        proposal_creator_params: dict | None = None,
        **faster_rcnn_kwargs,
    ):
        extractor, top = decom_resnet(depth, pretrained)
        rpn = RegionProposalNetwork(
            1024, rpn_channels, ratios=ratios, anchor_scales=anchor_scales, feat_stride=self.feat_stride,
            proposal_creator_params=proposal_creator_params,
        )
        head = ResNetRoIHead(n_fg_class + 1, roi_size=14, spatial_scale=1.0 / self.feat_stride, top=top)
        super().__init__(extractor, rpn, head, **faster_rcnn_kwargs)
        self.depth = int(depth)
        self.arch = {
            "name": f"resnet{depth}",
            "n_fg_class": int(n_fg_class),
            "ratios": np.asarray(ratios, dtype=np.float64).tolist(),
            "anchor_scales": np.asarray(anchor_scales, dtype=np.float64).tolist(),
            "rpn_channels": int(rpn_channels),
            "proposal_creator_params": dict(rpn.proposal_creator_params),
            **self.faster_rcnn_arch(),
        }
