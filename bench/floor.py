"""The FLOP floor of a benchmark: the model's FLOPs at the best fp32 rate this machine is seen to reach.

Used by ``bench/inference.py`` and ``bench/train.py``. A floor is only a floor if no run can beat it, so the
peak rate is not the rate of one BLAS call (on AMD machines a ``torch.mm`` of 4096^3 runs far below
oneDNN's convolutions: 157-194 GFLOP/s on 2 threads of an EPYC Zen 5 whose VGG16 conv3 layers run at 400+)
but the best rate measured among

* dense fp32 matmuls of several sizes (1024^3, 2048^3, 4096^3);
* every convolution layer of the model, timed alone at the input size the model run gave it, in both memory
  formats (contiguous, channels_last), forward and, for training, backward with exactly the gradients the
  model asks of it (input, weight and bias gradients as autograd computes them in the model run: VGG16's
  conv1/conv2 are frozen and need none, conv3_1 needs no input gradient);
* every linear layer, forward and (training) backward, at its real input size.

The layers are timed on PyTorch's stock kernels (``nn.Conv2d._conv_forward``: oneDNN's direct
convolutions; ``F.linear``), whatever the model runs: the floor is what the stock kernels allow. Our wide
3x3 convolutions take Winograd F(2x2, 3x3) on the CPU (``model/utils/cpu_conv.py``), 4/9 of the
multiply-adds, so ours may run below its layers timed alone.

The floor is the model's FLOPs (multiply-add = 2; convolutions and linear layers; a backward product, input
or weight gradient, costs the forward's) divided by that peak. A benchmark time below the floor means the
peak was measured too low (a loaded machine while the layers were timed): :func:`floor_ratio_text` prints it
as a ``BROKEN FLOOR``, never as a result.

Not every layer can run at the peak (VGG16's conv1_1 has 3 input channels, fc6 is a 25088-deep product of
128 or 300 rows), so the floor is below what even a perfect implementation reaches. The tighter, reachable
reference is :meth:`FloorMeter.layers_alone`: the sum of the model's own layer calls, each timed alone in
the model's memory format; a model run above it pays for everything else (RoI pooling, NMS, the creators,
the optimizer, memory traffic between the layers).

Cost: identical layer calls (VGG16's conv3_2/conv3_3, conv5_x and the RPN's 3x3 convolution...) are timed
once; one :meth:`FloorMeter.measure` pass times every candidate once (the first pass runs each once more
to warm up oneDNN's primitive cache), about the model's own FLOPs per format; the benchmarks run two or
three passes among their repetitions and keep each candidate's best.
"""

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from utils.memory_format import cpu_signature

FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
MATMUL_SIZES = (1024, 2048, 4096)


def cpu_text() -> str:
    """The CPU in one line: model name, vendor, family/model, the flags that pick oneDNN's kernels, torch's
    CPU capability (:func:`utils.memory_format.cpu_signature`)."""
    sig = cpu_signature()
    return (f"{sig['model_name']} ({sig['vendor']}, cpu family {sig['cpu_family']}, model {sig['model']}; "
            f"{' '.join(sig['flags']) or 'no flags read'}; torch {sig['cpu_capability']} kernels)")


def layer_flops(module: nn.Conv2d | nn.Linear, out: torch.Tensor) -> int:
    """FLOPs (multiply-add = 2) of one forward of a convolution or linear layer that produced ``out``."""
    if isinstance(module, nn.Conv2d):
        fan_in = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
    else:
        fan_in = module.in_features
    return 2 * fan_in * out.numel()


@dataclass(frozen=True)
class LayerCall:
    """One call of a convolution or linear layer during a model run, as the floor needs it.

    ``path``: the module's path in the model (``extractor.10``); ``name``: how to print it
    (:func:`layer_names`).
    ``input_grad``/``weight_grad``/``bias_grad``: whether autograd computes that gradient for this call
    (all False in an inference run). ``flops``: the forward's (:func:`layer_flops`).
    """

    path: str
    name: str
    module: nn.Conv2d | nn.Linear
    input_shape: tuple[int, ...]
    input_grad: bool
    weight_grad: bool
    bias_grad: bool
    flops: int

    @property
    def backward_flops(self) -> int:
        """Input and weight gradients cost a forward each (the bias gradient is a sum, not counted)."""
        return self.flops * (int(self.input_grad) + int(self.weight_grad))

    def key(self) -> tuple:
        """Calls with equal keys run the same kernels: they are timed once."""
        m = self.module
        config = (m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                  m.padding_mode) if isinstance(m, nn.Conv2d) else (m.in_features, m.out_features)
        return (type(m).__name__, config, m.bias is not None, self.input_shape, self.input_grad,
                self.weight_grad, self.bias_grad)

    def describe(self) -> str:
        m = self.module
        if isinstance(m, nn.Conv2d):
            kind = f"conv {m.in_channels}->{m.out_channels} {m.kernel_size[0]}x{m.kernel_size[1]}"
        else:
            kind = f"linear {m.in_features}->{m.out_features}"
        return f"{self.name}: {kind}, input {'x'.join(map(str, self.input_shape))}"


