"""RoI max pooling (Fast R-CNN / Caffe RoIPool): ``RoIPooling2D`` over a modern autograd Function.

Shapes:
    N: batch size; C: channels; H, W: feature-map height and width;
    R: number of rois; OH, OW: pooled height and width (``outh``, ``outw``).

Naming:
    ``rois``: ``(R, 5)`` ``(batch_index, x_min, y_min, x_max, y_max)`` in input-image pixels, the layout of
    ``torchvision.ops.roi_pool``. ``argmax``: ``(R, C, OH, OW)`` int32 flat index ``h * W + w`` of each
    maximum in its feature plane, -1 for an empty bin.

Semantics (original-spec §7, the same as ``torchvision.ops.roi_pool``), per roi, in the dtype of ``x``
(float32 for a float16 or bfloat16 ``x``, see below):
    1. corners to cells: ``start_w = round(x_min * spatial_scale)`` (half away from zero), likewise
       ``start_h``, ``end_w``, ``end_h``;
    2. ``roi_h = max(end_h - start_h + 1, 1)`` (a malformed roi becomes one cell), ``bin_h = roi_h / OH``;
    3. bin ``ph`` covers rows ``[floor(ph * bin_h), ceil((ph + 1) * bin_h))`` shifted by ``start_h``, clipped
       to ``[0, H]``; likewise for columns;
    4. an empty bin gives 0 and argmax -1; otherwise the maximum, the first in row-major order on ties;
    5. the gradient of a pooled cell goes to its argmax (summed over every roi and bin that chose it).

Devices: a CUDA tensor runs the CuPy kernels of ``model/utils/roi_cupy.py`` (float32 only) when CuPy sees a
GPU; everything else runs the torch implementation below, on a CPU copy for a tensor that is not on the CPU
(with a warning: install CuPy), and the result returns to the input's device. Feature values are assumed
finite (the kernels never pick a NaN or -inf as a maximum; the CPU path may).

Half precision: a float16 or bfloat16 ``x`` (e.g. under ``torch.autocast``) is pooled in float32 on every
path, rois included (their coordinates are converted to float32, never rounded to the half dtype, so the bins
are those of float32 features), and the output and the gradient w.r.t. ``x`` come back in ``x``'s dtype, as
``torchvision.ops.roi_pool`` returns half outputs. Max pooling only selects, so the values and the argmax
are those of ``x.float()`` exactly; the gradient is summed in float32 and rounded once to ``x``'s dtype.
"""

import contextlib
import warnings
from typing import NamedTuple

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from model.utils.cupy_utils import cupy_available
from model.utils.roi_cupy import roi_backward_cuda, roi_forward_cuda

try:  # optional Cython forward (model/utils/build.py); without it the torch twin below runs
    from model.utils._roi_pool_cpu import roi_pool_forward_nhwc as _forward_nhwc_cython
except ImportError:
    _forward_nhwc_cython = None

__all__ = [
    "RoI",
    "RoIPooling2D",
    "roi_table",
    "roi_pooling_2d",
    "roi_pool_forward",
    "roi_pool_backward",
    "roi_pool_forward_cpu",
    "roi_pool_forward_torch",
    "roi_pool_backward_cpu",
]

