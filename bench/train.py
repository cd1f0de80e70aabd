"""Training speed: our ``FasterRCNNVGG16`` + ``FasterRCNNTrainer`` against torchvision's ``FasterRCNN`` on the
same VGG16, and the toy job's time to mAP 0.9.

1. VGG16 training step (``--device cpu``, the default). Both models start from the same random VGG16
   weights (``bench/inference.py``'s ``build_ours`` / ``build_torchvision``: conv1/conv2 frozen in both,
   RoIPool 7x7 at 1/16, 9 anchors of 128/256/512 px). torchvision's model is set to the original's training
   settings: RPN 12000/2000 boxes before/after NMS, 256 anchors sampled (half positive at most), 128 RoIs
   (a quarter positive at most). Both use the original's optimizer (SGD, momentum 0.9, biases 2x lr, no
   weight decay on biases) as our ``get_optimizer`` makes it (fused); for information, torchvision runs
   also with its reference recipe's plain ``torch.optim.SGD``. One step = forward, the four losses,
   backward, optimizer step, on a 600x800 photo (scikit-image's ``chelsea``) with three ground-truth
   boxes; ours is given the preprocessed image, torchvision the RGB [0, 1] image (it normalises inside; the
   resize is a no-op at 600x800). Both models run in both memory formats (``contiguous`` and
   ``channels_last``, ``model.to(memory_format=...)``), so each ratio compares them in the same format; the
   headline is the format ``utils.memory_format.choose_memory_format`` picks for training on this machine
   (cached per machine; ``--memory-format`` forces it), applied to both. Repetitions interleave the models;
   medians are reported, and the ratios (target <= 0.85). On AMD CPUs our fc6/fc7 run on oneDNN, 2x
   faster there than the default BLAS torchvision's run on (``model/utils/cpu_linear.py``); no switch of
   torchvision's does that for training, and beside the headline ours is timed with fc6/fc7 on the default
   BLAS too.
   The FLOP floor of the step (``bench/floor.py``): the FLOPs of every convolution and linear layer of ours,
   forward, plus backward twice the forward where both the weight and the input need a gradient and once
   where only one does (conv3_1 has no input gradient: conv1/conv2 are frozen), divided by the best fp32 rate
   measured on the machine among dense matmuls of several sizes and each of the step's convolution (both
   formats) and linear layers timed alone at its input size, forward and backward with the gradients the
   step computes; the layers are timed among the repetitions. A step faster than the floor is printed as a
   ``BROKEN FLOOR``, never as a ratio.
2. Toy time to mAP: ``train.train(data='toy')`` exactly as ``python train.py train --data=toy`` runs it,
   in this process; the run's ``history.jsonl`` gives the iteration and the time (evaluation included) at
   which the per-epoch test mAP first reached 0.9, the final mAP and the total time.
3. ``--toy-pace``: the toy preset's model alone, training images per second at batch 1, 2 and 4 (its
   lr scaled with the batch), on the toy set's first images.
4. ``--device cuda``: images/s and peak memory (``torch.cuda.max_memory_allocated``) of VOC-size training
   steps (600x1000) for both models. Targets on an H100: >= 20 img/s, <= 3 GB.

``--batch-size=N`` (N copies of the photo per step) and ``--amp`` (both models under ``torch.autocast``:
bfloat16 on the CPU; float16 with a ``GradScaler`` on CUDA, as torchvision's detection reference trains
with ``--amp``; the toy job with ``train.py --amp``) apply to both alike; the FLOP floor, a float32 one, is
not measured under ``--amp``. ``--json PATH`` writes the headline's figures for ``bench/gpu.sh``.

Usage: ``.venv/bin/python bench/train.py [--threads 2] [--reps 3] [--device cpu|cuda] [--batch-size 1]
[--amp] [--memory-format auto|channels_last|contiguous] [--json PATH] [--skip-toy] [--toy-only] [--toy-pace]
[--profile]``
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.floor import (  # noqa: E402
    FORMATS,
    FloorMeter,
    LayerCall,
    cpu_text,
    floor_passes,
    floor_ratio_text,
    record_layer_calls,
)
from bench.inference import (  # noqa: E402
    build_ours,
    build_torchvision,
    format_name,
    photo,
    winograd_calls,
    write_json,
)
from bench.ops import timed  # noqa: E402
from data.dataset import preprocess  # noqa: E402
from model.utils import cpu_conv, cpu_linear  # noqa: E402
from trainer import FasterRCNNTrainer, get_optimizer  # noqa: E402
from utils.amp import autocast, autocast_dtype, grad_scaler  # noqa: E402
from utils.memory_format import choose_memory_format, keep_onednn_primitives, release_mkl_buffers  # noqa: E402

# Ground truth of the benchmark image, (y_min, x_min, y_max, x_max) in 600x800 pixels, and fg labels.
BBOX = np.array([[60, 120, 560, 700], [200, 40, 420, 300], [300, 500, 520, 760]], dtype=np.float32)
LABEL = np.array([7, 11, 14], dtype=np.int32)


class OursStep:
    """One training step of our trainer on ``batch`` copies of the preprocessed image."""

    def __init__(self, raw: np.ndarray, device: torch.device, memory_format: torch.memory_format,
                 batch: int = 1, amp: bool = False):
        model = build_ours(seed=0).train().to(device).to(memory_format=memory_format)
        self.trainer = FasterRCNNTrainer(model, seed=0, amp=amp)
        img = preprocess(raw, 600, 1000, "torchvision")
        self.img = torch.from_numpy(img)[None].expand(batch, -1, -1, -1).contiguous().to(device)
        self.scale = [img.shape[1] / raw.shape[1]] * batch
        self.bbox = [BBOX * self.scale[0]] * batch
        self.label = [LABEL] * batch

    def __call__(self):
        return self.trainer.train_step(self.img, self.bbox, self.label, self.scale)


class OursNativeStep(OursStep):
    """:class:`OursStep` with ``switch`` (``cpu_linear`` or ``cpu_conv``) on PyTorch's stock kernels
    (``switch.backend('native')``), as torchvision's run: fc6/fc7 on the default BLAS (ours runs them on
    oneDNN on AMD CPUs), or every convolution on oneDNN's direct kernels (ours runs its wide 3x3 layers by
    Winograd); reported beside the headline."""

    def __init__(self, switch, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.switch = switch

    def __call__(self):
        with self.switch.backend("native"):
            return super().__call__()


class TorchvisionStep:
    """One training step of torchvision's FasterRCNN set to the original's training settings.

    ``reference_sgd``: instead of our ``get_optimizer`` (fused SGD), the optimizer of torchvision's detection
    reference recipe (``torch.optim.SGD(params, lr, momentum=0.9, weight_decay=...)``, PyTorch's default
    implementation).
    """

    def __init__(self, raw: np.ndarray, device: torch.device, memory_format: torch.memory_format,
                 reference_sgd: bool = False, batch: int = 1, amp: bool = False):
        model = build_torchvision(build_ours(seed=0), share=False)
        model.rpn._pre_nms_top_n["training"] = 12000
        model.rpn._post_nms_top_n["training"] = 2000
        model.rpn.fg_bg_sampler.batch_size_per_image = 256
        model.rpn.fg_bg_sampler.positive_fraction = 0.5
        model.roi_heads.fg_bg_sampler.batch_size_per_image = 128
        model.roi_heads.fg_bg_sampler.positive_fraction = 0.25
        self.model = model.train().to(device).to(memory_format=memory_format)
        if reference_sgd:
            params = [p for p in self.model.parameters() if p.requires_grad]
            self.optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=5e-4)
        else:
            self.optimizer = get_optimizer(self.model)
        self.img = [(torch.from_numpy(raw) / 255).to(device)] * batch
        boxes = torch.from_numpy(BBOX[:, [1, 0, 3, 2]])  # (y_min, x_min, ...) -> (x_min, y_min, ...)
        self.targets = [{"boxes": boxes.to(device),
                         "labels": torch.from_numpy(LABEL + 1).long().to(device)}] * batch
        # mixed precision as torchvision's detection reference does it: autocast, and a GradScaler on CUDA
        self.device, self.amp, self.scaler = device, amp, grad_scaler(device, amp)

    def __call__(self):
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.amp):
            losses = self.model(self.img, self.targets)
        total = sum(losses.values())
        self.scaler.scale(total).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return total


def training_flops(step: OursStep) -> tuple[int, int, list[LayerCall]]:
    """``(forward, backward)`` FLOPs (multiply-add = 2) of the convolutions and linear layers of one step of
    ours, and the layer calls (for the floor); each backward product (weight gradient, input gradient) that
    autograd computes costs the forward's. Recorded with ``cpu_linear.backend('native')``: fc6/fc7 on oneDNN
    bypass their modules' hooks."""
    with cpu_linear.backend("native"):
        calls = record_layer_calls(step.trainer.faster_rcnn, step)
    return sum(c.flops for c in calls), sum(c.backward_flops for c in calls), calls


