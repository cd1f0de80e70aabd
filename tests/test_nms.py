"""non_maximum_suppression against a slow reference, torchvision.ops.nms and hand-worked cases; its CPU paths
(Cython, numpy), mask post-processings (Cython, Python) and CUDA path against each other; the kernel compiles.

Semantics under test (model/utils/nms/non_maximum_suppression.py): rank by score (stable, ties keep the lower
index first) or by input order, keep a box unless a kept box has IoU >= thresh, IoU in float32 without "+1".
"""

import importlib
import json
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from model.utils.cupy_utils import cupy, cupy_available
from model.utils.nms import non_maximum_suppression
from model.utils.nms._nms_cpu_py import _nms_cpu as nms_cpu_numpy
from model.utils.nms._nms_gpu_post_py import _nms_gpu_post as nms_gpu_post_python

nms_module = importlib.import_module("model.utils.nms.non_maximum_suppression")
NMS_DIR = Path(nms_module.__file__).parent
REPO_ROOT = NMS_DIR.parents[2]

cuda = pytest.mark.skipif(not cupy_available(), reason="needs CuPy and a CUDA GPU")


@pytest.fixture(scope="module")
def cython_nms():
    """The built Cython extensions, building them in place first if needed (as ./setup.sh does)."""
    try:
        cpu = importlib.import_module("model.utils.nms._nms_cpu")
        post = importlib.import_module("model.utils.nms._nms_gpu_post")
    except ImportError:
        pytest.importorskip("Cython", reason="Cython is not installed: the extensions cannot be built")
        subprocess.run([sys.executable, "build.py", "build_ext", "--inplace"], cwd=NMS_DIR.parent, check=True,
                       capture_output=True)
        importlib.invalidate_caches()
        cpu = importlib.import_module("model.utils.nms._nms_cpu")
        post = importlib.import_module("model.utils.nms._nms_gpu_post")
    return types.SimpleNamespace(nms_cpu=cpu._nms_cpu, nms_gpu_post=post._nms_gpu_post)


# ---------------------------------------------------------------------------------------------------------
# inputs and references


def random_bbox(rng, n, height=600.0, width=800.0):
    """``(n, 4)`` float32 ``(y_min, x_min, y_max, x_max)``: centres in the image, sides 8..400 px,
    log-uniform, so many pairs overlap at every IoU level."""
    ctr = rng.uniform((0, 0), (height, width), (n, 2))
    size = np.exp(rng.uniform(np.log(8), np.log(400), (n, 2)))
    return np.concatenate((ctr - size / 2, ctr + size / 2), axis=1).astype(np.float32)


def rpn_like_bbox(rng, n, height=600, width=800, stride=16):
    """``(n, 4)`` float32 proposals as the proposal layer makes them: the 9 anchors on a stride-16 grid, moved
    by random offsets, clipped to the image (so many share exact integer edges), the first ``n`` in random
    order."""
    from model.utils.bbox_tools import generate_anchor_base, loc2bbox

    shift_y, shift_x = np.meshgrid(np.arange(0, height, stride), np.arange(0, width, stride), indexing="ij")
    shift = np.stack((shift_y.ravel(), shift_x.ravel()) * 2, axis=1)  # (H*W, 4)
    anchor = (shift[:, None, :] + generate_anchor_base()[None]).reshape(-1, 4)  # (H*W, 9, 4) -> (H*W*9, 4)
    anchor = anchor.astype(np.float32)
    bbox = loc2bbox(anchor, rng.normal(0, 0.2, anchor.shape).astype(np.float32))
    bbox[:, 0::2] = np.clip(bbox[:, 0::2], 0, height)
    bbox[:, 1::2] = np.clip(bbox[:, 1::2], 0, width)
    return bbox[rng.permutation(len(bbox))[:n]]


