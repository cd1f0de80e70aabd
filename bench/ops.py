"""Our NMS and RoI pooling against ``torchvision.ops.nms`` / ``torchvision.ops.roi_pool``, side by side.

What is timed (seeded random inputs, the sizes of one VGG16 training step on a 600x800 image):

* RoI pooling: ``model.roi_module.roi_pooling_2d`` and ``torchvision.ops.roi_pool`` on a ``(1, 512, 38, 50)``
  float32 feature map and 128 rois (the ProposalTargetCreator's sample size) of sides log-uniform in
  16..480 px inside the image, 7x7 at scale 1/16; forward alone (no grad) and forward + backward (the
  gradient w.r.t. the feature map of a random upstream gradient). Target: ours / torchvision <= 1.0.
* NMS: ``model.utils.nms.non_maximum_suppression`` on float32 numpy ``(y_min, x_min, y_max, x_max)`` boxes
  with scores (how ``ProposalCreator`` calls it) and ``torchvision.ops.nms`` on the same boxes and scores as
  tensors; 12000 RPN-like boxes (the training pre-NMS count: random centres, sides log-uniform in 8..512 px,
  clipped to the image), threshold 0.7. Target: ours / torchvision <= 1.5.

Repetitions interleave ours and torchvision's (so a change of machine load hits both), and the median of
each is reported with the ratio. The intra-op thread count is fixed (``--threads``, default 2) and printed.
``--device cuda``: the same on the GPU, our CuPy kernels against torchvision's CUDA ops, each call
synchronised (without CuPy ours falls back to the CPU, which the output says).

Usage: ``.venv/bin/python bench/ops.py [--threads 2] [--repeats 15] [--device cpu|cuda] [--only roi|nms]``
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.roi_module import roi_pooling_2d  # noqa: E402
from model.utils.cupy_utils import cupy_available  # noqa: E402

IMG_H, IMG_W = 600, 800
FEAT = (1, 512, 38, 50)  # VGG16 conv5_3 of a 600x800 image
N_ROI, ROI_SIZE, SCALE = 128, 7, 1 / 16
N_BOX, NMS_THRESH = 12000, 0.7


def random_boxes(rng: np.random.Generator, n: int, min_side: float, max_side: float) -> np.ndarray:
    """``(n, 4)`` float32 ``(y_min, x_min, y_max, x_max)`` boxes in the image: random centres, sides
    log-uniform in ``[min_side, max_side]``, clipped."""
    centre = rng.uniform((0, 0), (IMG_H, IMG_W), (n, 2))
    side = np.exp(rng.uniform(np.log(min_side), np.log(max_side), (n, 2)))
    box = np.concatenate((centre - side / 2, centre + side / 2), axis=1)
    return np.clip(box, 0, (IMG_H, IMG_W, IMG_H, IMG_W)).astype(np.float32)


def timed(fn, device: torch.device) -> float:
    """Seconds of one call, synchronised on CUDA."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def compare(name: str, ours, theirs, target: float, repeats: int, device: torch.device) -> None:
    """Time ``ours`` and ``theirs`` alternately; print the medians and the ratio against ``target``."""
    for fn in (ours, theirs):  # warm-up: kernel compilation, allocator, caches
        fn()
        fn()
    times = {"ours": [], "theirs": []}
    for _ in range(repeats):
        times["ours"].append(timed(ours, device))
        times["theirs"].append(timed(theirs, device))
    t_ours, t_theirs = statistics.median(times["ours"]), statistics.median(times["theirs"])
    ratio = t_ours / t_theirs
    verdict = "ok" if ratio <= target else "ABOVE TARGET"
    print(f"{name:<34} {t_ours * 1e3:9.2f} {t_theirs * 1e3:12.2f} {ratio:7.2f}   <= {target:.1f} {verdict}")


def bench_roi(rng: np.random.Generator, repeats: int, device: torch.device) -> None:
    x = torch.from_numpy(rng.standard_normal(FEAT).astype(np.float32)).to(device)
    box = random_boxes(rng, N_ROI, 16, 480)
    # (y_min, x_min, y_max, x_max) -> (batch_index, x_min, y_min, x_max, y_max)
    rois = torch.from_numpy(np.concatenate((np.zeros((N_ROI, 1), np.float32), box[:, [1, 0, 3, 2]]), 1))
    rois = rois.to(device)
    grad_y = torch.from_numpy(rng.standard_normal((N_ROI, FEAT[1], ROI_SIZE, ROI_SIZE)).astype(np.float32))
    grad_y = grad_y.to(device)
    x_grad = x.clone().requires_grad_()

    def ours_forward():
        with torch.no_grad():
            roi_pooling_2d(x, rois, ROI_SIZE, ROI_SIZE, SCALE)

    def theirs_forward():
        with torch.no_grad():
            torchvision.ops.roi_pool(x, rois, ROI_SIZE, SCALE)

    def ours_backward():
        x_grad.grad = None
        roi_pooling_2d(x_grad, rois, ROI_SIZE, ROI_SIZE, SCALE).backward(grad_y)

    def theirs_backward():
        x_grad.grad = None
        torchvision.ops.roi_pool(x_grad, rois, ROI_SIZE, SCALE).backward(grad_y)

    shape = "x".join(map(str, FEAT[1:]))
    compare(f"roi_pool {N_ROI} rois {shape} fwd", ours_forward, theirs_forward, 1.0, repeats, device)
    compare(f"roi_pool {N_ROI} rois {shape} fwd+bwd", ours_backward, theirs_backward, 1.0, repeats, device)


def bench_nms(rng: np.random.Generator, repeats: int, device: torch.device) -> None:
    from model.utils.nms import non_maximum_suppression

    box = random_boxes(rng, N_BOX, 8, 512)
    score = rng.random(N_BOX).astype(np.float32)
    box_t, score_t = torch.from_numpy(box).to(device), torch.from_numpy(score).to(device)
    if device.type == "cuda":  # ours takes tensors on the GPU (the CuPy kernel)
        def ours():
            non_maximum_suppression(box_t, NMS_THRESH, score_t)
    else:  # the numpy path ProposalCreator takes
        def ours():
            non_maximum_suppression(box, NMS_THRESH, score)

    def theirs():  # IoU is symmetric in the axes, so (y, x) order is as good as torchvision's (x, y)
        torchvision.ops.nms(box_t, score_t, NMS_THRESH)

    compare(f"nms {N_BOX} boxes @ {NMS_THRESH}", ours, theirs, 1.5, repeats, device)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--repeats", type=int, default=15, help="timed repetitions of each op (default 15)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--only", choices=("roi", "nms"), help="run one of the two benchmarks")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    torch.set_num_threads(args.threads)
    name = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"{torch.get_num_threads()} threads, device {device}{name}")
    if device.type == "cuda":
        print("ours on CUDA: " + ("CuPy kernels" if cupy_available() else "no CuPy, CPU fallback"))
    print(f"{'op':<34} {'ours ms':>9} {'torchvision':>12} {'ratio':>7}   target")
    rng = np.random.default_rng(args.seed)
    if args.only in (None, "roi"):
        bench_roi(rng, args.repeats, device)
    if args.only in (None, "nms"):
        bench_nms(rng, args.repeats, device)


if __name__ == "__main__":
    main()
