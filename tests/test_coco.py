"""COCO data and COCO AP: the reader against the json, the label mapping, the data check, our COCOeval
wrapper against pycocotools run directly, and the toy set written as COCO."""

import contextlib
import copy
import io
import json
import math
import os
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from data.check import BadSampleWarning, check_dataset, check_splits
from data.coco_dataset import COCOAnnotationError, COCOBboxDataset, coco_annotation_path
from data.dataset import _VOCSplit
from data.toy_coco import MANIFEST_NAME, TOY_COCO_CATEGORY_IDS, ensure_toy_coco, is_complete_toy_coco
from data.toy_dataset import TOY_LABEL_NAMES
from data.util import DataError, read_image
from data.voc_dataset import VOCBboxDataset
from utils.coco_eval import COCO_METRICS, coco_results, coco_table, evaluate_coco, write_coco_results

SMALL_TOY = dict(n_trainval=6, n_test=4, seed=3)  # a seed with crowd (difficult) boxes in both splits

# Categories listed out of id order, ids with gaps: sorted by id they are cat (1), dog (5), bird (9).
CATEGORIES = [{"id": 9, "name": "bird"}, {"id": 1, "name": "cat"}, {"id": 5, "name": "dog"}]
# (id, file_name, width, height), listed out of id order.
IMAGES = [(10, "a.png", 60, 40), (3, "b.jpg", 50, 30), (7, "c.jpg", 32, 32), (12, "d.jpg", 40, 40)]
ANNOTATIONS = [  # (id, image_id, category_id, bbox, iscrowd)
    (101, 10, 5, [5.5, 6.25, 20, 10], 0),
    (102, 10, 1, [0, 0, 60, 40], 0),  # the whole image
    (103, 10, 9, [30, 10, 15, 20], 1),  # a crowd region
    (104, 3, 9, [1, 2, 3, 4], 0),
    (105, 12, 1, [2, 2, 10, 10], 1),  # image 12 has only a crowd box; image 7 has no annotation at all
]


def pixels(width, height, seed):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def write_coco(root, split, images=IMAGES, annotations=ANNOTATIONS, categories=CATEGORIES, make_files=True):
    """Write ``<root>/annotations/instances_<split>.json`` and the images (``<root>/<split>/``) with PIL."""
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    os.makedirs(os.path.join(root, split), exist_ok=True)
    if make_files:
        for image_id, name, width, height in images:
            Image.fromarray(pixels(width, height, image_id)).save(os.path.join(root, split, name))
    dataset = {
        "images": [{"id": i, "file_name": n, "width": w, "height": h} for i, n, w, h in images],
        "annotations": [{"id": a, "image_id": i, "category_id": c, "bbox": b, "iscrowd": crowd,
                         "area": b[2] * b[3] if isinstance(b, list) and len(b) == 4 else 0}
                        for a, i, c, b, crowd in annotations],
        "categories": categories,
    }
    path = coco_annotation_path(root, split)
    with open(path, "w") as f:
        json.dump(dataset, f)
    return path


@pytest.fixture
def coco_root(tmp_path):
    root = str(tmp_path / "coco")
    write_coco(root, "val")
    return root


def quiet(function, *args):
    with contextlib.redirect_stdout(io.StringIO()):
        return function(*args)


# ----------------------------------------------------------------------------------------------------------
# The reader


def expected_annotation(image_id, with_crowd):
    """Boxes, labels, crowd flags of an image, straight from the ANNOTATIONS table."""
    label_of = {1: 0, 5: 1, 9: 2}
    rows = [(b, c, crowd) for _, i, c, b, crowd in ANNOTATIONS if i == image_id and (with_crowd or not crowd)]
    bbox = np.array([[y, x, y + h, x + w] for (x, y, w, h), _, _ in rows], np.float32).reshape(-1, 4)
    return bbox, np.array([label_of[c] for _, c, _ in rows], np.int32), np.array([r[2] for r in rows], bool)