# Cells of -inf padded around the feature map on the CPU path: a roi may overhang the map by this much and
# still be pooled as one crop (proposals clipped to the image overhang by at most one cell, after rounding).
_MARGIN = 2
# Bound on the elements gathered at once for the rois pooled by explicit bins (float32: 64 MiB).
_GATHER_CHUNK = 2**24
# Feature dtypes pooled in float32 and returned in their own dtype.
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype RoI pooling computes in for features of ``dtype``: float32 for a half dtype, else itself."""
    return torch.float32 if dtype in _HALF_DTYPES else dtype


@contextlib.contextmanager
def _one_thread():
    """Run the CPU path on one intra-op thread (restored after), as torchvision's CPU kernel runs.

    Its per-roi calls are small (``adaptive_max_pool2d`` would split even one 7x7 output across threads):
    splitting them costs more than it saves, and far more when the cores are busy, as each parallel call then
    waits for a descheduled thread.
    """
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n_threads)


def roi_pooling_2d(x: torch.Tensor, rois: torch.Tensor, outh: int, outw: int,
                   spatial_scale: float) -> torch.Tensor:
    """Max-pool each roi of ``x`` into an ``(OH, OW)`` grid; differentiable w.r.t. ``x``.

    Args:
        x: ``(N, C, H, W)`` float16, bfloat16, float32 or float64 feature map (not float64 on CUDA with
            CuPy). A half dtype is pooled in float32 (see the module docstring).
        rois: ``(R, 5)`` floating tensor on ``x``'s device, ``(batch_index, x_min, y_min, x_max, y_max)`` in
            input-image pixels, batch indices integers in ``[0, N)``; converted to ``x``'s dtype, or to
            float32 for a half ``x``.
        outh, outw: pooled size ``OH``, ``OW`` (>= 1).
        spatial_scale: feature cells per input-image pixel (> 0), e.g. 1/16.

    Returns:
        ``(R, C, OH, OW)`` contiguous tensor of ``x``'s dtype on ``x``'s device; the gradient w.r.t. ``x`` is
        of ``x``'s dtype too.
    """
    rois = _check_inputs(x, rois, outh, outw, spatial_scale)
    return RoI.apply(x, rois, int(outh), int(outw), float(spatial_scale))


def roi_table(rois, roi_indices, x: torch.Tensor) -> torch.Tensor:
    """The ``(R, 5)`` input of :func:`roi_pooling_2d` from the project's box order.

    Args:
        rois: ``(R, 4)`` numpy array or tensor, ``(y_min, x_min, y_max, x_max)`` in input-image pixels.
        roi_indices: ``(R,)`` numpy array or tensor, the image of each RoI in ``x``.
        x: the ``(N, C, H, W)`` feature map the RoIs will be pooled from (its device, and its dtype when
            float64; coordinates stay float32 for float32 and half-precision maps).

    Returns:
        ``(R, 5)`` tensor ``(batch_index, x_min, y_min, x_max, y_max)`` on ``x``'s device.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    rois = torch.as_tensor(rois, device=x.device).to(dtype)  # (R, 4)
    roi_indices = torch.as_tensor(roi_indices, device=x.device).to(dtype)  # (R,)
    # (y_min, x_min, y_max, x_max) -> (batch_index, x_min, y_min, x_max, y_max)
    return torch.cat((roi_indices[:, None], rois[:, [1, 0, 3, 2]]), dim=1)


