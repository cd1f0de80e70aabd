"""The host's share of a training step and of a test image at VOC size, on the CPU, one thread.

On a GPU the convolutions of a 600x1000 image take a few milliseconds, so what the host does per step (the
numpy creators, NMS and its post-processing, Python) sets the pace. This measures that work on the CPU path,
NMS included: an upper bound of the host work of a GPU machine (there NMS runs as a CUDA kernel).

The scene (fixed seeds): a 375x625 original image resized by 1.6 to 600x1000; a 37x62 feature map at stride 16
with the 9 default anchors per cell (20646 anchors); RPN outputs drawn at random like the real layer's
(``softmax`` of two ``N(0, 2)`` logits per anchor as the foreground score, offsets ``N(0, 0.1)`` for centres
and ``N(0, 0.2)`` for sizes), handed over as the RPN does (numpy views of one host array); 3 ground-truth
boxes with random labels; RoI-head outputs for 300 RoIs and 21 classes (normalised offsets ``N(0, 1)``, class
logits ``N(0, 2)`` with the background's raised by 2).

Stages, each timed on its own (median of ``--repeats`` calls after two warm-ups, with min and max):

* training step: ``ProposalCreator`` 12000 -> 2000 (NMS 0.7, ``min_size`` 16 times the scale), the
  ``AnchorTargetCreator`` (256 samples), the ``ProposalTargetCreator`` (128 RoIs from the 2000 proposals);
* test image: ``ProposalCreator`` 6000 -> 300, and ``FasterRCNN.predict``'s post-processing (per-class
  decoding, clipping, softmax, score 0.05, class-offset NMS 0.3) through the real ``predict`` on a model
  whose extractor, RPN and head return the prepared outputs at once (so whatever else ``predict`` does on
  the host, such as batching the input image, is counted too).

"of which" lines (the NMS alone on the boxes the creator ranks) are part of the line above, not added to
the total. The totals of the medians are checked against the targets: <= 10 ms per training step and <= 4 ms
per test image. The sampling creators get a fresh generator of the same seed for every call, so every
repetition does the same work. One torch thread and single-threaded numpy (BLAS/OpenMP variables set to 1
before numpy is imported).

Usage: ``.venv/bin/python bench/host.py [--repeats 30] [--seed 0]``
"""

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.faster_rcnn import FasterRCNN  # noqa: E402
from model.region_proposal_network import _enumerate_shifted_anchor  # noqa: E402
from model.utils.bbox_tools import generate_anchor_base  # noqa: E402
from model.utils.creator_tool import AnchorTargetCreator, ProposalCreator, ProposalTargetCreator  # noqa: E402
from model.utils.nms import non_maximum_suppression  # noqa: E402

ORIG_SIZE = (375, 625)  # a VOC-like original image
SCALE = 1.6
IMG_SIZE = (600, 1000)  # after resizing: shorter side 600, longer at most 1000
FEAT_SIZE = (37, 62)  # VGG16 conv5_3 of a 600x1000 image (stride 16)
N_GT, N_CLASS = 3, 21
TARGET_TRAIN_MS, TARGET_TEST_MS = 10.0, 4.0  # on every CPU kind
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_name() -> str:
    """Model name, family/model and the vector flags that matter here, from ``/proc/cpuinfo``."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key and key not in info:
                    info[key] = value.strip()
    except OSError:
        return "unknown CPU (no /proc/cpuinfo)"
    flags = set(info.get("flags", "").split())
    present = [flag for flag in CPU_FLAGS if flag in flags]
    return (f"{info.get('model name', '?')}, cpu family {info.get('cpu family', '?')} model "
            f"{info.get('model', '?')}, flags: {' '.join(present) or 'none of ' + '/'.join(CPU_FLAGS)}")


def make_scene(seed: int) -> dict:
    """The seeded inputs of every stage."""
    rng = np.random.default_rng(seed)
    anchor = _enumerate_shifted_anchor(generate_anchor_base(), 16, *FEAT_SIZE)  # (S, 4)
    n_anchor = len(anchor)
    logits = torch.from_numpy(rng.normal(0, 2, (n_anchor, 2)).astype(np.float32))
    score = F.softmax(logits, dim=1)[:, 1:]  # (S, 1) as the RPN computes it
    loc = torch.from_numpy((rng.normal(0, 1, (n_anchor, 4)) * (0.1, 0.1, 0.2, 0.2)).astype(np.float32))
    # As the RPN hands them to the proposal layer: float32 numpy views of one (S, 5) host array.
    host = torch.cat((loc, score), dim=1).numpy()  # (S, 4) + (S, 1) -> (S, 5)
    loc, score = host[:, :4], host[:, 4]  # (S, 4), (S,)

    height, width = IMG_SIZE
    ctr = rng.uniform((0.2 * height, 0.2 * width), (0.8 * height, 0.8 * width), (N_GT, 2))
    side = rng.uniform(60, 400, (N_GT, 2))
    bbox = np.clip(np.concatenate((ctr - side / 2, ctr + side / 2), axis=1), 0,
                   (height, width, height, width)).astype(np.float32)  # (G, 4)
    label = rng.integers(0, N_CLASS - 1, N_GT).astype(np.int32)

    roi_cls_loc = torch.from_numpy(rng.normal(0, 1, (300, N_CLASS * 4)).astype(np.float32))  # (R, L*4)
    roi_score = rng.normal(0, 2, (300, N_CLASS)).astype(np.float32)  # (R, L)
    roi_score[:, 0] += 2
    return {"anchor": anchor, "loc": loc, "score": score, "bbox": bbox, "label": label,
            "roi_cls_loc": roi_cls_loc, "roi_score": torch.from_numpy(roi_score)}


class _Fixed(nn.Module):
    """Stands for the extractor, the RPN or the head of ``FasterRCNN``: returns what it was given."""

    def __init__(self, output, n_class: int = N_CLASS, feat_stride: int = 16):
        super().__init__()
        self.output, self.n_class, self.feat_stride = output, n_class, feat_stride

    def forward(self, *args):
        return self.output


def timed(fn, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn``, after two warm-up calls."""
    fn()
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def report(name: str, times: list[float]) -> float:
    """Print one stage line; return its median in ms."""
    ms = [t * 1e3 for t in times]
    median = statistics.median(ms)
    print(f"  {name:<46} {median:8.2f} {min(ms):8.2f} {max(ms):8.2f}")
    return median


