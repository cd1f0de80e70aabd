"""The CUDA kernels of NMS and RoI pooling, run on the CPU through C++ shims, against the CPU paths.

The kernels are the very source strings the CuPy path compiles (imported from the modules, never copied),
launched with the grid and block sizes of the very functions the CuPy path calls, on one host thread per CUDA
thread (``tests/cuda_shim``). Each comparison runs under the shim's schedules: ``parallel`` (threads run
concurrently) and the two serial orders, in which a race between threads of a block shows up
deterministically. Where CuPy sees a GPU, the same tests also launch the kernels through CuPy (``cuda``).

The mutation tests at the end break a kernel on purpose (a copy of its source string) and check that the
comparisons here catch it: the harness bites.
"""

import numpy as np
import pytest
import torch
import torchvision

from model.roi_module import RoIPooling2D, roi_pool_backward_cpu, roi_pool_forward_cpu
from model.utils.cupy_utils import cupy, cupy_available, load_kernel
from model.utils.nms._nms_gpu_post_py import _nms_gpu_post as nms_gpu_post_py
from model.utils.nms.non_maximum_suppression import (
    NMS_COMPILE_OPTIONS,
    NMS_KERNEL_SOURCE,
    THREADS_PER_BLOCK,
    _nms_gpu_post,
    nms_launch_config,
    non_maximum_suppression,
)
from model.utils.roi_cupy import kernel_backward, kernel_forward, roi_launch_config
from tests.cuda_shim import SCHEDULES, KernelError, find_compiler, load_cpu_kernel

pytestmark = pytest.mark.skipif(
    find_compiler() is None, reason="no C++20 compiler with <barrier> (g++ >= 11; set CXX) for the CUDA shim"
)

# ---------------------------------------------------------------------------------------------------------
# Launching a kernel: on the CPU through the shim, or on a GPU through CuPy


def launch_on_cpu(source, name, options, grid, block, args, schedule="parallel"):
    """Kernel ``name`` of ``source`` on the CPU shim, numpy arrays written in place (``options``: NVRTC's)."""
    load_cpu_kernel(source, name)(grid, block, args, schedule=schedule)


def launch_on_gpu(source, name, options, grid, block, args, schedule="parallel"):
    """The CuPy launch of the CUDA path, with numpy arrays copied to the GPU and back."""
    if schedule != "parallel":
        pytest.skip("the serial schedules are the CPU shim's")
    device_args = tuple(cupy.asarray(a) if isinstance(a, np.ndarray) else a for a in args)
    kernel = load_kernel(source, name, 0) if options is None else load_kernel(source, name, 0, options)
    kernel(grid, block, device_args)
    for a, d in zip(args, device_args, strict=True):
        if isinstance(a, np.ndarray):
            a[...] = cupy.asnumpy(d)


def mutate(source, old, new):
    """``source`` with its one occurrence of ``old`` replaced by ``new`` (a kernel broken on purpose)."""
    assert source.count(old) == 1, f"the mutation no longer applies to the kernel source: {old!r}"
    return source.replace(old, new)


def schedules_for(*sources):
    """The serial schedules matter only to kernels whose threads talk through shared memory."""
    return SCHEDULES if any("__shared__" in source for source in sources) else ("parallel",)


@pytest.fixture(
    params=[
        "cpu",
        pytest.param(
            "gpu",
            marks=(pytest.mark.cuda, pytest.mark.skipif(not cupy_available(), reason="needs CuPy and a GPU")),
        ),
    ]
)
def launch(request):
    """``launch(source, name, options, grid, block, args, schedule)``, on the CPU shim or through CuPy."""
    return launch_on_cpu if request.param == "cpu" else launch_on_gpu


# ---------------------------------------------------------------------------------------------------------
# The shim itself, on small kernels written in the same CUDA subset