def iou_float32(bbox_a, bbox_b):
    """``(A, 4), (B, 4) -> (A, B)`` IoU in float32, the kernel's operations in the kernel's order."""
    a, b = bbox_a[:, None, :].astype(np.float32), bbox_b[None, :, :].astype(np.float32)
    height = np.maximum(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), np.float32(0))
    width = np.maximum(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), np.float32(0))
    inter = height * width
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    with np.errstate(divide="ignore", invalid="ignore"):
        return inter / (area_a + area_b - inter)


def nms_reference(bbox, thresh, score=None):
    """Greedy NMS, one candidate at a time: best first (Python's sort is stable, so equal scores keep input
    order), kept unless its IoU with a kept box is >= thresh (both float32)."""
    bbox = np.asarray(bbox, dtype=np.float32)
    order = range(len(bbox)) if score is None else sorted(range(len(bbox)), key=lambda i: -score[i])
    thresh = np.float32(thresh)
    keep = []
    kept_bbox = np.empty_like(bbox)  # kept_bbox[:len(keep)] = bbox[keep]
    for i in order:
        if not (iou_float32(bbox[i:i + 1], kept_bbox[:len(keep)]) >= thresh).any():
            kept_bbox[len(keep)] = bbox[i]
            keep.append(i)
    return np.array(keep, dtype=np.int32)


