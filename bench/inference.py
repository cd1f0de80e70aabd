"""Inference time and memory: our ``FasterRCNNVGG16`` against torchvision's ``FasterRCNN`` on the same VGG16
(or both on the same ResNet-50/101 in the C4 layout, ``--backbone=resnet101``).

Both models are randomly initialised (no ImageNet weights are available offline) with the *same* VGG16
weights: torchvision's model gets copies of our extractor (conv1_1 ... relu5_3, 512 channels), fc6/fc7 and
class/box layers, and an RPN head that mirrors ours (one objectness logit per anchor, our foreground minus
background logit; our offsets in its order), so that both keep about as many proposals and their heads pool
about as many RoIs (printed for each). The class biases are drawn from U(0, 2.5) in both so that a realistic
number of detections go through the per-class NMS (with a plain random init every class probability is
about 1/21 < 0.05 and both models would skip post-processing). torchvision's model uses the original's test
settings: 9 anchors (sizes 128/256/512, ratios 0.5/1/2), RoIPool 7x7 at 1/16 (``torchvision.ops.RoIPool``
behind the ``MultiScaleRoIAlign`` call signature), RPN NMS 0.7 with 6000/300 boxes before/after, box score
0.05, box NMS
0.3, no cap on detections, min_size 600 / max_size 1000.

What is timed, on a real photo (scikit-image's ``chelsea``, resized to 600x800; 600x1000 with ``--device
cuda``):

* ours: ``predict([img], [size])`` on the preprocessed image (``data.dataset.preprocess`` is timed
  separately and reported, and added in the end-to-end ratio), the 'evaluate' preset;
* torchvision: ``model([img])`` on the RGB [0, 1] tensor (its transform normalises and resizes inside).

Memory format: both models run in both formats, ``contiguous`` (PyTorch's default) and ``channels_last``
(``model.to(memory_format=torch.channels_last)``, one line for either model), so every ratio compares them in
the same format. The headline is the format that ``utils.memory_format.choose_memory_format`` picks for
inference on this machine (a probe of the extractor in both formats, cached per machine; on CUDA,
contiguous), applied to both models; ``--memory-format`` forces it. Repetitions interleave the models, and
the median is reported.

Fully connected layers: on AMD CPUs our fc6/fc7 run on oneDNN rather than the default BLAS (MKL, 2x slower
there: ``model/utils/cpu_linear.py``), torchvision's on the default BLAS. A torchvision user can move its box
head to oneDNN for inference in one line (``torch.utils.mkldnn.to_mkldnn``), so beside the headline (CPU,
float32, VGG16) two ratios put the fully connected layers of both on one kernel: ours against torchvision with
``to_mkldnn``, and ours with fc6/fc7 on the default BLAS against torchvision as it is.

The FLOP floor is the FLOPs of every convolution and linear layer of one ``predict`` (extractor, RPN, and the
head's linear layers for the RoIs actually pooled) divided by the best fp32 rate measured on the machine
(``bench/floor.py``): among dense matmuls of several sizes and each of the model's convolution and linear
layers timed alone at its input size in the run, convolutions in both formats; the layers are timed between
the repetitions, so that they see the same machine load. A time below the floor is printed as a ``BROKEN
FLOOR``, not as a ratio.

Peak memory on the CPU: each model runs in a fresh subprocess that builds the model, resets the kernel's
peak-RSS counter (``/proc/self/clear_refs``), runs inference twice and reads ``VmHWM`` from
``/proc/self/status``: the peak resident memory during inference, weights included. With ``--device cuda``:
``torch.cuda.max_memory_allocated`` after a reset, per model, in this process.

Options for both models alike: ``--batch-size=N`` (N copies of the photo per call; ours predicts them in one
batch), ``--amp`` (both under ``torch.autocast``: bfloat16 on the CPU, float16 on CUDA, as a torchvision user
switches it on in one line; the FLOP floor, a float32 one, is then not measured), ``--backbone=resnet101``
or ``resnet50`` (torchvision's ``FasterRCNN`` built on our ResNet C4 extractor, layer4 + average pooling as
its box head on RoIPool 14x14, the same weights; BatchNorm statistics calibrated on random images).
``--json PATH`` writes the headline's figures for ``bench/gpu.sh``.

Usage: ``.venv/bin/python bench/inference.py [--threads 2] [--reps 5] [--device cpu|cuda] [--batch-size 1]
[--amp] [--backbone vgg16|resnet50|resnet101] [--memory-format auto|channels_last|contiguous] [--json PATH]
[--profile]``
"""

