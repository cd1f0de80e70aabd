"""RoI pooling against a slow literal reference of original-spec §7, ``torchvision.ops.roi_pool`` and
hand-worked cases; ``gradcheck``; the CUDA kernels compile, and (where CuPy sees a GPU) match the CPU path.

Semantics under test (model/roi_module.py): rois ``(batch_index, x_min, y_min, x_max, y_max)`` in image
pixels; corners rounded half away from zero; ``roi_h = max(end - start + 1, 1)``; bins ``[floor(p * bin),
ceil((p + 1) * bin))`` in float arithmetic, clipped to the map; an empty bin gives 0 and argmax -1; the first
maximum wins; the gradient of a pooled cell goes to its argmax.
"""

import math
import shutil
import subprocess

import numpy as np
import pytest
import torch
import torchvision

from model import roi_module
from model.roi_module import (
    RoIPooling2D,
    roi_pool_backward_cpu,
    roi_pool_forward,
    roi_pool_forward_cpu,
    roi_pool_forward_torch,
    roi_pooling_2d,
)
from model.utils.cupy_utils import cupy_available
from model.utils.roi_cupy import (
    MAX_BLOCKS,
    THREADS_PER_BLOCK,
    kernel_backward,
    kernel_forward,
    roi_launch_config,
)

cuda = [pytest.mark.cuda, pytest.mark.skipif(not cupy_available(), reason="needs CuPy and a CUDA GPU")]
DEVICES = ["cpu", pytest.param("cuda", marks=cuda)]


@pytest.fixture(params=["cython", "torch"])
def cpu_forward(request, monkeypatch):
    """Run a test with each CPU forward: the Cython loop (built by ./setup.sh) and its torch twin."""
    if request.param == "cython":
        if roi_module._forward_nhwc_cython is None:
            pytest.skip("the Cython RoI extension is not built (cd model/utils && python build.py build_ext "
                        "--inplace)")
    else:
        monkeypatch.setattr(roi_module, "_forward_nhwc_cython", None)
    return request.param


# ---------------------------------------------------------------------------------------------------------
# The slow reference: original-spec §7 one element at a time, in float32 like the kernel


def c_round(v) -> int:
    """C's ``round``: halves away from zero (``v`` is a float32, exact in float64)."""
    return int(math.copysign(math.floor(abs(float(v)) + 0.5), float(v)))


def reference_forward(x, rois, outh, outw, spatial_scale):
    """``(y, argmax)`` of the forward kernel, written out loop by loop."""
    x = np.asarray(x, np.float32)
    rois = np.asarray(rois, np.float32)
    f32 = np.float32
    _, n_channel, height, width = x.shape
    y = np.zeros((len(rois), n_channel, outh, outw), np.float32)
    argmax = np.full(y.shape, -1, np.int32)
    for n, roi in enumerate(rois):
        batch = int(roi[0])
        start_w, start_h, end_w, end_h = (c_round(roi[i] * f32(spatial_scale)) for i in (1, 2, 3, 4))
        roi_w = max(end_w - start_w + 1, 1)
        roi_h = max(end_h - start_h + 1, 1)
        bin_h = f32(roi_h) / f32(outh)
        bin_w = f32(roi_w) / f32(outw)
        for ph in range(outh):
            for pw in range(outw):
                hstart = min(max(int(np.floor(f32(ph) * bin_h)) + start_h, 0), height)
                hend = min(max(int(np.ceil(f32(ph + 1) * bin_h)) + start_h, 0), height)
                wstart = min(max(int(np.floor(f32(pw) * bin_w)) + start_w, 0), width)
                wend = min(max(int(np.ceil(f32(pw + 1) * bin_w)) + start_w, 0), width)
                empty = hend <= hstart or wend <= wstart
                for c in range(n_channel):
                    maxval, maxidx = (f32(0) if empty else f32(-1e37)), -1
                    for h in range(hstart, hend):
                        for w in range(wstart, wend):
                            if x[batch, c, h, w] > maxval:
                                maxval, maxidx = x[batch, c, h, w], h * width + w
                    y[n, c, ph, pw] = maxval
                    argmax[n, c, ph, pw] = maxidx
    return y, argmax


def reference_backward(grad_y, rois, argmax, x_shape):
    """For every input element, the sum of ``grad_y`` over the (roi, ph, pw) whose argmax it is."""
    grad_y, argmax = np.asarray(grad_y, np.float64), np.asarray(argmax)
    batch = np.asarray(rois)[:, 0].astype(int)
    n_img, n_channel, height, width = x_shape
    grad_x = np.zeros(x_shape)
    for n in range(n_img):
        for c in range(n_channel):
            for h in range(height):
                for w in range(width):
                    chosen = (batch[:, None, None] == n) & (argmax[:, c] == h * width + w)  # (R, OH, OW)
                    grad_x[n, c, h, w] = grad_y[:, c][chosen].sum()
    return grad_x


# ---------------------------------------------------------------------------------------------------------
# Inputs