def kernel_mask_reference(sorted_bbox, thresh):
    """The ``(R * B,)`` uint64 words ``nms_kernel`` writes, built from the float32 IoU matrix: bit ``k`` of
    word ``(i, c)`` set when box ``j = 64 c + k`` comes after box ``i`` and their IoU is >= thresh."""
    n = len(sorted_bbox)
    col_blocks = -(-n // 64)
    hit = np.zeros((n, col_blocks * 64), dtype=bool)
    hit[:, :n] = np.triu(iou_float32(sorted_bbox, sorted_bbox) >= np.float32(thresh), k=1)
    words = np.packbits(hit, axis=1, bitorder="little").view("<u8")  # (R, B), bit k of a word = column 64c+k
    return np.ascontiguousarray(words.astype(np.uint64)).ravel(), col_blocks


def to_xyxy(bbox):
    """``(y_min, x_min, y_max, x_max)`` numpy -> ``(x_min, y_min, x_max, y_max)`` tensor for torchvision."""
    return torch.from_numpy(np.ascontiguousarray(bbox[:, [1, 0, 3, 2]]))


# ---------------------------------------------------------------------------------------------------------
# the public function on the CPU path


@pytest.mark.parametrize("n", [0, 1, 2000, 12000])
@pytest.mark.parametrize("with_score", [True, False], ids=["score", "no_score"])
def test_matches_reference(n, with_score):
    rng = np.random.default_rng(n)
    bbox = random_bbox(rng, n)
    score = rng.random(n).astype(np.float32) if with_score else None
    keep = non_maximum_suppression(bbox, 0.7, score)
    assert isinstance(keep, np.ndarray) and keep.dtype == np.int32 and keep.ndim == 1
    np.testing.assert_array_equal(keep, nms_reference(bbox, 0.7, score))
    if n > 1:
        assert 0 < len(keep) < n  # the scene really suppresses


@pytest.mark.parametrize("thresh", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_matches_reference_across_thresholds(thresh):
    rng = np.random.default_rng(7)
    bbox = rpn_like_bbox(rng, 2000)
    bbox[10:20] = bbox[:10]  # identical pairs: IoU exactly 1, suppressed even at thresh 1
    score = rng.random(2000).astype(np.float32)
    keep = non_maximum_suppression(bbox, thresh, score)
    np.testing.assert_array_equal(keep, nms_reference(bbox, thresh, score))
    if thresh == 0.0:  # IoU >= 0 holds for every pair: only the best box survives
        np.testing.assert_array_equal(keep, [np.argmax(score)])


@pytest.mark.parametrize("n", [0, 1, 2000, 12000])
def test_matches_torchvision(n):
    """torchvision suppresses at IoU > t (IoU float32, t double); we at IoU >= float32(t). For float32 IoUs
    the two rules coincide when torchvision gets the largest double below float32(t), whatever the boxes."""
    rng = np.random.default_rng(100 + n)
    bbox = rpn_like_bbox(rng, n) if n > 2000 else random_bbox(rng, n)
    score = rng.permutation(n).astype(np.float32)  # no ties (torchvision orders them its own way)
    for thresh in (0.7, 0.5, 0.3):
        tv_thresh = np.nextafter(np.float64(np.float32(thresh)), -np.inf)
        expected = torchvision.ops.nms(to_xyxy(bbox), torch.from_numpy(score), tv_thresh).numpy()
        np.testing.assert_array_equal(non_maximum_suppression(bbox, thresh, score), expected)


def test_matches_torchvision_at_the_same_threshold_when_no_iou_equals_it():
    rng = np.random.default_rng(3)
    bbox = random_bbox(rng, 2000)
    score = rng.random(2000).astype(np.float32)
    for thresh in (0.7, 0.5):
        assert not (iou_float32(bbox, bbox) == np.float32(thresh)).any()  # precondition of the comparison
        expected = torchvision.ops.nms(to_xyxy(bbox), torch.from_numpy(score), thresh).numpy()
        np.testing.assert_array_equal(non_maximum_suppression(bbox, thresh, score), expected)


@pytest.mark.parametrize("second, iou", [
    ([0, 0, 10, 5], 0.5),     # half of the first box: 50 / 100
    ([0, 0, 10, 7.5], 0.75),  # 75 / 100
    ([0, 0, 5, 5], 0.25),     # 25 / 100
    ([0, 0, 10, 7], 0.7),     # 70 / 100 rounds to float32(0.7), the threshold the kernel is given
])
def test_iou_exactly_at_threshold_is_suppressed(second, iou):
    bbox = np.array([[0, 0, 10, 10], second, [20, 20, 30, 30]], dtype=np.float32)
    assert iou_float32(bbox[:1], bbox[1:2])[0, 0] == np.float32(iou)
    np.testing.assert_array_equal(non_maximum_suppression(bbox, iou), [0, 2])  # >=: suppressed
    np.testing.assert_array_equal(non_maximum_suppression(bbox, np.nextafter(np.float32(iou), 1)), [0, 1, 2])
    np.testing.assert_array_equal(  # torchvision's strict > keeps it
        torchvision.ops.nms(to_xyxy(bbox), torch.tensor([3.0, 2.0, 1.0]), iou).numpy(), [0, 1, 2])
    keep = non_maximum_suppression(torch.from_numpy(bbox), iou, torch.tensor([1.0, 2.0, 0.0]))
    assert keep.tolist() == [1, 2]  # ranked first, the second box suppresses the first


def test_limit():
    rng = np.random.default_rng(4)
    bbox, score = random_bbox(rng, 2000), rng.random(2000)
    full = non_maximum_suppression(bbox, 0.7, score)
    assert len(full) > 10
    for limit in (0, 1, 10, len(full), len(full) + 1, 5000):
        keep = non_maximum_suppression(bbox, 0.7, score, limit=limit)
        assert keep.dtype == np.int32
        np.testing.assert_array_equal(keep, full[:limit])
    with pytest.raises(ValueError, match="limit"):
        non_maximum_suppression(bbox, 0.7, score, limit=-1)


def test_score_none_ranks_by_input_order():
    rng = np.random.default_rng(5)
    bbox = random_bbox(rng, 500)
    keep = non_maximum_suppression(bbox, 0.5)
    np.testing.assert_array_equal(keep, nms_reference(bbox, 0.5))
    np.testing.assert_array_equal(keep, non_maximum_suppression(bbox, 0.5, np.arange(500, 0, -1)))
    assert np.all(np.diff(keep) > 0)  # best first = input order
    # reversing the input reverses the priorities
    np.testing.assert_array_equal(non_maximum_suppression(bbox[::-1], 0.5),
                                  499 - nms_reference(bbox, 0.5, np.arange(500)))


def test_equal_scores_keep_the_lower_index_first():
    same = np.tile(np.array([[0, 0, 10, 10]], np.float32), (5, 1))
    np.testing.assert_array_equal(non_maximum_suppression(same, 0.5, np.ones(5)), [0])
    apart = np.array([[0, 0, 1, 1], [0, 10, 1, 11], [0, 20, 1, 21], [0, 30, 1, 31]], np.float32)
    np.testing.assert_array_equal(non_maximum_suppression(apart, 0.5, [1, 2, 1, 2]), [1, 3, 0, 2])
    assert non_maximum_suppression(torch.from_numpy(apart), 0.5, torch.tensor([1, 2, 1, 2])).tolist() == \
        [1, 3, 0, 2]
    rng = np.random.default_rng(6)
    bbox = random_bbox(rng, 2000)
    score = rng.integers(0, 4, 2000).astype(np.float32)  # four score levels: ties everywhere
    np.testing.assert_array_equal(non_maximum_suppression(bbox, 0.6, score), nms_reference(bbox, 0.6, score))


def test_torch_tensors_in_and_out():
    rng = np.random.default_rng(8)
    bbox, score = random_bbox(rng, 300), rng.random(300).astype(np.float32)
    expected = non_maximum_suppression(bbox, 0.7, score)
    wide = torch.from_numpy(np.concatenate((bbox, bbox), axis=1)).requires_grad_()  # (R, 8)
    for tensor in (torch.from_numpy(bbox), torch.from_numpy(bbox).double(), wide[:, :4]):
        keep = non_maximum_suppression(tensor, 0.7, torch.from_numpy(score))
        assert isinstance(keep, torch.Tensor) and keep.dtype == torch.int64 and keep.device == tensor.device
        np.testing.assert_array_equal(keep.numpy(), expected)
    keep = non_maximum_suppression(torch.from_numpy(bbox), 0.7, score, limit=3)  # numpy score with a tensor
    np.testing.assert_array_equal(keep.numpy(), expected[:3])
    empty = non_maximum_suppression(torch.zeros(0, 4), 0.7, torch.zeros(0))
    assert empty.dtype == torch.int64 and empty.shape == (0,)


def test_array_inputs_of_other_layouts_and_dtypes():
    rng = np.random.default_rng(9)
    bbox, score = random_bbox(rng, 300), rng.random(300)
    expected = nms_reference(bbox, 0.7, score)
    strided = np.repeat(bbox, 2, axis=1)[:, ::2]  # (R, 4) view with a column stride of 2
    assert np.array_equal(strided, bbox) and not strided.flags.c_contiguous
    for array in (np.asfortranarray(bbox), strided, bbox.astype(np.float64), bbox.tolist()):
        np.testing.assert_array_equal(non_maximum_suppression(array, 0.7, score), expected)
    empty = non_maximum_suppression(np.zeros((0, 4), np.float32), 0.7)
    assert empty.dtype == np.int32 and empty.shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_boxes_and_scores(dtype):
    """float16 / bfloat16 tensors (numpy has no bfloat16) are ranked and compared in float32, which holds
    their values exactly: the float32 reference on the same values. bfloat16 scores tie often (8 bits):
    ties keep the lower index first."""
    rng = np.random.default_rng()
    bbox = torch.from_numpy(rpn_like_bbox(rng, 600)).to(dtype)
    score = torch.from_numpy(rng.random(600).astype(np.float32)).to(dtype)
    bbox32, score32 = bbox.float().numpy(), score.float().numpy()
    assert len(np.unique(score32)) < 600  # ties
    for thresh in (0.3, 0.7):
        expected = nms_reference(bbox32, thresh, score32)
        assert 10 < len(expected) < 600
        for b, s in ((bbox, score), (bbox.requires_grad_(), score.float()), (bbox, score32)):
            keep = non_maximum_suppression(b, thresh, s)
            assert keep.dtype == torch.int64
            np.testing.assert_array_equal(keep.numpy(), expected)
        keep = non_maximum_suppression(bbox, thresh)  # input order
        np.testing.assert_array_equal(keep.numpy(), nms_reference(bbox32, thresh))
    if dtype == torch.float16:  # numpy float16 arrays too
        keep = non_maximum_suppression(bbox.detach().numpy(), 0.7, score.numpy())
        np.testing.assert_array_equal(keep, nms_reference(bbox32, 0.7, score32))


@pytest.mark.parametrize("make", [np.zeros, torch.zeros], ids=["numpy", "torch"])
def test_bad_shapes_are_named(make):
    for shape in ((5, 3), (4,), (2, 4, 1)):
        with pytest.raises(ValueError, match=re.escape(f"bbox must have shape (R, 4), got {shape}")):
            non_maximum_suppression(make(shape), 0.7)
    with pytest.raises(ValueError, match=r"score must have shape \(5,\)"):
        non_maximum_suppression(make((5, 4)), 0.7, make((4,)))


def test_launch_config():
    assert nms_module.nms_launch_config(1) == ((1, 1, 1), (64, 1, 1))
    assert nms_module.nms_launch_config(64) == ((1, 1, 1), (64, 1, 1))
    assert nms_module.nms_launch_config(65) == ((2, 2, 1), (64, 1, 1))
    assert nms_module.nms_launch_config(12000) == ((188, 188, 1), (64, 1, 1))
    with pytest.raises(ValueError, match="n_bbox"):
        nms_module.nms_launch_config(0)


# ---------------------------------------------------------------------------------------------------------
# the implementations behind it, against each other


@pytest.mark.parametrize("n", [0, 1, 63, 64, 65, 2000, 12000])
def test_cython_and_numpy_cpu_paths_agree(cython_nms, n):
    rng = np.random.default_rng(200 + n)
    for bbox in (random_bbox(rng, n), rpn_like_bbox(rng, n)):
        for thresh in (0.7, 0.3):
            full = cython_nms.nms_cpu(bbox, thresh, n)
            assert full.dtype == np.int32
            np.testing.assert_array_equal(nms_cpu_numpy(bbox, thresh, n), full)
            for limit in sorted({0, 1, n // 3, len(full)}):
                np.testing.assert_array_equal(cython_nms.nms_cpu(bbox, thresh, limit), full[:limit])
                np.testing.assert_array_equal(nms_cpu_numpy(bbox, thresh, limit), full[:limit])


def gpu_post_reference(mask, n_bbox, col_blocks):
    """Box i is kept unless a kept box k < i has bit i set in its row."""
    rows = mask.reshape(n_bbox, col_blocks)
    keep = []
    for i in range(n_bbox):
        if not any((int(rows[k, i // 64]) >> (i % 64)) & 1 for k in keep):
            keep.append(i)
    return keep


@pytest.mark.parametrize("n", [1, 63, 64, 65, 300])
def test_mask_post_processings_agree_on_random_masks(cython_nms, n):
    rng = np.random.default_rng(300 + n)
    col_blocks = -(-n // 64)
    for density in (1, 3, 6):  # AND of `density` random words: about 1/2, 1/8, 1/64 of the bits set
        words = rng.integers(0, 2**64, (density, n * col_blocks), dtype=np.uint64)
        mask = np.bitwise_and.reduce(words, axis=0)
        sel_py, n_py = nms_gpu_post_python(mask, n, 64, col_blocks)
        sel_cy, n_cy = cython_nms.nms_gpu_post(mask, n, 64, col_blocks)
        assert sel_py.dtype == sel_cy.dtype == np.int32 and n_py == n_cy
        np.testing.assert_array_equal(sel_py, sel_cy)
        np.testing.assert_array_equal(sel_cy[:n_cy], gpu_post_reference(mask, n, col_blocks))


@pytest.mark.parametrize("n", [1, 63, 64, 65, 2000])
def test_kernel_mask_and_post_processing_select_what_the_cpu_path_selects(cython_nms, n):
    """The GPU algorithm with the kernel's mask emulated in numpy: same boxes as the CPU paths."""
    rng = np.random.default_rng(400 + n)
    bbox = rpn_like_bbox(rng, n)
    mask, col_blocks = kernel_mask_reference(bbox, 0.7)
    for post in (cython_nms.nms_gpu_post, nms_gpu_post_python):
        selection, n_selection = post(mask, n, 64, col_blocks)
        np.testing.assert_array_equal(selection[:n_selection], cython_nms.nms_cpu(bbox, 0.7, n))
        np.testing.assert_array_equal(selection[:n_selection], nms_reference(bbox, 0.7))


def test_fallback_warns_once_in_one_line_and_selects_the_same():
    """With the extensions made unimportable, the fallback is used and one warning names the build command."""
    code = (
        "import sys, warnings, numpy as np\n"
        "sys.modules['model.utils.nms._nms_cpu'] = None\n"
        "sys.modules['model.utils.nms._nms_gpu_post'] = None\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    from model.utils.nms import non_maximum_suppression\n"
        "    m = sys.modules['model.utils.nms.non_maximum_suppression']\n"
        "    assert m._nms_cpu.__module__ == 'model.utils.nms._nms_cpu_py', m._nms_cpu.__module__\n"
        "    rng = np.random.default_rng(0)\n"
        "    bbox = np.sort(rng.uniform(0, 100, (200, 4)).astype(np.float32).reshape(200, 2, 2), axis=1)\n"
        "    print(non_maximum_suppression(bbox.transpose(0, 2, 1).reshape(200, 4), 0.3).tolist())\n"
        "msgs = [str(w.message) for w in caught if 'model/utils/nms' in str(w.message)]\n"
        "assert len(msgs) == 1 and '\\n' not in msgs[0], msgs\n"
        "print(msgs[0])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    keep_line, message = out.stdout.strip().splitlines()
    assert "cd model/utils && python build.py build_ext --inplace" in message
    rng = np.random.default_rng(0)
    bbox = np.sort(rng.uniform(0, 100, (200, 4)).astype(np.float32).reshape(200, 2, 2), axis=1)
    bbox = bbox.transpose(0, 2, 1).reshape(200, 4)
    assert json.loads(keep_line) == nms_reference(bbox, 0.3).tolist()


# ---------------------------------------------------------------------------------------------------------
# the CUDA kernel


def test_kernel_source_compiles_with_nvcc_without_fma(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    source = tmp_path / "nms_kernel.cu"
    source.write_text(nms_module.NMS_KERNEL_SOURCE)
    for kind in ("-cubin", "-ptx"):
        out = tmp_path / f"nms_kernel{kind.replace('-', '.')}"
        result = subprocess.run([nvcc, kind, "-arch=sm_80", *nms_module.NMS_COMPILE_OPTIONS, str(source),
                                 "-o", str(out)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    ptx = (tmp_path / "nms_kernel.ptx").read_text()
    assert ".entry nms_kernel(" in ptx  # extern "C": the name CuPy looks up is not mangled
    assert "fma.rn.f32" not in ptx  # IoU must round like the CPU path's


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["torch", "cupy"])
@pytest.mark.parametrize("n", [1, 63, 64, 65, 2000, 12000])
def test_cuda_path_selects_what_the_cpu_path_selects(kind, n):
    rng = np.random.default_rng(500 + n)
    bbox = rpn_like_bbox(rng, n)
    score = rng.integers(0, 50, n).astype(np.float32)  # with ties
    as_device = {"torch": lambda a: torch.from_numpy(a).cuda(), "cupy": cupy.asarray}[kind]
    for sc, limit in ((None, None), (score, None), (score, n // 4)):
        expected = non_maximum_suppression(bbox, 0.7, sc, limit)
        keep = non_maximum_suppression(as_device(bbox), 0.7, None if sc is None else as_device(sc), limit)
        if kind == "torch":
            assert keep.is_cuda and keep.dtype == torch.int64
            keep = keep.cpu().numpy()
        else:
            assert isinstance(keep, cupy.ndarray) and keep.dtype == np.int32
            keep = cupy.asnumpy(keep)
        np.testing.assert_array_equal(keep, expected)


@cuda
@pytest.mark.cuda
def test_cuda_path_at_threshold_empty_and_on_a_side_stream():
    bbox = np.array([[0, 0, 10, 10], [0, 0, 10, 7], [20, 20, 30, 30]], dtype=np.float32)
    assert non_maximum_suppression(torch.from_numpy(bbox).cuda(), 0.7).tolist() == [0, 2]
    empty = non_maximum_suppression(torch.zeros(0, 4, device="cuda"), 0.7)
    assert empty.is_cuda and empty.shape == (0,)
    rng = np.random.default_rng(11)
    boxes = rpn_like_bbox(rng, 3000)
    expected = non_maximum_suppression(boxes, 0.7)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):  # inputs made and consumed on a non-default stream
        keep = non_maximum_suppression(torch.from_numpy(boxes).cuda() * 1.0, 0.7)
        np.testing.assert_array_equal(keep.cpu().numpy(), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.cuda
def test_cuda_tensor_without_cupy_takes_the_cpu_path(monkeypatch):
    monkeypatch.setattr(nms_module, "cupy_available", lambda: False)
    rng = np.random.default_rng(12)
    bbox, score = random_bbox(rng, 500), rng.random(500).astype(np.float32)
    keep = non_maximum_suppression(torch.from_numpy(bbox).cuda(), 0.7, torch.from_numpy(score).cuda())
    assert keep.is_cuda and keep.dtype == torch.int64
    np.testing.assert_array_equal(keep.cpu().numpy(), nms_reference(bbox, 0.7, score))


# ---------------------------------------------------------------------------------------------------------
# the CPU path compares a candidate only with kept boxes of a similar area (model/utils/nms/_nms_cpu.pyx):
# boxes of extreme and degenerate areas, at thresholds around where that bound is used


@pytest.mark.parametrize("thresh", [0.7, 0.3, 1.0, 0.0, 1e-31, 1e-29])
def test_cpu_path_on_extreme_and_degenerate_areas(thresh):
    rng = np.random.default_rng(13)
    bbox = random_bbox(rng, 600)
    kind = rng.integers(0, 6, len(bbox))
    bbox[kind == 1, 2] = bbox[kind == 1, 0]  # zero height
    bbox[kind == 2] = bbox[kind == 2][:, [2, 3, 0, 1]]  # both sides inverted: a positive area, no overlap
    bbox[kind == 3] *= np.float32(1e30)  # areas overflow to inf
    bbox[kind == 4] *= np.float32(1e-20)  # subnormal areas
    score = rng.random(len(bbox)).astype(np.float32)
    with np.errstate(over="ignore"):
        expected = nms_reference(bbox, thresh, score)
        np.testing.assert_array_equal(non_maximum_suppression(bbox, thresh, score), expected)
        np.testing.assert_array_equal(non_maximum_suppression(bbox, thresh, score, limit=40), expected[:40])


def test_cpu_path_area_bound_on_nested_boxes_at_the_threshold():
    # Nested boxes: the IoU is the ratio of the areas, exactly 0.7 (suppressed) or one float32 step below.
    outer = [0, 0, 10, 10]
    at, below = [0, 0, 7, 10], [0, 0, np.nextafter(np.float32(7), np.float32(0)), 10]
    for inner, expected in ((at, [0]), (below, [0, 1])):
        for bbox in (np.array([outer, inner], np.float32), np.array([inner, outer], np.float32)):
            assert non_maximum_suppression(bbox, 0.7).tolist() == expected