@pytest.mark.parametrize("use_difficult", [False, True])
def test_items_match_the_json(coco_root, use_difficult):
    db = COCOBboxDataset(coco_root, "val", use_difficult=use_difficult)
    assert db.ids == [3, 7, 10, 12] and len(db) == 4
    assert db.label_names == ("cat", "dog", "bird") and db.label_to_category_id == (1, 5, 9)
    assert db.annotation_path(0) == os.path.join(coco_root, "annotations", "instances_val.json")
    for i, image_id in enumerate(db.ids):
        assert db.image_id(i) == image_id
        _, name, width, height = next(im for im in IMAGES if im[0] == image_id)
        assert db.image_path(i) == os.path.join(coco_root, "val", name)
        assert db.image_size(i) == (height, width)
        img, bbox, label, difficult = db[i]
        assert img.shape == (3, height, width) and img.dtype == np.float32
        if name.endswith(".png"):
            np.testing.assert_array_equal(img, pixels(width, height, image_id).transpose(2, 0, 1))
        assert bbox.dtype == np.float32 and label.dtype == np.int32 and difficult.dtype == bool
        want = expected_annotation(image_id, use_difficult)
        for got, expected in zip((bbox, label, difficult), want, strict=True):
            np.testing.assert_array_equal(got, expected)
        assert db.annotation_ids(i) == [a for a, im, _, _, crowd in ANNOTATIONS
                                        if im == image_id and (use_difficult or not crowd)]
    bbox, _, _ = db.get_annotation(db.ids.index(10))
    np.testing.assert_array_equal(bbox[0], [6.25, 5.5, 16.25, 25.5])  # [x, y, w, h] -> (y, x, y + h, x + w)
    assert db.get_annotation(db.ids.index(7))[0].shape == (0, 4)


def test_skip_empty_follows_the_crowd_rule(coco_root):
    # Without crowd boxes (training), image 12 (crowd only) is empty as image 7 (nothing) is.
    assert COCOBboxDataset(coco_root, "val", skip_empty=True).ids == [3, 10]
    assert COCOBboxDataset(coco_root, "val", use_difficult=True, skip_empty=True).ids == [3, 10, 12]


def test_label_mapping_round_trip(coco_root):
    db = COCOBboxDataset(coco_root, "val")
    for label, category_id in enumerate(db.label_to_category_id):
        assert db.category_id_to_label[category_id] == label
    for category in CATEGORIES:
        assert db.label_to_category_id[db.category_id_to_label[category["id"]]] == category["id"]
        assert db.label_names[db.category_id_to_label[category["id"]]] == category["name"]

    # Ground truth -> our arrays -> COCO results: the json's own category ids and boxes come back.
    every = COCOBboxDataset(coco_root, "val", use_difficult=True)
    annotations = [every.get_annotation(i) for i in range(len(every))]
    results = coco_results(every.ids, [a[0] for a in annotations], [a[1] for a in annotations],
                           [np.ones(len(a[1])) for a in annotations], every.label_to_category_id)
    by_image = sorted(ANNOTATIONS, key=lambda a: every.ids.index(a[1]))  # our order: image, then json order
    assert [(r["image_id"], r["category_id"], r["bbox"]) for r in results] == [
        (i, c, [float(v) for v in b]) for _, i, c, b, _ in by_image]


def test_label_names_select_and_order_categories(coco_root):
    db = COCOBboxDataset(coco_root, "val", use_difficult=True, label_names=(" Bird", "cat"))
    assert db.label_names == (" Bird", "cat") and db.label_to_category_id == (9, 1)
    assert db.category_id_to_label == {9: 0, 1: 1}
    _, label, _ = db.get_annotation(db.ids.index(10))
    np.testing.assert_array_equal(label, [1, 0])  # the dog (category 5) is left out; cat, then bird
    assert db.annotation_ids(db.ids.index(10)) == [102, 103]
    with pytest.raises(ValueError, match="'horse' matches no category.*1 'cat', 5 'dog', 9 'bird'"):
        COCOBboxDataset(coco_root, "val", label_names=("cat", "horse"))
    with pytest.raises(ValueError, match="equal up to case"):
        COCOBboxDataset(coco_root, "val", label_names=("cat", "CAT"))