def total(ms: float, target: float) -> None:
    verdict = "ok" if ms <= target else "ABOVE TARGET"
    print(f"  {'total':<46} {ms:8.2f}   -> ceiling {1e3 / ms:.0f} img/s; target <= {target:.0f} ms {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    scene = make_scene(args.seed)
    anchor, loc, score, bbox, label = (scene[k] for k in ("anchor", "loc", "score", "bbox", "label"))

    proposal_creator = ProposalCreator()
    anchor_target_creator = AnchorTargetCreator()
    proposal_target_creator = ProposalTargetCreator()

    def proposals(training: bool) -> np.ndarray:
        return proposal_creator(loc, score, anchor, IMG_SIZE, scale=SCALE, training=training)

    def ranked_boxes(n_pre: int) -> np.ndarray:
        """The boxes the creator hands NMS: decoded, clipped, size-filtered, best ``n_pre`` first."""
        everything = ProposalCreator(nms_thresh=2.0, n_train_pre_nms=n_pre, n_train_post_nms=n_pre)
        return everything(loc, score, anchor, IMG_SIZE, scale=SCALE, training=True)

    roi_train, roi_test = proposals(True), proposals(False)
    ranked_train, ranked_test = ranked_boxes(12000), ranked_boxes(6000)
    model = FasterRCNN(_Fixed(torch.zeros(1, 1, *FEAT_SIZE)),
                       _Fixed((None, None, roi_test, np.zeros(len(roi_test), np.int32), anchor)),
                       _Fixed((scene["roi_cls_loc"][:len(roi_test)], scene["roi_score"][:len(roi_test)])))
    img = torch.zeros(3, *IMG_SIZE)
    prob = F.softmax(scene["roi_score"][:len(roi_test)], dim=1)[:, 1:]
    n_candidate = int((prob > model.score_thresh).sum())
    n_detection = len(model.predict([img], sizes=[ORIG_SIZE])[0][0])

    print(f"bench/host.py: host work per step at VOC size, CPU path, torch threads "
          f"{torch.get_num_threads()}, numpy single-threaded")
    print(f"CPU: {cpu_name()}")
    print(f"image {IMG_SIZE[0]}x{IMG_SIZE[1]} (scale {SCALE}), feature map {FEAT_SIZE[0]}x{FEAT_SIZE[1]}, "
          f"{len(anchor)} anchors, {N_GT} ground-truth boxes; kept: {len(roi_train)} train / {len(roi_test)} "
          f"test proposals (of {len(ranked_train)} / {len(ranked_test)} ranked), {n_detection} detections of "
          f"{n_candidate} candidates")
    print(f"repeats {args.repeats}, times in ms")
    print(f"  {'stage':<46} {'median':>8} {'min':>8} {'max':>8}")

    print("training step")
    train_ms = report("ProposalCreator 12000 -> 2000", timed(lambda: proposals(True), args.repeats))
    report("  of which NMS 12000 -> 2000 (0.7)",
           timed(lambda: non_maximum_suppression(ranked_train, 0.7, limit=2000), args.repeats))
    train_ms += report("AnchorTargetCreator (256)", timed(
        lambda: anchor_target_creator(bbox, anchor, IMG_SIZE, rng=np.random.default_rng(1)), args.repeats))
    train_ms += report("ProposalTargetCreator (128)", timed(
        lambda: proposal_target_creator(roi_train, bbox, label, rng=np.random.default_rng(2)), args.repeats))
    total(train_ms, TARGET_TRAIN_MS)

    print("test image")
    test_ms = report("ProposalCreator 6000 -> 300", timed(lambda: proposals(False), args.repeats))
    report("  of which NMS 6000 -> 300 (0.7)",
           timed(lambda: non_maximum_suppression(ranked_test, 0.7, limit=300), args.repeats))
    test_ms += report(f"predict post-processing ({N_CLASS} classes, NMS 0.3)",
                      timed(lambda: model.predict([img], sizes=[ORIG_SIZE]), args.repeats))
    total(test_ms, TARGET_TEST_MS)


if __name__ == "__main__":
    main()
