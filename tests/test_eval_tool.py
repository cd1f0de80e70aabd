"""The VOC evaluator on cases worked out by hand, and against a loop-by-loop port of the VOC devkit."""

import math

import numpy as np
import pytest

from utils import eval_tool
from utils.eval_tool import calc_detection_voc_ap, calc_detection_voc_prec_rec, eval_detection_voc

# Integer boxes (y_min, x_min, y_max, x_max), inclusive pixel ranges: A and B are 10 x 10 pixels.
A = [0, 0, 9, 9]
B = [20, 20, 29, 29]
FAR = [50, 50, 59, 59]


def boxes(*rows):
    return np.array(rows, dtype=np.float32).reshape(-1, 4)


def ints(*values):
    return np.array(values, dtype=np.int32)


def floats(*values):
    return np.array(values, dtype=np.float32)


def one_image(pred_bbox, pred_label, pred_score, gt_bbox, gt_label, gt_difficult=None):
    """Arguments of the evaluator for a single image."""
    args = ([pred_bbox], [pred_label], [pred_score], [gt_bbox], [gt_label])
    return args + (None if gt_difficult is None else [gt_difficult],)


def test_precision_recall_and_both_aps_by_hand():
    # Two gts (A, B). Predictions by score: 0.9 on A (TP), 0.8 far away (FP), 0.7 on B (TP), 0.6 on A
    # again (duplicate: FP). Given in shuffled order: ranking is by score.
    #   matches 1, 0, 1, 0 -> tp 1, 1, 2, 2; fp 0, 1, 1, 2
    #   prec = 1, 1/2, 2/3, 1/2; rec = 1/2, 1/2, 1, 1
    args = one_image(boxes(B, A, FAR, A), ints(0, 0, 0, 0), floats(0.7, 0.6, 0.8, 0.9),
                     boxes(A, B), ints(0, 0))
    prec, rec = calc_detection_voc_prec_rec(*args)
    np.testing.assert_allclose(prec[0], [1, 1 / 2, 2 / 3, 1 / 2])
    np.testing.assert_allclose(rec[0], [1 / 2, 1 / 2, 1, 1])
    # 11-point: t = 0 ... 0.5 (6 points) reach the first rank, precision 1; t = 0.6 ... 1 (5 points) only
    # ranks 3-4, best precision 2/3. AP = (6 * 1 + 5 * 2/3) / 11 = 28/33.
    np.testing.assert_allclose(calc_detection_voc_ap(prec, rec, use_07_metric=True), [28 / 33])
    # Area: envelope 1 on recall (0, 1/2], 2/3 on (1/2, 1]: AP = 1/2 * 1 + 1/2 * 2/3 = 5/6.
    np.testing.assert_allclose(calc_detection_voc_ap(prec, rec), [5 / 6])
    result = eval_detection_voc(*args, use_07_metric=True)
    np.testing.assert_allclose(result["ap"], [28 / 33])
    assert result["ap"].dtype == np.float64
    assert result["map"] == pytest.approx(28 / 33)


def test_rank_pools_images():
    # Image 1: gt A; predictions 0.9 on A (TP), 0.3 far (FP). Image 2: gts A and B; 0.6 on B (TP); A missed.
    #   ranks 0.9 TP, 0.6 TP, 0.3 FP; n_pos = 3 -> prec 1, 1, 2/3; rec 1/3, 2/3, 2/3
    #   11-point: t = 0 ... 0.6 (7 points) precision 1, t = 0.7 ... 1 nothing: AP = 7/11
    #   area: 1/3 * 1 + 1/3 * 1 + 1/3 * 0 = 2/3
    pred_bboxes = [boxes(A, FAR), boxes(B)]
    pred_labels = [ints(0, 0), ints(0)]
    pred_scores = [floats(0.9, 0.3), floats(0.6)]
    gt_bboxes = [boxes(A), boxes(A, B)]
    gt_labels = [ints(0), ints(0, 0)]
    prec, rec = calc_detection_voc_prec_rec(pred_bboxes, pred_labels, pred_scores, gt_bboxes, gt_labels)
    np.testing.assert_allclose(prec[0], [1, 1, 2 / 3])
    np.testing.assert_allclose(rec[0], [1 / 3, 2 / 3, 2 / 3])
    args = (pred_bboxes, pred_labels, pred_scores, gt_bboxes, gt_labels)
    assert eval_detection_voc(*args, use_07_metric=True)["map"] == pytest.approx(7 / 11)
    assert eval_detection_voc(*args)["map"] == pytest.approx(2 / 3)


