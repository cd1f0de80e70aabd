"""3x3 convolutions on the CPU by Winograd F(2x2, 3x3): VGG16's, ResNet's and the RPN's wide layers.

A 3x3 convolution (stride 1, padding 1) computes each 2x2 block of output pixels from a 4x4 block of input
pixels with 16 multiplications per input/output channel pair instead of 36 (Lavin and Gray, "Fast Algorithms
for Convolutional Neural Networks", CVPR 2016): the input tiles and the weights are transformed
(``model/utils/winograd.cpp``; ``U = G g G^T`` here), multiplied position by position as 16 GEMMs
``(tiles, C) @ (C, K)`` (one batched GEMM: ``torch.bmm``, or oneDNN's matmul on AMD CPUs,
:func:`use_onednn_gemm`), and transformed back. The GEMMs do 4/9 of the direct convolution's multiply-adds, so
where the GEMM runs near the rate of oneDNN's direct kernels the layer takes about half the time. On an Intel
Xeon (``cpu family`` 6, model 207, AVX-512, 2 threads), VGG16's layers at
600x800, channels-last, forward, best of 5 (the ratio: three such measurements):

    ====================================  ===========  ==========  ================
    layer                                  oneDNN       Winograd    ratio
    ====================================  ===========  ==========  ================
    conv1_2      64 -> 64,   600x800        190 ms       213 ms     1.12 - 1.43
    conv2_1      64 -> 128,  300x400         95 ms       113 ms     1.14 - 1.19
    conv2_2     128 -> 128,  300x400        170 ms       178 ms     0.90 - 1.05
    conv3_1     128 -> 256,  150x200         76 ms        59 ms     0.77 - 0.81
    conv3_2/3   256 -> 256,  150x200        146 ms        87 ms     0.60 - 0.68
    conv4_1     256 -> 512,   75x100         72 ms        48 ms     0.67 - 0.74
    conv4_2/3   512 -> 512,   75x100        148 ms        87 ms     0.59 - 0.61
    conv5_x     512 -> 512,   37x50          33 ms        24 ms     0.72 - 0.84
    ====================================  ===========  ==========  ================

Below 128 channels the GEMMs are too thin and the transforms' memory traffic wins; on small maps (the toy
model's RPN: 128 channels at 30x28, 1.0x; 512 at 19x25, 0.85-0.98x) the fixed costs eat the gain.

The tiles are processed in chunks of a few megabytes, so the transformed tiles stay in cache and no large
temporary is allocated (a fresh allocation of tens of megabytes pays a page fault per 4 KiB every call).

Numerics: the same function as ``F.conv2d`` to float rounding (the transforms add and subtract; the weight
transform halves): relative differences of a few 1e-7 in float32, 1e-16 in float64 (the tests compare both).
Every run on a machine takes the same path (the choice is a rule, not a timing; each tile is transformed by
one thread, whatever the thread count), so seeded runs stay reproducible on a machine.

Gradients (:class:`WinogradConv2dFunction`): the input gradient is itself a 3x3 convolution, of the upstream
gradient with the weights flipped and transposed (``(C, K, 3, 3)``), run by the same Winograd path; the
weight gradient runs the forward's algebra backwards (:func:`winograd_weight_grad`: the same 16 GEMMs,
transposed, between the input tiles' transform and the output transform's adjoint of the upstream
gradient); the bias gradient is the upstream gradient's sum.

Where it applies (:func:`use_winograd`): a float32 (or float64) input on the CPU, outside ``torch.autocast``,
a 3x3 kernel with stride 1, padding 1, dilation 1, one group and zero padding, the extension built
(``setup.sh``), and the backend (:func:`set_backend`) ``'winograd'``, or ``'auto'`` (the default) for a
layer of at least 128 input and output channels on maps of at least 1500 pixels per image (the table
above), on AMD CPUs only for a call that needs a gradient (training). The rule looks at one image's map, not
the batch, so an image takes the same path alone or in a batch. It was measured on two CPU kinds: the Intel
Xeon above, and an AMD EPYC Zen 4 (``cpu family`` 25, model 17, AVX-512, 2 threads), where the same layers
alone take 0.74-0.85x oneDNN's time forward from conv3_1 on and 0.66-0.78x forward + both gradients (conv3_2:
155 -> 121 ms forward, 526 -> 355 ms with the gradients). Inside VGG16's whole forward the Zen 4 loses that
gain (``bench/inference.py``: ours / ours on the stock kernels 1.02, 0.96 and 1.08 in three runs, and 1-2%
more peak memory), while its training step keeps it (``bench/train.py``: 0.77-0.81 of the stock
kernels' time in three runs; ours / torchvision 0.66-0.75 against 0.86-0.93), hence the AMD rule. There
the GEMMs run on oneDNN's matmul (:func:`use_onednn_gemm`). Everything else (CUDA, where cuDNN picks its own
algorithms, other dtypes, autocast, other layer shapes) runs ``F.conv2d`` unchanged. Parameters and
state-dict keys are untouched.

Usage: :class:`Conv2d` is an ``nn.Conv2d`` whose forward takes this path where it applies;
:func:`convert` turns a module's ``nn.Conv2d`` layers into it (same parameter tensors) and :func:`to_native`
back.
"""