class RoIPooling2D(nn.Module):
    """RoI max pooling layer (the original's ``RoIPooling2D``); see :func:`roi_pooling_2d`.

    Args:
        outh, outw: pooled size ``OH``, ``OW`` (7, 7 in the VGG16 head).
        spatial_scale: feature cells per input-image pixel (1/16 for VGG16's conv5_3).
    """

    def __init__(self, outh: int, outw: int, spatial_scale: float):
        super().__init__()
        _check_geometry(outh, outw, spatial_scale)
        self.outh, self.outw, self.spatial_scale = int(outh), int(outw), float(spatial_scale)

    def forward(self, x: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        """``x``: ``(N, C, H, W)``; ``rois``: ``(R, 5)``; returns ``(R, C, OH, OW)``."""
        return roi_pooling_2d(x, rois, self.outh, self.outw, self.spatial_scale)

    def extra_repr(self) -> str:
        return f"outh={self.outh}, outw={self.outw}, spatial_scale={self.spatial_scale}"


class RoI(torch.autograd.Function):
    """Autograd Function of RoI max pooling; the forward's argmax is saved for the backward.

    ``RoI.apply(x, rois, outh, outw, spatial_scale)`` expects inputs already checked by
    :func:`roi_pooling_2d` (rois ``(R, 5)`` of ``x``'s compute dtype: ``x``'s, float32 for a half ``x``;
    valid batch indices).
    """

    @staticmethod
    def forward(ctx, x, rois, outh, outw, spatial_scale):
        y, argmax = roi_pool_forward(x, rois, outh, outw, spatial_scale, with_argmax=ctx.needs_input_grad[0])
        ctx.save_for_backward(rois, argmax)
        ctx.x_shape = tuple(x.shape)
        ctx.spatial_scale = spatial_scale
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        rois, argmax = ctx.saved_tensors
        grad_x = roi_pool_backward(grad_y, rois, argmax, ctx.x_shape, ctx.spatial_scale)
        return grad_x, None, None, None, None


def roi_pool_forward(x: torch.Tensor, rois: torch.Tensor, outh: int, outw: int, spatial_scale: float,
                     with_argmax: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pooled output and argmax, on the device's implementation (see the module docstring).

    Args: as :func:`roi_pooling_2d`, with ``rois`` already of ``x``'s dtype (for a half ``x``, any floating
        dtype: converted to float32); ``with_argmax=False`` lets the CPU path skip the argmax (the CUDA kernel
        always writes it).

    Returns:
        ``(y, argmax)``: ``(R, C, OH, OW)`` of ``x``'s dtype on ``x``'s device, and ``(R, C, OH, OW)`` int32
        on the device that computed it (the CPU for the fallback; :func:`roi_pool_backward` follows it).
    """
    if x.is_cuda and cupy_available():
        if x.dtype not in (torch.float32, *_HALF_DTYPES):
            raise TypeError(f"roi_pooling_2d: the CUDA kernels take float32 (float16 and bfloat16 maps are "
                            f"converted), got x of {x.dtype}; cast x and rois with .float() (float64 runs on "
                            "the CPU only)")
        # The kernels read float32: a half map is converted on the way in and the output on the way out.
        y, argmax = roi_forward_cuda(x.float().contiguous(), rois.float().contiguous(), outh, outw,
                                     spatial_scale)
        return y.to(x.dtype), argmax
    if x.device.type == "cpu":
        return roi_pool_forward_cpu(x, rois, outh, outw, spatial_scale, with_argmax)
    warnings.warn(f"roi_pooling_2d: no CuPy kernel for a tensor on {x.device}; pooling on a CPU copy (slow). "
                  "Install the CuPy wheel of your CUDA, e.g. `pip install cupy-cuda12x`.", stacklevel=3)
    y, argmax = roi_pool_forward_cpu(x.cpu(), rois.cpu(), outh, outw, spatial_scale, with_argmax)
    return y.to(x.device), argmax


def roi_pool_backward(grad_y: torch.Tensor, rois: torch.Tensor, argmax: torch.Tensor,
                      x_shape: tuple[int, int, int, int], spatial_scale: float) -> torch.Tensor:
    """Gradient w.r.t. ``x`` (shape ``x_shape`` = ``(N, C, H, W)``) from ``grad_y`` ``(R, C, OH, OW)``.

    Runs where the forward's ``argmax`` lives (CUDA kernel or CPU); returns on ``grad_y``'s device, in
    ``grad_y``'s dtype (a half ``grad_y`` is summed in float32 and rounded once).
    """
    if argmax.is_cuda:
        grad_x = roi_backward_cuda(grad_y.float().contiguous(), rois.float().contiguous(), argmax, x_shape,
                                   spatial_scale)
        return grad_x.to(grad_y.dtype)
    grad_x = roi_pool_backward_cpu(grad_y.to(argmax.device), rois.to(argmax.device), argmax, x_shape)
    return grad_x.to(grad_y.device)


def roi_pool_forward_cpu(x: torch.Tensor, rois: torch.Tensor, outh: int, outw: int, spatial_scale: float,
                         with_argmax: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The forward kernel on the CPU: the Cython loop when it is built, else :func:`roi_pool_forward_torch`.

    Both give the kernel's values and argmax. The Cython loop (``model/utils/_roi_pool_cpu.pyx``) reads the
    map channels-last (no copy for a channels-last ``x``), one thread, and costs about a cell visit per
    pooled value, whatever the channel count; the torch twin pays a fixed cost per roi, which dominates for
    the few channels of the toy model.

    Args: as :func:`roi_pooling_2d`, with ``rois`` ``(R, 5)`` of ``x``'s dtype (for a half ``x``, any
        floating dtype: both are pooled in float32); ``with_argmax=False`` skips the argmax (inference).

    Returns:
        ``(y, argmax)``: ``(R, C, OH, OW)`` of ``x``'s dtype, and ``(R, C, OH, OW)`` int32 (or None), on the
        CPU, both in ``x``'s memory format (channels-last for a channels-last ``x``, else contiguous).
    """
    if x.dtype in _HALF_DTYPES:
        y, argmax = roi_pool_forward_cpu(x.float(), rois.float(), outh, outw, spatial_scale, with_argmax)
        return y.to(x.dtype), argmax
    channels_last = x.is_contiguous(memory_format=torch.channels_last)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    if _forward_nhwc_cython is None:
        y, argmax = roi_pool_forward_torch(x, rois, outh, outw, spatial_scale, with_argmax)
    else:
        x_nhwc = x.detach().permute(0, 2, 3, 1).contiguous()  # (N, C, H, W) -> (N, H, W, C)
        shape = (rois.shape[0], outh, outw, x.shape[1])  # (R, OH, OW, C)
        y = x.new_empty(shape)
        argmax = torch.empty(shape if with_argmax else (0, 0, 0, 0), dtype=torch.int32)
        _forward_nhwc_cython(x_nhwc.numpy(), rois.detach().contiguous().numpy(), outh, outw, spatial_scale,
                             y.numpy(), argmax.numpy(), with_argmax)
        # (R, OH, OW, C) -> (R, C, OH, OW) with channels-last strides (no copy)
        y, argmax = y.permute(0, 3, 1, 2), argmax.permute(0, 3, 1, 2) if with_argmax else None
    # in the map's memory format: a channels-last model's next layer (ResNet's layer4) takes it as it is
    y = y.contiguous(memory_format=layout)
    return y, argmax.contiguous(memory_format=layout) if with_argmax else None


@_one_thread()
def roi_pool_forward_torch(x: torch.Tensor, rois: torch.Tensor, outh: int, outw: int, spatial_scale: float,
                           with_argmax: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The torch implementation of the forward kernel: the same values and argmax.

    Bins in float arithmetic of ``x``'s dtype, as the kernel (float32) and torchvision compute them. A roi
    whose bins equal adaptive max pooling's integer bins ``[floor(ph * roi_h / OH), ceil((ph + 1) * roi_h /
    OH))`` (all but a few roi sizes, e.g. 57 cells in 7 bins) and that overhangs the map by at most
    ``_MARGIN`` cells is one ``adaptive_max_pool2d`` call on its crop of the -inf-padded, channels-last map
    (:func:`_pool_crops`): one pass over the crop, vectorised over channels, the first maximum winning as in
    the kernel. The other rois gather their bins explicitly (:func:`_pool_gather`).

    Args: as :func:`roi_pooling_2d`, with ``rois`` ``(R, 5)`` of ``x``'s dtype (for a half ``x``, any
        floating dtype: both are pooled in float32); ``with_argmax=False`` skips the argmax (inference).

    Returns:
        ``(y, argmax)``: ``(R, C, OH, OW)`` contiguous, of ``x``'s dtype, and ``(R, C, OH, OW)`` int32 (or
        None), on the CPU.
    """
    if x.dtype in _HALF_DTYPES:
        y, argmax = roi_pool_forward_torch(x.float(), rois.float(), outh, outw, spatial_scale, with_argmax)
        return y.to(x.dtype), argmax
    n_img, channels, height, width = x.shape
    shape = (rois.shape[0], channels, outh, outw)
    y = x.new_empty(shape)
    argmax = torch.empty(shape, dtype=torch.int32) if with_argmax else None
    if y.numel() == 0:
        return y, argmax
    grid, adaptive = _roi_grid(rois, outh, outw, spatial_scale, height, width)
    empty = (grid.he <= grid.hs)[:, :, None] | (grid.we <= grid.ws)[:, None, :]  # (R, OH, OW)

    m = _MARGIN
    # (N, C, H, W) -> (N, C, H + 2m, W + 2m), channels-last, -inf around the map
    padded = torch.empty((n_img, channels, height + 2 * m, width + 2 * m), dtype=x.dtype,
                         memory_format=torch.channels_last).fill_(float("-inf"))
    padded[:, :, m:m + height, m:m + width] = x
    fits = ((grid.start_h >= -m) & (grid.start_h + grid.size_h <= height + m)
            & (grid.start_w >= -m) & (grid.start_w + grid.size_w <= width + m))  # (R,)
    pooled = ~empty.flatten(1).all(1)  # (R,) rois with a non-empty bin; the others are all 0 / -1
    by_crop = pooled & adaptive & fits
    by_gather = pooled & ~by_crop
    if by_crop.any():
        _pool_crops(padded, grid, by_crop.nonzero().squeeze(1), empty, y, argmax)
    if by_gather.any():
        idx = by_gather.nonzero().squeeze(1)  # (R',)
        value, index = _pool_gather(padded, grid.take(idx), empty[idx], with_argmax)
        y.index_copy_(0, idx, value)
        if with_argmax:
            argmax.index_copy_(0, idx, index)
    if not pooled.all():
        idx = (~pooled).nonzero().squeeze(1)  # (R'',) rois with empty bins only
        y.index_fill_(0, idx, 0)
        if with_argmax:
            argmax.index_fill_(0, idx, -1)
    return y, argmax


@_one_thread()
def roi_pool_backward_cpu(grad_y: torch.Tensor, rois: torch.Tensor, argmax: torch.Tensor,
                          x_shape: tuple[int, int, int, int]) -> torch.Tensor:
    """The torch implementation of the backward kernel: one scatter-add of ``grad_y`` into the argmaxes.

    Args:
        grad_y: ``(R, C, OH, OW)`` gradient w.r.t. the pooled output.
        rois: the ``(R, 5)`` rois of the forward (only the batch index is read).
        argmax: the ``(R, C, OH, OW)`` int32 argmax of the forward, on ``grad_y``'s device.
        x_shape: ``(N, C, H, W)``.

    Returns:
        ``(N, C, H, W)`` tensor of ``grad_y``'s dtype; cells that no bin chose get 0. A half ``grad_y`` is
        summed in float32 and rounded once to its dtype.
    """
    if grad_y.dtype in _HALF_DTYPES:
        return roi_pool_backward_cpu(grad_y.float(), rois, argmax, x_shape).to(grad_y.dtype)
    n_img, channels, height, width = x_shape
    # Each (image, channel) plane gets one extra slot in front, which empty bins (argmax -1) feed and which
    # is dropped at the end: (N*C*(1 + H*W),). int32 indices where they fit (int64 arithmetic is slower).
    slots = grad_y.new_zeros(n_img * channels * (1 + height * width))
    index_dtype = torch.int32 if slots.numel() < 2**31 else torch.int64
    plane = (rois[:, 0].to(index_dtype)[:, None] * channels
             + torch.arange(channels, dtype=index_dtype, device=argmax.device)) * (1 + height * width) + 1
    index = argmax.to(index_dtype) + plane[:, :, None, None]  # (R, C, OH, OW)
    slots.index_add_(0, index.reshape(-1), grad_y.reshape(-1))
    # (N*C*(1 + H*W),) -> (N*C, 1 + H*W) -> drop the slot -> (N, C, H, W)
    return slots.view(n_img * channels, 1 + height * width)[:, 1:].reshape(x_shape)


class _RoIGrid(NamedTuple):
    """Caffe's integer geometry of R rois, all int64: ``batch``, ``start_h``, ``start_w`` (first cell, may lie
    outside the map), ``size_h``, ``size_w`` (``roi_h``, ``roi_w`` >= 1), and the bins clipped to the map:
    rows ``[hs, he)`` ``(R, OH)`` and columns ``[ws, we)`` ``(R, OW)``."""

    batch: torch.Tensor
    start_h: torch.Tensor
    start_w: torch.Tensor
    size_h: torch.Tensor
    size_w: torch.Tensor
    hs: torch.Tensor
    he: torch.Tensor
    ws: torch.Tensor
    we: torch.Tensor

    def take(self, idx: torch.Tensor) -> "_RoIGrid":
        return _RoIGrid(*(t[idx] for t in self))


def _roi_grid(rois, outh, outw, spatial_scale, height, width) -> tuple[_RoIGrid, torch.Tensor]:
    """The :class:`_RoIGrid` of ``rois`` and ``(R,)`` bool: whether its bins are adaptive pooling's."""
    cells = _round_half_away(rois[:, 1:] * spatial_scale).long()  # (R, 4) x_min, y_min, x_max, y_max
    start_w, start_h, end_w, end_h = cells.unbind(1)  # (R,) each
    size_h = (end_h - start_h + 1).clamp(min=1)
    size_w = (end_w - start_w + 1).clamp(min=1)
    h_lo, h_hi, h_adaptive = _bin_edges(size_h, outh, rois.dtype)  # (R, OH), (R, OH), (R,)
    w_lo, w_hi, w_adaptive = _bin_edges(size_w, outw, rois.dtype)  # (R, OW), (R, OW), (R,)
    grid = _RoIGrid(
        batch=rois[:, 0].long(), start_h=start_h, start_w=start_w, size_h=size_h, size_w=size_w,
        hs=(h_lo + start_h[:, None]).clamp(0, height), he=(h_hi + start_h[:, None]).clamp(0, height),
        ws=(w_lo + start_w[:, None]).clamp(0, width), we=(w_hi + start_w[:, None]).clamp(0, width),
    )
    return grid, h_adaptive & w_adaptive