def test_file_errors_name_the_json(tmp_path):
    root = str(tmp_path / "coco")
    path = coco_annotation_path(root, "val")
    with pytest.raises(COCOAnnotationError, match="no such file") as info:
        COCOBboxDataset(root, "val")
    assert info.value.path == path and isinstance(info.value, DataError)

    write_coco(root, "val")
    for text, words in (("{not json", "cannot parse JSON"), ("[1, 2]", "top level is a list"),
                        ('{"images": [], "categories": []}', None)):
        with open(path, "w") as f:
            f.write(text)
        if words is None:
            assert len(COCOBboxDataset(root, "val")) == 0  # no annotations list: images only, allowed
            continue
        with pytest.raises(COCOAnnotationError, match=words) as info:
            COCOBboxDataset(root, "val")
        assert info.value.path == path

    write_coco(root, "val", images=[IMAGES[0], IMAGES[0]], make_files=False)
    with pytest.raises(COCOAnnotationError, match=r"images\[1\]: id 10 appears twice"):
        COCOBboxDataset(root, "val")
    with open(path) as f:
        dataset = json.load(f)
    del dataset["images"][1], dataset["annotations"][2]["image_id"]
    with open(path, "w") as f:
        json.dump(dataset, f)
    with pytest.raises(COCOAnnotationError, match=r"annotations\[2\] is not an object with the keys id, "):
        COCOBboxDataset(root, "val")


def test_unknown_category_and_malformed_box_are_reported_by_get_annotation(tmp_path):
    root = str(tmp_path / "coco")
    annotations = [(301, 10, 1, [1, 1, 5, 5], 0), (302, 10, 77, [1, 1, 5, 5], 0),
                   (303, 3, 5, [1, 1, 5], 0), (304, 7, 5, [1, "2", 5, 5], 1)]
    write_coco(root, "val", images=IMAGES[:3], annotations=annotations)
    db = COCOBboxDataset(root, "val")  # construction does not fail
    with pytest.raises(COCOAnnotationError) as info:
        db.get_annotation(db.ids.index(10))
    assert (info.value.image_id, info.value.annotation_id, info.value.path) == (10, 302, db.annotation_file)
    assert info.value.reason == ("image id 10 (a.png) annotation id 302: unknown category id 77 "
                                 "(the json's categories: 1, 5, 9)")
    with pytest.raises(COCOAnnotationError, match=r"image id 3 \(b.jpg\) annotation id 303: bbox is not"):
        db.get_annotation(db.ids.index(3))
    assert len(db.get_annotation(db.ids.index(7))[0]) == 0  # the bad crowd box is left out of training...
    with pytest.raises(COCOAnnotationError, match=r"annotation id 304: bbox is not four numbers"):
        COCOBboxDataset(root, "val", use_difficult=True).get_annotation(db.ids.index(7))  # ...not out of eval


# ----------------------------------------------------------------------------------------------------------
# The data check


