"""CUDA kernels of RoI max pooling (Caffe / Fast R-CNN RoIPool) and their CuPy launch.

Shapes:
    N: batch size; C: channels; H, W: feature map height and width;
    R: number of rois; OH, OW: pooled height and width.

Tensors the kernels read and write (all contiguous, on one CUDA device):
    bottom_data: (N, C, H, W) float32 feature map.
    bottom_rois: (R, 5) float32 ``(batch_index, x_min, y_min, x_max, y_max)`` in input-image pixels.
    top_data:    (R, C, OH, OW) float32 pooled output.
    argmax_data: (R, C, OH, OW) int32 flat index ``h * W + w`` of the max in its feature plane, -1 for an
                 empty bin.
    top_diff / bottom_diff: gradients, shaped as top_data / bottom_data.

The sources are plain CUDA C within the subset of ``.notes/CONTRACTS.md`` (no includes, templates, atomics or
warp intrinsics; math functions ``roundf floorf ceilf max min``), so the same strings also run through the C++
shims of the CPU kernel tests. :func:`roi_launch_config` (pure Python) gives the grid and block that every
launcher uses. The torch reimplementation of the same semantics is in ``model/roi_module.py``.
"""

import numpy as np
import torch

from model.utils.cupy_utils import load_kernel, to_cupy, torch_stream

__all__ = [
    "THREADS_PER_BLOCK",
    "MAX_BLOCKS",
    "MAX_ELEMENTS",
    "kernel_forward",
    "kernel_backward",
    "roi_launch_config",
    "roi_forward_cuda",
    "roi_backward_cuda",
]

# The original's CUDA_NUM_THREADS. Both kernels are memory bound without shared memory or barriers, so the
# block size does not change their speed much; 1024 keeps the original's launch.
THREADS_PER_BLOCK = 1024
# Grid-stride loops let a capped grid cover any size; 65535 blocks fill every current GPU many times over.
MAX_BLOCKS = 65535
# The kernels index with int: the element count plus one grid stride must stay below 2**31.
MAX_ELEMENTS = 2**31 - 1 - THREADS_PER_BLOCK * MAX_BLOCKS

# Forward, one thread per output element (n, c, ph, pw) of top_data. Arguments, in order:
#   const float* bottom_data, const float* bottom_rois, float* top_data, int* argmax_data,
#   const float spatial_scale, const int channels, const int height, const int width,
#   const int pooled_height, const int pooled_width, const int n_threads (= R * C * OH * OW)
# spatial_scale is a float (the original passed a double): corners are scaled in float32, as torchvision's
# kernels do (the same for a power-of-two scale such as 1/16).
kernel_forward = r"""
extern "C" __global__ void roi_forward(
    const float* bottom_data, const float* bottom_rois, float* top_data, int* argmax_data,
    const float spatial_scale, const int channels, const int height, const int width,
    const int pooled_height, const int pooled_width, const int n_threads)
{
    const int stride = blockDim.x * gridDim.x;
    for (int idx = blockIdx.x * blockDim.x + threadIdx.x; idx < n_threads; idx += stride) {
        const int pw = idx % pooled_width;
        const int ph = (idx / pooled_width) % pooled_height;
        const int c = (idx / pooled_width / pooled_height) % channels;
        const int n = idx / pooled_width / pooled_height / channels;

        const float* const roi = bottom_rois + n * 5;
        const int roi_batch_ind = (int)roi[0];
        // Roi corners to feature cells, rounding half away from zero.
        const int roi_start_w = (int)roundf(roi[1] * spatial_scale);
        const int roi_start_h = (int)roundf(roi[2] * spatial_scale);
        const int roi_end_w = (int)roundf(roi[3] * spatial_scale);
        const int roi_end_h = (int)roundf(roi[4] * spatial_scale);
        // Inclusive ends; a malformed roi (end < start) is forced to one cell.
        const int roi_width = max(roi_end_w - roi_start_w + 1, 1);
        const int roi_height = max(roi_end_h - roi_start_h + 1, 1);
        const float bin_size_h = (float)roi_height / (float)pooled_height;
        const float bin_size_w = (float)roi_width / (float)pooled_width;

        // Bin [hstart, hend) x [wstart, wend), clipped to the feature map.
        int hstart = (int)floorf((float)ph * bin_size_h);
        int wstart = (int)floorf((float)pw * bin_size_w);
        int hend = (int)ceilf((float)(ph + 1) * bin_size_h);
        int wend = (int)ceilf((float)(pw + 1) * bin_size_w);
        hstart = min(max(hstart + roi_start_h, 0), height);
        hend = min(max(hend + roi_start_h, 0), height);
        wstart = min(max(wstart + roi_start_w, 0), width);
        wend = min(max(wend + roi_start_w, 0), width);
        const bool is_empty = (hend <= hstart) || (wend <= wstart);

        // An empty bin gives 0 and argmax -1 (no gradient); otherwise the first maximum wins (strict >).
        float maxval = is_empty ? 0.0f : -1e37f;
        int maxidx = -1;
        const float* const plane = bottom_data + (roi_batch_ind * channels + c) * height * width;
        for (int h = hstart; h < hend; ++h) {
            for (int w = wstart; w < wend; ++w) {
                const int index = h * width + w;
                if (plane[index] > maxval) {
                    maxval = plane[index];
                    maxidx = index;
                }
            }
        }
        top_data[idx] = maxval;
        argmax_data[idx] = maxidx;
    }
}
"""

