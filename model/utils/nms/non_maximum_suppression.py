"""Non-maximum suppression: the original's CUDA bitmask kernel through CuPy, and a CPU path that matches it.

Shape symbols:

    R: number of boxes given.
    K: number of boxes kept (``K <= R``, and ``K <= limit`` when a limit is given).
    B: number of column blocks, ``ceil(R / 64)``.

Semantics, identical on every path (what the original's CuPy kernel computes):

- Boxes are ranked by ``score``, highest first; equal scores keep their input order (a stable descending
  sort, so the lower index goes first). Without ``score`` the input order is the ranking.
- Going down the ranking, a box is kept unless its IoU with an already kept box is ``>= thresh``.
  ``torchvision.ops.nms`` suppresses only when IoU ``> thresh``; the two differ only where an IoU equals the
  threshold exactly.
- IoU has no "+1": ``area = (y_max - y_min) * (x_max - x_min)``, intersection sides clamped at 0, and
  ``iou = inter / (area_a + area_b - inter)``, all in float32 in exactly this order, compared with the
  threshold rounded to float32. The CUDA kernel is compiled without FMA contraction (``--fmad=false``) and the
  Cython path with ``-ffp-contract=off``, so every path rounds each operation alike and keeps the same boxes.
- Coordinates are expected to be finite; NaN or infinite coordinates give unspecified (not crashing) results.

Paths: numpy arrays and CPU tensors take the CPU path (``_nms_cpu``: Cython, or a vectorised numpy fallback
when the extension is not built). CUDA tensors and CuPy arrays take the CUDA kernel when CuPy sees a GPU; a
CUDA tensor without CuPy takes the CPU path and its result goes back to the tensor's device.
"""

import warnings

import numpy as np
import torch

from ..cupy_utils import cupy, cupy_available, load_kernel, to_cupy, torch_stream

try:
    from ._nms_cpu import _nms_cpu
    from ._nms_gpu_post import _nms_gpu_post
except ImportError:  # the Cython extensions are not built: same results, slower
    from ._nms_cpu_py import _nms_cpu
    from ._nms_gpu_post_py import _nms_gpu_post

    warnings.warn(
        "model/utils/nms: Cython extensions not built, using the slower Python fallback; build them with "
        "`cd model/utils && python build.py build_ext --inplace`",
        stacklevel=1,
    )

__all__ = ["NMS_COMPILE_OPTIONS", "NMS_KERNEL_SOURCE", "THREADS_PER_BLOCK", "nms_launch_config",
           "non_maximum_suppression"]

#: Boxes per block: one bit of an ``unsigned long long`` per column box (``8 * sizeof(unsigned long long)``).
THREADS_PER_BLOCK = 64