def test_equal_scores_keep_input_order():
    # Two predictions on A with the same score: as in the devkit's stable sort, the first given is the
    # TP and the second the duplicate: prec 1, 1/2; rec 1, 1 (reversed ties would give prec 0, 1/2).
    args = one_image(boxes([0, 0, 9, 7], A), ints(0, 0), floats(0.5, 0.5), boxes(A), ints(0))
    prec, rec = calc_detection_voc_prec_rec(*args)
    np.testing.assert_allclose(prec[0], [1, 1 / 2])
    np.testing.assert_allclose(rec[0], [1, 1])


def test_difficult_gt_is_ignored():
    # gts: A difficult, B not. Predictions: 0.9 on A (ignored), 0.8 on A again (ignored, not a duplicate
    # FP), 0.7 on B (TP). n_pos = 1: tp 0, 0, 1; fp 0, 0, 0 -> prec NaN, NaN, 1; rec 0, 0, 1; AP 1.
    args = one_image(boxes(A, A, B), ints(0, 0, 0), floats(0.9, 0.8, 0.7), boxes(A, B), ints(0, 0),
                     np.array([True, False]))
    prec, rec = calc_detection_voc_prec_rec(*args)
    assert np.isnan(prec[0][:2]).all() and prec[0][2] == 1
    np.testing.assert_allclose(rec[0], [0, 0, 1])
    for use_07 in (True, False):
        assert eval_detection_voc(*args, use_07_metric=use_07)["map"] == pytest.approx(1.0)


def test_undetected_difficult_gt_does_not_lower_recall():
    # gts: A difficult, B; one prediction on B. With the flag: rec 1, AP 1. Without: rec 1/2, so
    # 11-point AP = 6/11 (t = 0 ... 0.5) and area AP = 1/2.
    pred = (boxes(B), ints(0), floats(0.5), boxes(A, B), ints(0, 0))
    assert eval_detection_voc(*one_image(*pred, np.array([True, False])), use_07_metric=True)["map"] == 1.0
    assert eval_detection_voc(*one_image(*pred), use_07_metric=True)["map"] == pytest.approx(6 / 11)
    assert eval_detection_voc(*one_image(*pred))["map"] == pytest.approx(1 / 2)


def test_plus_one_convention_moves_iou_across_threshold():
    # gt A = rows/cols 0..9 (10 x 10 pixels); prediction rows 0..9, cols 0..4 (10 x 5 pixels).
    # With the devkit's +1: IoU = 50 / 100 = 0.5 >= 0.5 -> TP, AP 1.
    # Without it (max - min): IoU = (9 * 4) / (9 * 9) = 0.444 -> FP, AP 0.
    args = one_image(boxes([0, 0, 9, 4]), ints(0), floats(0.9), boxes(A), ints(0))
    assert eval_detection_voc(*args, use_07_metric=True)["map"] == pytest.approx(1.0)
    # One pixel narrower: 10 x 4 = 40 / 100 with +1 -> FP.
    args = one_image(boxes([0, 0, 9, 3]), ints(0), floats(0.9), boxes(A), ints(0))
    assert eval_detection_voc(*args, use_07_metric=True)["map"] == 0.0