SHIM_TEST_SOURCE = r"""
extern "C" __global__ void block_sum(const int n, const float* x, float* out) {
  // grid-stride loop, then a tree reduction in shared memory: one partial sum per block
  __shared__ float partial[256];
  float acc = 0.f;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
    acc += x[i];
  }
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (unsigned int width = blockDim.x / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) {
      partial[threadIdx.x] += partial[threadIdx.x + width];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    out[blockIdx.x] = partial[0];
  }
}

extern "C" __global__ void thread_ids(int* out) {
  // out[block, thread] = (blockIdx, threadIdx, blockDim, gridDim) packed in one int per thread
  const int block = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
  const int thread = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
  const int n_threads = blockDim.x * blockDim.y * blockDim.z;
  out[block * n_threads + thread] = ((blockIdx.x * 10 + blockIdx.y) * 10 + blockIdx.z) * 1000
                                    + (threadIdx.x * 10 + threadIdx.y) * 10 + threadIdx.z;
}

extern "C" __global__ void math_functions(const int n, const float* x, float* out, int* iout) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) {
    out[i * 5 + 0] = roundf(x[i]);
    out[i * 5 + 1] = floorf(x[i]);
    out[i * 5 + 2] = ceilf(x[i]);
    out[i * 5 + 3] = fmaxf(x[i], 0.25f);
    out[i * 5 + 4] = fminf(x[i], 0.25f);
    iout[i * 2 + 0] = max(static_cast<int>(floorf(x[i])), -1);
    iout[i * 2 + 1] = min(static_cast<int>(floorf(x[i])), 1);
  }
}

extern "C" __global__ void unwritten_shared(float* out) {
  __shared__ float values[64];
  if (threadIdx.x > 0) {
    values[threadIdx.x] = 1.f;  // slot 0 is never written
  }
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = values[(threadIdx.x + 1) % blockDim.x];
}

extern "C" __global__ void divergent_barrier(float* out) {
  if (threadIdx.x < 3) {
    __syncthreads();
  }
  out[threadIdx.x] = 1.f;
}

extern "C" __global__ void barriers_on_two_lines(float* out) {
  if (threadIdx.x % 2) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.f;
}

extern "C" __global__ void off_by_one_write(const int n, float* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i <= n) {
    out[i] = 1.f;
  }
}

extern "C" __global__ void wait_for_flag(const int* flag) {
  while (*(volatile const int*)flag == 0) {
  }
}
"""


def shim_kernel(name):
    return load_cpu_kernel(SHIM_TEST_SOURCE, name)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_shim_block_reduction_through_shared_memory(schedule):
    x = np.random.default_rng(0).uniform(-1, 1, 10_000).astype(np.float32)
    out = np.full(5, np.nan, dtype=np.float32)
    shim_kernel("block_sum")((5,), (128,), (np.int32(x.size), x, out), schedule=schedule)
    # each block sums every 640th element starting at its own offset
    expected = [sum(x[b * 128 + t :: 640].astype(np.float64).sum() for t in range(128)) for b in range(5)]
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_shim_missing_barrier_gives_a_wrong_sum():
    # Without the barrier inside the reduction loop, thread 0 runs all its rounds (in_order schedule) before
    # the others have added their halves: a race that the serial schedule makes deterministic.
    source = mutate(SHIM_TEST_SOURCE, "    }\n    __syncthreads();\n  }", "    }\n  }")
    x = np.ones(1024, dtype=np.float32)
    out = np.zeros(1, dtype=np.float32)
    load_cpu_kernel(source, "block_sum")((1,), (128,), (np.int32(x.size), x, out), schedule="in_order")
    assert out[0] != 1024.0
    shim_kernel("block_sum")((1,), (128,), (np.int32(x.size), x, out), schedule="in_order")
    assert out[0] == 1024.0


def test_shim_builtin_variables_in_three_dimensions():
    grid, block = (3, 2, 2), (4, 3, 2)
    out = np.full(12 * 24, -1, dtype=np.int32)
    shim_kernel("thread_ids")(grid, block, (out,))
    expected = [
        ((bx * 10 + by) * 10 + bz) * 1000 + (tx * 10 + ty) * 10 + tz
        for bz in range(2) for by in range(2) for bx in range(3)
        for tz in range(2) for ty in range(3) for tx in range(4)
    ]
    np.testing.assert_array_equal(out, expected)