def test_check_reports_coco_problems_with_their_ids(tmp_path):
    root = str(tmp_path / "coco")
    images = [(1, "good.jpg", 60, 40), (2, "missing.jpg", 60, 40), (3, "boxes.jpg", 60, 40),
              (4, "unknown.jpg", 60, 40), (5, "empty.jpg", 30, 30), (6, "crowd_only.jpg", 60, 40),
              (8, "malformed.jpg", 60, 40), (9, "size.jpg", 60, 40)]
    annotations = [
        (11, 1, 1, [0, 0, 60, 40], 0),  # the whole image
        (12, 1, 5, [-1, -0.5, 61, 40.5], 0),  # within the one pixel of tolerance
        (21, 2, 1, [1, 1, 5, 5], 0),
        (31, 3, 1, [5, 5, 0, 10], 0),  # no area
        (32, 3, 5, [5, 5, 10, -2], 0),  # negative height
        (33, 3, 9, [50, 5, 11.5, 10], 0),  # x + w = 61.5 > 60 + 1
        (34, 3, 1, [5, float("nan"), 10, 10], 0),
        (35, 3, 5, [-3, 5, 10, 10], 1),  # a crowd box outside is checked too
        (36, 3, 1, [10, 10, 10, 10], 0),  # good
        (41, 4, 1, [1, 1, 5, 5], 0), (42, 4, 4, [1, 1, 5, 5], 0),  # category 4 does not exist
        (61, 6, 9, [1, 1, 20, 20], 1),
        (81, 8, 9, [1, 1, 20], 0),
        (91, 9, 1, [1, 1, 5, 5], 0),
    ]
    write_coco(root, "train", images=images, annotations=annotations)
    os.remove(os.path.join(root, "train", "missing.jpg"))
    Image.fromarray(pixels(40, 60, 9)).save(os.path.join(root, "train", "size.jpg"))  # rotated: 40x60
    db = COCOBboxDataset(root, "train")
    report = check_dataset(db, progress=False)

    assert report.n_checked == 8 and not report.ok
    problems = {}
    for p in report.problems:
        problems.setdefault(p.image_id, []).append(p)
    assert sorted(problems) == [2, 3, 4, 8, 9]
    assert report.bad_indices == [db.ids.index(i) for i in (2, 3, 4, 8, 9)]
    assert report.empty == [5, 6]  # nothing, or only a crowd box (left out of training)
    json_path = db.annotation_file

    (missing,) = problems[2]
    assert missing.path == os.path.join(root, "train", "missing.jpg")
    assert missing.reason == "image id 2 (missing.jpg): no such file"
    where = "image id 3 (boxes.jpg): "
    assert all(p.path == json_path and p.reason.startswith(where) for p in problems[3])
    assert [p.reason.removeprefix(where) for p in problems[3]] == [
        "annotation id 31 ('cat') bbox x=5 y=5 w=0 h=10: no area (needs w > 0 and h > 0)",
        "annotation id 32 ('dog') bbox x=5 y=5 w=10 h=-2: no area (needs w > 0 and h > 0)",
        "annotation id 33 ('bird') bbox x=50 y=5 w=11.5 h=10: outside the 60x40 (width x height) image",
        "annotation id 34 ('cat') bbox x=5 y=nan w=10 h=nan: a coordinate is not a finite number",
        "annotation id 35 ('dog') bbox x=-3 y=5 w=10 h=10: outside the 60x40 (width x height) image",
    ]
    (unknown,) = problems[4]
    assert unknown.path == json_path
    assert "image id 4 (unknown.jpg) annotation id 42: unknown category id 4" in unknown.reason
    (malformed,) = problems[8]
    assert "image id 8 (malformed.jpg) annotation id 81: bbox is not four numbers" in malformed.reason
    (size,) = problems[9]
    assert size.path == os.path.join(root, "train", "size.jpg")
    assert size.reason == "image id 9 (size.jpg): the image is 40x60 (width x height) but the json says 60x40"
    text = report.format()
    assert "8 samples checked" in text and "5 bad" in text and "2 without objects" in text

    # Skipping: the bad samples are dropped from the split (the drop of data/dataset.py rewrites db.ids).
    split = _VOCSplit()
    split.db = db
    with pytest.warns(BadSampleWarning) as warned:
        check_splits([split], skip_bad_samples=True, progress=False)
    assert [str(w.message) for w in warned] == [
        f"skipping sample {p.image_id} of train: {p}" for p in report.problems]
    assert db.ids == [1, 5, 6] and len(split) == 3
    assert check_dataset(db, progress=False).ok


def test_check_of_a_json_without_images(tmp_path):
    root = str(tmp_path / "coco")
    write_coco(root, "val", images=[], annotations=[])
    report = check_dataset(COCOBboxDataset(root, "val"), progress=False)
    (problem,) = report.problems
    assert (problem.path, problem.reason) == (coco_annotation_path(root, "val"), "lists no image")


# ----------------------------------------------------------------------------------------------------------
# COCO AP


def random_detections(db, rng, n_per_image=12):
    """Ground-truth boxes jittered, relabelled now and then, plus random boxes, with random scores."""
    image_ids, bboxes, labels, scores = [], [], [], []
    every = COCOBboxDataset(db.data_dir, db.split, use_difficult=True, annotation_file=db.annotation_file,
                            image_dir=db.image_dir)
    n_class = len(db.label_names)
    for i in range(len(every)):
        height, width = every.image_size(i)
        gt_bbox, gt_label, _ = every.get_annotation(i)
        n_random = int(rng.integers(0, n_per_image))
        y0, x0 = rng.uniform(0, height, n_random), rng.uniform(0, width, n_random)
        random_boxes = np.stack((y0, x0, y0 + rng.uniform(2, height, n_random),
                                 x0 + rng.uniform(2, width, n_random)), axis=1)
        scale = np.concatenate((gt_bbox[:, 2:] - gt_bbox[:, :2],) * 2, axis=1)
        jittered = gt_bbox + rng.normal(0, 0.08, gt_bbox.shape) * scale
        n_gt = len(gt_label)
        relabelled = np.where(rng.random(n_gt) < 0.2, rng.integers(0, n_class, n_gt), gt_label)
        image_ids.append(every.ids[i])
        bboxes.append(np.concatenate((jittered, random_boxes)).astype(np.float32))
        labels.append(np.concatenate((relabelled, rng.integers(0, n_class, n_random))).astype(np.int32))
        scores.append(rng.random(len(bboxes[-1])).astype(np.float32))
    return coco_results(image_ids, bboxes, labels, scores, db.label_to_category_id)