import argparse
import copy
import functools
import json
import statistics
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torchvision
from skimage import data as skimage_data
from skimage.transform import resize
from torch import nn
from torchvision.models.detection import FasterRCNN as TorchvisionFasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.misc import Conv2dNormActivation

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.floor import (  # noqa: E402
    FORMATS,
    FloorMeter,
    LayerCall,
    cpu_text,
    floor_passes,
    floor_ratio_text,
    record_layer_calls,
    timed,
)
from data.dataset import preprocess  # noqa: E402
from model import FasterRCNN, FasterRCNNResNet, FasterRCNNVGG16  # noqa: E402
from model.region_proposal_network import RegionProposalNetwork  # noqa: E402
from model.utils import cpu_conv, cpu_linear  # noqa: E402
from utils.amp import autocast, autocast_dtype  # noqa: E402
from utils.memory_format import choose_memory_format, keep_onednn_primitives, release_mkl_buffers  # noqa: E402

N_FG_CLASS = 20


class RoIPoolAdapter(MultiScaleRoIAlign):
    """``torchvision.ops.RoIPool`` behind ``MultiScaleRoIAlign``'s interface (torchvision's FasterRCNN accepts
    only that type), on the one feature map ``'0'``."""

    def __init__(self, output_size: int = 7, spatial_scale: float = 1 / 16):
        super().__init__(featmap_names=["0"], output_size=output_size, sampling_ratio=0)
        self.pool = torchvision.ops.RoIPool((output_size, output_size), spatial_scale)

    def forward(self, features: dict, proposals: list, image_shapes: list) -> torch.Tensor:
        x = features["0"]
        if x.dtype == torch.bfloat16:  # torchvision's CPU roi_pool has no bfloat16 kernel: pool in float32,
            return self.pool(x.float(), [p.float() for p in proposals]).to(x.dtype)  # as ours does inside
        return self.pool(x, proposals)  # proposals: (x_min, y_min, x_max, y_max) per image


RESNET_RPN_LOC_SCALE = 0.01  # see build_ours


def build_ours(seed: int, backbone: str = "vgg16") -> FasterRCNN:
    """Our model with random weights (ResNet: BatchNorm statistics calibrated on random images, so that the
    frozen BatchNorm keeps activations in range) and class biases drawn from U(0, 2.5)."""
    torch.manual_seed(seed)
    if backbone == "vgg16":
        model = FasterRCNNVGG16(n_fg_class=N_FG_CLASS)
    else:
        model = FasterRCNNResNet(n_fg_class=N_FG_CLASS, depth=int(backbone[len("resnet"):]))
        load_resnet(model, calibrated_resnet_state_dict(backbone, seed))
        # On the random network's layer3 the RPN's N(0, 0.01) offsets come out large enough for exp(dh) to
        # overflow: boxes no trained RPN gives, which ours keeps (and NMS merges) while torchvision clamps
        # them, so the two would pool different numbers of RoIs. Scaled to a trained RPN's small offsets.
        with torch.no_grad():
            model.rpn.loc.weight.mul_(RESNET_RPN_LOC_SCALE)
    model.eval()
    with torch.no_grad():
        model.head.score.bias.uniform_(0, 2.5)
    return model


def calibrated_resnet_state_dict(backbone: str, seed: int) -> dict:
    """torchvision's randomly initialised ResNet whose BatchNorm statistics were measured on random images
    (an untrained network with identity BatchNorm grows its activations ~1e4-fold by layer3)."""
    torch.manual_seed(seed)
    net = getattr(torchvision.models, backbone)(weights=None)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # a cumulative average over the calibration batches
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(4, 3, 160, 160))
    return net.state_dict()


