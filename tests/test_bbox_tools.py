"""bbox_tools against float64 formulas written out per box, and a literal table of the base anchors."""

import math

import numpy as np
import pytest

from model.utils.bbox_tools import bbox2loc, bbox_iou, generate_anchor_base, loc2bbox


def random_bbox(rng, n, size=500.0, min_side=1.0):
    """``(n, 4)`` float32 boxes ``(y_min, x_min, y_max, x_max)`` with sides of at least ``min_side``."""
    tl = rng.uniform(0, size, (n, 2))
    hw = rng.uniform(min_side, size / 2, (n, 2))
    return np.concatenate((tl, tl + hw), axis=1).astype(np.float32)


def iou_reference(a, b):
    """One pair at a time, in float64."""
    ih = min(a[2], b[2]) - max(a[0], b[0])
    iw = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(ih, 0.0) * max(iw, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def test_bbox_iou_matches_pairwise_reference():
    rng = np.random.default_rng(0)
    a, b = random_bbox(rng, 37), random_bbox(rng, 23)
    b[:5] = a[:5]  # identical pairs give IoU 1
    expected = np.array([[iou_reference(x.astype(np.float64), y.astype(np.float64)) for y in b] for x in a])
    got = bbox_iou(a, b)
    assert got.shape == (37, 23)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.diag(got[:5, :5]), 1.0, rtol=1e-6)


def test_bbox_iou_hand_worked_cases():
    a = np.array([[0, 0, 10, 10]], dtype=np.float32)
    b = np.array([
        [0, 0, 10, 10],     # same box: 1
        [0, 5, 10, 15],     # half overlap: 50 / 150
        [10, 10, 20, 20],   # touching at a corner: 0
        [20, 20, 30, 30],   # apart: 0
        [2, 2, 4, 4],       # inside: 4 / 100
    ], dtype=np.float32)
    np.testing.assert_allclose(bbox_iou(a, b)[0], [1.0, 1 / 3, 0.0, 0.0, 0.04], rtol=1e-6)


def test_bbox_iou_empty_and_degenerate():
    a = np.zeros((0, 4), np.float32)
    assert bbox_iou(a, random_bbox(np.random.default_rng(1), 3)).shape == (0, 3)
    point = np.array([[5, 5, 5, 5]], np.float32)
    assert bbox_iou(point, point)[0, 0] == 0.0  # zero area on both sides: 0, not NaN
    with pytest.raises(IndexError):
        bbox_iou(np.zeros((2, 3), np.float32), np.zeros((2, 4), np.float32))


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_bbox_iou_integer_boxes_give_float64(dtype):
    rng = np.random.default_rng()
    a = np.round(random_bbox(rng, 19, size=2000.0)).astype(dtype)  # areas up to 1e6: beyond int16, not int32
    b = np.round(random_bbox(rng, 13, size=2000.0)).astype(dtype)
    b[:3] = a[:3]
    a[3, 3] = max(a[3, 3], a[3, 1] + 10)  # wider than the shift below (sides are drawn from 1 pixel up)
    b[3] = a[3] + (0, 5, 0, 5)  # a shifted copy: a partial overlap
    expected = np.array([[iou_reference(x.astype(np.float64), y.astype(np.float64)) for y in b] for x in a])
    got = bbox_iou(a, b)
    assert got.dtype == np.float64 and got.shape == (19, 13)
    np.testing.assert_allclose(got, expected, rtol=1e-15, atol=0)
    assert 0 < got[3, 3] < 1
    # Integer pixels, worked by hand: 10 x 10 and 10 x 10 overlapping in 10 x 5: 50 / 150.
    got = bbox_iou(np.array([[0, 0, 10, 10]], dtype), np.array([[0, 5, 10, 15], [20, 20, 30, 30]], dtype))
    assert got.dtype == np.float64 and got.tolist() == [[1 / 3, 0.0]]


def test_bbox_iou_float16_boxes_computed_in_float32():
    """Boxes of a few hundred pixels: their float16 areas overflow (65504 is a 256-pixel square)."""
    rng = np.random.default_rng()
    tl = rng.uniform(0, 300, (29, 2))
    a64 = np.concatenate((tl, tl + rng.uniform(400, 600, (29, 2))), axis=1)  # sides of ~500 px
    b64 = a64[rng.permutation(29)[:17]] + rng.uniform(-60, 60, (17, 4))
    a, b = a64.astype(np.float16), b64.astype(np.float16)
    got = bbox_iou(a, b)
    assert got.dtype == np.float32 and got.shape == (29, 17)
    # Against float64 on the same (float16-rounded) coordinates: float32 arithmetic only.
    expected = np.array([[iou_reference(x.astype(np.float64), y.astype(np.float64)) for y in b] for x in a])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert (got > 0.5).sum() >= 10  # the shifted copies overlap well
    # Against the unrounded boxes: float16 spacing is 0.5 px at these coordinates, so each coordinate moves
    # by at most 0.25 px, and the IoU of boxes with sides >= ~400 px by at most ~4 * 0.25 / 400 each way.
    exact = np.array([[iou_reference(x, y) for y in b64] for x in a64])
    np.testing.assert_allclose(got, exact, rtol=0, atol=5e-3)