import functools
from collections.abc import Iterator

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from model.utils.cpu_linear import cpu_is_amd, needs_grad
from model.utils.kernel_switch import KernelSwitch

__all__ = ["BACKENDS", "Conv2d", "WinogradConv2dFunction", "backend", "convert", "get_backend",
           "set_backend", "to_native", "use_onednn_gemm", "use_winograd", "winograd_conv2d",
           "winograd_available"]

# 'auto' (default): Winograd for layers of at least 128 input and output channels on maps of at least 1500
# pixels (on AMD CPUs: when a gradient is needed); 'winograd': wherever it applies; 'native': never
# (nn.Conv2d's kernels)
BACKENDS = ("auto", "winograd", "native")
MIN_CHANNELS = 128  # 'auto': fewer input or output channels stay on oneDNN (thin GEMMs, memory-bound)
MIN_PIXELS = 1500  # 'auto': smaller maps (H x W of one image) stay on oneDNN (fixed costs)
CHUNK_BYTES = 4 << 20  # transformed tiles per GEMM chunk (16 x T x channels values)

# Winograd F(2x2, 3x3)'s weight transform (see winograd.cpp for the input and output transforms).
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


@functools.cache
def _extension():
    """The compiled transforms (``model/utils/_winograd*.so``), or ``None`` when they were not built."""
    try:
        from model.utils import _winograd
    except ImportError:
        return None
    return _winograd


def winograd_available() -> bool:
    """Whether the transforms' extension is built (``setup.sh``, or ``python build.py build_ext --inplace``
    in ``model/utils``)."""
    return _extension() is not None


_switch = KernelSwitch("cpu_conv", BACKENDS)
set_backend = _switch.set  # the choice for the whole process; returns the previous one
get_backend = _switch.get
backend = _switch.use  # set_backend for a ``with`` block


def use_winograd(x: torch.Tensor, conv: nn.Conv2d, training: bool | None = None) -> bool:
    """Whether ``conv(x)`` runs on the Winograd path (see the module docstring for the rule); ``training``:
    whether the call needs a gradient (``None``: :func:`model.utils.cpu_linear.needs_grad`), which ``'auto'``
    asks on AMD CPUs."""
    if _switch.get() == "native" or not winograd_available():
        return False
    weight = conv.weight
    if x.device.type != "cpu" or weight.device.type != "cpu" or x.dim() != 4:
        return False
    if x.dtype not in (torch.float32, torch.float64) or weight.dtype != x.dtype:
        return False
    if torch.is_autocast_enabled("cpu") or x.numel() == 0:
        return False
    if (conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups, conv.padding_mode) != (
            (3, 3), (1, 1), (1, 1), (1, 1), 1, "zeros"):
        return False
    if _switch.get() == "winograd":
        return True
    if min(conv.in_channels, conv.out_channels) < MIN_CHANNELS or x.shape[2] * x.shape[3] < MIN_PIXELS:
        return False
    if not cpu_is_amd():
        return True
    return needs_grad(x, conv.weight, conv.bias) if training is None else training