def test_empty_images():
    # Image 1: nothing at all. Image 2: a gt, no prediction. Image 3: a prediction, no gt (FP).
    # Image 4: gt B found at 0.8. Ranks: 0.9 FP, 0.8 TP; n_pos 2 -> prec 0, 1/2; rec 0, 1/2.
    # 11-point: t = 0 ... 0.5 -> 1/2 (6 points), rest 0: AP = 3/11. Area: 1/2 * 1/2 = 1/4.
    empty_boxes, empty_labels, empty_scores = np.zeros((0, 4), np.float32), ints(), floats()
    pred_bboxes = [empty_boxes, empty_boxes, boxes(FAR), boxes(B)]
    pred_labels = [empty_labels, empty_labels, ints(0), ints(0)]
    pred_scores = [empty_scores, empty_scores, floats(0.9), floats(0.8)]
    gt_bboxes = [empty_boxes, boxes(A), empty_boxes, boxes(B)]
    gt_labels = [empty_labels, ints(0), empty_labels, ints(0)]
    args = (pred_bboxes, pred_labels, pred_scores, gt_bboxes, gt_labels)
    prec, rec = calc_detection_voc_prec_rec(*args)
    np.testing.assert_allclose(prec[0], [0, 1 / 2])
    np.testing.assert_allclose(rec[0], [0, 1 / 2])
    assert eval_detection_voc(*args, use_07_metric=True)["map"] == pytest.approx(3 / 11)
    assert eval_detection_voc(*args)["map"] == pytest.approx(1 / 4)
    # Nothing anywhere: no class, NaN mean (and no warning).
    result = eval_detection_voc([empty_boxes], [empty_labels], [empty_scores], [empty_boxes], [empty_labels])
    assert result["ap"].shape == (0,) and math.isnan(result["map"])


def test_class_without_gt_is_nan_and_left_out_of_map():
    # Class 0: found (AP 1). Class 1: predicted, never in the gt -> NaN. Class 2: gt only -> AP 0.
    # mAP = mean(1, 0) = 0.5. With n_class=4, class 3 (nowhere) also gets an entry, NaN.
    args = one_image(boxes(A, B), ints(0, 1), floats(0.9, 0.9), boxes(A, FAR), ints(0, 2))
    result = eval_detection_voc(*args, use_07_metric=True)
    assert result["ap"].shape == (3,)
    assert result["ap"][0] == pytest.approx(1.0) and np.isnan(result["ap"][1]) and result["ap"][2] == 0.0
    assert result["map"] == pytest.approx(0.5)
    result = eval_detection_voc(*args, use_07_metric=True, n_class=4)
    assert result["ap"].shape == (4,) and np.isnan(result["ap"][3])
    assert result["map"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="n_class=2"):
        eval_detection_voc(*args, n_class=2)


def test_11_point_thresholds_are_the_devkit_codes_floating_point_ones():
    # np.arange(0., 1.1, 0.1) of voc_eval.py / ChainerCV / the original: start + k * step, so 0.3, 0.6 and
    # 0.7 are one ulp above the doubles nearest 3/10, 6/10, 7/10; the other eight are those doubles.
    thresholds = eval_tool._VOC07_RECALL_THRESHOLDS
    assert thresholds.dtype == np.float64 and thresholds.tolist() == [k * 0.1 for k in range(11)]
    assert thresholds[3] == 0.30000000000000004 > 3 / 10
    assert thresholds[6] == 0.6000000000000001 > 6 / 10
    assert thresholds[7] == 0.7000000000000001 > 7 / 10
    assert [k for k in range(11) if thresholds[k] != k / 10] == [3, 6, 7]


def test_recall_exactly_3_of_10_misses_the_devkit_threshold_0_3():
    # 10 gts, 3 found and nothing else: rec 0.1, 0.2, 0.3, prec 1. The devkit's t = 0.30000000000000004 is
    # above 3/10, so only t = 0, 0.1, 0.2 get precision 1: AP = 3/11 (exact k / 10 thresholds: 4/11).
    gt = boxes(*[[20 * i, 0, 20 * i + 9, 9] for i in range(10)])
    args = one_image(gt[:3], ints(0, 0, 0), floats(0.9, 0.8, 0.7), gt, ints(*[0] * 10))
    assert eval_detection_voc(*args, use_07_metric=True)["map"] == pytest.approx(3 / 11, abs=1e-15)