@pytest.mark.parametrize("dtype_a, dtype_b, expected", [
    (np.float32, np.float32, np.float32),
    (np.float64, np.float64, np.float64),
    (np.float32, np.float64, np.float64),
    (np.float16, np.float16, np.float32),
    (np.float16, np.float32, np.float32),
    (np.float16, np.float64, np.float64),
    (np.int32, np.float32, np.float64),  # np.result_type: float64
    (np.uint8, np.float16, np.float32),  # np.result_type: float16, computed in float32
    (np.int64, np.int32, np.float64),
    (np.bool_, np.bool_, np.float64),
])
def test_bbox_iou_output_dtype(dtype_a, dtype_b, expected):
    a = np.array([[0, 0, 4, 4], [1, 1, 5, 3]]).astype(dtype_a)
    b = np.array([[0, 2, 4, 6]]).astype(dtype_b)
    got = bbox_iou(a, b)
    assert got.dtype == expected
    if dtype_a is not np.bool_:
        # [0, 4] x [0, 4] and [0, 4] x [2, 6]: 8 / 24; [1, 5] x [1, 3] and [0, 4] x [2, 6]: 3 / (8 + 16 - 3)
        np.testing.assert_allclose(got, [[1 / 3], [3 / 21]], rtol=1e-7)


def test_bbox2loc_matches_formula_and_round_trips():
    rng = np.random.default_rng(2)
    src, dst = random_bbox(rng, 50), random_bbox(rng, 50)
    loc = bbox2loc(src, dst)
    s, d = src.astype(np.float64), dst.astype(np.float64)
    for i in range(len(src)):
        ph, pw = s[i, 2] - s[i, 0], s[i, 3] - s[i, 1]
        gh, gw = d[i, 2] - d[i, 0], d[i, 3] - d[i, 1]
        expected = [
            ((d[i, 0] + gh / 2) - (s[i, 0] + ph / 2)) / ph,
            ((d[i, 1] + gw / 2) - (s[i, 1] + pw / 2)) / pw,
            math.log(gh / ph),
            math.log(gw / pw),
        ]
        np.testing.assert_allclose(loc[i], expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(loc2bbox(src, loc), dst, rtol=1e-5, atol=1e-3)


def test_loc2bbox_several_groups_per_row_and_empty():
    rng = np.random.default_rng(3)
    src = random_bbox(rng, 8)
    locs = [rng.normal(0, 0.3, (8, 4)).astype(np.float32) for _ in range(3)]
    together = loc2bbox(src, np.concatenate(locs, axis=1))
    assert together.shape == (8, 12)
    for k, loc in enumerate(locs):
        np.testing.assert_allclose(together[:, 4 * k:4 * k + 4], loc2bbox(src, loc), rtol=1e-6)
    assert loc2bbox(np.zeros((0, 4), np.float32), np.zeros((0, 84), np.float32)).shape == (0, 84)


def test_bbox2loc_degenerate_source_is_finite():
    src = np.array([[5, 5, 5, 5]], np.float32)
    dst = np.array([[0, 0, 10, 10]], np.float32)
    assert np.all(np.isfinite(bbox2loc(src, dst)))


# The nine anchors of the original (base 16, ratios 0.5/1/2, scales 8/16/32), worked out by hand:
# h = 16 * s * sqrt(r), w = 16 * s / sqrt(r), centred at (8, 8).
BASE_ANCHORS = [
    (-37.254833, -82.50967, 53.254833, 98.50967),
    (-82.50967, -173.01933, 98.50967, 189.01933),
    (-173.01933, -354.03867, 189.01933, 370.03867),
    (-56.0, -56.0, 72.0, 72.0),
    (-120.0, -120.0, 136.0, 136.0),
    (-248.0, -248.0, 264.0, 264.0),
    (-82.50967, -37.254833, 98.50967, 53.254833),
    (-173.01933, -82.50967, 189.01933, 98.50967),
    (-354.03867, -173.01933, 370.03867, 189.01933),
]


def test_generate_anchor_base_literal_table():
    anchor = generate_anchor_base()
    assert anchor.dtype == np.float32 and anchor.shape == (9, 4)
    np.testing.assert_allclose(anchor, np.array(BASE_ANCHORS), rtol=1e-6, atol=1e-4)


def test_generate_anchor_base_other_settings():
    anchor = generate_anchor_base(base_size=8, ratios=(1,), anchor_scales=(2, 4))
    np.testing.assert_allclose(anchor, [[-4, -4, 12, 12], [-12, -12, 20, 20]])