def _gg(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``G kron G``, ``(16, 9)``: ``[4a+b, 3i+j] = G[a, i] G[b, j]``."""
    g = torch.tensor(_G, dtype=dtype, device=device)
    return torch.kron(g, g)


def _taps(weight: torch.Tensor) -> torch.Tensor:
    """``(K, C, 3, 3)`` -> ``(K, 9, C)``, tap ``3i+j``: a view of a ``channels_last`` weight (its storage
    order), a copy of another."""
    k, c = weight.shape[:2]
    return weight.permute(0, 2, 3, 1).reshape(k, 9, c)


def weight_transform(weight: torch.Tensor, flipped: bool = False) -> torch.Tensor:
    """``U = G g G^T`` of every filter ``g``: ``(K, C, 3, 3)`` -> ``(16, K, C)``, position ``4a+b`` first.

    One batched product, ``(16, 9) @ (K, 9, C)``, rows of ``C`` copied whole (no transposing copy of a
    ``channels_last`` weight). ``flipped``: the transform of the filters rotated by 180 degrees (the
    transposed convolution of the input gradient), tap ``3i+j`` read as ``8 - (3i+j)``.
    """
    gg = _gg(weight.dtype, weight.device)
    if flipped:
        gg = gg.flip(1)
    return (gg @ _taps(weight)).transpose(0, 1).contiguous()  # (K, 16, C) -> (16, K, C)


def _check_extension():
    ext = _extension()
    if ext is None:
        raise RuntimeError("the Winograd extension is not built: run ./setup.sh (or, in model/utils, "
                           "python build.py build_ext --inplace)")
    return ext


def use_onednn_gemm(a: torch.Tensor) -> bool:
    """Whether the Winograd GEMMs on ``a``'s dtype run on oneDNN's matmul rather than ``torch.bmm``: float32
    on an AMD CPU (:func:`model.utils.cpu_linear.cpu_is_amd`, the rule fc6/fc7 follow), when the torch build
    exports the matmul (``winograd.cpp``).

    PyTorch's ``torch.bmm`` is MKL's batched sgemm, which on an AMD EPYC Zen 4 (``cpu family`` 25, model 17,
    2 threads) runs VGG16's Winograd GEMMs at 0.75-0.95x oneDNN's rate (medians: 144-157 against 164-197
    GFLOP/s) and changes pace from run to run (86-187 GFLOP/s for one shape); on Intel CPUs MKL stays."""
    ext = _extension()
    return a.dtype == torch.float32 and cpu_is_amd() and ext is not None and ext.onednn_gemm_available()


def _gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool = False) -> None:
    """``out = a @ b`` (``out += a @ b`` when ``accumulate``) for ``(16, M, K) @ (16, K, N)``: ``out``
    contiguous, ``a`` and ``b`` contiguous or transposed in their last two dimensions."""
    if use_onednn_gemm(a):
        _extension().onednn_gemm(a, b, out, 1.0 if accumulate else 0.0)
    elif accumulate:
        out.baddbmm_(a, b)
    else:
        torch.bmm(a, b, out=out)


def _chunks(x: torch.Tensor, widths: tuple[int, int]) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """``(t0, a, b)`` for each chunk of the 2x2 output tiles of ``x`` ``(N, C, H, W)`` (``N ceil(H/2)
    ceil(W/2)`` of them): buffers ``a`` ``(16, size, widths[0])`` and ``b`` ``(16, size, widths[1])`` of
    ``x``'s dtype, about :data:`CHUNK_BYTES` each, the same two for every full chunk (the caller fills
    them)."""
    n, _, h, w = x.shape
    tiles = n * ((h + 1) // 2) * ((w + 1) // 2)
    chunk = max(1, min(tiles, CHUNK_BYTES // (16 * max(widths) * x.element_size())))
    full = tuple(x.new_empty((16, chunk, width)) for width in widths)
    for t0 in range(0, tiles, chunk):
        size = min(chunk, tiles - t0)
        a, b = full if size == chunk else (x.new_empty((16, size, width)) for width in widths)
        yield t0, a, b


def _winograd(x: torch.Tensor, u_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The convolution of ``x`` ``(N, C, H, W)`` with the transformed filters ``u_t`` ``(16, C, K)`` (the
    GEMMs' right operand, any strides BLAS reads), plus ``bias``; ``(N, K, H, W)`` as
    :func:`winograd_conv2d` returns it."""
    ext = _check_extension()
    n, c, h, w = x.shape
    k = u_t.shape[2]
    channels_last = x.is_contiguous(memory_format=torch.channels_last)
    x_nhwc = x.permute(0, 2, 3, 1).contiguous()  # (N, H, W, C): a view when x is channels_last
    bias = bias.contiguous() if bias is not None else x.new_empty(0)
    # a fresh channels_last tensor, not a permuted view: an in-place ReLU may follow the autograd Function
    y = torch.empty((n, k, h, w), dtype=x.dtype, memory_format=torch.channels_last)
    y_nhwc = y.permute(0, 2, 3, 1)  # (N, H, W, K), contiguous: the same storage in its own order
    for t0, v, m in _chunks(x, (c, k)):
        ext.input_transform(x_nhwc, t0, v)  # (16, size, C)
        _gemm(v, u_t, m)  # (16, size, C) @ (16, C, K) -> (16, size, K)
        ext.output_transform(m, bias, t0, y_nhwc)
    return y if channels_last else y.contiguous()


