"""Linear layers on the CPU through oneDNN where it beats the default BLAS (VGG16's fc6/fc7 on AMD CPUs).

On the CPU ``nn.Linear`` runs the BLAS PyTorch was built with (MKL's sgemm in the x86 wheels). On an AMD EPYC
Zen 5 (``cpu family`` 26, AVX-512, 2 threads) MKL reaches 130-165 GFLOP/s on VGG16's head while oneDNN, the
library behind PyTorch's CPU convolutions, runs the same products at 280-380 GFLOP/s (its ``brg_matmul``
AVX-512 kernel) reading the weight where it is (no copy of it, no prepacking):

    ====================================  ===========  ===========
    fc6 (25088 -> 4096), 2 threads         MKL          oneDNN
    ====================================  ===========  ===========
    forward, 300 RoIs (test)               376 ms       172 ms
    forward, 128 RoIs (training)           189 ms        69 ms
    input gradient, 128 RoIs               183 ms        89 ms
    weight gradient, 128 RoIs              286 ms       190 ms
    ====================================  ===========  ===========

(fc7, 4096 -> 4096: 76 -> 27 ms forward at 300 RoIs. The weight gradient's times include about 100 ms of page
faults for its fresh 411 MB result, which both pay.) An AMD EPYC Zen 4 (``cpu family`` 25, AVX-512) measures
the same 2x (fc6 at 128 RoIs: forward 307 ms MKL against 148 ms oneDNN, input gradient 296 against 148 ms).
MKL's sgemm is Intel's own and fast on Intel CPUs, so the default rule is by vendor: every run on a machine
takes the same kernels (a timing probe could choose differently from one run to the next and change the
rounding, hence the results, of a seeded run).

The oneDNN call is ``torch.ops.mkldnn._linear_pointwise`` (oneDNN's inner product on dense tensors, the op
PyTorch's own compiler uses for CPU linear layers); it computes in full fp32 (results within float32 rounding
of ``nn.Linear``'s, not bit-equal: under ``backend('native')`` a run is bit for bit what ``nn.Linear`` gives).
In training :class:`OneDNNLinearFunction` gives its backward through the same op: ``grad_x = grad @ W`` and
``grad_W = grad^T x`` (the transposed views of ``W`` and ``x`` as the op's weight: oneDNN reads them in
place), ``grad_b = grad.sum(0)``.

Where it applies (:func:`use_onednn`): a float32 input and weight on the CPU, outside ``torch.autocast``,
with at least one row, PyTorch built with oneDNN, and the backend (:func:`set_backend`) ``'onednn'``, or
``'auto'`` (the default) on an AMD CPU (:func:`cpu_is_amd`). Everything else (CUDA, other dtypes, autocast,
other CPUs under ``'auto'``) runs the layer unchanged. Parameters and state-dict keys are untouched: only the
kernel changes. The backend is a process-wide switch, as the ``torch.backends`` flags are; the benchmarks and
tests set it for a ``with`` block (:func:`backend`).

Usage (``VGG16RoIHead``)::

    fc7 = cpu_linear.sequential(self.classifier, pool)  # fc6, ReLU, fc7, ReLU; the Linears via oneDNN
"""

import functools
from pathlib import Path

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from model.utils.kernel_switch import KernelSwitch

__all__ = ["BACKENDS", "OneDNNLinearFunction", "backend", "cpu_is_amd", "get_backend", "linear",
           "needs_grad", "onednn_linear", "sequential", "set_backend", "use_onednn"]

# 'auto' (default): oneDNN on AMD CPUs; 'onednn': oneDNN wherever it applies; 'native': never (every layer
# runs as nn.Linear does)
BACKENDS = ("auto", "onednn", "native")


def _linear_pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` by oneDNN's inner product: ``x`` ``(R, in)``, ``weight`` ``(out, in)`` (any
    strides), ``bias`` ``(out,)`` or ``None``; returns ``(R, out)``."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_switch = KernelSwitch("cpu_linear", BACKENDS)
set_backend = _switch.set  # the choice for the whole process; returns the previous one
get_backend = _switch.get
backend = _switch.use  # set_backend for a ``with`` block


def use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``linear(x, weight, ...)`` runs on oneDNN (see the module docstring for the rule)."""
    if _switch.get() == "native" or not _onednn_available():
        return False
    if x.device.type != "cpu" or weight.device.type != "cpu":
        return False
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or weight.dim() != 2:
        return False
    if x.dim() < 1 or x.numel() == 0 or torch.is_autocast_enabled("cpu"):
        return False
    return _switch.get() == "onednn" or cpu_is_amd()


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will ask a layer called on ``tensors`` (its input and parameters; ``None`` for a
    missing bias) for a gradient of any of them (``model/utils/cpu_conv.py`` asks it too)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


@functools.cache
def cpu_is_amd(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the first ``vendor_id`` in ``cpuinfo`` is ``AuthenticAMD`` (``False`` if it cannot be read)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "vendor_id":
            return value.strip() == "AuthenticAMD"
    return False


class OneDNNLinearFunction(torch.autograd.Function):
    """``F.linear`` with the forward and both gradient products on oneDNN (CPU, float32).

    ``x``: ``(R, in)``; ``weight``: ``(out, in)``; ``bias``: ``(out,)`` or ``None``. Returns ``(R, out)``.
    Gradients: ``grad_x = grad @ weight`` ``(R, in)``, ``grad_weight = grad^T @ x`` ``(out, in)``,
    ``grad_bias = grad.sum(0)``, each only when asked for. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _linear_pointwise(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad
        grad_x = grad_weight = grad_bias = None
        if need_x:
            grad_x = _linear_pointwise(grad, weight.t(), None)  # (R, out) x (out, in) -> (R, in)
        if need_weight:
            grad_weight = _linear_pointwise(grad.t(), x.t(), None)  # (out, R) x (R, in) -> (out, in)
        if ctx.has_bias and need_bias:
            grad_bias = grad.sum(0)
        return grad_x, grad_weight, grad_bias


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` on oneDNN, whatever :func:`use_onednn` says (CPU float32 tensors only).

    ``x``: ``(*, in)`` with at least one row; ``weight``: ``(out, in)``; ``bias``: ``(out,)`` or ``None``.
    Returns ``(*, out)``; differentiable (:class:`OneDNNLinearFunction`) when a gradient is needed.
    """
    rows = x.reshape(-1, x.shape[-1])  # (*, in) -> (R, in)
    if needs_grad(x, weight, bias):
        out = OneDNNLinearFunction.apply(rows, weight, bias)
    else:
        out = _linear_pointwise(rows, weight, bias)
    return out.view(*x.shape[:-1], weight.shape[0])  # (R, out) -> (*, out)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: on oneDNN where :func:`use_onednn` says so, else ``F.linear`` itself.

    ``x``: ``(*, in)`` float; ``weight``: ``(out, in)``; ``bias``: ``(out,)`` or ``None``; returns
    ``(*, out)`` on ``x``'s device.
    """
    if use_onednn(x, weight):
        return onednn_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def sequential(layers: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``layers(x)``, each ``nn.Linear`` through :func:`onednn_linear` where :func:`use_onednn` says so.

    Every other layer (and a linear layer off that path) is called as a module, hooks included; a linear
    layer on the oneDNN path is not, so its forward hooks do not run (``backend('native')`` to record them).
    """
    for layer in layers:
        if isinstance(layer, nn.Linear) and use_onednn(x, layer.weight):
            x = onednn_linear(x, layer.weight, layer.bias)
        else:
            x = layer(x)
    return x