def test_recall_exactly_on_0_3_0_6_and_0_7_by_hand():
    # 10 gts G0..G9 and 10 predictions, ranked by score 1.0, 0.9, ..., 0.1:
    #   rank       1    2    3    4    5    6    7    8    9    10
    #   on         G0   G1   G2   far  G3   G4   G5   far  G6   far
    #   tp/fp      TP   TP   TP   FP   TP   TP   TP   FP   TP   FP
    #   rec        .1   .2   .3   .3   .4   .5   .6   .6   .7   .7
    #   prec       1    1    1    3/4  4/5  5/6  6/7  6/8  7/9  7/10
    # Devkit thresholds (np.arange(0., 1.1, 0.1)), largest precision at rec >= t:
    #   t = 0, 0.1, 0.2                -> 1    (rank 1-3)
    #   t = 0.30000000000000004 > 0.3  -> 6/7  (rec 0.3 misses it: ranks 5-10, best rank 7)
    #   t = 0.4, 0.5                   -> 6/7
    #   t = 0.6000000000000001 > 0.6   -> 7/9  (rec 0.6 misses it: ranks 9-10)
    #   t = 0.7000000000000001 > 0.7   -> 0    (no rank reaches it)
    #   t = 0.8, 0.9, 1                -> 0
    #   AP = (3 * 1 + 3 * 6/7 + 7/9) / 11 = (189 + 162 + 49) / 693 = 400/693
    # Exact k / 10 would give (4 * 1 + 3 * 6/7 + 7/9) / 11 = 463/693, so each of 0.3, 0.6, 0.7 matters.
    gt = [[20 * i, 0, 20 * i + 9, 9] for i in range(10)]
    far = [[20 * i, 100, 20 * i + 9, 109] for i in range(3)]
    pred = [gt[0], gt[1], gt[2], far[0], gt[3], gt[4], gt[5], far[1], gt[6], far[2]]
    score = np.arange(10, 0, -1, dtype=np.float32) / 10
    args = one_image(boxes(*pred), ints(*[0] * 10), score, boxes(*gt), ints(*[0] * 10))
    prec, rec = calc_detection_voc_prec_rec(*args)
    np.testing.assert_array_equal(rec[0], np.array([1, 2, 3, 3, 4, 5, 6, 6, 7, 7]) / 10)  # exactly k / 10
    np.testing.assert_allclose(prec[0], [1, 1, 1, 3 / 4, 4 / 5, 5 / 6, 6 / 7, 6 / 8, 7 / 9, 7 / 10])
    assert calc_detection_voc_ap(prec, rec, use_07_metric=True)[0] == pytest.approx(400 / 693, abs=1e-15)
    assert eval_detection_voc(*args, use_07_metric=True)["map"] == pytest.approx(400 / 693, abs=1e-15)


def test_input_errors():
    good = (boxes(A), ints(0), floats(0.5))
    with pytest.raises(ValueError, match="different numbers of images: pred_bboxes 1, .*gt_bboxes 2"):
        eval_detection_voc([good[0]], [good[1]], [good[2]], [boxes(A), boxes(B)], [ints(0), ints(0)])
    with pytest.raises(ValueError, match="different numbers of images: .*gt_labels 1, gt_difficults 0"):
        eval_detection_voc([good[0]], [good[1]], [good[2]], [boxes(A)], [ints(0)], gt_difficults=[])
    with pytest.raises(ValueError, match="image 0"):
        eval_detection_voc([boxes(A, B)], [ints(0)], [floats(0.5)], [boxes(A)], [ints(0)])
    with pytest.raises(ValueError, match="negative label"):
        eval_detection_voc([boxes(A)], [ints(-1)], [floats(0.5)], [boxes(A)], [ints(0)])


def two_image_scene():
    """Two images, two classes, a difficult box: ``(pred_bboxes, pred_labels, pred_scores, gt_bboxes,
    gt_labels, gt_difficults)`` as lists."""
    return ([boxes(A, FAR, B), boxes(B, A)], [ints(0, 0, 1), ints(1, 0)],
            [floats(0.9, 0.8, 0.7), floats(0.6, 0.5)], [boxes(A, B), boxes(A, B)], [ints(0, 1), ints(0, 1)],
            [np.array([False, False]), np.array([False, True])])