def random_rois(rng, n, n_img, height, width, spatial_scale):
    """``(n, 5)`` float32 rois of every kind for a ``(height, width)`` map: inside, partly and fully outside,
    degenerate (x_min > x_max), zero-sized, on the borders, on exact half cells (rounding ties)."""
    img_h, img_w = height / spatial_scale, width / spatial_scale
    lo = rng.uniform(-0.3, 1.1, (n, 2)) * (img_w, img_h)
    hi = lo + rng.uniform(-0.1, 0.8, (n, 2)) * (img_w, img_h)  # a tenth or so degenerate
    box = np.concatenate((lo, hi), axis=1)
    k = n // 8
    box[:k] = (0, 0, img_w - 1, img_h - 1)  # the whole image, on the borders
    box[k:2 * k, 2:] = box[k:2 * k, :2]  # zero size
    box[2 * k:3 * k] = rng.integers(-3, 2 * max(height, width), (k, 4)) + 0.5  # half cells: ties of round()
    box[2 * k:3 * k] /= spatial_scale
    box[3 * k:4 * k] += (2 * img_w, 0, 2 * img_w, 0)  # wholly to the right of the image
    batch = rng.integers(0, n_img, (n, 1))
    return np.concatenate((batch, box), axis=1).astype(np.float32)


def distinct_map(rng, shape, dtype=np.float32):
    """A feature map of distinct values (no ties: max pooling is differentiable there)."""
    return (rng.permutation(int(np.prod(shape))).reshape(shape) * 0.01 - 3.0).astype(dtype)


def torchvision_roi_pool(x, rois, outh, outw, spatial_scale):
    """torchvision's op with its argmax."""
    return torch.ops.torchvision.roi_pool(x, rois, spatial_scale, outh, outw)


CASES = [  # (outh, outw, spatial_scale, (N, C, H, W))
    (7, 7, 1 / 16, (2, 3, 9, 12)),
    (13, 11, 1 / 16, (3, 2, 8, 10)),  # bins of 13 and 11 often differ from adaptive pooling's: gathered
    (2, 3, 0.3, (1, 4, 7, 6)),  # a scale that is no power of two
]


# ---------------------------------------------------------------------------------------------------------
# Forward and backward on the CPU


@pytest.mark.parametrize("outh, outw, spatial_scale, shape", CASES)
def test_forward_matches_reference_and_torchvision(outh, outw, spatial_scale, shape, cpu_forward):
    rng = np.random.default_rng(outh * 100 + outw)
    x = (np.round(rng.standard_normal(shape) * 2) / 2).astype(np.float32)  # many ties: the first maximum wins
    rois = random_rois(rng, 48, shape[0], shape[2], shape[3], spatial_scale)
    y, argmax = roi_pool_forward_cpu(torch.from_numpy(x), torch.from_numpy(rois), outh, outw, spatial_scale)
    y_ref, argmax_ref = reference_forward(x, rois, outh, outw, spatial_scale)
    y_tv, argmax_tv = torchvision_roi_pool(torch.from_numpy(x), torch.from_numpy(rois), outh, outw,
                                           spatial_scale)
    assert y.shape == (48, shape[1], outh, outw) and y.dtype == torch.float32 and argmax.dtype == torch.int32
    np.testing.assert_array_equal(y.numpy(), y_ref)
    np.testing.assert_array_equal(argmax.numpy(), argmax_ref)
    np.testing.assert_array_equal(y.numpy(), y_tv.numpy())
    np.testing.assert_array_equal(argmax.numpy(), argmax_tv.numpy())
    assert (argmax_ref == -1).any() and (argmax_ref >= 0).any()  # the rois have empty and full bins


@pytest.mark.parametrize("outh, outw, spatial_scale, shape", CASES)
def test_backward_matches_reference_and_torchvision(outh, outw, spatial_scale, shape, cpu_forward):
    rng = np.random.default_rng(outh * 10 + outw)
    x = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
    rois = torch.from_numpy(random_rois(rng, 40, shape[0], shape[2], shape[3], spatial_scale))
    grad_y = torch.from_numpy(rng.standard_normal((40, shape[1], outh, outw)).astype(np.float32))

    x_ours, x_tv = x.clone().requires_grad_(), x.clone().requires_grad_()
    roi_pooling_2d(x_ours, rois, outh, outw, spatial_scale).backward(grad_y)
    torchvision.ops.roi_pool(x_tv, rois, (outh, outw), spatial_scale).backward(grad_y)
    _, argmax = reference_forward(x.numpy(), rois.numpy(), outh, outw, spatial_scale)
    grad_ref = reference_backward(grad_y.numpy(), rois.numpy(), argmax, shape)
    np.testing.assert_allclose(x_ours.grad.numpy(), grad_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x_ours.grad, x_tv.grad, rtol=1e-6, atol=1e-6)
    assert (grad_ref != 0).sum() > 10


def test_gradcheck_float64(cpu_forward):
    rng = np.random.default_rng(3)
    x = torch.from_numpy(distinct_map(rng, (2, 2, 6, 7), np.float64)).requires_grad_()
    rois = torch.tensor([
        [0, 0, 0, 111, 95],  # the whole map, on the borders
        [1, 20, 10, 60, 50],
        [1, 70, 40, 20, 10],  # degenerate: pooled as its first cell
        [0, -40, -30, 30, 40],  # partly outside
        [0, 200, 200, 300, 300],  # wholly outside: no gradient
        [1, 8, 8, 8, 8],  # zero size, on a rounding tie
    ], dtype=torch.float64)

    def pool(x):
        return roi_pooling_2d(x, rois, 3, 4, 1 / 16)

    assert torch.autograd.gradcheck(pool, (x,), eps=1e-6, atol=1e-6)
    assert pool(x).dtype == torch.float64


