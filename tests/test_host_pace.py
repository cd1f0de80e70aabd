"""The host-side speed-ups change no result: the proposal ranking, the CPU NMS, the box coder, the matching
and the two target creators against references that restate the algorithms they replaced (written here, not
imported), compared bit for bit on fresh random inputs with tied scores, IoUs exactly at the threshold,
degenerate boxes and non-finite values. The target creators must also draw the same random numbers.
"""

import importlib

import numpy as np
import pytest
import torch

from model.region_proposal_network import _enumerate_shifted_anchor
from model.utils.bbox_tools import bbox2loc, bbox_iou, generate_anchor_base, loc2bbox
from model.utils.creator_tool import AnchorTargetCreator, ProposalCreator, ProposalTargetCreator
from model.utils.nms import non_maximum_suppression
from model.utils.proposal_creator import _rank
from model.utils.target_helpers import decode_loc, encode_loc, match_to_gt, sample_balanced

try:
    nms_cpu_cython = importlib.import_module("model.utils.nms._nms_cpu")._nms_cpu
except ImportError:  # the extension is not built; tests/test_nms.py builds it
    nms_cpu_cython = None
needs_cython = pytest.mark.skipif(nms_cpu_cython is None, reason="the Cython NMS extension is not built")


def same_bits(a, b) -> bool:
    """Equal shapes, dtypes and bytes (so -0.0 differs from 0.0 and NaNs must match bit for bit)."""
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


# -------------------------------------------------------------------------------------------- references


def rank_reference(score, index, n):
    """The replaced ranking: a stable descending argsort of the candidates' scores, the first ``n``."""
    order = index[np.argsort(-score[index], kind="stable")]
    return order[:n] if n > 0 else order


def _max(a, b):
    """``a if a > b else b`` elementwise (the Cython path's max; the CUDA fmaxf on non-NaN values)."""
    return np.where(a > b, a, b)


def _min(a, b):
    return np.where(a < b, a, b)


def nms_forward_reference(bbox, thresh, limit):
    """The replaced Cython loop in numpy: going down the boxes, each kept box marks every later box whose IoU
    with it is >= thresh, the kernel's float32 operations in the kernel's order (the kept box first)."""
    bbox = np.asarray(bbox, dtype=np.float32)
    y_min, x_min, y_max, x_max = (np.ascontiguousarray(bbox[:, k]) for k in range(4))
    thresh, zero = np.float32(thresh), np.float32(0)
    suppressed = np.zeros(len(bbox), dtype=bool)
    keep = []
    with np.errstate(all="ignore"):
        area = (y_max - y_min) * (x_max - x_min)
        for i in range(len(bbox)):
            if len(keep) == limit:
                break
            if suppressed[i]:
                continue
            keep.append(i)
            later = slice(i + 1, None)
            height = _max(_min(y_max[i], y_max[later]) - _max(y_min[i], y_min[later]), zero)
            width = _max(_min(x_max[i], x_max[later]) - _max(x_min[i], x_min[later]), zero)
            inter = height * width
            suppressed[later] |= inter / (area[i] + area[later] - inter) >= thresh
    return np.array(keep, dtype=np.int32)


def iou_matrix(bbox_a, bbox_b):
    """``(A, 4), (B, 4) -> (A, B)`` float32 IoUs, the kernel's operations in the kernel's order."""
    a, b = bbox_a[:, None, :], bbox_b[None, :, :]
    height = _max(_min(a[..., 2], b[..., 2]) - _max(a[..., 0], b[..., 0]), np.float32(0))
    width = _max(_min(a[..., 3], b[..., 3]) - _max(a[..., 1], b[..., 1]), np.float32(0))
    inter = height * width
    with np.errstate(all="ignore"):
        return inter / ((a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
                        + (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1]) - inter)


