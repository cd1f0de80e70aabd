"""The three creators: invariants on random scenes, hand-built scenes with exact labels, and ProposalCreator
against a slow loop (decode, clip, filter, sort, greedy NMS) written out box by box."""

import math

import numpy as np
import pytest
import torch

from model.utils.bbox_tools import bbox2loc, bbox_iou, generate_anchor_base, loc2bbox
from model.utils.creator_tool import AnchorTargetCreator, ProposalCreator, ProposalTargetCreator
from model.utils.target_helpers import decode_loc, encode_loc, match_to_gt, sample_balanced

# ----------------------------------------------------------------------------------------------- scenes


def shifted_anchors(hh, ww, stride=16):
    """``(hh * ww * 9, 4)`` float32 anchors of an ``hh x ww`` feature map, cell-major as in the RPN."""
    base = generate_anchor_base(base_size=stride)
    sy, sx = np.meshgrid(np.arange(hh) * stride, np.arange(ww) * stride, indexing="ij")
    shift = np.stack((sy.ravel(), sx.ravel(), sy.ravel(), sx.ravel()), axis=1)
    return (shift[:, None, :] + base[None]).reshape(-1, 4).astype(np.float32)


def random_gt(rng, n, height, width, min_side=20.0):
    """``(n, 4)`` float32 boxes inside an ``height x width`` image."""
    y0 = rng.uniform(0, height - min_side, n)
    x0 = rng.uniform(0, width - min_side, n)
    y1 = rng.uniform(y0 + min_side, height)
    x1 = rng.uniform(x0 + min_side, width)
    return np.stack((y0, x0, y1, x1), axis=1).astype(np.float32)


def random_scene(seed, n_gt=None):
    """A resized image size, its anchors and a few ground-truth boxes."""
    rng = np.random.default_rng(seed)
    hh, ww = rng.integers(20, 38), rng.integers(20, 38)
    height, width = int(hh * 16), int(ww * 16)
    n_gt = int(rng.integers(1, 8)) if n_gt is None else n_gt
    return (height, width), shifted_anchors(hh, ww), random_gt(rng, n_gt, height, width)


def boxes(*rows):
    return np.array(rows, dtype=np.float32).reshape(-1, 4)


# ------------------------------------------------------------------------------------- shared helpers


def test_match_to_gt_ties_and_zero_overlap():
    anchor = boxes([0, 0, 20, 20], [20, 20, 40, 40], [60, 60, 80, 80])
    gt = boxes([10, 10, 30, 30], [90, 90, 95, 95])  # the second overlaps nothing
    match = match_to_gt(anchor, gt)
    np.testing.assert_array_equal(match.is_gt_best, [True, True, False])
    np.testing.assert_array_equal(match.gt_index, [0, 0, 0])
    np.testing.assert_allclose(match.max_iou, [1 / 7, 1 / 7, 0], rtol=1e-6)
    empty = match_to_gt(anchor, boxes())
    assert empty.gt_index.shape == (3,) and not empty.is_gt_best.any() and not empty.max_iou.any()
    assert match_to_gt(boxes(), gt).gt_index.shape == (0,)


def test_sample_balanced_counts_and_subsets():
    rng = np.random.default_rng(0)
    pos, neg = np.arange(0, 300), np.arange(300, 1000)
    pos_keep, neg_keep = sample_balanced(pos, neg, 128, 256, rng)
    assert len(pos_keep) == 128 and len(neg_keep) == 128
    assert len(np.unique(pos_keep)) == 128 and np.isin(pos_keep, pos).all() and np.isin(neg_keep, neg).all()
    pos_keep, neg_keep = sample_balanced(pos[:10], neg, 128, 256, rng)  # scarce positives: all kept
    np.testing.assert_array_equal(pos_keep, pos[:10])
    assert len(neg_keep) == 246
    pos_keep, neg_keep = sample_balanced(pos, neg[:5], 300, 256, rng)  # the quota caps at n_sample
    assert len(pos_keep) == 300 and len(neg_keep) == 0