def test_shim_math_functions_round_half_away_from_zero():
    x = np.array([-2.5, -1.5, -0.5, -0.49999997, 0.0, 0.49999997, 0.5, 1.5, 2.5, 3.7, -3.7], dtype=np.float32)
    out = np.zeros((x.size, 5), dtype=np.float32)
    iout = np.zeros((x.size, 2), dtype=np.int32)
    shim_kernel("math_functions")((1,), (32,), (np.int32(x.size), x, out, iout))
    x64 = x.astype(np.float64)
    np.testing.assert_array_equal(out[:, 0], np.sign(x64) * np.floor(np.abs(x64) + 0.5))  # CUDA roundf
    np.testing.assert_array_equal(out[:, 0], [-3, -2, -1, 0, 0, 0, 1, 2, 3, 4, -4])
    np.testing.assert_array_equal(out[:, 1], np.floor(x))
    np.testing.assert_array_equal(out[:, 2], np.ceil(x))
    np.testing.assert_array_equal(out[:, 3], np.maximum(x, 0.25))
    np.testing.assert_array_equal(out[:, 4], np.minimum(x, 0.25))
    np.testing.assert_array_equal(iout[:, 0], np.maximum(np.floor(x), -1))
    np.testing.assert_array_equal(iout[:, 1], np.minimum(np.floor(x), 1))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_shim_shared_memory_starts_as_garbage(schedule):
    # Slot 0 is never written: it reads garbage (NaN) in every block, not the previous block's value.
    out = np.zeros(3 * 64, dtype=np.float32)
    shim_kernel("unwritten_shared")((3,), (64,), (out,), schedule=schedule)
    out = out.reshape(3, 64)
    assert np.isnan(out[:, 63]).all()
    np.testing.assert_array_equal(out[:, :63], 1.0)


DIVERGENT_LINE = SHIM_TEST_SOURCE.splitlines().index("  if (threadIdx.x < 3) {") + 2  # 1-based, next line


@pytest.mark.parametrize(
    "name, message",
    [
        ("divergent_barrier", f"3 of 8 threads waited at a __syncthreads() (line {DIVERGENT_LINE} of"),
        ("barriers_on_two_lines", "the others waited at a different __syncthreads() line"),
    ],
)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_shim_reports_a_barrier_not_reached_by_the_whole_block(name, message, schedule):
    with pytest.raises(KernelError, match="not reached by every thread of block \\(0, 0, 0\\)") as error:
        shim_kernel(name)((1,), (8,), (np.zeros(8, dtype=np.float32),), schedule=schedule)
    assert message in str(error.value)


def test_shim_catches_a_write_out_of_bounds():
    out = np.zeros(100, dtype=np.float32)
    with pytest.raises(KernelError, match="wrote outside argument 1"):
        shim_kernel("off_by_one_write")((4,), (32,), (np.int32(100), out))
    shim_kernel("off_by_one_write")((4,), (32,), (np.int32(99), out))  # writes out[0..99]: in bounds
    np.testing.assert_array_equal(out, 1.0)


def test_shim_reports_a_kernel_that_never_returns():
    flag = np.zeros(1, dtype=np.int32)
    kernel = shim_kernel("wait_for_flag")
    with pytest.raises(TimeoutError, match="did not return within 0.5 s"):
        kernel((1,), (2,), (flag,), timeout=0.5)
    x, out = np.zeros(8, dtype=np.float32), np.zeros(1, dtype=np.float32)
    with pytest.raises(TimeoutError, match="an earlier launch .* is still stuck"):
        shim_kernel("block_sum")((1,), (8,), (np.int32(8), x, out), timeout=0.1)
    flag[0] = 1  # the stuck threads finish; the next launch waits for them
    kernel((1,), (2,), (flag,))


@pytest.mark.parametrize(
    "body, message",
    [
        ("float* out) { atomicAdd(out, 1.f); }", "'atomicAdd' was not declared"),
        ("char* out) { out[0] = 1; }", "kernel parameter type outside the supported subset"),
    ],
)
def test_shim_refuses_code_outside_the_subset(body, message):
    with pytest.raises(KernelError, match="the CUDA shim could not compile kernels") as error:
        load_cpu_kernel(f'extern "C" __global__ void outside({body}\n', "outside")
    assert message in str(error.value)