def load_resnet(model: FasterRCNNResNet, state: dict) -> None:
    """Load a torchvision ResNet state dict into our C4 model's extractor (conv1 ... layer3) and head body
    (layer4); BatchNorm's ``num_batches_tracked`` has no place in the frozen BatchNorm."""
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    parts = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3")
    model.extractor.load_state_dict({f"{parts.index(k.split('.')[0])}.{k.split('.', 1)[1]}": v
                                     for k, v in state.items() if k.split(".")[0] in parts})
    model.head.top.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items()
                                    if k.startswith("layer4.")})


def mirrored_rpn_head(rpn: RegionProposalNetwork) -> RPNHead:
    """torchvision's ``RPNHead`` computing what our RPN computes: the same 3x3 convolution, one objectness
    logit per anchor from our two (``fg - bg``: its sigmoid is our softmax's foreground probability), and
    our ``(dy, dx, dh, dw)`` offsets reordered to its ``(dx, dy, dw, dh)`` (copies of the weights). Both then
    rank and regress the anchors alike and keep about as many proposals after NMS: with its own random RPN,
    torchvision's head would pool another number of RoIs than ours, and the two heads (ResNet's layer4 above
    all) would not do the same work."""
    in_channels, mid_channels = rpn.conv1.in_channels, rpn.conv1.out_channels
    n_anchor = rpn.score.out_channels // 2
    head = RPNHead(in_channels, n_anchor)
    head.conv = nn.Sequential(Conv2dNormActivation(in_channels, mid_channels, kernel_size=3, norm_layer=None))
    head.cls_logits = nn.Conv2d(mid_channels, n_anchor, 1)
    head.bbox_pred = nn.Conv2d(mid_channels, n_anchor * 4, 1)
    score_w = rpn.score.weight.view(n_anchor, 2, mid_channels, 1, 1)  # [anchor, (bg, fg)]
    score_b = rpn.score.bias.view(n_anchor, 2)
    # our (dy, dx, dh, dw) channels of each anchor in torchvision's (dx, dy, dw, dh) order
    order = torch.arange(n_anchor * 4).view(n_anchor, 4)[:, [1, 0, 3, 2]].reshape(-1)
    with torch.no_grad():
        head.conv[0][0].weight.copy_(rpn.conv1.weight)
        head.conv[0][0].bias.copy_(rpn.conv1.bias)
        head.cls_logits.weight.copy_(score_w[:, 1] - score_w[:, 0])
        head.cls_logits.bias.copy_(score_b[:, 1] - score_b[:, 0])
        head.bbox_pred.weight.copy_(rpn.loc.weight[order])
        head.bbox_pred.bias.copy_(rpn.loc.bias[order])
    return head