@pytest.mark.parametrize("with_difficult", [True, False])
def test_generators_give_what_lists_give(with_difficult):
    # Class 0 (gts: A in both images): 0.9 on A (TP), 0.8 far (FP), 0.5 on A in image 2 (TP): prec 1, 1/2,
    # 2/3; rec 1/2, 1/2, 1. Class 1 (gts: B, and B difficult in image 2 when flagged): 0.7 on B (TP), 0.6 on
    # the difficult B (ignored; TP without the flag).
    scene = two_image_scene()
    if not with_difficult:
        scene = scene[:5]
    expected = eval_detection_voc(*scene, use_07_metric=True)
    prec_list, rec_list = calc_detection_voc_prec_rec(*scene)
    result = eval_detection_voc(*((a for a in x) for x in scene), use_07_metric=True)
    prec, rec = calc_detection_voc_prec_rec(*(iter(x) for x in scene))
    np.testing.assert_array_equal(result["ap"], expected["ap"])
    assert result["map"] == expected["map"]
    for got, want in zip(prec + rec, prec_list + rec_list, strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(prec[0], [1, 1 / 2, 2 / 3])
    np.testing.assert_allclose(rec[0], [1 / 2, 1 / 2, 1])
    np.testing.assert_allclose(rec[1], [1, 1] if with_difficult else [1 / 2, 1])
    # 11-point, class 0: t = 0 ... 0.5 -> 1, t = 0.6 ... 1 -> 2/3: (6 + 5 * 2/3) / 11 = 28/33. Class 1:
    # precision 1 up to recall 1 either way: 1.
    np.testing.assert_allclose(result["ap"], [28 / 33, 1.0])


def test_generators_of_different_lengths_raise_naming_them():
    scene = two_image_scene()
    short = (iter(x) for x in scene[:3])
    with pytest.raises(ValueError, match="different numbers of images: gt_bboxes 1, pred_bboxes, "
                                         "pred_labels, pred_scores, gt_labels, gt_difficults more than 1"):
        eval_detection_voc(*short, (b for b in scene[3][:1]), *(iter(x) for x in scene[4:]))
    with pytest.raises(ValueError, match="different numbers of images: gt_difficults 0, pred_bboxes"):
        calc_detection_voc_prec_rec(*(iter(x) for x in scene[:5]), iter([]))
    # A list against a generator: the list's length is known, the generator's is found when it ends.
    with pytest.raises(ValueError, match="pred_scores 1, .* more than 1"):
        eval_detection_voc(*scene[:2], iter(scene[2][:1]), *scene[3:])
    with pytest.raises(ValueError, match="pred_labels, pred_scores, gt_bboxes 2, gt_labels more than 2"):
        eval_detection_voc(*scene[:4], iter(scene[4] * 2))


# ----------------------------------------------------------------------------------------------------
# Reference: VOCevaldet.m / VOCap.m of the VOC2012 devkit, one detection at a time.


def devkit_ap(pred_bboxes, pred_labels, pred_scores, gt_bboxes, gt_labels, gt_difficults, label, use_07):
    dets = []  # (score, image, box) in file order: image by image, input order within an image
    for i, (bbs, lbs, scs) in enumerate(zip(pred_bboxes, pred_labels, pred_scores, strict=True)):
        dets += [(float(s), i, [float(v) for v in b]) for b, lb, s in zip(bbs, lbs, scs, strict=True)
                 if lb == label]
    gts = [[([float(v) for v in b], bool(d)) for b, lb, d in zip(bbs, lbs, dfs, strict=True) if lb == label]
           for bbs, lbs, dfs in zip(gt_bboxes, gt_labels, gt_difficults, strict=True)]
    npos = sum(not d for image in gts for _, d in image)
    if npos == 0:
        return float("nan")
    detected = [[False] * len(image) for image in gts]
    tp, fp = [], []
    for _, i, bb in sorted(dets, key=lambda d: -d[0]):  # Python's sort is stable, like MATLAB's
        ovmax, jmax = -math.inf, -1
        for j, (bbgt, _) in enumerate(gts[i]):
            ih = min(bb[2], bbgt[2]) - max(bb[0], bbgt[0]) + 1
            iw = min(bb[3], bbgt[3]) - max(bb[1], bbgt[1]) + 1
            if iw > 0 and ih > 0:
                ua = ((bb[2] - bb[0] + 1) * (bb[3] - bb[1] + 1)
                      + (bbgt[2] - bbgt[0] + 1) * (bbgt[3] - bbgt[1] + 1) - iw * ih)
                if iw * ih / ua > ovmax:
                    ovmax, jmax = iw * ih / ua, j
        if ovmax >= 0.5:
            if gts[i][jmax][1]:
                tp.append(0)
                fp.append(0)
            elif not detected[i][jmax]:
                detected[i][jmax] = True
                tp.append(1)
                fp.append(0)
            else:
                tp.append(0)
                fp.append(1)
        else:
            tp.append(0)
            fp.append(1)
    tp, fp = np.cumsum(tp, dtype=np.float64), np.cumsum(fp, dtype=np.float64)
    rec = tp / npos
    with np.errstate(invalid="ignore"):
        prec = tp / (tp + fp)
    if use_07:
        ap = 0.0
        for k in range(11):
            t = k * 0.1  # np.arange(0., 1.1, 0.1)'s start + k * step: 0.30000000000000004 for k = 3
            p = [pr for pr, r in zip(prec, rec, strict=True) if r >= t and not np.isnan(pr)]
            ap += (max(p) if p else 0.0) / 11
        return ap
    mrec = [0.0, *rec, 1.0]
    mpre = [0.0, *np.nan_to_num(prec), 0.0]
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    return sum((mrec[i] - mrec[i - 1]) * mpre[i] for i in range(1, len(mrec)) if mrec[i] != mrec[i - 1])


@pytest.mark.parametrize("use_07", [True, False])
def test_matches_devkit_reference_on_random_scenes(use_07):
    rng = np.random.default_rng(1234)
    n_class = 4
    pred_bboxes, pred_labels, pred_scores, gt_bboxes, gt_labels, gt_difficults = [], [], [], [], [], []
    for _ in range(30):
        n_gt = rng.integers(0, 6)
        tl = rng.integers(0, 80, (n_gt, 2))
        gt = np.concatenate((tl, tl + rng.integers(4, 30, (n_gt, 2))), axis=1)
        gt_label = rng.integers(0, n_class, n_gt)
        # Predictions: jittered copies of gts (IoUs spread around 0.5, duplicates), plus random boxes.
        src = rng.integers(0, max(n_gt, 1), rng.integers(0, 8)) if n_gt else np.zeros(0, int)
        jitter = gt[src] + rng.integers(-4, 5, (len(src), 4))
        n_rand = rng.integers(0, 3)
        tl = rng.integers(0, 80, (n_rand, 2))
        rand = np.concatenate((tl, tl + rng.integers(4, 30, (n_rand, 2))), axis=1)
        pred = np.concatenate((jitter, rand)).reshape(-1, 4)
        pred[:, 2:] = np.maximum(pred[:, 2:], pred[:, :2])
        flip = rng.random(len(src)) < 0.15  # some predictions of the wrong class
        pred_label = np.concatenate((np.where(flip, (gt_label[src] + 1) % n_class, gt_label[src]),
                                     rng.integers(0, n_class, n_rand)))
        pred_bboxes.append(pred.astype(np.float32))
        pred_labels.append(pred_label.astype(np.int32))
        pred_scores.append(np.round(rng.random(len(pred)), 1).astype(np.float32))  # with ties
        gt_bboxes.append(gt.astype(np.float32))
        gt_labels.append(gt_label.astype(np.int32))
        gt_difficults.append(rng.random(n_gt) < 0.2)

    args = (pred_bboxes, pred_labels, pred_scores, gt_bboxes, gt_labels, gt_difficults)
    result = eval_detection_voc(*args, use_07_metric=use_07, n_class=n_class)
    expected = [devkit_ap(*args, label, use_07) for label in range(n_class)]
    np.testing.assert_allclose(result["ap"], expected, rtol=1e-12, atol=1e-12)
    assert 0.05 < result["map"] < 0.95  # a scene with both hits and misses
    assert result["map"] == pytest.approx(np.nanmean(expected))