def test_shim_checks_arguments_and_launch_bounds():
    kernel = shim_kernel("block_sum")
    assert kernel.param_types == ("int", "const float*", "float*")
    x, out = np.zeros(8, dtype=np.float32), np.zeros(1, dtype=np.float32)
    with pytest.raises(KernelError, match="takes 3 arguments"):
        kernel((1,), (8,), (x, out))
    with pytest.raises(KernelError, match=r"argument 0 .* is a int: pass numpy.int32"):
        kernel((1,), (8,), (8, x, out))
    with pytest.raises(KernelError, match="argument 1 .* pass a C-contiguous float32 array, got a float64"):
        kernel((1,), (8,), (np.int32(8), x.astype(np.float64), out))
    with pytest.raises(KernelError, match="not C-contiguous"):
        kernel((1,), (8,), (np.int32(4), x[::2], out))
    with pytest.raises(KernelError, match="invalid block"):
        kernel((1,), (1025,), (np.int32(8), x, out))
    with pytest.raises(KernelError, match="invalid grid"):
        kernel((1, 65536), (8,), (np.int32(8), x, out))


# ---------------------------------------------------------------------------------------------------------
# NMS: nms_kernel + _nms_gpu_post, as _call_nms_kernel runs them

NMS_POSTS = {"python": nms_gpu_post_py}
if _nms_gpu_post is not nms_gpu_post_py:  # the Cython extension is built
    NMS_POSTS["cython"] = _nms_gpu_post


def nms_kernel_keep(launch, sorted_bbox, thresh, schedule="parallel", post=_nms_gpu_post,
                    source=NMS_KERNEL_SOURCE):
    """Positions (ascending) kept by the kernel and its mask post-processing, over boxes sorted best first."""
    n_bbox = len(sorted_bbox)
    grid, block = nms_launch_config(n_bbox)
    col_blocks = grid[0]
    mask = np.zeros(n_bbox * col_blocks, dtype=np.uint64)  # (R * B,) zero-filled, as the CUDA path
    args = (np.int32(n_bbox), np.float32(thresh), np.ascontiguousarray(sorted_bbox, dtype=np.float32), mask)
    launch(source, "nms_kernel", NMS_COMPILE_OPTIONS, grid, block, args, schedule)
    selection, n_selection = post(mask, n_bbox, THREADS_PER_BLOCK, col_blocks)
    return selection[:n_selection]