#: The CUDA kernel ``nms_kernel``. Arguments, in order:
#:
#: - ``const int n_bbox``: R.
#: - ``const float thresh``: IoU threshold; box j is marked when ``IoU(i, j) >= thresh``.
#: - ``const float* bbox``: ``(R, 4)`` C-contiguous, ``(y_min, x_min, y_max, x_max)``, sorted best first.
#: - ``unsigned long long* mask``: ``(R, B)`` C-contiguous, zero-filled. Bit ``k`` of ``mask[i, c]`` is set
#:   when box ``j = 64 c + k`` comes after box ``i`` and ``IoU(i, j) >= thresh``. Block ``(x=c, y=r)`` fills
#:   the words of column block ``c`` for the 64 boxes of row block ``r``; blocks below the diagonal
#:   (``r > c``) return at once, as the post-processing never reads their words.
#:
#: Launch with :func:`nms_launch_config`. Compile without FMA contraction (:data:`NMS_COMPILE_OPTIONS`; a host
#: compiler running it through shims: ``-ffp-contract=off``), or IoUs may round differently from the CPU path.
NMS_KERNEL_SOURCE = r"""
__device__ inline float bbox_iou(const float* a, const float* b) {
  // (y_min, x_min, y_max, x_max), no "+1"; the CPU path performs the same float32 operations in this order.
  const float top = fmaxf(a[0], b[0]);
  const float left = fmaxf(a[1], b[1]);
  const float bottom = fminf(a[2], b[2]);
  const float right = fminf(a[3], b[3]);
  const float height = fmaxf(bottom - top, 0.f);
  const float width = fmaxf(right - left, 0.f);
  const float area_i = height * width;
  const float area_a = (a[2] - a[0]) * (a[3] - a[1]);
  const float area_b = (b[2] - b[0]) * (b[3] - b[1]);
  return area_i / (area_a + area_b - area_i);
}

extern "C" __global__ void nms_kernel(const int n_bbox, const float thresh,
                                      const float* bbox, unsigned long long* mask) {
  const int threads_per_block = 8 * sizeof(unsigned long long);
  const int row_block = blockIdx.y;
  const int col_block = blockIdx.x;
  if (row_block > col_block) {
    return;  // the whole block leaves together, before any barrier
  }
  const int col_blocks = (n_bbox + threads_per_block - 1) / threads_per_block;
  const int row_size = min(n_bbox - row_block * threads_per_block, threads_per_block);
  const int col_size = min(n_bbox - col_block * threads_per_block, threads_per_block);
  const int t = threadIdx.x;

  // This block's column boxes, staged in shared memory once for all 64 row boxes.
  __shared__ float col_bbox[threads_per_block * 4];
  if (t < col_size) {
    for (int k = 0; k < 4; ++k) {
      col_bbox[t * 4 + k] = bbox[(col_block * threads_per_block + t) * 4 + k];
    }
  }
  __syncthreads();

  if (t < row_size) {
    const int i = row_block * threads_per_block + t;
    const float* cur = bbox + i * 4;
    // On the diagonal block, box i is compared only with the boxes after it.
    const int start = (row_block == col_block) ? t + 1 : 0;
    unsigned long long bits = 0;
    for (int j = start; j < col_size; ++j) {
      if (bbox_iou(cur, col_bbox + j * 4) >= thresh) {
        bits |= 1ULL << j;
      }
    }
    mask[(long long)i * col_blocks + col_block] = bits;
  }
}
"""

#: NVRTC options for :data:`NMS_KERNEL_SOURCE`: no FMA contraction, so IoUs round as on the CPU path.
NMS_COMPILE_OPTIONS = ("--std=c++14", "--fmad=false")


def nms_launch_config(n_bbox: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Grid and block of the ``nms_kernel`` launch for ``n_bbox`` boxes.

    Returns:
        ``(grid, block)``: grid ``(B, B, 1)`` with ``B = ceil(n_bbox / 64)`` (x: column block, y: row block),
        block ``(64, 1, 1)``.
    """
    if n_bbox < 1:
        raise ValueError(f"nms_launch_config: n_bbox must be at least 1, got {n_bbox}")
    col_blocks = -(-n_bbox // THREADS_PER_BLOCK)
    return (col_blocks, col_blocks, 1), (THREADS_PER_BLOCK, 1, 1)


def non_maximum_suppression(bbox, thresh: float, score=None, limit: int | None = None):
    """Indices of the boxes that survive greedy non-maximum suppression, best first.

    Args:
        bbox: ``(R, 4)`` boxes ``(y_min, x_min, y_max, x_max)``, as a numpy array, a torch tensor (any device)
            or a CuPy array. Computed in float32.
        thresh: IoU threshold; a box is suppressed by a kept box when their IoU is ``>= thresh`` (compared in
            float32).
        score: ``(R,)`` scores of the same kind as ``bbox`` (or anything convertible to it), higher is better;
            equal scores keep input order. ``None``: the input order is the ranking.
        limit: keep at most this many boxes (the best ones). ``None``: no limit.

    Returns:
        ``(K,)`` indices into ``bbox`` of the kept boxes, in ranking order: numpy int32 for numpy input, an
        int64 tensor on ``bbox``'s device for a tensor, an int32 CuPy array for a CuPy array.

    Raises:
        ValueError: ``bbox`` is not ``(R, 4)``, ``score`` is not ``(R,)``, or ``limit`` is negative.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"non_maximum_suppression: limit must be None or >= 0, got {limit}")
    if isinstance(bbox, torch.Tensor):
        _check_shapes(bbox.shape, None if score is None else np.shape(score))
        if bbox.is_cuda and cupy_available():
            return _nms_cuda(bbox, thresh, score, limit)
        if score is not None:
            score = torch.as_tensor(score).detach().cpu()
            # numpy has no bfloat16; float32 holds it exactly, so the ranking is unchanged.
            score = (score.float() if score.dtype == torch.bfloat16 else score).numpy()
        keep = _nms_numpy(bbox.detach().to("cpu", torch.float32).numpy(), thresh, score, limit)
        return torch.from_numpy(keep).to(device=bbox.device, dtype=torch.int64)
    if cupy is not None and isinstance(bbox, cupy.ndarray):
        _check_shapes(bbox.shape, None if score is None else np.shape(score))
        if isinstance(score, cupy.ndarray):
            score = torch.from_dlpack(score)
        keep = _nms_cuda(torch.from_dlpack(bbox), thresh, score, limit)
        return cupy.from_dlpack(keep.to(torch.int32))
    bbox = np.asarray(bbox)
    score = None if score is None else np.asarray(score)
    _check_shapes(bbox.shape, None if score is None else score.shape)
    return _nms_numpy(bbox, thresh, score, limit)