# Backward, one thread per input element (n, c, h, w) of bottom_diff: the sum of top_diff over every
# (roi, ph, pw) whose argmax is this element (written, not accumulated). Arguments, in order:
#   const float* top_diff, const int* argmax_data, const float* bottom_rois, float* bottom_diff,
#   const int num_rois, const float spatial_scale, const int channels, const int height, const int width,
#   const int pooled_height, const int pooled_width, const int n_threads (= N * C * H * W)
# Two fixes to the original, which could drop gradient the forward had routed: (1) the rows/columns a roi
# pools are start .. start + ceil(pooled * bin_size) - 1, not start .. end, since a malformed roi (end <
# start) is pooled as one cell and float rounding can stretch the last bin one cell past the end (a roi 57
# cells tall in 7 bins); (2) the pooled range from h / bin_size gets one bin of slack on each side, because
# float rounding can put a boundary element one bin off from the forward's ph * bin_size. The range only
# bounds the search: the argmax test alone decides which bins contribute.
kernel_backward = r"""
extern "C" __global__ void roi_backward(
    const float* top_diff, const int* argmax_data, const float* bottom_rois, float* bottom_diff,
    const int num_rois, const float spatial_scale, const int channels, const int height, const int width,
    const int pooled_height, const int pooled_width, const int n_threads)
{
    const int stride = blockDim.x * gridDim.x;
    for (int idx = blockIdx.x * blockDim.x + threadIdx.x; idx < n_threads; idx += stride) {
        const int w = idx % width;
        const int h = (idx / width) % height;
        const int c = (idx / width / height) % channels;
        const int n = idx / width / height / channels;
        const int index = h * width + w;

        float gradient = 0.0f;
        for (int roi_n = 0; roi_n < num_rois; ++roi_n) {
            const float* const roi = bottom_rois + roi_n * 5;
            if (n != (int)roi[0]) {
                continue;
            }
            const int roi_start_w = (int)roundf(roi[1] * spatial_scale);
            const int roi_start_h = (int)roundf(roi[2] * spatial_scale);
            const int roi_end_w = (int)roundf(roi[3] * spatial_scale);
            const int roi_end_h = (int)roundf(roi[4] * spatial_scale);
            const int roi_width = max(roi_end_w - roi_start_w + 1, 1);
            const int roi_height = max(roi_end_h - roi_start_h + 1, 1);
            const float bin_size_h = (float)roi_height / (float)pooled_height;
            const float bin_size_w = (float)roi_width / (float)pooled_width;

            // Skip a roi whose pooled cells (as the forward computes them) do not include (h, w).
            const int pooled_rows = (int)ceilf((float)pooled_height * bin_size_h);
            const int pooled_cols = (int)ceilf((float)pooled_width * bin_size_w);
            if (h < roi_start_h || h >= roi_start_h + pooled_rows ||
                w < roi_start_w || w >= roi_start_w + pooled_cols) {
                continue;
            }

            // Bins that can hold (h, w), with one bin of slack for float rounding.
            int phstart = (int)floorf((float)(h - roi_start_h) / bin_size_h) - 1;
            int phend = (int)ceilf((float)(h - roi_start_h + 1) / bin_size_h) + 1;
            int pwstart = (int)floorf((float)(w - roi_start_w) / bin_size_w) - 1;
            int pwend = (int)ceilf((float)(w - roi_start_w + 1) / bin_size_w) + 1;
            phstart = min(max(phstart, 0), pooled_height);
            phend = min(max(phend, 0), pooled_height);
            pwstart = min(max(pwstart, 0), pooled_width);
            pwend = min(max(pwend, 0), pooled_width);

            const int offset = (roi_n * channels + c) * pooled_height * pooled_width;
            for (int ph = phstart; ph < phend; ++ph) {
                for (int pw = pwstart; pw < pwend; ++pw) {
                    const int top_index = offset + ph * pooled_width + pw;
                    if (argmax_data[top_index] == index) {
                        gradient += top_diff[top_index];
                    }
                }
            }
        }
        bottom_diff[idx] = gradient;
    }
}
"""