def build_torchvision(ours: FasterRCNN, share: bool) -> TorchvisionFasterRCNN:
    """torchvision's FasterRCNN with ``ours``'s backbone and head weights: the same modules if ``share``, else
    copies. VGG16: fc6/fc7 on RoIPool 7x7; ResNet C4: layer4 and average pooling on RoIPool 14x14. Its
    convolutions are the stock ``nn.Conv2d`` (``cpu_conv.to_native``; with ``share``, ours' too)."""
    take = (lambda m: m) if share else copy.deepcopy
    backbone = cpu_conv.to_native(take(ours.extractor))
    if ours.arch["name"] == "vgg16":
        backbone.out_channels = 512
        box_head = nn.Sequential(nn.Flatten(1), take(ours.head.classifier))  # (R, 512, 7, 7) -> (R, 4096)
        roi_pool, features = RoIPoolAdapter(7, 1 / 16), 4096
    else:  # the C4 layout: (R, 1024, 14, 14) -> layer4 -> (R, 2048, 7, 7) -> (R, 2048)
        backbone.out_channels = 1024
        top = cpu_conv.to_native(take(ours.head.top))
        box_head = nn.Sequential(top, nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        roi_pool, features = RoIPoolAdapter(14, 1 / 16), 2048
    rpn_head = mirrored_rpn_head(ours.rpn)
    predictor = FastRCNNPredictor(features, N_FG_CLASS + 1)
    predictor.cls_score.load_state_dict(ours.head.score.state_dict())
    predictor.bbox_pred.load_state_dict(ours.head.cls_loc.state_dict())
    return TorchvisionFasterRCNN(
        backbone,
        min_size=600,
        max_size=1000,
        rpn_anchor_generator=AnchorGenerator(sizes=((128, 256, 512),), aspect_ratios=((0.5, 1.0, 2.0),)),
        rpn_head=rpn_head,
        rpn_pre_nms_top_n_test=6000,
        rpn_post_nms_top_n_test=300,
        rpn_nms_thresh=0.7,
        box_roi_pool=roi_pool,
        box_head=box_head,
        box_predictor=predictor,
        box_score_thresh=0.05,
        box_nms_thresh=0.3,
        box_detections_per_img=100_000,  # the original has no cap
    ).eval()


def photo(height: int, width: int) -> np.ndarray:
    """scikit-image's chelsea (300x451) resized to ``(3, height, width)`` float32 RGB in [0, 255]."""
    img = skimage_data.chelsea().astype(np.float32) / 255
    img = resize(img, (height, width), anti_aliasing=True)
    return (img.transpose(2, 0, 1) * 255).astype(np.float32)


class Inputs:
    """``batch`` copies of the image in the form each model takes, on ``device``, and whether to run under
    ``--amp``'s autocast."""

    def __init__(self, raw: np.ndarray, device: torch.device, batch: int = 1, amp: bool = False):
        self.raw, self.device, self.amp = raw, device, amp
        self.sizes = [raw.shape[1:]] * batch
        pre = torch.from_numpy(preprocess(raw, 600, 1000, "torchvision")).to(device)
        self.pre = [pre] * batch
        self.tv = [(torch.from_numpy(raw) / 255).to(device)] * batch


def run_ours(model, inputs: Inputs):
    with autocast(inputs.device, inputs.amp):
        return model.predict(inputs.pre, inputs.sizes, batch_size=len(inputs.pre))


def run_torchvision(model, inputs: Inputs):
    with torch.no_grad(), autocast(inputs.device, inputs.amp):
        return model(inputs.tv)


def run_ours_native(switch, model, inputs: Inputs):
    """``run_ours`` with ``switch`` (``cpu_linear`` or ``cpu_conv``) on PyTorch's stock kernels
    (``switch.backend('native')``), as torchvision's run: fc6/fc7 on the default BLAS, or every convolution
    on oneDNN's direct kernels; reported beside the headline."""
    with switch.backend("native"):
        return run_ours(model, inputs)


def winograd_calls(calls: list[LayerCall]) -> tuple[int, int]:
    """``(taken, total)``: how many of a run's recorded 3x3 convolution calls take the Winograd path (the
    rule asked with an input of each call's shape, never filled, and whether the call had a gradient)."""
    convs = [c for c in calls if isinstance(c.module, cpu_conv.Conv2d) and c.module.kernel_size == (3, 3)]
    taken = sum(cpu_conv.use_winograd(torch.empty(c.input_shape), c.module,
                                      training=c.input_grad or c.weight_grad or c.bias_grad) for c in convs)
    return taken, len(convs)


def torchvision_onednn_fc(model: TorchvisionFasterRCNN) -> TorchvisionFasterRCNN:
    """A copy of torchvision's model with its box head's fc6/fc7 on oneDNN, as any of its users can do in one
    line (``torch.utils.mkldnn.to_mkldnn``, inference only): the same kernel as our fc6/fc7 on AMD CPUs."""
    from torch.utils import mkldnn

    model = copy.deepcopy(model)
    with warnings.catch_warnings():  # its modules use the deprecated torch.jit.script_method
        warnings.simplefilter("ignore", FutureWarning)
        model.roi_heads.box_head = mkldnn.to_mkldnn(model.roi_heads.box_head)
    return model


def run_counting_rois(model, run, inputs: Inputs) -> tuple[object, int]:
    """``run(model, inputs)`` and the RoIs its head classified per image (the rows of its class scores'
    input over the batch, divided by the batch size)."""
    score = model.head.score if isinstance(model, FasterRCNN) else model.roi_heads.box_predictor.cls_score
    rows = []
    handle = score.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    try:
        out = run(model, inputs)
    finally:
        handle.remove()
    return out, sum(rows) // len(inputs.sizes)


def count_flops(model: FasterRCNNVGG16, inputs: Inputs) -> tuple[dict[str, int], list[LayerCall]]:
    """FLOPs (multiply-add = 2) of one ``predict``: extractor convs, RPN convs, head linears (from forward
    hooks), the number of RoIs the head saw, and the layer calls themselves (for the floor). Recorded with
    ``cpu_linear.backend('native')``: fc6/fc7 on oneDNN bypass their modules' hooks."""
    with cpu_linear.backend("native"):
        calls = record_layer_calls(model, lambda: run_ours(model, inputs))
    flops = {part: sum(c.flops for c in calls if c.path.split(".")[0] == part)
             for part in ("extractor", "rpn", "head")}
    flops["n_roi"] = next(c.input_shape[0] for c in calls if c.module is model.head.score)
    return flops, calls


def _proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(which: str, args) -> None:
    """In a fresh process: build one model in ``args.memory_format``, reset the peak RSS, infer twice, print
    the peaks as JSON."""
    torch.set_num_threads(args.threads)
    ours = build_ours(seed=0, backbone=args.backbone)
    if which == "ours":
        model, run = ours, run_ours
    else:
        model, run = build_torchvision(ours, share=True), run_torchvision
        del ours  # its RPN only; the backbone and fc layers now belong to torchvision's model
    model.to(memory_format=FORMATS[args.memory_format])
    inputs = Inputs(photo(600, 800), torch.device("cpu"), args.batch_size, args.amp)
    loaded_kb = _proc_status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    for _ in range(2):
        run(model, inputs)
    peak_kb = _proc_status_kb("VmHWM")
    print(json.dumps({"loaded_mb": loaded_kb / 1024, "peak_mb": peak_kb / 1024}))


def cpu_peak_memory(args, memory_format: str) -> dict[str, dict]:
    result = {}
    for which in ("ours", "torchvision"):
        out = subprocess.run(
            [sys.executable, __file__, "--memory-child", which, "--threads", str(args.threads),
             "--memory-format", memory_format, "--backbone", args.backbone, "--batch-size",
             str(args.batch_size)] + (["--amp"] if args.amp else []),
            check=True, capture_output=True, text=True,
        )
        result[which] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def cuda_peak_memory(models: dict, inputs: Inputs, device: torch.device) -> dict[str, float]:
    result = {}
    for name, (model, run) in models.items():
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        run(model, inputs)
        torch.cuda.synchronize(device)
        result[name] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def format_name(memory_format: torch.memory_format) -> str:
    return next(name for name, fmt in FORMATS.items() if fmt == memory_format)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per model (default 5)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--backbone", default="vgg16", choices=("vgg16", "resnet50", "resnet101"),
                        help="VGG16 (the original) or ResNet-50/101 in the C4 layout, for both models")
    parser.add_argument("--batch-size", type=int, default=1, help="images per call, for both (default 1)")
    parser.add_argument("--amp", action="store_true",
                        help="both models under torch.autocast: bfloat16 on the CPU, float16 on CUDA")
    parser.add_argument("--memory-format", default="auto", choices=("auto", *FORMATS),
                        help="the headline's format, for both models (default auto: "
                             "utils.memory_format.choose_memory_format's choice for inference)")
    parser.add_argument("--json", help="also write the headline's figures to this JSON file (bench/gpu.sh)")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of ours")
    parser.add_argument("--memory-child", choices=("ours", "torchvision"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args)
        return

    torch.set_num_threads(args.threads)
    keep_onednn_primitives()  # as train.py and demo.py do, for both models alike
    release_mkl_buffers()
    device = torch.device(args.device)
    height, width = (600, 1000) if device.type == "cuda" else (600, 800)
    ours = build_ours(seed=0, backbone=args.backbone)
    precision = f"autocast {autocast_dtype(device)}".replace("torch.", "") if args.amp else "float32"
    print(f"device {device}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"threads {torch.get_num_threads()}, {args.backbone}, {precision}, batch {args.batch_size} x image "
          f"{height}x{width} (chelsea), random init; CPU {cpu_text()}")
    headline = format_name(choose_memory_format(ours.to(device), "inference", (height, width),
                                                setting=args.memory_format, amp=args.amp))
    models = {}
    for fmt, memory_format in FORMATS.items():
        model = copy.deepcopy(ours) if fmt == "contiguous" else ours
        models[("ours", fmt)] = (model.to(device).to(memory_format=memory_format), run_ours)
        tv = build_torchvision(ours, share=False).to(device).to(memory_format=memory_format)
        models[("torchvision", fmt)] = (tv, run_torchvision)
    # beside the headline: the fully connected layers on one kernel for both (CPU, float32, VGG16)
    side_by_side = device.type == "cpu" and not args.amp and args.backbone == "vgg16"
    if side_by_side:
        models["ours, stock convs", headline] = (models["ours", headline][0],
                                                 functools.partial(run_ours_native, cpu_conv))
        models["ours, fc on BLAS", headline] = (models["ours", headline][0],
                                                functools.partial(run_ours_native, cpu_linear))
        models["tv, fc on oneDNN", headline] = (torchvision_onednn_fc(models["torchvision", headline][0]),
                                                run_torchvision)
    inputs = Inputs(photo(height, width), device, args.batch_size, args.amp)

    n_det, n_roi = {}, {}
    for (who, fmt), (model, run) in models.items():  # warm-up (oneDNN / cuDNN primitive selection)
        out, n_roi[who, fmt] = run_counting_rois(model, run, inputs)
        n_det[who, fmt] = len(out[1][0]) if who.startswith("ours") else len(out[0]["labels"])
    # the FLOP floor is a float32 one: under --amp it is not measured
    flops, calls = count_flops(models["ours", headline][0], inputs) if not args.amp else (None, [])
    meter = FloorMeter(calls, device) if not args.amp else None
    times = {key: [] for key in models}
    for rep in range(args.reps):
        for key, (model, run) in models.items():
            times[key].append(timed(lambda model=model, run=run: run(model, inputs), device)[0])
        if meter is not None and rep in floor_passes(args.reps):
            meter.measure()
    median = {key: statistics.median(t) for key, t in times.items()}
    cpu = torch.device("cpu")
    pre_time = statistics.median(
        timed(lambda: preprocess(inputs.raw, 600, 1000, "torchvision"), cpu)[0] for _ in range(5)
    )

    for (who, fmt), t in median.items():
        spread = f"min {min(times[who, fmt]):.3f} max {max(times[who, fmt]):.3f}"
        print(f"{who + ', ' + fmt:26s} {t:.3f} s median of {args.reps} ({spread}), "
              f"{args.batch_size / t:.2f} img/s, {n_det[who, fmt]} detections in the first image")
    print(f"{'ours: preprocess (CPU)':26s} {pre_time:.3f} s per image")
    print(f"RoIs pooled per image ({headline}): ours {n_roi['ours', headline]}, torchvision "
          f"{n_roi['torchvision', headline]}")
    for fmt in FORMATS:
        mark = "  <- headline" if fmt == headline else ""
        print(f"ratio ours / torchvision, both {fmt + ':':14s} "
              f"{median['ours', fmt] / median['torchvision', fmt]:.3f} (of the minimums: "
              f"{min(times['ours', fmt]) / min(times['torchvision', fmt]):.3f}){mark}")
    ratio = median["ours", headline] / median["torchvision", headline]
    why = ("the format utils.memory_format.choose_memory_format picks for inference on this machine"
           if args.memory_format == "auto" else "forced by --memory-format")
    print(f"HEADLINE ours / torchvision, both {headline} ({why}): {ratio:.3f} (target <= 0.85)")
    ratio = (median["ours", headline] + args.batch_size * pre_time) / median["torchvision", headline]
    print(f"ratio ours + preprocess / torchvision ({headline}): {ratio:.3f}")
    if side_by_side:
        onednn = cpu_linear.use_onednn(torch.zeros(1, 1), torch.zeros(1, 1))
        kernel = "oneDNN" if onednn else "the default BLAS"
        same_kernel = median["ours", headline] / median["tv, fc on oneDNN", headline]
        blas = median["ours, fc on BLAS", headline] / median["torchvision", headline]
        taken, total = winograd_calls(calls)
        print(f"beside the headline, ours with every convolution on the stock kernels as torchvision's "
              f"({headline}; ours runs {taken} of its {total} 3x3 convolution calls by Winograd here, "
              f"model/utils/cpu_conv.py): "
              f"{median['ours, stock convs', headline] / median['torchvision', headline]:.3f}")
        print(f"beside the headline, fc6/fc7 on one kernel for both ({headline}; ours runs them on {kernel} "
              f"here): ours / torchvision with fc6/fc7 on oneDNN (to_mkldnn) {same_kernel:.3f}; ours with "
              f"fc6/fc7 on the default BLAS / torchvision {blas:.3f}")
    if meter is not None:
        total_flops = flops["extractor"] + flops["rpn"] + flops["head"]
        print(f"FLOPs: extractor {flops['extractor'] / 1e9:.1f} G, RPN {flops['rpn'] / 1e9:.1f} G, head "
              f"{flops['head'] / 1e9:.1f} G for {flops['n_roi']} RoIs")
        print(meter.summary(total_flops))
        floor = total_flops / meter.peak().rate
        for who in ("ours", "torchvision"):
            target = 1.15 if who == "ours" else None
            print(floor_ratio_text(f"{who} ({headline})", median[who, headline], floor, target))
        print(meter.alone_ratio_text("ours", median["ours", headline], headline))
    peak = {}
    if device.type == "cuda":
        for (who, fmt), mib in cuda_peak_memory(models, inputs, device).items():
            peak[who, fmt] = mib
            print(f"{who + ', ' + fmt:26s} peak CUDA memory {mib:.0f} MiB (torch.cuda.max_memory_allocated)")
    else:
        memory = cpu_peak_memory(args, headline)
        for name, m in memory.items():
            peak[name, headline] = m["peak_mb"]
            print(f"{name + ', ' + headline:26s} peak RSS during inference {m['peak_mb']:.0f} MiB "
                  f"(loaded model {m['loaded_mb']:.0f} MiB; fresh process, VmHWM)")
        ratio = memory["ours"]["peak_mb"] / memory["torchvision"]["peak_mb"]
        print(f"peak memory ours / torchvision ({headline}): {ratio:.3f} (target <= 1)")
    if args.json:
        write_json(args.json, "inference", args, device, headline, median, peak)

    if args.profile:
        from torch.profiler import profile

        with profile() as prof:
            run_ours(models["ours", headline][0], inputs)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


def write_json(path, bench: str, args, device: torch.device, headline: str, median: dict, peak: dict) -> None:
    """The headline's figures of one run (``bench/gpu_table.py`` reads them)."""
    record = {"bench": bench, "device": str(device), "amp": bool(args.amp), "batch_size": args.batch_size,
              "backbone": getattr(args, "backbone", "vgg16"), "memory_format": headline}
    for who in ("ours", "torchvision"):
        seconds = median[who, headline]
        record[who] = {"seconds": seconds, "images_per_second": args.batch_size / seconds,
                       "peak_memory_mib": peak.get((who, headline))}
    Path(path).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