def test_float_rounding_stretches_the_last_bin(cpu_forward):
    """A roi 57 cells tall in 7 bins: 7 * float32(57 / 7) rounds above 57, so the last bin ends one row
    past the roi (the kernel's and torchvision's arithmetic). The forward pools that row and the gradient
    reaches it (the original backward kernel stopped at the roi's end row and dropped it)."""
    x = torch.zeros(1, 1, 64, 4)
    x[0, 0, 57, 1] = 5.0  # row 57 is outside the roi's rows 0..56
    rois = torch.tensor([[0.0, 0, 0, 3 * 16, 56 * 16]])
    x.requires_grad_()
    y = roi_pooling_2d(x, rois, 7, 4, 1 / 16)
    assert y[0, 0, 6, 1] == 5.0 and y[0, 0, 5, 1] == 0.0
    y_tv = torchvision.ops.roi_pool(x, rois, (7, 4), 1 / 16)
    np.testing.assert_array_equal(y.detach().numpy(), y_tv.detach().numpy())
    y.sum().backward()
    assert x.grad[0, 0, 57, 1] == 1.0


def test_float_rounding_moves_a_bin_start(cpu_forward):
    """26 cells in 22 bins: float32 11 * (26 / 22) rounds below 13, so bin 11 starts at column 12 (exact
    arithmetic, adaptive pooling's, says 13)."""
    x = torch.zeros(1, 1, 1, 30)
    x[0, 0, 0, 12] = 5.0
    rois = torch.tensor([[0.0, 0, 0, 25 * 16, 0]])
    y, argmax = roi_pool_forward_cpu(x, rois, 1, 22, 1 / 16)
    assert y[0, 0, 0, 10] == 5.0 and y[0, 0, 0, 11] == 5.0 and y[0, 0, 0, 12] == 0.0
    assert argmax[0, 0, 0, 11] == 12
    np.testing.assert_array_equal(y.numpy(), torchvision.ops.roi_pool(x, rois, (1, 22), 1 / 16).numpy())


def test_hand_worked_roi(cpu_forward):
    """The spec's example: x from 100 to 200 px at 1/16 -> cells 6..13 (12.5 rounds to 13), 8 cells in 7 bins
    of 8/7: column bins [6, 8), [7, 9), [8, 10), [9, 11), [10, 12), [11, 13), [12, 14)."""
    x = torch.arange(20.0).view(1, 1, 1, 20)  # value = column
    y, argmax = roi_pool_forward_cpu(x, torch.tensor([[0.0, 100, 0, 200, 0]]), 1, 7, 1 / 16)
    assert y.flatten().tolist() == [7, 8, 9, 10, 11, 12, 13]
    assert argmax.flatten().tolist() == [7, 8, 9, 10, 11, 12, 13]


def test_degenerate_and_zero_size_rois_pool_one_cell(cpu_forward):
    rng = np.random.default_rng(4)
    x = torch.from_numpy(distinct_map(rng, (1, 3, 5, 6)))
    rois = torch.tensor([[0.0, 64, 48, 16, 16], [0, 64, 48, 64, 48]])  # x_min > x_max; zero size at (3, 4)
    x.requires_grad_()
    y = roi_pooling_2d(x, rois, 2, 2, 1 / 16)
    expected = x[0, :, 3, 4].detach()[:, None, None].expand(3, 2, 2)
    torch.testing.assert_close(y[0], expected)
    torch.testing.assert_close(y[1], expected)
    y.sum().backward()
    grad = torch.zeros(1, 3, 5, 6)
    grad[0, :, 3, 4] = 8.0  # 2 rois x 4 bins
    torch.testing.assert_close(x.grad, grad)


def test_rois_outside_the_image_give_zeros_and_no_gradient(cpu_forward):
    x = torch.randn(2, 3, 5, 6).requires_grad_()
    rois = torch.tensor([[1.0, 200, 0, 300, 50], [0, -300, -200, -100, -50], [0, 0, 100, 50, 150]])
    y, argmax = roi_pool_forward_cpu(x.detach(), rois, 3, 3, 1 / 16)
    assert (y == 0).all() and (argmax == -1).all()
    roi_pooling_2d(x, rois, 3, 3, 1 / 16).sum().backward()
    assert (x.grad == 0).all()


def test_several_images_pool_their_own_map(cpu_forward):
    x = torch.randn(3, 2, 6, 8)
    x[1] += 100.0
    x[2] -= 100.0
    rois = torch.tensor([[b, 10.0, 5.0, 90.0, 70.0] for b in (0, 1, 2, 1, 0)])
    y = roi_pooling_2d(x, rois, 3, 3, 1 / 16)
    for n, b in enumerate((0, 1, 2, 1, 0)):
        alone = rois[n:n + 1].clone()
        alone[0, 0] = 0  # the same roi on its image alone
        single = roi_pooling_2d(x[b:b + 1], alone, 3, 3, 1 / 16)
        torch.testing.assert_close(y[n:n + 1], single, rtol=0, atol=0)
    assert (y[1] > 50).all() and (y[2] < -50).all()