def _pool_crops(padded, grid, rows, empty, y, argmax) -> None:
    """Adaptive max pooling of the ``(size_h, size_w)`` crop of the padded map of each roi in ``rows``
    (``(R',)`` int64), one call per roi, written into ``y[rows]`` and ``argmax[rows]`` (unless None).

    ``empty``: ``(R, OH, OW)`` bool, the empty bins (there a crop pools -inf from the padding: 0 and -1).
    """
    m = _MARGIN
    height, width = padded.shape[2] - 2 * m, padded.shape[3] - 2 * m
    channels, outh, outw = y.shape[1:]
    crops = [t[rows].tolist() for t in (grid.batch, grid.start_h, grid.start_w, grid.size_h, grid.size_w)]
    has_empty = empty[rows].flatten(1).any(1).tolist()
    if argmax is not None:
        # Crop cell (i, j) -> map index (start_h + i) * W + start_w + j, -1 in the padding; every roi's
        # table end to end: (sum of size_h * size_w,) int32
        area = grid.size_h[rows] * grid.size_w[rows]  # (R',)
        first = torch.cumsum(area, 0) - area  # (R',) where each roi's table starts
        owner = rows[torch.repeat_interleave(area)]  # (sum of areas,) the roi of each entry
        local = torch.arange(len(owner)) - first.repeat_interleave(area)  # i * size_w + j
        h = torch.div(local, grid.size_w[owner], rounding_mode="floor") + grid.start_h[owner]
        w = local % grid.size_w[owner] + grid.start_w[owner]
        table = torch.where((h >= 0) & (h < height) & (w >= 0) & (w < width), h * width + w, -1).int()
        crops.append(first.tolist())
        found = torch.empty((outh * outw, channels), dtype=torch.int32)  # reused
    for r, fix_empty, b, h0, w0, rh, rw, *t0 in zip(rows.tolist(), has_empty, *crops, strict=True):
        crop = padded[b:b + 1, :, h0 + m:h0 + m + rh, w0 + m:w0 + m + rw]  # (1, C, rh, rw) view
        value, index = torch.nn.functional.adaptive_max_pool2d(crop, (outh, outw), return_indices=True)
        # The outputs are channels-last like the map: (1, C, OH, OW) -> (OH*OW, C) views; transposed into
        # the contiguous (C, OH*OW) rows of y and argmax.
        y[r].view(channels, -1).copy_(value[0].permute(1, 2, 0).reshape(-1, channels).t())
        if fix_empty:
            y[r].masked_fill_(empty[r], 0)
        if argmax is not None:  # crop index -> map index
            index = index[0].permute(1, 2, 0).reshape(-1)  # (OH*OW*C,)
            torch.index_select(table[t0[0]:t0[0] + rh * rw], 0, index, out=found.view(-1))
            argmax[r].view(channels, -1).copy_(found.t())