def pycocotools_stats(gt_json, results_json, image_ids=None, category_ids=None):
    """COCO API as its own example runs it, on the json files."""
    gt = quiet(COCO, gt_json)
    dt = quiet(gt.loadRes, results_json)
    evaluator = COCOeval(gt, dt, "bbox")
    if image_ids is not None:
        evaluator.params.imgIds = image_ids
    if category_ids is not None:
        evaluator.params.catIds = category_ids
    for step in (evaluator.evaluate, evaluator.accumulate, evaluator.summarize):
        quiet(step)
    return [float(s) for s in evaluator.stats]


def same(a, b):
    return a == b or (math.isnan(a) and math.isnan(b))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_evaluate_coco_equals_pycocotools_on_the_same_json(tmp_path, seed):
    root = ensure_toy_coco(tmp_path / "toy_coco", **SMALL_TOY)
    db = COCOBboxDataset(root, "test", use_difficult=True)
    rng = np.random.default_rng(seed)
    results = random_detections(db, rng)
    before = copy.deepcopy(results)
    path = write_coco_results(tmp_path / "out" / "coco_instances_results.json", results)
    assert os.listdir(tmp_path / "out") == ["coco_instances_results.json"]  # no temporary file left

    metrics = evaluate_coco(db.coco, results)
    assert results == before  # loadRes got copies
    direct = pycocotools_stats(db.annotation_file, path)
    assert metrics["stats"] == direct
    for name, value in zip(COCO_METRICS, direct, strict=False):
        assert same(metrics[name], value if value > -1 else float("nan")), name
    assert metrics["map"] == metrics["AP"] and 0 < metrics["AP"] < 1

    # Per-category AP: each category evaluated alone by pycocotools.
    assert metrics["category_ids"] == TOY_COCO_CATEGORY_IDS
    for category_id, ap in zip(metrics["category_ids"], metrics["ap"], strict=True):
        alone = pycocotools_stats(db.annotation_file, path, category_ids=[category_id])[0]
        assert same(float(ap), alone if alone > -1 else float("nan"))

    # A subset of the images (as with test_num or dropped samples), categories in label order.
    subset = db.ids[1:3]
    part = evaluate_coco(db.coco, results, image_ids=subset, label_to_category_id=db.label_to_category_id)
    assert part["stats"] == pycocotools_stats(db.annotation_file, path, image_ids=subset)
    assert part["stats"] != metrics["stats"]


def one_image_coco(tmp_path):
    """One image, one cat (area 2000: medium) and a crowd of cats; no dog."""
    root = str(tmp_path / "one")
    write_coco(root, "val", images=[(1, "a.jpg", 200, 200)], annotations=[
        (1, 1, 1, [10, 10, 50, 40], 0),
        (2, 1, 1, [100, 100, 60, 80], 1),
    ], categories=[{"id": 1, "name": "cat"}, {"id": 5, "name": "dog"}])
    return COCOBboxDataset(root, "val")