def layer_names(model: nn.Module) -> dict[nn.Module, str]:
    """Module path of every convolution and linear layer, with VGG's ``convB_I`` name added inside a
    ``Sequential`` that has max-pools (``extractor.10`` -> ``conv3_1 (extractor.10)``)."""
    names = {m: path for path, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential) or not any(isinstance(m, nn.MaxPool2d) for m in seq):
            continue
        block, index = 1, 0
        for child in seq:
            if isinstance(child, nn.MaxPool2d):
                block, index = block + 1, 0
            elif isinstance(child, nn.Conv2d):
                index += 1
                names[child] = f"conv{block}_{index} ({names[child]})"
    return names


def record_layer_calls(model: nn.Module, run: Callable[[], object]) -> list[LayerCall]:
    """Run ``run()`` once with forward hooks on every ``nn.Conv2d``/``nn.Linear`` of ``model``; return their
    calls in order, with the gradients autograd computes for each (none under ``torch.no_grad``)."""
    names = layer_names(model)
    paths = {m: path for path, m in model.named_modules()}
    calls = []

    def record(module, args, out):
        x, grad = args[0], torch.is_grad_enabled()  # under no_grad (predict) autograd computes nothing
        bias = module.bias is not None and module.bias.requires_grad
        calls.append(LayerCall(paths[module], names[module], module, tuple(x.shape), grad and x.requires_grad,
                               grad and module.weight.requires_grad, grad and bias, layer_flops(module, out)))

    handles = [m.register_forward_hook(record) for m in names]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return calls


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """Seconds of one call (synchronised on CUDA) and its result."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


@dataclass
class Candidate:
    """One timed computation: its label, FLOPs and best time so far.

    ``calls``: how many layer calls of the model run it stands for (0 for a matmul); ``fmt``: the memory
    format it ran in (``None``: a linear layer or a matmul, the same in both).
    """

    label: str
    flops: int
    fmt: str | None = None
    calls: int = 0
    best: float = math.inf

    @property
    def rate(self) -> float:
        """FLOP/s of the best time (0 before any)."""
        return self.flops / self.best if self.best < math.inf else 0.0

    def update(self, seconds: float) -> None:
        self.best = min(self.best, seconds)


class _LayerBench:
    """One layer call in one memory format: fresh random inputs of the call's shape, a copy of the layer's
    weights in that format, requiring the gradients the call needs; the forward timed, then the backward
    (``torch.autograd.grad`` of a ones upstream gradient w.r.t. those tensors, as the model's autograd)."""

    def __init__(self, call: LayerCall, fmt: str | None, device: torch.device, count: int):
        self.call, self.fmt, self.device = call, fmt, device
        where = "" if fmt is None else f", {fmt}"
        self.forward = Candidate(f"{call.describe()}{where}, forward", call.flops, fmt, count)
        needs = [name for name, need in (("input", call.input_grad), ("weight", call.weight_grad),
                                         ("bias", call.bias_grad)) if need]
        self.backward = None if not needs else Candidate(
            f"{call.describe()}{where}, backward ({' + '.join(needs)} grad)", call.backward_flops, fmt, count)
        self.warm = False

    def candidates(self) -> list[Candidate]:
        return [c for c in (self.forward, self.backward) if c is not None]

    def measure(self) -> None:
        call, m = self.call, self.call.module
        conv = isinstance(m, nn.Conv2d)
        memory_format = FORMATS[self.fmt] if conv else torch.contiguous_format
        x = torch.rand(call.input_shape, device=self.device).contiguous(memory_format=memory_format)
        weight = m.weight.detach().clone(memory_format=memory_format)
        bias = None if m.bias is None else m.bias.detach().clone()
        needed = [t.requires_grad_() for t, need in ((x, call.input_grad), (weight, call.weight_grad),
                                                     (bias, call.bias_grad)) if need]

        def forward() -> torch.Tensor:
            with torch.set_grad_enabled(bool(needed)):  # training: record the graph, as the model run does
                return m._conv_forward(x, weight, bias) if conv else F.linear(x, weight, bias)

        for _ in range(1 if self.warm else 2):  # the first pass runs once untimed: oneDNN primitive creation
            seconds, out = timed(forward, self.device)
            if self.warm:
                self.forward.update(seconds)
            if self.backward is not None:
                grad_out = torch.ones_like(out)
                seconds, _ = timed(lambda o=out, g=grad_out: torch.autograd.grad(o, needed, g), self.device)
                if self.warm:
                    self.backward.update(seconds)
            self.warm = True


class _MatmulBench:
    """A square fp32 matmul ``(n, n) @ (n, n)``, ``2 n^3`` FLOPs."""

    def __init__(self, n: int, device: torch.device):
        self.n, self.device = n, device
        self.candidate = Candidate(f"matmul {n}x{n} @ {n}x{n}", 2 * n**3)
        self.warm = False

    def candidates(self) -> list[Candidate]:
        return [self.candidate]

    def measure(self) -> None:
        a = torch.rand(self.n, self.n, device=self.device)
        b = torch.rand(self.n, self.n, device=self.device)
        for _ in range(1 if self.warm else 2):
            seconds, _ = timed(lambda: a @ b, self.device)
            if self.warm:
                self.candidate.update(seconds)
            self.warm = True


@dataclass
class Peak:
    """The best rate measured (FLOP/s) and the candidate that reached it."""

    rate: float
    label: str


class FloorMeter:
    """The peak fp32 rate of this machine for a model run, from the run's own layers and dense matmuls.

    Args:
        calls: the run's layer calls (:func:`record_layer_calls`); calls with equal :meth:`LayerCall.key`
            are timed once. Convolutions are timed in both memory formats, linear layers once.
        device: where to time them.
        matmul_sizes: sides of the square matmuls timed too.

    Call :meth:`measure` a few times (between a benchmark's repetitions, so that the layers see the same
    machine load as the model); each candidate keeps its best time.
    """

    def __init__(self, calls: list[LayerCall], device: torch.device,
                 matmul_sizes: tuple[int, ...] = MATMUL_SIZES):
        groups: dict[tuple, list] = {}
        for call in calls:
            groups.setdefault(call.key(), [call, 0])[1] += 1
        self.benches: list[_LayerBench | _MatmulBench] = []
        for call, count in groups.values():
            formats = FORMATS if isinstance(call.module, nn.Conv2d) else (None,)
            self.benches += [_LayerBench(call, fmt, device, count) for fmt in formats]
        self.benches += [_MatmulBench(n, device) for n in matmul_sizes]
        self.passes = 0

    def measure(self) -> None:
        """Time every candidate once (the first time: twice, the first call untimed)."""
        for bench in self.benches:
            bench.measure()
        self.passes += 1

    def candidates(self) -> list[Candidate]:
        return [c for bench in self.benches for c in bench.candidates()]

    def peak(self) -> Peak:
        """The best rate among all candidates."""
        best = max(self.candidates(), key=lambda c: c.rate)
        return Peak(best.rate, best.label)

    def layers_alone(self, fmt: str) -> float:
        """Seconds of all the run's layer calls (forward and backward) timed alone, convolutions in ``fmt``:
        what the run would take if nothing but its convolutions and linear layers cost time."""
        return sum(c.best * c.calls for c in self.candidates() if c.calls and c.fmt in (fmt, None))

    def summary(self, flops: int) -> str:
        """One line: the peak, which candidate set it, the floor of ``flops`` and the layers-alone sums."""
        peak = self.peak()
        alone = ", ".join(f"{fmt} {self.layers_alone(fmt):.3f} s" for fmt in FORMATS)
        passes = f"{self.passes} pass{'es' if self.passes > 1 else ''}"
        return (f"peak fp32 rate {peak.rate / 1e9:.0f} GFLOP/s (best of {len(self.candidates())} candidates, "
                f"{passes}), set by {peak.label}; FLOP floor {flops / peak.rate:.3f} s ({flops / 1e9:.0f} "
                f"GFLOP); the same layers timed alone: {alone}")

    def alone_ratio_text(self, name: str, seconds: float, fmt: str) -> str:
        """``seconds`` (a run of the model in ``fmt``) against :meth:`layers_alone` in ``fmt``."""
        ratio = seconds / self.layers_alone(fmt)
        return (f"{name} ({fmt}) / its layers timed alone ({fmt}): {ratio:.3f} (what is left above the "
                "convolutions and linear layers at their own speed: all the rest, and their slowdown inside "
                "the model)")


def floor_passes(reps: int) -> set[int]:
    """The repetitions (0-based) after which a benchmark calls :meth:`FloorMeter.measure`: two or three,
    spread over the run (one if ``reps`` is 1)."""
    n = min(max(reps, 2), 3)
    return {round(i * (reps - 1) / (n - 1)) for i in range(n)} if reps > 1 else {0}


def floor_ratio_text(name: str, seconds: float, floor: float, target: float | None = 1.15) -> str:
    """``'{name} / floor 1.08 (target <= 1.15)'``, or a ``BROKEN FLOOR`` line when ``seconds < floor``."""
    ratio = seconds / floor
    if ratio < 1:
        return (f"BROKEN FLOOR: {name} took {seconds:.3f} s, below the FLOP floor {floor:.3f} s "
                f"({name} / floor {ratio:.3f}): the peak rate was measured too low (machine load while the "
                "layers were timed?), so this is no result; re-run on a quiet machine")
    return f"{name} / floor {ratio:.3f}" + (f" (target <= {target})" if target is not None else "")