def roi_launch_config(n_threads: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Grid and block for ``n_threads`` work items of either RoI kernel (both loop with a grid stride).

    Args:
        n_threads: the number of output elements (forward) or input elements (backward), >= 0.

    Returns:
        ``(grid, block)`` as 3-tuples: ``block = (THREADS_PER_BLOCK, 1, 1)``, ``grid = (g, 1, 1)`` with
        ``g = clip(ceil(n_threads / THREADS_PER_BLOCK), 1, MAX_BLOCKS)``. With ``n_threads == 0`` one block
        runs and does nothing.
    """
    n_threads = int(n_threads)
    if not 0 <= n_threads <= MAX_ELEMENTS:
        raise ValueError(f"roi_launch_config: n_threads must be in [0, {MAX_ELEMENTS}], got {n_threads}")
    n_blocks = min(max(-(-n_threads // THREADS_PER_BLOCK), 1), MAX_BLOCKS)
    return (n_blocks, 1, 1), (THREADS_PER_BLOCK, 1, 1)


def roi_forward_cuda(x: torch.Tensor, rois: torch.Tensor, outh: int, outw: int,
                     spatial_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``roi_forward`` on torch's current stream of ``x``'s device (needs CuPy and a GPU).

    Args:
        x: ``(N, C, H, W)`` float32 CUDA tensor.
        rois: ``(R, 5)`` float32 tensor on the same device, ``(batch_index, x_min, y_min, x_max, y_max)``
            in input-image pixels, batch indices in ``[0, N)`` (checked by the caller).
        outh, outw: pooled size ``OH``, ``OW``.
        spatial_scale: feature cells per input-image pixel (1/16 for VGG16's conv5_3).

    Returns:
        ``(y, argmax)``: ``(R, C, OH, OW)`` float32 and int32 tensors allocated by torch on ``x``'s device.
    """
    n_img, channels, height, width = x.shape
    y = torch.empty((rois.shape[0], channels, outh, outw), dtype=torch.float32, device=x.device)
    argmax = torch.empty(y.shape, dtype=torch.int32, device=x.device)
    if y.numel() == 0:
        return y, argmax
    _check_size(x.numel(), y.numel())
    grid, block = roi_launch_config(y.numel())
    kernel = load_kernel(kernel_forward, "roi_forward", x.device.index)
    with torch_stream(x.device):
        kernel(grid, block, (
            to_cupy(x), to_cupy(rois), to_cupy(y), to_cupy(argmax),
            np.float32(spatial_scale), np.int32(channels), np.int32(height), np.int32(width),
            np.int32(outh), np.int32(outw), np.int32(y.numel()),
        ))
    return y, argmax


def roi_backward_cuda(grad_y: torch.Tensor, rois: torch.Tensor, argmax: torch.Tensor,
                      x_shape: tuple[int, int, int, int], spatial_scale: float) -> torch.Tensor:
    """Run ``roi_backward``: the gradient w.r.t. the ``(N, C, H, W)`` input of :func:`roi_forward_cuda`.

    Args:
        grad_y: ``(R, C, OH, OW)`` float32 CUDA tensor, the gradient w.r.t. the pooled output.
        rois: the ``(R, 5)`` float32 rois of the forward.
        argmax: the ``(R, C, OH, OW)`` int32 argmax of the forward.
        x_shape: ``(N, C, H, W)``.
        spatial_scale: as in the forward.

    Returns:
        ``(N, C, H, W)`` float32 tensor on ``grad_y``'s device.
    """
    n_img, channels, height, width = x_shape
    outh, outw = argmax.shape[2:]
    grad_x = torch.empty(tuple(x_shape), dtype=torch.float32, device=grad_y.device)
    if grad_x.numel() == 0:
        return grad_x
    if rois.shape[0] == 0:
        return grad_x.zero_()
    _check_size(grad_x.numel(), argmax.numel())
    grid, block = roi_launch_config(grad_x.numel())
    kernel = load_kernel(kernel_backward, "roi_backward", grad_y.device.index)
    with torch_stream(grad_y.device):
        kernel(grid, block, (
            to_cupy(grad_y), to_cupy(argmax), to_cupy(rois), to_cupy(grad_x),
            np.int32(rois.shape[0]), np.float32(spatial_scale), np.int32(channels), np.int32(height),
            np.int32(width), np.int32(outh), np.int32(outw), np.int32(grad_x.numel()),
        ))
    return grad_x


def _check_size(*numels: int) -> None:
    """Refuse tensors too large for the kernels' int indexing."""
    if max(numels) > MAX_ELEMENTS:
        raise ValueError(f"RoI pooling on CUDA: tensors of more than {MAX_ELEMENTS} elements are not "
                         f"supported by the int-indexed kernels (got {max(numels)})")