def test_hand_worked_cases(tmp_path):
    db = one_image_coco(tmp_path)
    hit = {"image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 40], "score": 0.5}
    one = pytest.approx(1.0, rel=1e-12)  # COCOeval's precision is tp / (tp + fp + machine epsilon)
    metrics = evaluate_coco(db.coco, [hit])
    assert [metrics[name] for name in ("AP", "AP50", "AP75", "APm")] == [one] * 4
    assert math.isnan(metrics["APs"]) and math.isnan(metrics["APl"])  # no small or large object
    assert metrics["ap"][0] == one and np.isnan(metrics["ap"][1])  # no dog at all

    # A higher-scored cat detection inside the crowd region is ignored (neither hit nor false positive)...
    on_crowd = {"image_id": 1, "category_id": 1, "bbox": [105, 105, 40, 60], "score": 0.9}
    assert evaluate_coco(db.coco, [hit, on_crowd])["AP"] == one
    # ...while the same detection elsewhere is a false positive ranked first: precision 1/2 at every recall.
    elsewhere = {**on_crowd, "bbox": [10, 120, 40, 60]}
    assert evaluate_coco(db.coco, [hit, elsewhere])["AP"] == pytest.approx(0.5, rel=1e-12)
    # Wrong category: nothing found.
    assert evaluate_coco(db.coco, [{**hit, "category_id": 5}])["AP"] == 0.0
    # Shifted by 10 px: IoU 1600 / 2400 = 0.667, a hit at 4 of the 10 thresholds (0.50, 0.55, 0.60, 0.65).
    shifted = {**hit, "bbox": [20, 10, 50, 40]}
    metrics = evaluate_coco(db.coco, [shifted])
    assert metrics["AP50"] == one and metrics["AP75"] == 0.0
    assert metrics["AP"] == pytest.approx(0.4, rel=1e-12)


def test_no_detections_scores_zero_where_there_is_ground_truth(tmp_path):
    db = one_image_coco(tmp_path)
    metrics = evaluate_coco(db.coco, [])
    assert metrics["AP"] == metrics["AP50"] == metrics["AP75"] == metrics["APm"] == 0.0
    assert math.isnan(metrics["APs"]) and math.isnan(metrics["APl"])
    np.testing.assert_array_equal(metrics["ap"], [0.0, np.nan])
    # The same as pycocotools with a detection that matches nothing at a score that cannot matter.
    far = {"image_id": 1, "category_id": 1, "bbox": [190, 190, 1, 1], "score": 0.01}
    assert evaluate_coco(db.coco, [far])["stats"][:6] == metrics["stats"][:6]


def test_ground_truth_as_detections_scores_one(tmp_path):
    # Through the whole path: json -> our boxes -> COCO results -> COCOeval. One pixel off anywhere would
    # cost the high IoU thresholds on the toy's small shapes.
    root = ensure_toy_coco(tmp_path / "toy_coco", **SMALL_TOY)
    db = COCOBboxDataset(root, "trainval")  # crowd boxes left out: COCOeval ignores them anyway
    annotations = [db.get_annotation(i) for i in range(len(db))]
    results = coco_results(db.ids, [a[0] for a in annotations], [a[1] for a in annotations],
                           [np.linspace(1, 0.5, len(a[1])) for a in annotations], db.label_to_category_id)
    metrics = evaluate_coco(db.coco, results, label_to_category_id=db.label_to_category_id)
    one = pytest.approx(1.0, rel=1e-12)  # COCOeval's precision is tp / (tp + fp + machine epsilon)
    assert metrics["AP"] == one and metrics["AP50"] == one
    assert [v for v in metrics["ap"] if not math.isnan(v)] == [one] * len(TOY_LABEL_NAMES)


def test_coco_table_and_results_file(tmp_path):
    db = one_image_coco(tmp_path)
    results = [{"image_id": 1, "category_id": 1, "bbox": [10.0, 10.0, 50.0, 40.0], "score": 0.5}]
    metrics = evaluate_coco(db.coco, results)
    table = coco_table(metrics).splitlines()
    assert table[0].split() == list(COCO_METRICS)
    assert table[1].split() == ["1.0000", "1.0000", "1.0000", "nan", "1.0000", "nan"]  # 1 - 2e-16 rounds
    with_classes = coco_table(metrics, class_names=db.label_names)
    assert "cat    1.0000" in with_classes and "dog    nan" in with_classes

    path = write_coco_results(tmp_path / "run" / "coco_instances_results.json", results)
    with open(path) as f:
        assert json.load(f) == results
    gt = quiet(COCO, db.annotation_file)
    assert len(quiet(gt.loadRes, path).getAnnIds()) == 1  # any COCO tool reads it back


# ----------------------------------------------------------------------------------------------------------
# The toy set as COCO


def test_toy_coco_tree_is_the_toy_voc_tree(tmp_path):
    root = ensure_toy_coco(tmp_path / "toy_coco", **SMALL_TOY)
    voc_root = str(tmp_path / "toy_coco_voc")
    assert sorted(os.listdir(tmp_path)) == ["toy_coco", "toy_coco_voc"]
    for split, n_images in (("trainval", 6), ("test", 4)):
        gt = quiet(COCO, os.path.join(root, "annotations", f"instances_{split}.json"))
        voc = VOCBboxDataset(voc_root, split=split, use_difficult=True, label_names=TOY_LABEL_NAMES)
        voc_objects = [voc.get_annotation(i) for i in range(len(voc))]
        assert len(gt.getImgIds()) == len(voc) == n_images
        assert len(gt.getAnnIds()) == sum(len(o[1]) for o in voc_objects)
        assert len(gt.getAnnIds(iscrowd=True)) == sum(int(o[2].sum()) for o in voc_objects) > 0
        assert sorted(gt.getCatIds()) == list(TOY_COCO_CATEGORY_IDS) != list(range(1, 7))
        assert [c["name"] for c in gt.loadCats(sorted(gt.getCatIds()))] == list(TOY_LABEL_NAMES)

        db = COCOBboxDataset(root, split, use_difficult=True)
        assert db.ids == [int(i) for i in voc.ids] and db.label_names == TOY_LABEL_NAMES
        assert check_dataset(db, progress=False).ok
        for i in range(len(db)):
            # The raw XML against the raw json: x = xmin - 1, w = xmax - xmin + 1 (1-based inclusive ->
            # continuous 0-based), same order, crowd = difficult.
            xml = ET.parse(voc.annotation_path(i)).getroot()
            want = []
            for obj in xml.iter("object"):
                box = {t: int(obj.find("bndbox").findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax")}
                want.append(([box["xmin"] - 1, box["ymin"] - 1, box["xmax"] - box["xmin"] + 1,
                              box["ymax"] - box["ymin"] + 1], int(obj.findtext("difficult")),
                             TOY_COCO_CATEGORY_IDS[TOY_LABEL_NAMES.index(obj.findtext("name"))]))
            anns = gt.loadAnns(gt.getAnnIds(imgIds=db.ids[i]))
            assert [(a["bbox"], a["iscrowd"], a["category_id"]) for a in anns] == want
            info = gt.loadImgs(db.ids[i])[0]
            assert (info["height"], info["width"]) == xml_size(xml)
            # The two readers: equal top-left corners, COCO's bottom-right one pixel further.
            voc_bbox, voc_label, voc_difficult = voc_objects[i]
            bbox, label, difficult = db.get_annotation(i)
            np.testing.assert_array_equal(bbox, voc_bbox + np.float32([0, 0, 1, 1]))
            np.testing.assert_array_equal(label, voc_label)
            np.testing.assert_array_equal(difficult, voc_difficult)
            np.testing.assert_array_equal(read_image(db.image_path(i)), read_image(voc.image_path(i)))


def xml_size(xml):
    size = xml.find("size")
    return int(size.findtext("height")), int(size.findtext("width"))


def tree_bytes(root):
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                files[os.path.relpath(os.path.join(folder, name), root)] = f.read()
    return files


def test_ensure_toy_coco_is_deterministic_idempotent_and_repairs(tmp_path):
    root = str(tmp_path / "cache" / "toy_coco")
    assert ensure_toy_coco(root, **SMALL_TOY) == root
    reference = tree_bytes(root)
    assert tree_bytes(ensure_toy_coco(tmp_path / "other", **SMALL_TOY)) == reference
    assert os.stat(os.path.join(root, "test", "000007.jpg")).st_nlink == 2  # hard link to the VOC tree's

    manifest = os.path.join(root, MANIFEST_NAME)
    stamp = os.stat(manifest).st_mtime_ns
    ensure_toy_coco(root, **SMALL_TOY)
    assert os.stat(manifest).st_mtime_ns == stamp  # complete: left alone

    os.remove(os.path.join(root, "trainval", "000002.jpg"))
    assert not is_complete_toy_coco(root, **SMALL_TOY)
    ensure_toy_coco(root, **SMALL_TOY)
    assert tree_bytes(root) == reference
    with open(os.path.join(root, "annotations", "instances_test.json"), "w") as f:
        f.write("{")  # cut short
    ensure_toy_coco(root, **SMALL_TOY)
    assert tree_bytes(root) == reference

    ensure_toy_coco(root, **{**SMALL_TOY, "n_test": 2})  # other parameters: replaced
    assert is_complete_toy_coco(root, **{**SMALL_TOY, "n_test": 2})
    assert not is_complete_toy_coco(root, **SMALL_TOY)
    assert len(COCOBboxDataset(root, "test")) == 2
    assert sorted(os.listdir(tmp_path / "cache")) == ["toy_coco", "toy_coco_voc"]  # no temporary folders left

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "photo.jpg").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="not a toy COCO data set"):
        ensure_toy_coco(tmp_path / "mine", **SMALL_TOY)