def _check_shapes(bbox_shape, score_shape) -> None:
    if len(bbox_shape) != 2 or bbox_shape[1] != 4:
        raise ValueError(f"non_maximum_suppression: bbox must have shape (R, 4), got {tuple(bbox_shape)}")
    if score_shape is not None and tuple(score_shape) != (bbox_shape[0],):
        raise ValueError(
            f"non_maximum_suppression: score must have shape ({bbox_shape[0]},) to match bbox "
            f"{tuple(bbox_shape)}, got {tuple(score_shape)}")


def _nms_numpy(bbox: np.ndarray, thresh: float, score, limit) -> np.ndarray:
    """CPU path: ``(R, 4)`` numpy boxes -> ``(K,)`` int32 indices."""
    n_bbox = bbox.shape[0]
    limit = n_bbox if limit is None else min(limit, n_bbox)
    if score is None:
        order = None
    else:
        # Stable descending sort: sort the reversed array ascending (stable), then reverse back, so equal
        # scores come out in increasing index order, for any dtype.
        order = (n_bbox - 1) - np.argsort(score[::-1], kind="stable")[::-1]
        bbox = bbox[order]
    sorted_bbox = np.ascontiguousarray(bbox, dtype=np.float32)
    selection = _nms_cpu(sorted_bbox, float(np.float32(thresh)), limit)
    if order is not None:
        selection = order[selection]
    return selection.astype(np.int32, copy=False)


def _nms_cuda(bbox: torch.Tensor, thresh: float, score, limit) -> torch.Tensor:
    """CUDA path: ``(R, 4)`` CUDA tensor -> ``(K,)`` int64 indices on its device, via the CuPy kernel."""
    device = bbox.device
    bbox = bbox.detach()
    order = None
    if score is not None:
        score = torch.as_tensor(score, device=device).detach()
        order = torch.sort(score, descending=True, stable=True).indices  # ties: lower index first
        bbox = bbox[order]
    if bbox.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64, device=device)
    sorted_bbox = bbox.to(torch.float32).contiguous()
    selection = _call_nms_kernel(sorted_bbox, thresh)[:limit]
    keep = torch.from_numpy(selection).to(device=device, dtype=torch.int64)
    return keep if order is None else order[keep]


def _call_nms_kernel(sorted_bbox: torch.Tensor, thresh: float) -> np.ndarray:
    """Run ``nms_kernel`` on torch's current stream and reduce its mask on the host.

    Args:
        sorted_bbox: ``(R, 4)`` float32 C-contiguous CUDA tensor, ``R >= 1``, best box first.

    Returns:
        ``(K,)`` int32 numpy positions (into ``sorted_bbox``) of the kept boxes, ascending.
    """
    n_bbox = sorted_bbox.shape[0]
    device = sorted_bbox.device
    grid, block = nms_launch_config(n_bbox)
    col_blocks = grid[0]
    # Allocated by torch so the buffer follows torch's stream-ordered caching allocator.
    mask = torch.zeros(n_bbox * col_blocks, dtype=torch.int64, device=device)  # (R * B,) words
    kernel = load_kernel(NMS_KERNEL_SOURCE, "nms_kernel", device.index, NMS_COMPILE_OPTIONS)
    with cupy.cuda.Device(device.index), torch_stream(device):
        kernel(grid, block, (np.int32(n_bbox), np.float32(thresh), to_cupy(sorted_bbox), to_cupy(mask)))
    mask_host = mask.cpu().numpy().view(np.uint64)  # waits for the kernel on torch's stream
    selection, n_selection = _nms_gpu_post(mask_host, n_bbox, THREADS_PER_BLOCK, col_blocks)
    return selection[:n_selection]