def match_reference(bbox, gt_bbox):
    """The replaced ``match_to_gt`` body: ``(gt_index, max_iou, is_gt_best)``."""
    iou = bbox_iou(bbox, gt_bbox)
    gt_index = iou.argmax(axis=1)
    max_iou = iou[np.arange(len(bbox)), gt_index]
    gt_max_iou = iou.max(axis=0)
    return gt_index, max_iou, ((iou == gt_max_iou) & (gt_max_iou > 0)).any(axis=1)


def encode_reference(src_bbox, dst_bbox, mean=(0.0, 0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0, 1.0)):
    loc = (bbox2loc(src_bbox, dst_bbox) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return loc.astype(np.float32, copy=False)


def decode_reference(src_bbox, loc, mean=(0.0, 0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0, 1.0)):
    return loc2bbox(src_bbox, loc * np.asarray(std, loc.dtype) + np.asarray(mean, loc.dtype))


def proposals_reference(loc, score, anchor, img_size, scale, n_pre, n_post, thresh=0.7, min_size=16):
    """The replaced ``ProposalCreator.__call__`` for numpy float32 inputs."""
    roi = decode_reference(anchor, loc)
    height, width = img_size
    roi[:, 0::2] = np.clip(roi[:, 0::2], 0, height)
    roi[:, 1::2] = np.clip(roi[:, 1::2], 0, width)
    min_size = min_size * scale
    keep = np.flatnonzero(((roi[:, 2] - roi[:, 0]) >= min_size) & ((roi[:, 3] - roi[:, 1]) >= min_size))
    roi, score = roi[keep], score[keep]
    order = np.argsort(-score, kind="stable")
    if n_pre > 0:
        order = order[:n_pre]
    roi = np.ascontiguousarray(roi[order], dtype=np.float32)
    return roi[nms_forward_reference(roi, thresh, n_post if n_post > 0 else len(roi))]


def anchor_targets_reference(bbox, anchor, img_size, rng, n_sample=256, pos_iou_thresh=0.7,
                             neg_iou_thresh=0.3, pos_ratio=0.5):
    """The replaced ``AnchorTargetCreator.__call__``."""
    height, width = img_size
    inside = np.flatnonzero(
        (anchor[:, 0] >= 0) & (anchor[:, 1] >= 0) & (anchor[:, 2] <= height) & (anchor[:, 3] <= width))
    inside_anchor = anchor[inside]
    n = len(inside_anchor)
    if n and len(bbox):
        gt_index, max_iou, is_gt_best = match_reference(inside_anchor, bbox)
    else:
        gt_index, max_iou, is_gt_best = np.zeros(n, np.int64), np.zeros(n, np.float32), np.zeros(n, bool)
    inside_label = np.full(n, -1, np.int32)
    inside_label[max_iou < neg_iou_thresh] = 0
    inside_label[is_gt_best] = 1
    inside_label[max_iou >= pos_iou_thresh] = 1
    pos_keep, neg_keep = sample_balanced(np.flatnonzero(inside_label == 1), np.flatnonzero(inside_label == 0),
                                         int(pos_ratio * n_sample), n_sample, rng)
    inside_label[:] = -1
    inside_label[pos_keep] = 1
    inside_label[neg_keep] = 0
    inside_loc = (encode_reference(inside_anchor, bbox[gt_index]) if len(bbox)
                  else np.zeros((n, 4), np.float32))
    loc = np.zeros((len(anchor), 4), np.float32)
    label = np.full(len(anchor), -1, np.int32)
    loc[inside] = inside_loc
    label[inside] = inside_label
    return loc, label


def proposal_targets_reference(roi, bbox, label, rng, mean=(0.0, 0.0, 0.0, 0.0), std=(0.1, 0.1, 0.2, 0.2),
                               n_sample=128, pos_ratio=0.25, pos_iou_thresh=0.5, neg_hi=0.5, neg_lo=0.0):
    """The replaced ``ProposalTargetCreator.__call__``."""
    roi = np.concatenate((roi, bbox), axis=0).astype(np.float32, copy=False)
    if len(roi) and len(bbox):
        gt_index, max_iou, _ = match_reference(roi, bbox)
    else:
        gt_index, max_iou = np.zeros(len(roi), np.int64), np.zeros(len(roi), np.float32)
    pos_keep, neg_keep = sample_balanced(
        np.flatnonzero(max_iou >= pos_iou_thresh), np.flatnonzero((max_iou < neg_hi) & (max_iou >= neg_lo)),
        int(np.round(n_sample * pos_ratio)), n_sample, rng)
    keep = np.concatenate((pos_keep, neg_keep)).astype(np.int64)
    gt_roi_label = np.zeros(len(keep), np.int32)
    if len(bbox) == 0:
        return roi[keep], np.zeros((len(keep), 4), np.float32), gt_roi_label
    gt_roi_label[:len(pos_keep)] = label[gt_index[pos_keep]] + 1
    return roi[keep], encode_reference(roi[keep], bbox[gt_index[keep]], mean, std), gt_roi_label


# ------------------------------------------------------------------------------------------------ inputs


def voc_anchors(hh=37, ww=62):
    """The anchors of a 600x1000 image's 37x62 feature map (20646 anchors)."""
    return _enumerate_shifted_anchor(generate_anchor_base(), 16, hh, ww)


def rpn_outputs(rng, anchor, n_levels=None):
    """Offsets and foreground scores like the RPN's; ``n_levels``: scores rounded to so many values (ties)."""
    loc = (rng.normal(0, 1, anchor.shape) * (0.1, 0.1, 0.2, 0.2)).astype(np.float32)
    score = rng.uniform(0, 1, len(anchor)).astype(np.float32)
    if n_levels is not None:
        score = (np.floor(score * n_levels) / n_levels).astype(np.float32)
    return loc, score


def grid_boxes(rng, n, extent=12, max_side=10):
    """Boxes with small integer corners: many pairs with equal IoUs and IoUs exactly at 0.5 or 0.7 (a float32
    quotient of small integers is the float32 threshold exactly: 7 / 10 rounds to float32(0.7))."""
    corner = rng.integers(0, extent, (n, 2))
    side = rng.integers(1, max_side + 1, (n, 2))
    return np.concatenate((corner, corner + side), axis=1).astype(np.float32)


def rpn_like_boxes(rng, n, height=600, width=1000):
    """Decoded, clipped anchors in random order (many share clipped edges)."""
    anchor = voc_anchors(height // 16, width // 16)
    bbox = loc2bbox(anchor, rng.normal(0, 0.2, anchor.shape).astype(np.float32))
    bbox[:, 0::2] = np.clip(bbox[:, 0::2], 0, height)
    bbox[:, 1::2] = np.clip(bbox[:, 1::2], 0, width)
    return bbox[rng.permutation(len(bbox))[:n]]


def odd_boxes(rng, n):
    """Degenerate and extreme boxes mixed with ordinary ones: zero sides, inverted sides (one or both, the
    latter with a positive area), coordinates near 1e30 (areas overflow to inf), near 1e-30 (areas underflow
    to 0), near 1e-20 (subnormal areas), NaN and infinite coordinates, exact duplicates."""
    bbox = grid_boxes(rng, n, extent=20, max_side=8)
    kind = rng.integers(0, 10, n)
    bbox[kind == 1, 2] = bbox[kind == 1, 0]  # zero height
    flip = kind == 2
    bbox[flip] = bbox[flip][:, [2, 1, 0, 3]]  # inverted height: negative area
    both = kind == 3
    bbox[both] = bbox[both][:, [2, 3, 0, 1]]  # both sides inverted: positive area, no intersection
    bbox[kind == 4] *= np.float32(1e29)
    bbox[kind == 5] *= np.float32(1e-31)
    bbox[kind == 6, rng.integers(0, 4)] = np.nan
    bbox[kind == 7, rng.integers(0, 4)] = np.inf * rng.choice((-1, 1))
    dup = np.flatnonzero(kind == 8)
    bbox[dup] = bbox[rng.integers(0, n, len(dup))]
    bbox[kind == 9] *= np.float32(1e-20)
    return bbox


# ------------------------------------------------------------------------------------------------ ranking


@pytest.mark.parametrize("seed", range(6))
def test_rank_is_the_stable_descending_argsort(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 5000))
    score = rng.choice(np.array([0.0, -0.0, 0.25, 0.5, 1.0, -1.0, np.inf, -np.inf, np.nan, 1e-40, -1e-40],
                                np.float32), n)
    score = np.where(rng.random(n) < 0.5, score, rng.uniform(-2, 2, n).astype(np.float32))  # ties and spread
    index = np.flatnonzero(rng.random(n) < 0.8)
    # n around a tie group's boundary, none (<= 0: all), more than there are
    for top in {0, -1, 1, len(index) // 2, len(index) - 1, len(index), len(index) + 5, 12000}:
        got = _rank(score, index, top)
        assert got.dtype == np.intp
        np.testing.assert_array_equal(got, rank_reference(score, index, top))
    np.testing.assert_array_equal(_rank(score, index[:0], 10), index[:0])


def test_rank_ties_at_the_cut_take_the_lower_indices():
    score = np.array([0.5, 0.9, 0.5, 0.5, 0.1, 0.5], np.float32)
    np.testing.assert_array_equal(_rank(score, np.arange(6), 3), [1, 0, 2])
    np.testing.assert_array_equal(_rank(score, np.array([2, 3, 5]), 2), [2, 3])


# ---------------------------------------------------------------------------------------------------- NMS

THRESHOLDS = (0.7, 0.5, 0.3, 1.0, 1.5, 0.0, -0.5, np.nan, 1e-31, 1e-29)  # 1e-31: below the area bound's use


def check_nms(bbox, thresh, limits):
    bbox = np.ascontiguousarray(bbox, dtype=np.float32)
    full = nms_forward_reference(bbox, thresh, len(bbox))
    for limit in sorted({0, 1, len(full) // 2, len(full), len(bbox)}.union(limits)):
        limit = min(limit, len(bbox))
        got = nms_cpu_cython(bbox, float(np.float32(thresh)), limit)
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, full[:limit], err_msg=f"thresh {thresh}, limit {limit}")
    return full


@needs_cython
@pytest.mark.parametrize("seed", range(4))
def test_nms_keeps_what_the_replaced_loop_kept_on_ties_and_exact_thresholds(seed):
    rng = np.random.default_rng(100 + seed)
    bbox = grid_boxes(rng, 600)
    for thresh in (0.7, 0.5, 0.3):
        assert (iou_matrix(bbox, bbox) == np.float32(thresh)).sum() > 20  # pairs exactly at the threshold
        full = check_nms(bbox, thresh, {7})
        assert 0 < len(full) < len(bbox)
    for thresh in THRESHOLDS:
        check_nms(bbox, thresh, set())


@needs_cython
@pytest.mark.parametrize("seed", range(3))
def test_nms_keeps_what_the_replaced_loop_kept_on_odd_boxes(seed):
    rng = np.random.default_rng(200 + seed)
    bbox = odd_boxes(rng, 500)
    for thresh in THRESHOLDS:
        check_nms(bbox, thresh, {3})


@needs_cython
def test_nms_keeps_what_the_replaced_loop_kept_at_voc_size():
    rng = np.random.default_rng(300)
    bbox = rpn_like_boxes(rng, 12000)
    full = check_nms(bbox, 0.7, {300, 2000})
    assert len(full) > 2000  # the limit cuts
    for thresh in (0.3, 0.5, 0.9):
        check_nms(bbox[:3000], thresh, {300})


@needs_cython
def test_nms_area_bound_at_its_edge():
    # Nested boxes whose IoU is their area ratio, exactly at and one float32 step around the threshold.
    thresh = np.float32(0.7)
    outer = np.array([[0, 0, 10, 10]], np.float32)
    seven = np.float32(7)
    heights = (seven, np.nextafter(seven, np.float32(8)), np.nextafter(seven, np.float32(6)))
    inner = np.array([[0, 0, height, 10] for height in heights], np.float32)  # IoU with outer: height / 10
    bbox = np.concatenate((outer, inner), axis=0)
    for order in ([0, 1], [1, 0], [0, 2], [2, 0], [0, 3], [3, 0]):
        keep = nms_cpu_cython(np.ascontiguousarray(bbox[order]), float(thresh), 2)
        np.testing.assert_array_equal(keep, nms_forward_reference(bbox[order], thresh, 2))
    np.testing.assert_array_equal(nms_cpu_cython(bbox[[0, 1]], float(thresh), 2), [0])  # at: suppressed
    np.testing.assert_array_equal(nms_cpu_cython(bbox[[0, 3]], float(thresh), 2), [0, 1])  # below: kept


@pytest.mark.parametrize("seed", range(2))
def test_public_nms_with_scores_keeps_what_the_replaced_path_kept(seed):
    rng = np.random.default_rng(400 + seed)
    bbox = np.concatenate((grid_boxes(rng, 400), rpn_like_boxes(rng, 400)))
    score = (np.floor(rng.random(len(bbox)) * 20) / 20).astype(np.float32)  # many ties
    order = np.argsort(-score, kind="stable")
    for thresh in (0.7, 0.3):
        expected = order[nms_forward_reference(bbox[order], thresh, len(bbox))]
        np.testing.assert_array_equal(non_maximum_suppression(bbox, thresh, score), expected)
        np.testing.assert_array_equal(non_maximum_suppression(bbox, thresh, score, limit=50), expected[:50])


# ---------------------------------------------------------------------------------------- ProposalCreator


@pytest.mark.parametrize("training", [True, False], ids=["train", "test"])
@pytest.mark.parametrize("seed", range(2))
def test_proposals_are_the_replaced_layers_bit_for_bit(seed, training):
    rng = np.random.default_rng(500 + seed)
    anchor = voc_anchors()
    loc, score = rpn_outputs(rng, anchor, n_levels=64 if seed == 0 else None)  # seed 0: ties at the cut
    loc[rng.random(loc.shape) < 0.01] = -0.0
    score[rng.integers(0, len(score), 20)] = np.nan
    creator = ProposalCreator()
    n_pre, n_post = (12000, 2000) if training else (6000, 300)
    expected = proposals_reference(loc, score, anchor, (600, 1000), 1.6, n_pre, n_post)
    for loc_in, score_in in ((loc, score), (torch.from_numpy(loc), torch.from_numpy(score))):
        roi = creator(loc_in, score_in, anchor, (600, 1000), scale=1.6, training=training)
        assert same_bits(roi, expected)
    assert len(expected) == n_post


def test_proposals_with_few_survivors_and_odd_counts():
    rng = np.random.default_rng(600)
    anchor = voc_anchors(10, 14)
    loc, score = rpn_outputs(rng, anchor, n_levels=8)
    loc[:, 2:] -= 2.5  # most boxes fall below min_size
    for n_pre, n_post in ((0, 0), (-1, 5), (7, 3), (100000, 100000)):
        creator = ProposalCreator(n_test_pre_nms=n_pre, n_test_post_nms=n_post)
        roi = creator(loc, score, anchor, (160, 224), scale=1.0)
        assert same_bits(roi, proposals_reference(loc, score, anchor, (160, 224), 1.0, n_pre, n_post))


# ------------------------------------------------------------------------------- box coder and matching


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_box_coder_is_the_replaced_formulas_bit_for_bit(dtype):
    rng = np.random.default_rng(700)
    src = grid_boxes(rng, 500, extent=50, max_side=40).astype(dtype)
    dst = grid_boxes(rng, 500, extent=50, max_side=40).astype(dtype)
    loc = rng.normal(0, 0.5, (500, 4)).astype(dtype)
    loc[rng.random(loc.shape) < 0.2] = -0.0
    loc[rng.random(loc.shape) < 0.2] = 0.0
    src[::7] = -0.0  # degenerate boxes at -0.0
    normalisations = [((0.0, 0.0, 0.0, 0.0), (1.0, 1.0, 1.0, 1.0)),
                      ((0.0, 0.0, 0.0, 0.0), (0.1, 0.1, 0.2, 0.2)),
                      ((-0.0, 0.0, -0.0, 0.0), (1.0, 1.0, 1.0, 1.0)),
                      ((0.1, -0.2, 0.0, 0.3), (0.5, 2.0, 1.0, 1.0))]
    with np.errstate(all="ignore"):
        for mean, std in normalisations:
            assert same_bits(encode_loc(src, dst, mean, std), encode_reference(src, dst, mean, std))
            assert same_bits(decode_loc(src, loc, mean, std), decode_reference(src, loc, mean, std))
        assert same_bits(encode_loc(src, dst), encode_reference(src, dst))
        assert same_bits(decode_loc(src, loc), decode_reference(src, loc))


@pytest.mark.parametrize("n_gt", [1, 2, 5, 40])
def test_match_to_gt_is_the_replaced_matching_bit_for_bit(n_gt):
    rng = np.random.default_rng(800 + n_gt)
    anchor = voc_anchors(20, 30)
    gt = grid_boxes(rng, n_gt, extent=400, max_side=200) + np.float32(0.5)
    gt[-1] = anchor[123]  # a ground truth equal to an anchor (IoU 1)
    if n_gt > 1:
        gt[0] = gt[-1]  # two equal ground truths: ties across columns
        gt[1] = (2000, 2000, 2100, 2100)  # overlaps no anchor: marks nothing
    for bbox in (anchor, np.concatenate((anchor, anchor[:50]))):  # duplicate boxes: ties down a column
        got = match_to_gt(bbox, gt)
        expected = match_reference(bbox, gt)
        for a, b in zip(got, expected, strict=True):
            assert same_bits(a, b)
        assert got.is_gt_best.any()


# ------------------------------------------------------------------------------------ target creators


@pytest.mark.parametrize("n_gt", [0, 1, 3, 12])
def test_anchor_targets_and_draws_are_the_replaced_creators(n_gt):
    rng = np.random.default_rng(900 + n_gt)
    anchor = voc_anchors()
    bbox = np.clip(grid_boxes(rng, n_gt, extent=550, max_side=400) + np.float32(0.25), 0, 600)
    creator = AnchorTargetCreator()
    for seed in range(3):
        got_rng, ref_rng = np.random.default_rng(seed), np.random.default_rng(seed)
        loc, label = creator(bbox, anchor, (600, 1000), rng=got_rng)
        expected_loc, expected_label = anchor_targets_reference(bbox, anchor, (600, 1000), ref_rng)
        assert same_bits(loc, expected_loc) and same_bits(label, expected_label)
        assert got_rng.bit_generator.state == ref_rng.bit_generator.state  # the same draws
        assert (label >= 0).sum() == 256


@pytest.mark.parametrize("n_gt", [0, 1, 3, 12])
def test_proposal_targets_and_draws_are_the_replaced_creators(n_gt):
    rng = np.random.default_rng(1000 + n_gt)
    bbox = np.clip(grid_boxes(rng, n_gt, extent=550, max_side=400) + np.float32(0.25), 0, 600)
    label = rng.integers(0, 20, n_gt).astype(np.int32)
    roi = rpn_like_boxes(rng, 2000)
    creator = ProposalTargetCreator()
    for seed in range(3):
        got_rng, ref_rng = np.random.default_rng(seed), np.random.default_rng(seed)
        got = creator(roi, bbox, label, rng=got_rng)
        expected = proposal_targets_reference(roi, bbox, label, ref_rng)
        for a, b in zip(got, expected, strict=True):
            assert same_bits(a, b)
        assert got_rng.bit_generator.state == ref_rng.bit_generator.state