def winograd_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` by Winograd F(2x2, 3x3), without autograd.

    Args:
        x: ``(N, C, H, W)`` float32/float64 on the CPU, any memory format (``channels_last`` is read in place;
            another layout is copied to it first).
        weight: ``(K, C, 3, 3)`` of ``x``'s dtype.
        bias: ``(K,)`` or ``None``.

    Returns:
        ``(N, K, H, W)``: ``channels_last`` when ``x`` is, else contiguous.
    """
    c = x.shape[1]
    k = weight.shape[0]
    if weight.shape != (k, c, 3, 3):
        raise ValueError(f"weight must be (K, {c}, 3, 3) for {c} input channels, got {tuple(weight.shape)}")
    return _winograd(x, weight_transform(weight).transpose(1, 2), bias)  # (16, C, K): a transposed view


def winograd_input_grad(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The gradient w.r.t. ``x`` of ``F.conv2d(x, weight, padding=1)`` given ``grad`` ``(N, K, H, W)``: the
    convolution of ``grad`` with the filters rotated by 180 degrees, input and output channels swapped;
    ``(N, C, H, W)``."""
    return _winograd(grad, weight_transform(weight, flipped=True), None)  # (16, K, C): K in, C out


def winograd_weight_grad(x: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The gradient w.r.t. ``weight`` of ``F.conv2d(x, weight, padding=1)`` given ``grad``, by Winograd.

    Args:
        x: ``(N, C, H, W)`` float32/float64 on the CPU, any memory format.
        grad: ``(N, K, H, W)``, the gradient w.r.t. the convolution's output.
        weight: ``(K, C, 3, 3)``; only its shape, dtype and memory format are used.

    Returns:
        ``(K, C, 3, 3)`` in ``weight``'s memory format: ``G^T dU G`` of ``dU[xi] = dM[xi]^T @ V[xi]`` summed
        over the tiles, ``V`` the input tiles' transform and ``dM`` the output transform's adjoint of
        ``grad``.
    """
    ext = _check_extension()
    c, k = x.shape[1], grad.shape[1]
    x_nhwc = x.permute(0, 2, 3, 1).contiguous()  # (N, H, W, C)
    g_nhwc = grad.permute(0, 2, 3, 1).contiguous()  # (N, H, W, K)
    du = x.new_zeros((16, k, c))
    for t0, v, dm in _chunks(x, (c, k)):
        ext.input_transform(x_nhwc, t0, v)  # (16, size, C)
        ext.output_adjoint(g_nhwc, t0, dm)  # (16, size, K)
        _gemm(dm.transpose(1, 2), v, du, accumulate=True)  # += (16, K, size) @ (16, size, C)
    taps = _gg(x.dtype, x.device).t() @ du.transpose(0, 1)  # (9, 16) @ (K, 16, C) -> (K, 9, C): G^T dU G
    grad_weight = torch.empty_like(weight)  # weight's memory format
    if grad_weight.is_contiguous(memory_format=torch.channels_last):
        _taps(grad_weight).copy_(taps)  # a view of its storage: rows of C copied whole
    else:
        grad_weight.copy_(taps.view(k, 3, 3, c).permute(0, 3, 1, 2))
    return grad_weight


class WinogradConv2dFunction(torch.autograd.Function):
    """:func:`winograd_conv2d` with gradients (see the module docstring). Not twice differentiable."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return winograd_conv2d(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad
        grad_x = grad_weight = grad_bias = None
        if need_x:  # the transposed convolution: the flipped filters, input and output channels swapped
            grad_x = winograd_input_grad(grad, weight)
        if need_weight:
            grad_weight = winograd_weight_grad(x, grad, weight)
        if need_bias and ctx.has_bias:
            grad_bias = grad.sum((0, 2, 3))
        return grad_x, grad_weight, grad_bias


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` that runs on the Winograd path where :func:`use_winograd` says so, else as itself.

    The transformed weight is computed at every call (VGG16: about 30 ms an image for all its layers) rather
    than kept: keeping it would hold 16/9 of the layers' weights (100 MB for VGG16) for the whole run."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        training = needs_grad(x, self.weight, self.bias)
        if not use_winograd(x, self, training):
            return super().forward(x)
        if training:
            return WinogradConv2dFunction.apply(x, self.weight, self.bias)
        return winograd_conv2d(x, self.weight, self.bias)


def _swap_class(module: nn.Module, to: type[nn.Conv2d], source: type[nn.Conv2d]) -> nn.Module:
    """``module`` with every submodule of exactly ``source``'s class retyped to ``to`` in place (the same
    object, parameters, buffers and hooks: the two classes differ only in ``forward``)."""
    for m in module.modules():
        if type(m) is source:
            m.__class__ = to
    return module


def convert(module: nn.Module) -> nn.Module:
    """``module`` (changed in place and returned) with its ``nn.Conv2d`` layers made :class:`Conv2d`.

    The layers stay the same objects with the same parameters; :func:`use_winograd` decides at each call
    whether a layer takes the Winograd path (other kernel sizes or strides never do)."""
    return _swap_class(module, Conv2d, nn.Conv2d)


def to_native(module: nn.Module) -> nn.Module:
    """The inverse of :func:`convert`: every :class:`Conv2d` of ``module`` made ``nn.Conv2d`` again, in
    place (``bench/`` gives torchvision's model the stock layers)."""
    return _swap_class(module, nn.Conv2d, Conv2d)