def test_no_rois(cpu_forward):
    x = torch.randn(1, 4, 5, 5).requires_grad_()
    y = roi_pooling_2d(x, torch.zeros(0, 5), 7, 7, 1 / 16)
    assert y.shape == (0, 4, 7, 7)
    y.sum().backward()
    assert x.grad.shape == x.shape and (x.grad == 0).all()


def test_non_contiguous_inputs(cpu_forward):
    rng = np.random.default_rng(5)
    x = torch.from_numpy(rng.standard_normal((2, 5, 9, 10)).astype(np.float32))
    rois = torch.from_numpy(random_rois(rng, 20, 2, 9, 10, 1 / 16))
    grad_y = torch.randn(20, 5, 7, 7)
    expected = roi_pool_forward_cpu(x, rois, 7, 7, 1 / 16)
    expected_grad = roi_pool_backward_cpu(grad_y, rois, expected[1], tuple(x.shape))
    rois_t = rois.t().contiguous().t()  # same values, column-major
    views = [
        x.contiguous(memory_format=torch.channels_last),
        torch.stack((x, -x), dim=2)[:, :, 0],  # a strided slice holding the same values
        x.transpose(2, 3).contiguous().transpose(2, 3),
    ]
    for view in views:
        assert not view.is_contiguous()
        xv = view.requires_grad_()
        y = roi_pooling_2d(xv, rois_t, 7, 7, 1 / 16)
        torch.testing.assert_close(y, expected[0], rtol=0, atol=0)
        y.backward(grad_y.transpose(0, 1).contiguous().transpose(0, 1))  # a non-contiguous grad too
        torch.testing.assert_close(xv.grad, expected_grad, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels", [1, 32, 67])
def test_cython_forward_matches_the_torch_twin(dtype, channels):
    """The Cython loop and the torch twin on fresh random maps and rois of every kind, channels-last and
    contiguous maps, with and without argmax, float32 and float64 (bins in the map's precision)."""
    if roi_module._forward_nhwc_cython is None:
        pytest.skip("the Cython RoI extension is not built")
    rng = np.random.default_rng()
    for outh, outw, spatial_scale, (n, _, h, w) in CASES + [(7, 7, 1 / 8, (2, 0, 28, 44))]:
        x = torch.from_numpy(rng.standard_normal((n, channels, h, w))).to(dtype)
        x[:, :, ::3] = torch.round(x[:, :, ::3])  # ties: the first maximum wins
        rois = torch.from_numpy(random_rois(rng, 96, n, h, w, spatial_scale)).to(dtype)
        y_ref, argmax_ref = roi_pool_forward_torch(x, rois, outh, outw, spatial_scale)
        for xv in (x, x.contiguous(memory_format=torch.channels_last)):
            y, argmax = roi_pool_forward_cpu(xv, rois, outh, outw, spatial_scale)
            layout = torch.channels_last if xv is not x else torch.contiguous_format  # the map's format
            assert y.is_contiguous(memory_format=layout) and argmax.is_contiguous(memory_format=layout)
            assert y.dtype == dtype
            torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
            torch.testing.assert_close(argmax, argmax_ref, rtol=0, atol=0)
            y_only, none = roi_pool_forward_cpu(xv, rois, outh, outw, spatial_scale, with_argmax=False)
            assert none is None
            torch.testing.assert_close(y_only, y_ref, rtol=0, atol=0)


def test_crop_and_gather_strategies_agree():
    """The two ways the CPU path pools (adaptive pooling of a crop, explicit bins) on the rois both can do."""
    rng = np.random.default_rng(6)
    x = torch.from_numpy(rng.standard_normal((2, 3, 10, 12)).astype(np.float32))
    rois = torch.from_numpy(random_rois(rng, 64, 2, 10, 12, 1 / 16))
    grid, adaptive = roi_module._roi_grid(rois, 7, 7, 1 / 16, 10, 12)
    m = roi_module._MARGIN
    fits = ((grid.start_h >= -m) & (grid.start_h + grid.size_h <= 10 + m)
            & (grid.start_w >= -m) & (grid.start_w + grid.size_w <= 12 + m))
    idx = (adaptive & fits).nonzero().squeeze(1)
    assert len(idx) > 20
    padded = torch.full((2, 3, 10 + 2 * m, 12 + 2 * m), float("-inf"))
    padded[:, :, m:-m, m:-m] = x
    padded = padded.contiguous(memory_format=torch.channels_last)
    empty = (grid.he <= grid.hs)[:, :, None] | (grid.we <= grid.ws)[:, None, :]  # (R, OH, OW)
    y_crop = torch.full((64, 3, 7, 7), 99.0)
    argmax_crop = torch.full((64, 3, 7, 7), 99, dtype=torch.int32)
    roi_module._pool_crops(padded, grid, idx, empty, y_crop, argmax_crop)
    y_gather, argmax_gather = roi_module._pool_gather(padded, grid.take(idx), empty[idx], with_argmax=True)
    torch.testing.assert_close(y_crop[idx], y_gather, rtol=0, atol=0)
    torch.testing.assert_close(argmax_crop[idx], argmax_gather, rtol=0, atol=0)
    assert empty[idx].any() and (argmax_gather == -1).any()
    others = torch.ones(64, dtype=torch.bool)
    others[idx] = False
    assert (y_crop[others] == 99).all() and (argmax_crop[others] == 99).all()  # only the rows asked for


# ---------------------------------------------------------------------------------------------------------
# Half precision features: pooled in float32, returned (and differentiated) in their own dtype

HALF = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("outh, outw, spatial_scale, shape", CASES)
def test_half_forward_is_the_float32_forward_of_the_same_values(dtype, outh, outw, spatial_scale, shape,
                                                                 cpu_forward):
    """Max pooling only selects: the pooled values and argmax of a half map are exactly those of its float32
    copy (which the float32 tests check against the reference and torchvision), and come back in its dtype."""
    rng = np.random.default_rng()
    x = torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(dtype)
    x[:, :, ::2] = torch.round(x[:, :, ::2])  # ties: the first maximum wins
    rois = torch.from_numpy(random_rois(rng, 64, shape[0], shape[2], shape[3], spatial_scale))
    y32, argmax32 = roi_pool_forward_cpu(x.float(), rois, outh, outw, spatial_scale)
    y_tv32, argmax_tv32 = torchvision_roi_pool(x.float(), rois, outh, outw, spatial_scale)
    for xv in (x, x.contiguous(memory_format=torch.channels_last)):
        y, argmax = roi_pool_forward_cpu(xv, rois, outh, outw, spatial_scale)
        layout = torch.channels_last if xv is not x else torch.contiguous_format  # the map's format
        assert y.dtype == dtype and y.is_contiguous(memory_format=layout) and argmax.dtype == torch.int32
        assert torch.equal(y.float(), y32) and torch.equal(argmax, argmax32)
        assert torch.equal(y.float(), y_tv32) and torch.equal(argmax, argmax_tv32)
        assert torch.equal(roi_pool_forward_torch(xv, rois, outh, outw, spatial_scale)[0], y)
        y_only, none = roi_pool_forward_cpu(xv, rois, outh, outw, spatial_scale, with_argmax=False)
        assert none is None and torch.equal(y_only, y)
    y = roi_pooling_2d(x, rois.double(), outh, outw, spatial_scale)  # rois of any floating dtype
    assert y.dtype == dtype and torch.equal(y.float(), y32)
    assert (argmax32 == -1).any() and (argmax32 >= 0).any()


def test_float16_forward_matches_torchvision_float16(cpu_forward):
    """torchvision's CPU kernel takes float16 (not bfloat16) but computes the roi corners and bins in float16
    too, so it only agrees where float16 arithmetic gives float32's cells: the VGG head's 7 x 7 bins at 1/16
    on a small map, rois on float16 coordinates. (Elsewhere our bins are float32's, as the float32 map's:
    ``test_half_forward_is_the_float32_forward_of_the_same_values``.)"""
    outh, outw, spatial_scale, shape = CASES[0]
    # Here rois span at most 28 cells; float16 bins of 1/7 first differ from float32's at 29 (and 57, 58).
    rng = np.random.default_rng()
    x = torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).half()
    rois = torch.from_numpy(random_rois(rng, 200, shape[0], shape[2], shape[3], spatial_scale)).half()
    y, argmax = roi_pool_forward_cpu(x, rois, outh, outw, spatial_scale)
    y_tv, argmax_tv = torchvision_roi_pool(x, rois, outh, outw, spatial_scale)
    assert y_tv.dtype == torch.float16
    assert torch.equal(y, y_tv) and torch.equal(argmax, argmax_tv)
    # The gradient: torchvision's float16 backward sums in float16 (a rounding per addition: up to 5% off here
    # where 200 rois overlap), ours in float32 with one rounding at the end, so ours is torchvision's float32
    # gradient rounded to float16 (up to the float32 summation order: one float16 rounding apart).
    x_ours, x_tv = x.clone().requires_grad_(), x.float().requires_grad_()
    grad_y = torch.randn(200, shape[1], outh, outw).half()
    roi_pooling_2d(x_ours, rois, outh, outw, spatial_scale).backward(grad_y)
    torchvision.ops.roi_pool(x_tv, rois.float(), (outh, outw), spatial_scale).backward(grad_y.float())
    assert x_ours.grad.dtype == torch.float16
    torch.testing.assert_close(x_ours.grad.float(), x_tv.grad.half().float(), rtol=2**-10, atol=1e-6)
    assert (x_ours.grad != 0).sum() > 50