def vgg16_steps(args, device: torch.device) -> None:
    height, width = (600, 1000) if device.type == "cuda" else (600, 800)
    raw = photo(height, width)
    precision = f"autocast {autocast_dtype(device)}".replace("torch.", "") if args.amp else "float32"
    print(f"VGG16 training step: device {device}, torch {torch.__version__}, torchvision "
          f"{torchvision.__version__}, threads {torch.get_num_threads()}, {precision}, batch "
          f"{args.batch_size} x image {height}x{width} (chelsea), {len(BBOX)} boxes, random init; CPU "
          f"{cpu_text()}")
    probe_model = build_ours(seed=0).train().to(device)
    headline = format_name(choose_memory_format(probe_model, "training", (height, width),
                                                setting=args.memory_format, amp=args.amp))
    del probe_model
    steps = {}
    batch, amp = args.batch_size, args.amp
    for fmt, memory_format in FORMATS.items():
        steps["ours", fmt] = OursStep(raw, device, memory_format, batch, amp)
        steps["torchvision", fmt] = TorchvisionStep(raw, device, memory_format, batch=batch, amp=amp)
    steps["tv, ref. SGD", headline] = TorchvisionStep(raw, device, FORMATS[headline], reference_sgd=True,
                                                      batch=batch, amp=amp)
    blas_fc = device.type == "cpu" and not amp  # beside the headline: fc6/fc7 on one kernel for both
    if blas_fc:
        native_args = (raw, device, FORMATS[headline], batch, amp)
        steps["ours, stock convs", headline] = OursNativeStep(cpu_conv, *native_args)
        steps["ours, fc on BLAS", headline] = OursNativeStep(cpu_linear, *native_args)
    for step in steps.values():  # warm-up (oneDNN / cuDNN primitive selection)
        step()
    # the FLOP floor is a float32 one: under --amp it is not measured
    forward, backward, calls = training_flops(steps["ours", headline]) if not amp else (0, 0, [])
    meter = FloorMeter(calls, device) if not amp else None
    times = {key: [] for key in steps}
    for rep in range(args.reps):
        for key, step in steps.items():
            times[key].append(timed(step, device))
        if meter is not None and rep in floor_passes(args.reps):
            meter.measure()
    median = {key: statistics.median(t) for key, t in times.items()}
    for (who, fmt), t in median.items():
        print(f"{who + ', ' + fmt:27s} {t:.3f} s/step median of {args.reps} (min {min(times[who, fmt]):.3f} "
              f"max {max(times[who, fmt]):.3f}), {batch / t:.2f} img/s")
    for fmt in FORMATS:
        mark = "  <- headline" if fmt == headline else ""
        print(f"ratio ours / torchvision, both {fmt + ':':14s} "
              f"{median['ours', fmt] / median['torchvision', fmt]:.3f} (of the minimums: "
              f"{min(times['ours', fmt]) / min(times['torchvision', fmt]):.3f}){mark}")
    why = ("the format utils.memory_format.choose_memory_format picks for training on this machine"
           if args.memory_format == "auto" else "forced by --memory-format")
    print(f"HEADLINE ours / torchvision, both {headline} ({why}): "
          f"{median['ours', headline] / median['torchvision', headline]:.3f} (target <= 0.85; the same "
          "optimizer, our fused SGD, for both)")
    print(f"ratio ours / torchvision with its reference recipe's SGD ({headline}): "
          f"{median['ours', headline] / median['tv, ref. SGD', headline]:.3f} (for information)")
    if blas_fc:
        taken, total = winograd_calls(calls)
        print(f"beside the headline, ours with every convolution on the stock kernels as torchvision's "
              f"({headline}; ours runs {taken} of its {total} 3x3 convolution calls by Winograd here, "
              f"model/utils/cpu_conv.py): "
              f"{median['ours, stock convs', headline] / median['torchvision', headline]:.3f}")
        onednn = cpu_linear.use_onednn(torch.zeros(1, 1), torch.zeros(1, 1))
        print(f"beside the headline, ours with fc6/fc7 on the default BLAS as torchvision's ({headline}; "
              f"ours runs them on {'oneDNN' if onednn else 'the default BLAS'} here): "
              f"{median['ours, fc on BLAS', headline] / median['torchvision', headline]:.3f}")
    if meter is not None:
        print(f"FLOPs of a step (convolutions and linear layers): forward {forward / 1e9:.0f} G, backward "
              f"{backward / 1e9:.0f} G")
        print(meter.summary(forward + backward))
        floor = (forward + backward) / meter.peak().rate
        for who in ("ours", "torchvision"):
            target = 1.15 if who == "ours" else None
            print(floor_ratio_text(f"{who} ({headline})", median[who, headline], floor, target))
        print(meter.alone_ratio_text("ours", median["ours", headline], headline))
    peak = {}
    if device.type == "cuda":
        for (who, fmt), step in steps.items():
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            step()
            torch.cuda.synchronize(device)
            peak[who, fmt] = mib = torch.cuda.max_memory_allocated(device) / 2**20
            print(f"{who + ', ' + fmt:27s} peak CUDA memory {mib:.0f} MiB (torch.cuda.max_memory_allocated, "
                  "one training step)")
    if args.json:
        write_json(args.json, "train", args, device, headline, median, peak)
    if args.profile:
        from torch.profiler import profile

        with profile() as prof:
            steps["ours", headline]()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def toy_time_to_map(args) -> None:
    """Run the toy job as ``train.py train --data=toy`` does; read its history for the time to mAP 0.9."""
    from train import train

    with tempfile.TemporaryDirectory() as save_dir:
        start = time.time()
        best = train(data="toy", save_dir=save_dir, run_name="bench", device=args.device, amp=args.amp)
        total = time.time() - start
        history = [json.loads(line) for line in (Path(save_dir) / "bench" / "history.jsonl").open()]
    maps = [h for h in history if h["name"] == "test_map"]
    reached = next((h for h in maps if h["value"] >= 0.9), None)
    print(f"toy job ({len(maps)} epochs, threads {torch.get_num_threads()}): best test mAP {best:.4f}, "
          f"final {maps[-1]['value']:.4f}, total {total:.0f} s (data generation excluded if cached)")
    for h in maps:
        print(f"  iteration {h['step']:6d}  {h['time'] - start:7.1f} s  mAP {h['value']:.4f}")
    if reached is None:
        print("mAP 0.9 not reached")
    else:
        print(f"mAP >= 0.9 first at iteration {reached['step']}, {reached['time'] - start:.0f} s after the "
              f"start (evaluations included; target: within 600 s on 2 cores)")