def _pool_gather(padded, grid, empty, with_argmax):
    """Max over the explicit clipped bins of ``grid``, each bin gathered and padded to the largest bin with
    -inf cells; in chunks of rois to bound memory. ``empty``: ``(R', OH, OW)`` bool, the empty bins.

    Returns ``(R', C, OH, OW)`` values and int32 argmax ``h * W + w`` (or None), 0 and -1 in empty bins.
    """
    m = _MARGIN
    n_img, channels, height_p, width_p = padded.shape
    width = width_p - 2 * m
    outh, outw = empty.shape[1:]
    kh = max(int((grid.he - grid.hs).max()), 1)  # every bin padded to kh x kw cells
    kw = max(int((grid.we - grid.ws).max()), 1)
    rows = padded.permute(0, 2, 3, 1).reshape(-1, channels)  # (N, H+2m, W+2m, C) -> (N*(H+2m)*(W+2m), C)
    h = grid.hs[:, :, None] + torch.arange(kh)  # (R', OH, kh)
    w = grid.ws[:, :, None] + torch.arange(kw)  # (R', OW, kw)
    inside = (h < grid.he[:, :, None])[:, :, None, :, None] & (w < grid.we[:, :, None])[:, None, :, None, :]
    h, w = h[:, :, None, :, None], w[:, None, :, None, :]  # (R', OH, 1, kh, 1), (R', 1, OW, 1, kw)
    # Outside a bin: row 0 (a -inf padding cell of image 0) and map index -1. (R', OH, OW, kh, kw) ->
    # (R'*OH*OW, kh*kw)
    row = torch.where(inside, (grid.batch[:, None, None, None, None] * height_p + h + m) * width_p + w + m, 0)
    cell = torch.where(inside, h * width + w, -1)
    row, cell = row.reshape(-1, kh * kw), cell.reshape(-1, kh * kw)
    values, argmaxes = [], []
    step = max(_GATHER_CHUNK // (kh * kw * channels), 1)
    for i in range(0, row.shape[0], step):
        gathered = rows[row[i:i + step].flatten()].view(-1, kh * kw, channels)  # (B, kh*kw, C)
        value, k = gathered.max(dim=1)  # (B, C), the first maximum in (kh, kw) row-major order
        values.append(value)
        if with_argmax:
            argmaxes.append(torch.gather(cell[i:i + step], 1, k).int())
    n = grid.hs.shape[0]
    # (R'*OH*OW, C) -> (R', OH, OW, C) -> (R', C, OH, OW)
    value = torch.cat(values).view(n, outh, outw, channels).permute(0, 3, 1, 2)
    value = value.masked_fill(empty[:, None], 0)
    if not with_argmax:
        return value, None
    return value, torch.cat(argmaxes).view(n, outh, outw, channels).permute(0, 3, 1, 2)


def _round_half_away(v: torch.Tensor) -> torch.Tensor:
    """``round`` of C: halves away from zero (``torch.round`` rounds them to even)."""
    whole = torch.trunc(v)
    return whole + torch.sign(v) * ((v - whole).abs() >= 0.5).to(v.dtype)


def _bin_edges(size: torch.Tensor, n_bins: int, dtype: torch.dtype):
    """Caffe's bin edges of rois ``size`` cells long, relative to the roi start.

    Returns ``(lo, hi, adaptive)``: ``(R, n_bins)`` int64 ``floor(p * bin)`` and ``ceil((p + 1) * bin)`` with
    ``bin = size / n_bins`` in ``dtype``, and ``(R,)`` bool, whether they equal adaptive pooling's exact
    integer edges ``floor(p * size / n_bins)`` and ``ceil((p + 1) * size / n_bins)``.
    """
    bin_size = size.to(dtype) / n_bins  # (R,)
    p = torch.arange(n_bins)  # (n_bins,)
    lo = torch.floor(p.to(dtype) * bin_size[:, None]).long()  # (R, n_bins)
    hi = torch.ceil((p + 1).to(dtype) * bin_size[:, None]).long()
    exact_lo = torch.div(p * size[:, None], n_bins, rounding_mode="floor")
    exact_hi = -torch.div(-(p + 1) * size[:, None], n_bins, rounding_mode="floor")
    adaptive = ((lo == exact_lo) & (hi == exact_hi)).all(1)
    return lo, hi, adaptive


def _check_geometry(outh, outw, spatial_scale) -> None:
    for name, value in (("outh", outh), ("outw", outw)):
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise ValueError(f"RoIPooling2D: {name} must be a positive integer, got {value!r}")
    if not 0 < float(spatial_scale) < float("inf"):
        raise ValueError(f"RoIPooling2D: spatial_scale must be positive and finite, got {spatial_scale!r}")


def _check_inputs(x, rois, outh, outw, spatial_scale) -> torch.Tensor:
    """Validate the arguments of :func:`roi_pooling_2d`; return ``rois`` in the dtype ``x`` is pooled in:
    ``x``'s, float32 for a half ``x`` (a coordinate rounded to float16 or bfloat16 could move its bins)."""
    _check_geometry(outh, outw, spatial_scale)
    if not isinstance(x, torch.Tensor) or not isinstance(rois, torch.Tensor):
        raise TypeError(f"roi_pooling_2d: x and rois must be torch tensors, got {type(x).__name__} and "
                        f"{type(rois).__name__}")
    if x.dim() != 4:
        raise ValueError(f"roi_pooling_2d: x must be (N, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype not in (*_HALF_DTYPES, torch.float32, torch.float64):
        raise TypeError(f"roi_pooling_2d: x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if rois.dim() != 2 or rois.shape[1] != 5:
        hint = " (prepend the batch index of each roi)" if rois.dim() == 2 and rois.shape[1] == 4 else ""
        raise ValueError("roi_pooling_2d: rois must be (R, 5) (batch_index, x_min, y_min, x_max, y_max), "
                         f"got shape {tuple(rois.shape)}{hint}")
    if not rois.is_floating_point():
        raise TypeError(f"roi_pooling_2d: rois must be a floating tensor, got {rois.dtype}")
    if rois.device != x.device:
        raise ValueError(f"roi_pooling_2d: rois on {rois.device} but x on {x.device}")
    rois = rois.to(_compute_dtype(x.dtype))
    if rois.shape[0]:
        index = rois[:, 0]
        bad = ~torch.isfinite(rois).all(1) | (index != torch.round(index)) | (index < 0) | (index >= len(x))
        if bad.any():
            first = int(bad.nonzero()[0, 0])
            raise ValueError(f"roi_pooling_2d: roi {first} is {rois[first].tolist()}: coordinates must be "
                             f"finite and the batch index an integer in [0, {len(x)})")
    return rois