def test_box_coder_round_trip_and_normalisation():
    rng = np.random.default_rng(1)
    src, dst = random_gt(rng, 40, 500, 500), random_gt(rng, 40, 500, 500)
    mean, std = (0.1, -0.2, 0.05, 0.0), (0.1, 0.1, 0.2, 0.2)
    loc = encode_loc(src, dst, mean, std)
    assert loc.dtype == np.float32
    np.testing.assert_allclose(loc, (bbox2loc(src, dst) - np.array(mean)) / np.array(std), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(decode_loc(src, loc, mean, std), dst, rtol=1e-5, atol=1e-3)


# ---------------------------------------------------------------------------------- AnchorTargetCreator


def inside_reference(anchor, height, width):
    return np.array([a[0] >= 0 and a[1] >= 0 and a[2] <= height and a[3] <= width for a in anchor])


def gt_best_reference(iou):
    """Per row: is it tied for some column's highest value, that value being above 0? One gt at a time."""
    best = np.zeros(len(iou), bool)
    for j in range(iou.shape[1]):
        column_max = iou[:, j].max()
        if column_max > 0:
            best |= iou[:, j] == column_max
    return best


@pytest.mark.parametrize("seed", range(6))
def test_anchor_targets_invariants_on_random_scenes(seed):
    img_size, anchor, bbox = random_scene(seed)
    creator = AnchorTargetCreator()
    loc, label = creator(bbox, anchor, img_size, rng=np.random.default_rng(seed))
    assert loc.shape == anchor.shape and loc.dtype == np.float32
    assert label.shape == (len(anchor),) and label.dtype == np.int32
    assert set(np.unique(label)) <= {-1, 0, 1}

    inside = inside_reference(anchor, *img_size)
    assert (label[~inside] == -1).all() and (loc[~inside] == 0).all()

    iou = bbox_iou(anchor[inside], bbox)
    max_iou = iou.max(axis=1)
    is_best = gt_best_reference(iou)
    pos_candidate = (max_iou >= 0.7) | is_best
    neg_candidate = (max_iou < 0.3) & ~pos_candidate
    label_in = label[inside]
    assert pos_candidate[label_in == 1].all()
    assert neg_candidate[label_in == 0].all()
    n_pos, n_neg = (label_in == 1).sum(), (label_in == 0).sum()
    assert n_pos == min(pos_candidate.sum(), 128)
    assert n_neg == min(neg_candidate.sum(), 256 - n_pos)
    assert n_pos > 0  # every scene has a gt, so at least its best anchor

    # Offsets of every inside anchor decode onto its ground truth of highest IoU.
    np.testing.assert_allclose(loc2bbox(anchor[inside], loc[inside]), bbox[iou.argmax(axis=1)],
                               rtol=1e-4, atol=1e-2)


def test_anchor_targets_cap_positives_by_pos_ratio():
    anchor = np.tile(boxes([0, 0, 50, 50]), (400, 1)) + np.repeat(np.arange(400), 4).reshape(400, 4) % 3
    anchor = np.concatenate((anchor, boxes(*[[300, 300, 350, 350]] * 400)))
    bbox = boxes([0, 0, 50, 50])
    _, label = AnchorTargetCreator(n_sample=100, pos_ratio=0.3)(bbox, anchor, (400, 400))
    assert (label == 1).sum() == 30 and (label[:400] >= 0).sum() == 30
    assert (label == 0).sum() == 70 and (label[400:] == 0).sum() == 70


def test_anchor_targets_tie_rule_hand_built():
    # gt (10, 10, 30, 30): anchors 0 and 1 both reach its best IoU, 1/7, so both are positive even though
    # 1/7 < 0.3; anchor 3 overlaps it a little (1/15), anchor 2 not at all, anchor 4 sticks out of the image.
    anchor = boxes([0, 0, 20, 20], [20, 20, 40, 40], [60, 60, 80, 80], [25, 0, 45, 20], [50, 50, 120, 90])
    bbox = boxes([10, 10, 30, 30])
    loc, label = AnchorTargetCreator()(bbox, anchor, (100, 100))
    np.testing.assert_array_equal(label, [1, 1, 0, 0, -1])
    np.testing.assert_array_equal(loc[4], 0)
    np.testing.assert_allclose(loc2bbox(anchor[:4], loc[:4]), np.repeat(bbox, 4, axis=0), atol=1e-4)


def test_anchor_targets_thresholds_hand_built():
    # IoU with the gt: 1 (best), 0.8 (>= 0.7: positive), 0.6 (in between: ignored), 0.2 (negative).
    anchor = boxes([0, 0, 10, 10], [0, 0, 10, 8], [0, 0, 10, 6], [0, 0, 10, 2])
    _, label = AnchorTargetCreator()(boxes([0, 0, 10, 10]), anchor, (10, 10))
    np.testing.assert_array_equal(label, [1, 1, -1, 0])


def test_anchor_targets_gt_overlapping_no_inside_anchor():
    # The second gt only meets the anchor that sticks out of the image: its best inside IoU is 0, which
    # must not turn the zero-IoU inside anchors positive (the original did, original-spec §17.5).
    anchor = boxes([0, 0, 20, 20], [30, 30, 50, 50], [0, 60, 20, 80], [70, 70, 130, 130])
    bbox = boxes([0, 0, 20, 20], [85, 85, 99, 99])
    _, label = AnchorTargetCreator()(bbox, anchor, (100, 100))
    np.testing.assert_array_equal(label, [1, 0, 0, -1])
    _, label = AnchorTargetCreator()(bbox[1:], anchor, (100, 100))
    np.testing.assert_array_equal(label, [0, 0, 0, -1])


def test_anchor_targets_no_inside_anchor():
    anchor = shifted_anchors(2, 2)  # the smallest anchor is 90 px tall: none fits a 40 x 40 image
    loc, label = AnchorTargetCreator()(boxes([5, 5, 30, 30]), anchor, (40, 40))
    assert (label == -1).all() and (loc == 0).all() and loc.shape == anchor.shape


def test_anchor_targets_no_ground_truth():
    img_size, anchor, _ = random_scene(7)
    inside = inside_reference(anchor, *img_size)
    assert inside.sum() > 256
    loc, label = AnchorTargetCreator()(boxes(), anchor, img_size)
    assert (label == 0).sum() == 256 and (label == 1).sum() == 0 and (label[~inside] == -1).all()
    assert (loc == 0).all()


def test_anchor_targets_bad_shapes():
    with pytest.raises(ValueError, match="anchor"):
        AnchorTargetCreator()(boxes([0, 0, 1, 1]), np.zeros((5, 3), np.float32), (10, 10))


def test_anchor_targets_seed_reproducibility():
    img_size, anchor, bbox = random_scene(3, n_gt=6)
    a = AnchorTargetCreator(seed=11)(bbox, anchor, img_size)[1]
    b = AnchorTargetCreator(seed=11)(bbox, anchor, img_size)[1]
    c = AnchorTargetCreator(seed=12)(bbox, anchor, img_size)[1]
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    d = AnchorTargetCreator(seed=1)(bbox, anchor, img_size, rng=np.random.default_rng(5))[1]
    e = AnchorTargetCreator(seed=2)(bbox, anchor, img_size, rng=np.random.default_rng(5))[1]
    np.testing.assert_array_equal(d, e)


# -------------------------------------------------------------------------------- ProposalTargetCreator


def random_rois(rng, bbox, n, height, width):
    """Proposals: jittered copies of the gt boxes (many positives) and random boxes (mostly negatives)."""
    near = np.repeat(bbox, n // (2 * len(bbox)) + 1, axis=0)[: n // 2]
    near = near + rng.normal(0, 6, near.shape).astype(np.float32)
    near[:, 2:] = np.maximum(near[:, 2:], near[:, :2] + 1)
    return np.concatenate((near, random_gt(rng, n - len(near), height, width, 5))).astype(np.float32)


@pytest.mark.parametrize("seed", range(6))
def test_proposal_targets_invariants_on_random_scenes(seed):
    rng = np.random.default_rng(seed)
    height, width = 400, 560
    bbox = random_gt(rng, int(rng.integers(1, 6)), height, width)
    label = rng.integers(0, 20, len(bbox)).astype(np.int32)
    roi = random_rois(rng, bbox, int(rng.integers(50, 2000)), height, width)
    mean, std = (0.0, 0.0, 0.0, 0.0), (0.1, 0.1, 0.2, 0.2)
    sample_roi, gt_roi_loc, gt_roi_label = ProposalTargetCreator()(roi, bbox, label, mean, std,
                                                                   rng=np.random.default_rng(seed))
    assert sample_roi.dtype == np.float32 and gt_roi_loc.dtype == np.float32
    assert gt_roi_label.dtype == np.int32
    n = len(sample_roi)
    assert n <= 128 and gt_roi_loc.shape == (n, 4) and gt_roi_label.shape == (n,)

    candidates = np.concatenate((roi, bbox))
    iou_all = bbox_iou(candidates, bbox).max(axis=1)
    n_pos_candidates = (iou_all >= 0.5).sum()
    n_neg_candidates = (iou_all < 0.5).sum()

    iou = bbox_iou(sample_roi, bbox)
    assigned = iou.argmax(axis=1)
    is_pos = gt_roi_label > 0
    n_pos = is_pos.sum()
    assert (is_pos[:n_pos]).all() and not is_pos[n_pos:].any()  # positives first
    assert n_pos == min(n_pos_candidates, 32)
    assert n - n_pos == min(n_neg_candidates, 128 - n_pos)
    assert (iou.max(axis=1)[is_pos] >= 0.5).all() and (iou.max(axis=1)[~is_pos] < 0.5).all()
    np.testing.assert_array_equal(gt_roi_label[is_pos], label[assigned[is_pos]] + 1)

    # Every sample is one of the candidates, none twice.
    index = [np.flatnonzero((candidates == r).all(axis=1))[0] for r in sample_roi]
    assert len(set(index)) == n
    # Normalised offsets decode back onto the assigned ground truth.
    decoded = loc2bbox(sample_roi, gt_roi_loc * np.array(std, np.float32) + np.array(mean, np.float32))
    np.testing.assert_allclose(decoded, bbox[assigned], rtol=1e-4, atol=1e-2)


def test_proposal_targets_normalisation_formula():
    rng = np.random.default_rng(4)
    bbox = random_gt(rng, 3, 300, 300)
    roi = random_rois(rng, bbox, 200, 300, 300)
    mean, std = (0.5, -0.25, 0.1, 0.2), (0.3, 0.1, 0.2, 0.4)
    sample_roi, gt_roi_loc, _ = ProposalTargetCreator()(roi, bbox, np.zeros(3, np.int32), mean, std)
    assigned = bbox_iou(sample_roi, bbox).argmax(axis=1)
    s, g = sample_roi.astype(np.float64), bbox[assigned].astype(np.float64)
    for i in range(len(s)):
        ph, pw = s[i, 2] - s[i, 0], s[i, 3] - s[i, 1]
        gh, gw = g[i, 2] - g[i, 0], g[i, 3] - g[i, 1]
        raw = [(g[i, 0] + gh / 2 - s[i, 0] - ph / 2) / ph, (g[i, 1] + gw / 2 - s[i, 1] - pw / 2) / pw,
               math.log(gh / ph), math.log(gw / pw)]
        expected = [(raw[k] - mean[k]) / std[k] for k in range(4)]
        np.testing.assert_allclose(gt_roi_loc[i], expected, rtol=1e-4, atol=1e-4)


def test_proposal_targets_hand_built():
    # IoU with the gt: 1, exactly 0.5 (positive: >= 0.5), 0.4 (negative), 0 (negative while lo = 0.0).
    bbox = boxes([0, 0, 10, 10])
    roi = boxes([0, 0, 10, 10], [0, 0, 10, 5], [0, 0, 10, 4], [20, 20, 30, 30])
    sample_roi, gt_roi_loc, gt_roi_label = ProposalTargetCreator()(roi, bbox, np.array([3], np.int32))
    np.testing.assert_array_equal(gt_roi_label, [4, 4, 4, 0, 0])
    pos = sorted(map(tuple, sample_roi[:3].tolist()))
    assert pos == sorted([(0, 0, 10, 10), (0, 0, 10, 10), (0, 0, 10, 5)])  # the gt itself is appended
    assert sorted(map(tuple, sample_roi[3:].tolist())) == [(0, 0, 10, 4), (20, 20, 30, 30)]
    # With py-faster-rcnn's lower bound 0.1 the IoU-0 roi is no candidate at all.
    _, _, gt_roi_label = ProposalTargetCreator(neg_iou_thresh_lo=0.1)(roi, bbox, np.array([3], np.int32))
    np.testing.assert_array_equal(gt_roi_label, [4, 4, 4, 0])


def test_proposal_targets_without_ground_truth_or_rois():
    rng = np.random.default_rng(5)
    roi = random_gt(rng, 300, 200, 200, 5)
    sample_roi, gt_roi_loc, gt_roi_label = ProposalTargetCreator()(roi, boxes(), np.zeros(0, np.int32))
    assert sample_roi.shape == (128, 4) and (gt_roi_label == 0).all() and (gt_roi_loc == 0).all()
    sample_roi, _, gt_roi_label = ProposalTargetCreator()(roi[:10], boxes(), np.zeros(0, np.int32))
    assert len(sample_roi) == 10  # no padding
    bbox = boxes([0, 0, 10, 10], [50, 50, 90, 70])
    sample_roi, gt_roi_loc, gt_roi_label = ProposalTargetCreator()(boxes(), bbox, np.array([1, 7], np.int32))
    np.testing.assert_array_equal(sample_roi, bbox)
    np.testing.assert_array_equal(gt_roi_label, [2, 8])
    np.testing.assert_allclose(gt_roi_loc, 0, atol=1e-6)
    with pytest.raises(ValueError, match="label"):
        ProposalTargetCreator()(roi, bbox, np.array([1], np.int32))


def test_proposal_targets_seed_reproducibility():
    rng = np.random.default_rng(6)
    bbox = random_gt(rng, 4, 400, 400)
    roi = random_rois(rng, bbox, 1500, 400, 400)
    label = np.arange(4, dtype=np.int32)
    a = ProposalTargetCreator(seed=3)(roi, bbox, label)[0]
    b = ProposalTargetCreator(seed=3)(roi, bbox, label)[0]
    c = ProposalTargetCreator(seed=4)(roi, bbox, label)[0]
    np.testing.assert_array_equal(a, b)
    assert a.shape != c.shape or (a != c).any()


# -------------------------------------------------------------------------------------- ProposalCreator


def proposals_reference(loc, score, anchor, img_size, scale, min_size, n_pre, n_post, thresh):
    """The proposal layer written out one box at a time, in float64."""
    height, width = img_size
    rois = []
    for a, t in zip(anchor.astype(np.float64), loc.astype(np.float64), strict=True):
        h, w = a[2] - a[0], a[3] - a[1]
        cy, cx = a[0] + h / 2 + t[0] * h, a[1] + w / 2 + t[1] * w
        h, w = h * math.exp(t[2]), w * math.exp(t[3])
        y0, y1 = min(max(cy - h / 2, 0), height), min(max(cy + h / 2, 0), height)
        x0, x1 = min(max(cx - w / 2, 0), width), min(max(cx + w / 2, 0), width)
        rois.append((y0, x0, y1, x1))
    smallest = min_size * scale
    kept = [i for i, r in enumerate(rois) if r[2] - r[0] >= smallest and r[3] - r[1] >= smallest]
    kept = sorted(kept, key=lambda i: (-score[i], i))[:n_pre]
    selected = []
    for i in kept:
        if all(iou_pair(rois[i], rois[j]) < thresh for j in selected):
            selected.append(i)
            if len(selected) == n_post:
                break
    return np.array([rois[i] for i in selected]).reshape(-1, 4)


def iou_pair(a, b):
    inter = max(min(a[2], b[2]) - max(a[0], b[0]), 0) * max(min(a[3], b[3]) - max(a[1], b[1]), 0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def rpn_outputs(seed, hh=12, ww=16):
    rng = np.random.default_rng(seed)
    anchor = shifted_anchors(hh, ww)
    loc = rng.normal(0, 0.3, anchor.shape).astype(np.float32)
    score = rng.uniform(0, 1, len(anchor)).astype(np.float32)
    return (hh * 16, ww * 16), anchor, loc, score


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_proposals_match_slow_reference(seed, training):
    img_size, anchor, loc, score = rpn_outputs(seed)
    params = dict(n_train_pre_nms=900, n_train_post_nms=150, n_test_pre_nms=400, n_test_post_nms=60)
    scale = 1.3
    roi = ProposalCreator(**params)(loc, score, anchor, img_size, scale=scale, training=training)
    n_pre, n_post = (900, 150) if training else (400, 60)
    expected = proposals_reference(loc, score, anchor, img_size, scale, 16, n_pre, n_post, 0.7)
    assert roi.dtype == np.float32 and roi.shape == expected.shape
    assert len(roi) == n_post  # these scenes have plenty of survivors
    np.testing.assert_allclose(roi, expected, rtol=1e-5, atol=1e-3)


def test_proposals_default_counts_train_vs_test():
    img_size, anchor, loc, score = rpn_outputs(0, hh=37, ww=50)  # a 592 x 800 input: 16650 anchors
    creator = ProposalCreator()
    assert len(creator(loc, score, anchor, img_size, training=True)) == 2000
    assert len(creator(loc, score, anchor, img_size, training=False)) == 300


def test_proposals_clip_to_image():
    anchor = boxes([-10, -20, 50, 60], [5, 5, 25, 45])
    loc = np.zeros((2, 4), np.float32)
    roi = ProposalCreator(min_size=1)(loc, np.array([0.9, 0.1], np.float32), anchor, (40, 50))
    np.testing.assert_allclose(roi, [[0, 0, 40, 50], [5, 5, 25, 45]])
    img_size, anchor, loc, score = rpn_outputs(1)
    roi = ProposalCreator()(loc * 4, score, anchor, img_size)
    assert (roi >= 0).all() and (roi[:, 0::2] <= img_size[0]).all() and (roi[:, 1::2] <= img_size[1]).all()


def test_proposals_min_size_scales_with_the_image():
    anchor = boxes([0, 0, 20, 20], [100, 0, 140, 40], [200, 0, 220, 40], [300, 0, 324, 24])
    loc, score = np.zeros((4, 4), np.float32), np.array([0.4, 0.3, 0.2, 0.1], np.float32)
    creator = ProposalCreator(min_size=16)
    np.testing.assert_array_equal(creator(loc, score, anchor, (400, 400), scale=1.0), anchor)
    # 16 px of the original image are 24 px of an input resized by 1.5: 24 itself is kept.
    np.testing.assert_array_equal(creator(loc, score, anchor, (400, 400), scale=1.5), anchor[[1, 3]])
    empty = creator(loc, score, anchor, (400, 400), scale=3.0)
    assert empty.shape == (0, 4) and empty.dtype == np.float32


def test_proposals_suppress_at_threshold_in_score_order():
    # IoU of the first two boxes is exactly 0.75: suppressed at nms_thresh 0.75 (>=), kept just above it.
    anchor = boxes([0, 0, 10, 10], [0, 0, 10, 7.5], [50, 50, 60, 60])
    loc, score = np.zeros((3, 4), np.float32), np.array([0.5, 0.9, 0.7], np.float32)
    roi = ProposalCreator(nms_thresh=0.75, min_size=1)(loc, score, anchor, (100, 100))
    np.testing.assert_array_equal(roi, anchor[[1, 2]])
    roi = ProposalCreator(nms_thresh=0.76, min_size=1)(loc, score, anchor, (100, 100))
    np.testing.assert_array_equal(roi, anchor[[1, 2, 0]])
    # Equal scores rank by anchor index: the first of the two overlapping boxes wins.
    roi = ProposalCreator(min_size=1)(loc, np.full(3, 0.5, np.float32), anchor, (100, 100))
    np.testing.assert_array_equal(roi, anchor[[0, 2]])


def test_proposals_accept_torch_tensors():
    img_size, anchor, loc, score = rpn_outputs(2)
    creator = ProposalCreator()
    expected = creator(loc, score, anchor, img_size)
    loc_t = torch.from_numpy(loc).requires_grad_()
    np.testing.assert_array_equal(creator(loc_t, torch.from_numpy(score), anchor, img_size), expected)
    # Other dtypes (float64 here, half precision under autocast) go through float32 box math.
    got = creator(loc_t.double(), torch.from_numpy(score).double(), anchor, img_size)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)
    got = creator(loc_t.bfloat16(), torch.from_numpy(score).bfloat16(), anchor, img_size)
    assert got.dtype == np.float32 and got.shape[1] == 4 and 0 < len(got) <= 300


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_proposals_cuda_input_matches_numpy():
    img_size, anchor, loc, score = rpn_outputs(3, hh=37, ww=50)
    creator = ProposalCreator()
    for training in (False, True):
        expected = creator(loc, score, anchor, img_size, training=training)
        got = creator(torch.from_numpy(loc).cuda(), torch.from_numpy(score).cuda(), anchor, img_size,
                      training=training)
        np.testing.assert_array_equal(got, expected)