def toy_pace(args, device: torch.device, steps: int = 40, warmup: int = 5) -> None:
    """Training images per second of the toy preset's model at batch 1, 2 and 4 (the preset's lr scaled),
    on the toy set's own first images, in the memory format the preset's run would pick."""
    from data.dataset import Dataset, collate_train, resized_size
    from train import build_model
    from utils.config import Config

    print(f"toy model, training pace: device {device}, threads {torch.get_num_threads()}, "
          f"{'autocast' if args.amp else 'float32'}; CPU {cpu_text()}")
    for batch in (1, 2, 4):
        cfg = Config.parse({"data": "toy", "batch_size": batch, "amp": args.amp})
        torch.manual_seed(0)
        dataset = Dataset(cfg)
        model = build_model(cfg, len(dataset.label_names)).to(device)
        size = resized_size(dataset.image_size(0), cfg.min_size, cfg.max_size)
        model.to(memory_format=choose_memory_format(model, "training", size, cfg.memory_format, amp=cfg.amp))
        trainer = FasterRCNNTrainer.from_config(model, cfg, class_names=dataset.label_names,
                                                lr=cfg.lr * batch)
        batches = [collate_train([dataset[i * batch + j] for j in range(batch)], multiple=model.feat_stride)
                   for i in range(warmup + steps)]
        for imgs, *rest in batches[:warmup]:
            trainer.train_step(imgs.to(device), *rest)
        start = time.perf_counter()
        for imgs, *rest in batches[warmup:]:
            trainer.train_step(imgs.to(device), *rest)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        print(f"batch {batch}: {steps * batch / seconds:.1f} img/s ({seconds / steps * 1000:.0f} ms per "
              f"step, {steps} steps)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--reps", type=int, default=3, help="timed steps per model (default 3)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--memory-format", default="auto", choices=("auto", *FORMATS),
                        help="the headline's format, for both models (default auto: "
                             "utils.memory_format.choose_memory_format's choice for training)")
    parser.add_argument("--batch-size", type=int, default=1, help="images per step, for both (default 1)")
    parser.add_argument("--amp", action="store_true",
                        help="both under torch.autocast (bfloat16 on the CPU; float16 and a GradScaler on "
                             "CUDA); the toy job with --amp")
    parser.add_argument("--json", help="also write the headline's figures to this JSON file (bench/gpu.sh)")
    parser.add_argument("--skip-toy", action="store_true", help="only the VGG16 step comparison")
    parser.add_argument("--toy-only", action="store_true", help="only the toy time to mAP")
    parser.add_argument("--toy-pace", action="store_true",
                        help="only the toy model's training img/s at batch 1, 2 and 4")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of our step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_onednn_primitives()  # as train.py and demo.py do, for both models alike
    release_mkl_buffers()
    device = torch.device(args.device)
    if args.toy_pace:
        toy_pace(args, device)
        return
    if not args.toy_only:
        vgg16_steps(args, device)
    if not args.skip_toy:
        toy_time_to_map(args)


if __name__ == "__main__":
    main()
