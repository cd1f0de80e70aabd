"""A small Faster R-CNN that learns from scratch on a few CPU cores (the ``--data=toy`` backbone).

Shape symbols used below:

    N:      batch size.
    H, W:   height and width of the preprocessed input image.
    C:      channels of the extractor's output (``channels[-1]``).
    hh, ww: feature-map size, ``ceil(H / feat_stride)``, ``ceil(W / feat_stride)``.
    R:      RoIs given to the head.
    L:      classes of the head, background included (``n_fg_class + 1``).

Only the extractor and the head's fully connected layers differ from ``FasterRCNNVGG16``: the same
``FasterRCNN``, ``RegionProposalNetwork``, creators, ``RoIPooling2D``, losses, trainer and evaluation run on
top of them. The extractor is a stack of stride-2 stages (3x3 convolution, GroupNorm, ReLU, twice) with
GroupNorm rather than BatchNorm because training runs one image at a time; the head thins the features with
a 1x1 convolution, pools each RoI and classifies it with a two-layer MLP.
"""

import torch
from torch import nn

from model.faster_rcnn import FasterRCNN, box_predictor
from model.region_proposal_network import RegionProposalNetwork
from model.roi_module import RoIPooling2D, roi_table

__all__ = ["FasterRCNNToy", "ToyRoIHead", "make_toy_extractor"]


def _conv_gn_relu(in_channels: int, out_channels: int, stride: int, groups: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
        nn.GroupNorm(groups, out_channels),
        nn.ReLU(inplace=True),
    ]


def make_toy_extractor(channels: tuple[int, ...] = (32, 64, 128), groups: int = 8) -> nn.Sequential:
    """``(N, 3, H, W)`` -> ``(N, channels[-1], hh, ww)``; each stage halves the size (stride ``2 ** len``).

    Stage ``i``: 3x3 stride-2 convolution to ``channels[i]``, then a 3x3 stride-1 convolution, each followed
    by GroupNorm (``groups`` groups) and ReLU. Kaiming-normal initialisation (fan-out, ReLU).
    """
    layers, in_channels = [], 3
    for out_channels in channels:
        layers += _conv_gn_relu(in_channels, out_channels, 2, groups)
        layers += _conv_gn_relu(out_channels, out_channels, 1, groups)
        in_channels = out_channels
    extractor = nn.Sequential(*layers)
    for m in extractor.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return extractor


class ToyRoIHead(nn.Module):
    """A 1x1 convolution that thins the features, RoI pooling, a two-layer MLP, then per-class offsets and
    class scores.

    Thinning the ``C`` channels to ``head_channels`` before pooling divides the cost of RoI pooling and of the
    first fully connected layer by ``C / head_channels``.

    Args:
        n_class: classes ``L``, background included.
        roi_size: RoI pooling output height and width.
        spatial_scale: feature-map cells per input pixel (``1 / feat_stride``).
        in_channels: channels ``C`` of the feature map.
        head_channels: channels after the 1x1 convolution (``C'``).
        fc_channels: width of the two hidden layers.
    """

    def __init__(
        self, n_class: int, roi_size: int, spatial_scale: float, in_channels: int, head_channels: int,
        fc_channels: int,
    ):
        super().__init__()
        self.n_class = n_class
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, head_channels, 1), nn.ReLU(inplace=True))
        self.roi = RoIPooling2D(roi_size, roi_size, spatial_scale)
        self.fc = nn.Sequential(
            nn.Linear(head_channels * roi_size * roi_size, fc_channels),
            nn.ReLU(inplace=True),
            nn.Linear(fc_channels, fc_channels),
            nn.ReLU(inplace=True),
        )
        self.cls_loc, self.score = box_predictor(fc_channels, n_class)

    def forward(self, x: torch.Tensor, rois, roi_indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Classify RoIs and regress their boxes.

        Args:
            x: ``(N, C, hh, ww)`` float feature map.
            rois: ``(R, 4)`` boxes ``(y_min, x_min, y_max, x_max)`` in input-image pixels (numpy or tensor).
            roi_indices: ``(R,)`` image index of each RoI (numpy or tensor).

        Returns:
            ``roi_cls_locs`` ``(R, L * 4)`` and ``roi_scores`` ``(R, L)`` float tensors.
        """
        thin = self.reduce(x)  # (N, C', hh, ww)
        pool = self.roi(thin, roi_table(rois, roi_indices, thin))  # (R, C', roi_size, roi_size)
        fc = self.fc(pool.flatten(1))  # (R, C' * roi_size**2) -> (R, fc_channels)
        return self.cls_loc(fc), self.score(fc)


class FasterRCNNToy(FasterRCNN):
    """Faster R-CNN with the small extractor of :func:`make_toy_extractor` and :class:`ToyRoIHead`.

    Args:
        n_fg_class: foreground classes.
        ratios: anchor height/width ratios.
        anchor_scales: anchor sizes in multiples of the 16-pixel base anchor (28, 56 and 112 px by default,
            for the toy data set's shapes at 224-pixel inputs).
        channels: output channels of the extractor's stages; the feature stride is ``2 ** len(channels)``.
        rpn_channels: channels of the RPN's 3x3 convolution.
        head_channels: channels the head's 1x1 convolution thins the features to before RoI pooling (64: on
            the toy set, 0.914 test mAP against 0.904 for 32 in about the same time, the 32-channel head
            confusing circles with squares and stars with crosses).
        fc_channels: width of the head's hidden layers.
        roi_size: RoI pooling output size.
        proposal_creator_params: keyword arguments of the RPN's ``ProposalCreator`` (e.g. fewer proposals
            than VGG16's 12000/2000 for small images); recorded in full in ``arch``.
        faster_rcnn_kwargs: ``FasterRCNN`` arguments (``min_size``, ``max_size``, ``normalize``...).
    """

    def __init__(
        self,
        n_fg_class: int = 20,
        ratios: tuple[float, ...] = (0.5, 1, 2),
        anchor_scales: tuple[float, ...] = (1.75, 3.5, 7),
        channels: tuple[int, ...] = (32, 64, 128),
        rpn_channels: int = 128,
        head_channels: int = 64,
        fc_channels: int = 256,
        roi_size: int = 7,
        proposal_creator_params: dict | None = None,
        **faster_rcnn_kwargs,
    ):
        feat_stride = 2 ** len(channels)
        extractor = make_toy_extractor(tuple(channels))
        rpn = RegionProposalNetwork(
            channels[-1],
            rpn_channels,
            ratios=tuple(ratios),
            anchor_scales=tuple(anchor_scales),
            feat_stride=feat_stride,
            proposal_creator_params=proposal_creator_params,
        )
        head = ToyRoIHead(
            n_fg_class + 1, roi_size, 1.0 / feat_stride, channels[-1], head_channels, fc_channels
        )
        super().__init__(extractor, rpn, head, **faster_rcnn_kwargs)
        self.arch = {
            "name": "toy",
            "n_fg_class": n_fg_class,
            "ratios": list(ratios),
            "anchor_scales": list(anchor_scales),
            "channels": list(channels),
            "rpn_channels": rpn_channels,
            "head_channels": head_channels,
            "fc_channels": fc_channels,
            "roi_size": roi_size,
            "proposal_creator_params": dict(rpn.proposal_creator_params),
            **self.faster_rcnn_arch(),
        }