@pytest.mark.parametrize("dtype, coordinate", [
    (torch.float16, 2055.0),  # float16 has 2056: 2055/16 = 128.4375 -> cell 128, 2056/16 = 128.5 -> 129
    (torch.bfloat16, 1031.0),  # bfloat16 has 1032: 1031/16 = 64.4375 -> cell 64, 1032/16 = 64.5 -> 65
])
def test_half_map_pools_rois_at_float32_coordinates(dtype, coordinate, cpu_forward):
    """A roi coordinate that the half dtype cannot hold: the bins are those of the float32 map (its
    coordinates are converted to float32, not rounded to the map's dtype), whatever the rois' dtype."""
    rounded = float(torch.tensor(coordinate).to(dtype))
    assert c_round(coordinate / 16) + 1 == c_round(rounded / 16)  # rounding to the dtype would move a cell
    x = torch.arange(140.0).repeat(1, 1, 3, 1).to(dtype)  # (1, 1, 3, 140), value = column (exact up to 256)
    x.requires_grad_()
    for rois_dtype in (torch.float32, torch.float64):
        rois = torch.tensor([[0, coordinate, 0, coordinate, 40]], dtype=rois_dtype)  # one column
        assert roi_module._check_inputs(x, rois, 1, 1, 1 / 16).dtype == torch.float32
        y = roi_pooling_2d(x, rois, 2, 1, 1 / 16)
        y_float32 = roi_pooling_2d(x.detach().float(), rois, 2, 1, 1 / 16)
        assert y.dtype == dtype and torch.equal(y.float(), y_float32)
        assert y.flatten().tolist() == [c_round(coordinate / 16)] * 2
        x.grad = None
        y.sum().backward()
        assert x.grad.dtype == dtype and x.grad[0, 0, :, c_round(coordinate / 16)].sum() == 2


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("outh, outw, spatial_scale, shape", CASES)
def test_half_backward_is_the_float32_backward_rounded_once(dtype, outh, outw, spatial_scale, shape,
                                                             cpu_forward):
    """The gradient w.r.t. a half map: the float32 gradient (summed in float32) of the same values, rounded to
    the map's dtype once; against the float64 reference within that one rounding."""
    rng = np.random.default_rng()
    x = torch.from_numpy(distinct_map(rng, shape)).to(dtype)  # bfloat16 rounds some to ties: the first wins
    rois = torch.from_numpy(random_rois(rng, 80, shape[0], shape[2], shape[3], spatial_scale))
    grad_y = torch.from_numpy(rng.standard_normal((80, shape[1], outh, outw)).astype(np.float32)).to(dtype)

    x_half, x_float = x.clone().requires_grad_(), x.float().requires_grad_()
    roi_pooling_2d(x_half, rois, outh, outw, spatial_scale).backward(grad_y)
    roi_pooling_2d(x_float, rois, outh, outw, spatial_scale).backward(grad_y.float())
    assert x_half.grad.dtype == dtype and x_float.grad.dtype == torch.float32
    assert torch.equal(x_half.grad, x_float.grad.to(dtype))
    _, argmax = reference_forward(x.float().numpy(), rois.numpy(), outh, outw, spatial_scale)
    grad_ref = reference_backward(grad_y.float().numpy(), rois.numpy(), argmax, shape)
    eps = torch.finfo(dtype).eps  # one rounding of the float64 sum to the dtype: half an ulp, <= eps / 2
    np.testing.assert_allclose(x_half.grad.double().numpy(), grad_ref, rtol=eps / 2 + 1e-6, atol=1e-6)
    summed = (grad_ref != 0) & ~np.isin(grad_ref, grad_y.double().numpy())  # cells chosen by several bins
    assert summed.sum() > 5
    direct = roi_pool_backward_cpu(grad_y, rois, torch.from_numpy(argmax), shape)  # the backward alone
    assert direct.dtype == dtype and torch.equal(direct, x_float.grad.to(dtype))