def crowded_boxes(rng, n, extent=200.0):
    """``(n, 4)`` float32 ``(y_min, x_min, y_max, x_max)`` boxes jittered around ``n / 8`` cluster boxes."""
    n_cluster = max(1, n // 8)
    top_left = rng.uniform(0, extent, (n_cluster, 2))
    size = rng.uniform(10, extent / 4, (n_cluster, 2))
    member = rng.integers(0, n_cluster, n)
    bbox = np.concatenate((top_left[member], top_left[member] + size[member]), axis=1)
    bbox += rng.normal(0, 0.15, (n, 4)) * np.tile(size[member], 2)
    bbox[:, 2:] = np.maximum(bbox[:, 2:], bbox[:, :2] + 1)
    return bbox.astype(np.float32)


def nms_reference_keep(bbox, score, thresh):
    """(CPU path, torchvision.ops.nms) indices kept, best first. Boxes in (y, x) order: IoU is symmetric."""
    cpu = non_maximum_suppression(bbox, thresh, score)
    tv = torchvision.ops.nms(torch.from_numpy(bbox), torch.from_numpy(score), thresh).numpy()
    return cpu, tv


@pytest.mark.parametrize("schedule", schedules_for(NMS_KERNEL_SOURCE))
@pytest.mark.parametrize("n_bbox", [1, 2, 63, 64, 65, 129])
def test_nms_kernel_matches_cpu_path_and_torchvision(launch, n_bbox, schedule):
    rng = np.random.default_rng(n_bbox)
    bbox = crowded_boxes(rng, n_bbox)
    score = rng.permutation(n_bbox).astype(np.float32)  # distinct scores: one ranking for everyone
    order = np.argsort(-score)
    keep = order[nms_kernel_keep(launch, bbox[order], 0.5, schedule)]
    cpu, tv = nms_reference_keep(bbox, score, 0.5)
    np.testing.assert_array_equal(keep, cpu)
    np.testing.assert_array_equal(keep, tv)
    if n_bbox >= 63:
        assert 0 < len(keep) < n_bbox / 2  # not vacuous: many boxes suppressed, across blocks


@pytest.mark.parametrize("post", NMS_POSTS.values(), ids=NMS_POSTS.keys())
@pytest.mark.parametrize("thresh", [0.3, 0.7])
def test_nms_kernel_on_a_few_thousand_boxes(launch, thresh, post):
    rng = np.random.default_rng(7)
    bbox = crowded_boxes(rng, 3000, extent=1000.0)
    score = rng.uniform(0, 1, 3000).astype(np.float32)
    order = np.argsort(-score, kind="stable")
    keep = order[nms_kernel_keep(launch, bbox[order], thresh, post=post)]
    cpu, tv = nms_reference_keep(bbox, score, thresh)
    np.testing.assert_array_equal(keep, cpu)
    np.testing.assert_array_equal(keep, tv)
    assert 0 < len(keep) < 3000 * 0.9


def boxes_at_threshold():
    """40 squares, then per square a half and a shifted twin: IoU exactly 1/2 and 1/3 in float32 arithmetic.

    Returns ``(bbox (120, 4) float32 best first, positions of the squares, of the halves, of the twins)``.
    Integer coordinates: every product and difference is exact, and the divisions 50/100 and 50/150 round
    to float32(1/2) and float32(1/3), so the kernel's IoU equals the threshold bit for bit. The halves and
    twins come 40 and 80 places after their square, so pairs straddle the 64-box blocks of the kernel.
    """
    y, x = np.arange(40) // 10 * 100, np.arange(40) % 10 * 100  # 4 rows of 10 squares, 100 pixels apart
    square = np.stack((y, x, y + 10, x + 10), axis=1)
    half = np.stack((y, x, y + 10, x + 5), axis=1)  # inside the square, half its area: IoU 50 / 100
    twin = np.stack((y, x + 5, y + 10, x + 15), axis=1)  # overlaps half the square: IoU 50 / 150
    bbox = np.concatenate((square, half, twin)).astype(np.float32)
    return bbox, np.arange(40), np.arange(40, 80), np.arange(80, 120)


@pytest.mark.parametrize("schedule", schedules_for(NMS_KERNEL_SOURCE))
def test_nms_kernel_suppresses_at_the_threshold_exactly(launch, schedule):
    bbox, square, half, twin = boxes_at_threshold()
    # IoU >= thresh suppresses: at 1/2 the halves go, at 1/3 the halves and the twins.
    for thresh, expected in [
        (0.5, np.concatenate((square, twin))),
        (np.nextafter(np.float32(0.5), np.float32(1)), np.arange(120)),
        (1 / 3, square),
        (np.nextafter(np.float32(1 / 3), np.float32(1)), np.concatenate((square, twin))),
    ]:
        np.testing.assert_array_equal(nms_kernel_keep(launch, bbox, thresh, schedule), expected)
        np.testing.assert_array_equal(non_maximum_suppression(bbox, thresh), expected)
    # torchvision suppresses only above the threshold: at 1/2 exactly it keeps the halves.
    score = torch.arange(120, 0, -1, dtype=torch.float32)
    np.testing.assert_array_equal(torchvision.ops.nms(torch.from_numpy(bbox), score, 0.5), np.arange(120))


# ---------------------------------------------------------------------------------------------------------
# RoI pooling: roi_forward and roi_backward, as roi_forward_cuda / roi_backward_cuda launch them


def roi_kernel_forward(launch, x, rois, outh, outw, spatial_scale, schedule="parallel",
                       source=kernel_forward):
    """``(y, argmax)``: ``(R, C, OH, OW)`` float32 and int32 from ``roi_forward``."""
    _, channels, height, width = x.shape
    # torch.empty in the CUDA path: start from garbage, so every element must be written
    y = np.full((len(rois), channels, outh, outw), np.nan, dtype=np.float32)
    argmax = np.full(y.shape, -7, dtype=np.int32)
    grid, block = roi_launch_config(y.size)
    args = (x, rois, y, argmax, np.float32(spatial_scale), np.int32(channels), np.int32(height),
            np.int32(width), np.int32(outh), np.int32(outw), np.int32(y.size))
    launch(source, "roi_forward", None, grid, block, args, schedule)
    return y, argmax


def roi_kernel_backward(launch, grad_y, rois, argmax, x_shape, spatial_scale, schedule="parallel",
                        source=kernel_backward):
    """``(N, C, H, W)`` float32 gradient w.r.t. the input from ``roi_backward``."""
    _, channels, height, width = x_shape
    outh, outw = argmax.shape[2:]
    grad_x = np.full(x_shape, np.nan, dtype=np.float32)  # torch.empty in the CUDA path
    grid, block = roi_launch_config(grad_x.size)
    args = (grad_y, argmax, rois, grad_x, np.int32(len(rois)), np.float32(spatial_scale), np.int32(channels),
            np.int32(height), np.int32(width), np.int32(outh), np.int32(outw), np.int32(grad_x.size))
    launch(source, "roi_backward", None, grid, block, args, schedule)
    return grad_x


def roi_cases(rng, n_img, height, width, stride, n_random=24):
    """``(R, 5)`` float32 rois ``(batch_index, x_min, y_min, x_max, y_max)`` in image pixels of a feature map
    ``(height, width)`` at ``stride`` pixels per cell: random ones inside the image, ones crossing its border,
    wholly outside it, degenerate (max < min), single points, corners on half cells (rounding half away from
    zero, also below 0), and the whole image; batch indices spread over the ``n_img`` images."""
    img_h, img_w = height * stride, width * stride

    def boxes(n, low, high):
        x = np.sort(rng.uniform(low * img_w, high * img_w, (n, 2)), axis=1)
        y = np.sort(rng.uniform(low * img_h, high * img_h, (n, 2)), axis=1)
        return np.stack((x[:, 0], y[:, 0], x[:, 1], y[:, 1]), axis=1)

    half = stride / 2
    special = np.array([
        [img_w + 2 * stride, 0, img_w + 5 * stride, img_h / 2],  # right of the image
        [-5 * stride, -5 * stride, -2 * stride, -2 * stride],  # above left of it
        [0, -3 * stride, img_w / 2, -stride],  # above it
        [img_w / 2, img_h / 2, img_w / 4, img_h / 4],  # degenerate: max < min
        [30.0, 40.0, 10.0, 41.0],
        [img_w / 3, img_h / 3, img_w / 3, img_h / 3],  # a point
        [img_w - 1, img_h - 1, img_w - 1, img_h - 1],  # the last cell
        [half, 3 * half, 5 * half, 7 * half],  # half cells: round away from zero
        [-half, -3 * half, 3 * half, half],  # negative half cells
        [0, 0, img_w - 1, img_h - 1],  # the whole image
        [-half, -half, img_w - half, img_h - half],  # the whole image, shifted by half a cell
    ])
    xyxy = np.concatenate((boxes(n_random, 0, 1), boxes(8, -0.5, 1.5), special))
    batch = rng.integers(0, n_img, len(xyxy))
    return np.concatenate((batch[:, None], xyxy), axis=1).astype(np.float32)


def torchvision_roi_pool(x, rois, outh, outw, spatial_scale):
    """torchvision's RoIPool: ``(y, argmax)`` with argmax ``h * W + w`` (-1 for an empty bin)."""
    y, argmax = torch.ops.torchvision.roi_pool(torch.from_numpy(x), torch.from_numpy(rois), spatial_scale,
                                               outh, outw)
    return y.numpy(), argmax.numpy()


ROI_SCENES = {
    # name: (N, C, H, W, OH, OW, stride): a small map with pooled sides of different lengths, and a map
    # large enough for rois up to 64 cells, whose float bins differ from integer ones (57 cells in 7 bins)
    "small": (3, 4, 12, 14, 7, 5, 16),
    "large": (2, 2, 64, 64, 7, 7, 16),
}


def roi_scene(name, seed, ties=False):
    n_img, channels, height, width, outh, outw, stride = ROI_SCENES[name]
    rng = np.random.default_rng(seed)
    if ties:  # few distinct values: the first maximum (row-major) must win everywhere
        x = rng.integers(0, 3, (n_img, channels, height, width)).astype(np.float32)
    else:
        x = rng.normal(size=(n_img, channels, height, width)).astype(np.float32)
    rois = roi_cases(rng, n_img, height, width, stride)
    return x, rois, outh, outw, 1.0 / stride


@pytest.mark.parametrize("schedule", schedules_for(kernel_forward))
@pytest.mark.parametrize("scene, ties", [("small", False), ("small", True), ("large", False)])
def test_roi_forward_kernel_matches_cpu_path_and_torchvision(launch, scene, ties, schedule):
    x, rois, outh, outw, scale = roi_scene(scene, 1, ties)
    y, argmax = roi_kernel_forward(launch, x, rois, outh, outw, scale, schedule)
    y_cpu, argmax_cpu = roi_pool_forward_cpu(torch.from_numpy(x), torch.from_numpy(rois), outh, outw, scale)
    np.testing.assert_array_equal(argmax, argmax_cpu.numpy())
    np.testing.assert_array_equal(y, y_cpu.numpy())
    y_tv, argmax_tv = torchvision_roi_pool(x, rois, outh, outw, scale)
    np.testing.assert_array_equal(argmax, argmax_tv)
    np.testing.assert_array_equal(y, y_tv)
    assert (argmax == -1).any() and (argmax >= 0).mean() > 0.5  # empty bins and pooled ones


@pytest.mark.parametrize("schedule", schedules_for(kernel_forward, kernel_backward))
@pytest.mark.parametrize("scene, ties", [("small", False), ("small", True), ("large", False)])
def test_roi_backward_kernel_matches_cpu_path_and_autograd(launch, scene, ties, schedule):
    x, rois, outh, outw, scale = roi_scene(scene, 2, ties)
    _, argmax = roi_kernel_forward(launch, x, rois, outh, outw, scale, schedule)
    grad_y = np.random.default_rng(3).normal(size=argmax.shape).astype(np.float32)
    grad_x = roi_kernel_backward(launch, grad_y, rois, argmax, x.shape, scale, schedule)

    expected = roi_pool_backward_cpu(torch.from_numpy(grad_y), torch.from_numpy(rois),
                                     torch.from_numpy(argmax), x.shape)
    np.testing.assert_allclose(grad_x, expected.numpy(), rtol=1e-5, atol=1e-6)
    # autograd through the CPU module, and through torchvision's RoIPool
    for pool in (RoIPooling2D(outh, outw, scale), torchvision.ops.RoIPool((outh, outw), scale)):
        x_t = torch.from_numpy(x).requires_grad_()
        pool(x_t, torch.from_numpy(rois)).backward(torch.from_numpy(grad_y))
        np.testing.assert_allclose(grad_x, x_t.grad.numpy(), rtol=1e-5, atol=1e-6)
    # not vacuous: some input cells take the gradient of several bins, of overlapping rois too
    counts = np.bincount(argmax[argmax >= 0], minlength=x.shape[2] * x.shape[3])
    assert (grad_x != 0).any() and counts.max() > 2


# ---------------------------------------------------------------------------------------------------------
# Mutation tests: a kernel broken on purpose (in a copy of its source string) fails the comparisons above


NMS_MUTANTS = {
    # the barrier between staging the column boxes in shared memory and reading them
    "no_barrier": ("  __syncthreads();\n", ""),
    # suppression only above the threshold (torchvision's rule), not at it
    "strict_threshold": (">= thresh", "> thresh"),
    # the diagonal blocks skipped: no suppression among the 64 boxes of one block
    "skip_diagonal": ("if (row_block > col_block)", "if (row_block >= col_block)"),
    # the last column box of each block never compared
    "short_column": ("const int col_size = min(", "const int col_size = -1 + min("),
}


@pytest.mark.parametrize("mutant", NMS_MUTANTS)
def test_nms_comparisons_catch_a_broken_kernel(mutant):
    source = mutate(NMS_KERNEL_SOURCE, *NMS_MUTANTS[mutant])
    caught = []
    for schedule in SCHEDULES:
        rng = np.random.default_rng(129)
        bbox = crowded_boxes(rng, 129)
        keep = nms_kernel_keep(launch_on_cpu, bbox, 0.5, schedule, source=source)
        at_threshold = boxes_at_threshold()[0]
        keep_at_threshold = nms_kernel_keep(launch_on_cpu, at_threshold, 0.5, schedule, source=source)
        caught.append(not np.array_equal(keep, non_maximum_suppression(bbox, 0.5))
                      or not np.array_equal(keep_at_threshold, non_maximum_suppression(at_threshold, 0.5)))
    # a race may go unnoticed in the parallel schedule, never in the serial ones
    assert (caught[1] and caught[2]) if mutant == "no_barrier" else all(caught)


ROI_FORWARD_MUTANTS = {
    # an off-by-one in a bin bound: every bin one column wider
    "bin_end": ("int wend = (int)ceilf((float)(pw + 1) * bin_size_w);",
                "int wend = (int)ceilf((float)(pw + 1) * bin_size_w) + 1;"),
    # the roi's inclusive end taken as exclusive
    "roi_height": ("const int roi_height = max(roi_end_h - roi_start_h + 1, 1);",
                   "const int roi_height = max(roi_end_h - roi_start_h, 1);"),
    # bins clipped to the map one row short
    "clip": ("hend = min(max(hend + roi_start_h, 0), height);",
             "hend = min(max(hend + roi_start_h, 0), height - 1);"),
    # the last maximum wins ties instead of the first
    "ties": ("if (plane[index] > maxval)", "if (plane[index] >= maxval)"),
    # rounding half to even instead of away from zero
    "rounding": ("const int roi_start_w = (int)roundf(roi[1] * spatial_scale);",
                 "const int roi_start_w = (int)rintf(roi[1] * spatial_scale);"),
    # the last output element never computed
    "last_thread": ("idx < n_threads; idx += stride", "idx < n_threads - 1; idx += stride"),
}


@pytest.mark.parametrize("mutant", ROI_FORWARD_MUTANTS)
def test_roi_forward_comparisons_catch_a_broken_kernel(mutant):
    source = mutate(kernel_forward, *ROI_FORWARD_MUTANTS[mutant])
    caught = False
    for scene, ties in [("small", False), ("small", True), ("large", False)]:
        x, rois, outh, outw, scale = roi_scene(scene, 1, ties)
        y, argmax = roi_kernel_forward(launch_on_cpu, x, rois, outh, outw, scale, source=source)
        y_cpu, argmax_cpu = roi_pool_forward_cpu(torch.from_numpy(x), torch.from_numpy(rois), outh, outw,
                                                 scale)
        caught |= not (np.array_equal(y, y_cpu.numpy()) and np.array_equal(argmax, argmax_cpu.numpy()))
    assert caught


ROI_BACKWARD_MUTANTS = {
    # gradient taken from the rois of every image, not only this one's
    "any_image": ("if (n != (int)roi[0]) {", "if (n < 0) {"),
    # the original's bound: only rows start_h .. end_h, dropping what float bins stretch past the end
    "original_rows": ("h >= roi_start_h + pooled_rows", "h > roi_end_h"),
    # accumulated into the (garbage) output instead of written
    "accumulate": ("bottom_diff[idx] = gradient;", "bottom_diff[idx] += gradient;"),
}


@pytest.mark.parametrize("mutant", ROI_BACKWARD_MUTANTS)
def test_roi_backward_comparisons_catch_a_broken_kernel(mutant):
    source = mutate(kernel_backward, *ROI_BACKWARD_MUTANTS[mutant])
    caught = False
    for scene, ties in [("small", False), ("small", True), ("large", False)]:
        x, rois, outh, outw, scale = roi_scene(scene, 2, ties)
        _, argmax = roi_kernel_forward(launch_on_cpu, x, rois, outh, outw, scale)
        grad_y = np.random.default_rng(3).normal(size=argmax.shape).astype(np.float32)
        grad_x = roi_kernel_backward(launch_on_cpu, grad_y, rois, argmax, x.shape, scale, source=source)
        expected = roi_pool_backward_cpu(torch.from_numpy(grad_y), torch.from_numpy(rois),
                                         torch.from_numpy(argmax), x.shape)
        caught |= not np.allclose(grad_x, expected.numpy(), rtol=1e-5, atol=1e-6)
    assert caught