def test_head_forward_under_bfloat16_autocast(cpu_forward):
    """``torch.autocast('cpu', dtype=torch.bfloat16)``: a convolution gives a bfloat16 map, RoI pooling keeps
    it, a Linear takes it; forward and backward run, and the pooled values are the float32 pooling's."""
    torch.manual_seed(0)
    conv, pool = torch.nn.Conv2d(3, 8, 3, padding=1), RoIPooling2D(7, 7, 1 / 16)
    fc = torch.nn.Linear(8 * 49, 5)
    img = torch.randn(2, 3, 9, 12)
    rois = torch.from_numpy(random_rois(np.random.default_rng(0), 16, 2, 9, 12, 1 / 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feature = conv(img)
        pooled = pool(feature, rois)
        out = fc(pooled.flatten(1))
    assert feature.dtype == pooled.dtype == out.dtype == torch.bfloat16 and out.shape == (16, 5)
    assert torch.equal(pooled.float(), roi_pooling_2d(feature.detach().float(), rois, 7, 7, 1 / 16))
    out.float().sum().backward()
    assert conv.weight.grad.dtype == torch.float32 and torch.isfinite(conv.weight.grad).all()
    assert (conv.weight.grad != 0).any()


class _PretendCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA: drives the CuPy branch of ``roi_pool_forward`` and
    ``roi_pool_backward`` without a GPU (the kernels are replaced by the CPU path in the test below)."""

    @property
    def is_cuda(self):
        return True


@pytest.mark.parametrize("dtype", HALF + [torch.float32])
def test_cuda_branch_hands_the_float32_kernels_float32_and_returns_the_maps_dtype(dtype, monkeypatch):
    """No GPU needed: the CuPy launchers are replaced by recorders that run the CPU path, so this checks what
    the CUDA branch hands them (float32, contiguous) and returns (the map's dtype), forward and backward."""
    calls = []

    def forward(x, rois, outh, outw, spatial_scale):
        calls.append(("forward", x.dtype, rois.dtype, x.is_contiguous(), rois.is_contiguous()))
        y, argmax = roi_pool_forward_cpu(x.as_subclass(torch.Tensor), rois.as_subclass(torch.Tensor), outh,
                                         outw, spatial_scale)
        assert y.dtype == torch.float32  # what the kernel writes
        return y.as_subclass(_PretendCuda), argmax.as_subclass(_PretendCuda)

    def backward(grad_y, rois, argmax, x_shape, spatial_scale):
        calls.append(("backward", grad_y.dtype, rois.dtype, grad_y.is_contiguous(), rois.is_contiguous()))
        grad_x = roi_pool_backward_cpu(grad_y.as_subclass(torch.Tensor), rois.as_subclass(torch.Tensor),
                                       argmax.as_subclass(torch.Tensor), x_shape)
        return grad_x.as_subclass(_PretendCuda)

    monkeypatch.setattr(roi_module, "cupy_available", lambda: True)
    monkeypatch.setattr(roi_module, "roi_forward_cuda", forward)
    monkeypatch.setattr(roi_module, "roi_backward_cuda", backward)
    outh, outw, spatial_scale, shape = CASES[0]
    rng = np.random.default_rng()
    x = torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(dtype)
    rois = torch.from_numpy(random_rois(rng, 30, shape[0], shape[2], shape[3], spatial_scale))
    grad_y = torch.randn(30, shape[1], outh, outw).to(dtype)
    x_fake = x.transpose(2, 3).contiguous().transpose(2, 3).as_subclass(_PretendCuda).requires_grad_()
    assert x_fake.is_cuda and not x_fake.is_contiguous()
    y = roi_pooling_2d(x_fake, rois.double().as_subclass(_PretendCuda), outh, outw, spatial_scale)
    y.backward(grad_y.as_subclass(_PretendCuda))
    assert calls == [("forward", torch.float32, torch.float32, True, True),
                     ("backward", torch.float32, torch.float32, True, True)]
    y_cpu, argmax_cpu = roi_pool_forward_cpu(x, rois, outh, outw, spatial_scale)
    assert y.dtype == dtype and torch.equal(y.as_subclass(torch.Tensor), y_cpu)
    grad_cpu = roi_pool_backward_cpu(grad_y, rois, argmax_cpu, shape)
    assert x_fake.grad.dtype == dtype and torch.equal(x_fake.grad.as_subclass(torch.Tensor), grad_cpu)
    with pytest.raises(TypeError, match="CUDA kernels take float32"):
        roi_pooling_2d(x.double().as_subclass(_PretendCuda), rois.double().as_subclass(_PretendCuda), outh,
                       outw, spatial_scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF)
def test_half_on_device_matches_cpu_path(device, dtype):
    """``cuda``: the float32 CuPy kernels behind half maps (converted on the way in and out) against the CPU
    path; ``cpu``: the public entries."""
    outh, outw, spatial_scale, shape = CASES[0]
    rng = np.random.default_rng(8)
    x = torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(dtype)
    rois = torch.from_numpy(random_rois(rng, 40, shape[0], shape[2], shape[3], spatial_scale))
    grad_y = torch.randn(40, shape[1], outh, outw).to(dtype)
    y_cpu, argmax_cpu = roi_pool_forward_cpu(x, rois, outh, outw, spatial_scale)
    grad_cpu = roi_pool_backward_cpu(grad_y, rois, argmax_cpu, tuple(x.shape))

    y, argmax = roi_pool_forward(x.to(device), rois.to(device), outh, outw, spatial_scale)
    assert y.device.type == device and y.dtype == dtype
    assert torch.equal(y.cpu(), y_cpu) and torch.equal(argmax.cpu(), argmax_cpu)
    xd = x.to(device).requires_grad_()
    roi_pooling_2d(xd, rois.to(device), outh, outw, spatial_scale).backward(grad_y.to(device))
    assert xd.grad.device.type == device and xd.grad.dtype == dtype
    torch.testing.assert_close(xd.grad.cpu().float(), grad_cpu.float(), rtol=1e-6, atol=1e-6)


def test_module(cpu_forward):
    pool = RoIPooling2D(7, 7, 1 / 16)
    assert "outh=7" in repr(pool)
    x = torch.randn(1, 2, 6, 6)
    rois = torch.tensor([[0, 0.0, 0.0, 80.0, 90.0]], dtype=torch.float64)  # converted to x's dtype
    y = pool(x, rois)
    torch.testing.assert_close(y, torchvision.ops.roi_pool(x, rois.float(), 7, 1 / 16), rtol=0, atol=0)


@pytest.mark.parametrize("args, error, match", [
    ((torch.randn(2, 3, 4), torch.zeros(1, 5)), ValueError, r"x must be \(N, C, H, W\)"),
    ((torch.randn(1, 3, 4, 4), torch.zeros(1, 4)), ValueError, "prepend the batch index"),
    ((torch.randn(1, 3, 4, 4), torch.zeros(5)), ValueError, r"rois must be \(R, 5\)"),
    ((torch.zeros(1, 3, 4, 4, dtype=torch.int32), torch.zeros(1, 5)), TypeError,
     "float16, bfloat16, float32 or float64"),
    ((torch.randn(1, 3, 4, 4), torch.zeros(1, 5, dtype=torch.int64)), TypeError, "floating"),
    ((torch.randn(1, 3, 4, 4), torch.tensor([[1.0, 0, 0, 5, 5]])), ValueError, r"integer in \[0, 1\)"),
    ((torch.randn(2, 3, 4, 4), torch.tensor([[0.5, 0, 0, 5, 5]])), ValueError, "roi 0"),
    ((torch.randn(2, 3, 4, 4), torch.tensor([[0, 0, 0, 5, 5], [0, 0, float("nan"), 5, 5]])), ValueError,
     "roi 1 .* finite"),
    ((np.zeros((1, 3, 4, 4)), torch.zeros(1, 5)), TypeError, "torch tensors"),
])
def test_bad_inputs_raise_clear_errors(args, error, match):
    with pytest.raises(error, match=match):
        roi_pooling_2d(*args, 7, 7, 1 / 16)


@pytest.mark.parametrize("outh, outw, scale, match", [
    (0, 7, 1 / 16, "outh must be a positive integer"),
    (7, 2.5, 1 / 16, "outw must be a positive integer"),
    (7, 7, 0.0, "spatial_scale must be positive"),
    (7, 7, float("inf"), "spatial_scale must be positive"),
])
def test_bad_geometry_raises(outh, outw, scale, match):
    with pytest.raises(ValueError, match=match):
        RoIPooling2D(outh, outw, scale)


def test_rois_on_another_device_raise():
    if not torch.cuda.is_available():
        pytest.skip("needs a second device")
    with pytest.raises(ValueError, match="rois on cuda"):
        roi_pooling_2d(torch.randn(1, 1, 4, 4), torch.zeros(1, 5, device="cuda"), 2, 2, 1.0)


# ---------------------------------------------------------------------------------------------------------
# The CUDA kernels: launch geometry, compilation, and (with a GPU) the CuPy path against the CPU path


def test_launch_config():
    assert roi_launch_config(0) == ((1, 1, 1), (THREADS_PER_BLOCK, 1, 1))
    assert roi_launch_config(1) == ((1, 1, 1), (1024, 1, 1))
    assert roi_launch_config(1024)[0] == (1, 1, 1) and roi_launch_config(1025)[0] == (2, 1, 1)
    n = 128 * 512 * 49
    (grid, _, _), (block, _, _) = roi_launch_config(n)
    assert grid * block >= n > (grid - 1) * block
    assert roi_launch_config(2**31 - 2**27)[0] == (MAX_BLOCKS, 1, 1)  # the grid-stride loop covers the rest
    with pytest.raises(ValueError, match="n_threads"):
        roi_launch_config(-1)
    with pytest.raises(ValueError, match="n_threads"):
        roi_launch_config(2**31)


@pytest.mark.parametrize("source, name", [(kernel_forward, "roi_forward"), (kernel_backward, "roi_backward")])
def test_kernel_compiles_with_nvcc(tmp_path, source, name):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    assert f'extern "C" __global__ void {name}(' in source
    src = tmp_path / f"{name}.cu"
    src.write_text(source)
    out = subprocess.run([nvcc, "-cubin", "-arch=sm_80", "-o", str(tmp_path / f"{name}.cubin"), str(src)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / f"{name}.cubin").stat().st_size > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("outh, outw, spatial_scale, shape", CASES)
def test_device_matches_cpu_path(device, outh, outw, spatial_scale, shape):
    """``cuda``: the CuPy kernels against the CPU path; ``cpu``: the public entry against the CPU path."""
    rng = np.random.default_rng(7)
    x = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
    rois = torch.from_numpy(random_rois(rng, 40, shape[0], shape[2], shape[3], spatial_scale))
    grad_y = torch.randn(40, shape[1], outh, outw)
    y_cpu, argmax_cpu = roi_pool_forward_cpu(x, rois, outh, outw, spatial_scale)
    grad_cpu = roi_pool_backward_cpu(grad_y, rois, argmax_cpu, tuple(x.shape))

    y, argmax = roi_pool_forward(x.to(device), rois.to(device), outh, outw, spatial_scale)
    assert y.device.type == device and y.is_contiguous()
    torch.testing.assert_close(y.cpu(), y_cpu, rtol=0, atol=0)
    torch.testing.assert_close(argmax.cpu(), argmax_cpu, rtol=0, atol=0)
    xd = x.to(device).requires_grad_()
    roi_pooling_2d(xd, rois.to(device), outh, outw, spatial_scale).backward(grad_y.to(device))
    assert xd.grad.device.type == device
    torch.testing.assert_close(xd.grad.cpu(), grad_cpu, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda)])
def test_cuda_rejects_float64(device):
    with pytest.raises(TypeError, match="CUDA kernels take float32"):
        roi_pooling_2d(torch.zeros(1, 1, 4, 4, dtype=torch.float64, device=device),
                       torch.zeros(1, 5, dtype=torch.float64, device=device), 2, 2, 1.0)


def test_cuda_tensor_without_cupy_falls_back_to_the_cpu(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    monkeypatch.setattr(roi_module, "cupy_available", lambda: False)
    x = torch.randn(1, 2, 6, 6, device="cuda", requires_grad=True)
    rois = torch.tensor([[0, 0.0, 0.0, 80.0, 90.0]], device="cuda")
    with pytest.warns(UserWarning, match="CPU copy"):
        y = roi_pooling_2d(x, rois, 3, 3, 1 / 16)
    assert y.device == x.device
    torch.testing.assert_close(y.cpu(), roi_pooling_2d(x.detach().cpu(), rois.cpu(), 3, 3, 1 / 16))
    y.sum().backward()
    assert x.grad.device == x.device
