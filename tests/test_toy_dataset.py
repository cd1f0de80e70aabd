"""The toy VOC generator: determinism, the VOC tree it writes, boxes against pixels, ensure_toy_voc."""

import os
import types
import xml.etree.ElementTree as ET

import numpy as np
import pytest

import data.toy_dataset as toy
from data.dataset import Dataset, TestDataset
from data.toy_dataset import (
    MANIFEST_NAME,
    TOY_LABEL_NAMES,
    ToyParams,
    ensure_toy_voc,
    generate_toy_voc,
    is_complete_toy_voc,
    render_scene,
    render_toy_image,
)
from data.util import read_image
from data.voc_dataset import VOCBboxDataset

SMALL = dict(n_trainval=12, n_test=6, seed=3)


def tree_bytes(root):
    """``{relative path: bytes}`` of every file under ``root``."""
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, root)] = f.read()
    return files


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    a = tree_bytes(generate_toy_voc(tmp_path / "a", **SMALL))
    b = tree_bytes(generate_toy_voc(tmp_path / "b", **SMALL))
    assert a == b
    assert len(a) == 2 * 18 + 2 + 1  # jpg + xml per image, two split files, the manifest
    c = tree_bytes(generate_toy_voc(tmp_path / "c", **{**SMALL, "seed": 4}))
    assert c.keys() == a.keys()
    jpgs = [k for k in a if k.endswith(".jpg")]
    assert all(a[k] != c[k] for k in jpgs)


def test_split_size_does_not_change_other_images(tmp_path):
    a = tree_bytes(generate_toy_voc(tmp_path / "a", n_trainval=5, n_test=0))
    b = tree_bytes(generate_toy_voc(tmp_path / "b", n_trainval=8, n_test=0))
    for k in a:
        if k.startswith("JPEGImages"):
            assert a[k] == b[k]


def test_tree_reads_back_as_voc(tmp_path):
    root = generate_toy_voc(tmp_path / "toy", **SMALL)
    with open(os.path.join(root, "ImageSets", "Main", "trainval.txt")) as f:
        assert f.read().split() == [f"{i:06d}" for i in range(1, 13)]
    n_objects = 0
    for split, n in (("trainval", 12), ("test", 6)):
        ds = VOCBboxDataset(root, split=split, use_difficult=True, label_names=TOY_LABEL_NAMES)
        assert len(ds) == n
        for i in range(n):
            img, bbox, label, difficult = ds[i]
            _, h, w = img.shape
            assert 128 <= h <= 192 and 128 <= w <= 192
            assert bbox.dtype == np.float32 and label.dtype == np.int32 and difficult.dtype == bool
            assert len(bbox) >= 1 and ((label >= 0) & (label < len(TOY_LABEL_NAMES))).all()
            assert (bbox[:, :2] >= 0).all() and (bbox[:, 2] <= h - 1).all() and (bbox[:, 3] <= w - 1).all()
            assert (bbox[:, 2:] >= bbox[:, :2]).all()
            n_objects += len(bbox)

            # VOC's schema.
            root_el = ET.parse(ds.annotation_path(i)).getroot()
            assert root_el.tag == "annotation" and root_el.findtext("filename") == f"{ds.ids[i]}.jpg"
            assert root_el.findtext("folder")
            size = root_el.find("size")
            assert (int(size.findtext("height")), int(size.findtext("width")), size.findtext("depth")) == (
                h, w, "3")
            for obj in root_el.iter("object"):
                assert obj.findtext("pose") == "Unspecified"
                assert obj.findtext("truncated") in ("0", "1") and obj.findtext("difficult") in ("0", "1")
                assert [c.tag for c in obj.find("bndbox")] == ["xmin", "ymin", "xmax", "ymax"]
    assert n_objects >= 18 * 2  # 1-5 objects an image, about 3 on average


def test_tree_matches_rendered_images(tmp_path):
    root = generate_toy_voc(tmp_path / "toy", **SMALL)
    params = ToyParams(**SMALL)
    ds = VOCBboxDataset(root, split="test", use_difficult=True, label_names=TOY_LABEL_NAMES)
    for i in range(len(ds)):
        image, objects = render_toy_image(params, "test", i)
        img, bbox, label, difficult = ds[i]
        # The JPEG is the rendered image: JPEG drops part of the pixel noise, so compare 4x4 block means.
        _, h, w = img.shape
        blocks = (3, h // 4, 4, w // 4, 4)
        diff = img[:, :h // 4 * 4, :w // 4 * 4] - image.transpose(2, 0, 1)[:, :h // 4 * 4, :w // 4 * 4]
        assert np.abs(diff.reshape(blocks).mean(axis=(2, 4))).mean() < 2
        np.testing.assert_array_equal(bbox, [o.bbox for o in objects])  # XML 1-based - 1 == 0-based
        np.testing.assert_array_equal(label, [TOY_LABEL_NAMES.index(o.name) for o in objects])
        np.testing.assert_array_equal(difficult, [o.difficult for o in objects])


def test_boxes_match_the_drawn_pixels():
    params = ToyParams()
    rng = np.random.default_rng(11)
    n_easy = n_recovered = n_difficult = n_truncated = n_objects = 0
    for _ in range(60):
        h, w = (int(s) for s in rng.integers(128, 193, 2))
        image, objects = render_scene(rng, h, w, params)
        assert image.shape == (h, w, 3) and image.dtype == np.uint8
        assert 1 <= len(objects) <= 5
        covered = np.zeros((h, w), bool)
        for obj in objects:
            n_objects += 1
            n_difficult += obj.difficult
            y0, x0, y1, x1 = obj.bbox
            assert 0 <= y0 <= y1 < h and 0 <= x0 <= x1 < w
            rows, cols = np.flatnonzero(obj.mask.any(axis=1)), np.flatnonzero(obj.mask.any(axis=0))
            assert (rows[0], cols[0], rows[-1], cols[-1]) == obj.bbox  # tight box of the visible pixels
            assert not (covered & obj.mask).any()  # visible masks do not overlap
            covered |= obj.mask
            color = np.array(obj.color, dtype=np.float64)
            np.testing.assert_allclose(image[obj.mask].mean(axis=0), color, atol=4)  # painted there
            if obj.truncated:
                n_truncated += 1
                assert y0 == 0 or x0 == 0 or y1 == h - 1 or x1 == w - 1
            if obj.difficult:
                continue
            # Independently of the mask: pixels of the object's colour near the box span the box.
            n_easy += 1
            ys, xs = slice(max(y0 - 3, 0), y1 + 4), slice(max(x0 - 3, 0), x1 + 4)
            close = np.linalg.norm(image[ys, xs].astype(np.float64) - color, axis=2) < 30
            r, c = np.flatnonzero(close.any(axis=1)) + ys.start, np.flatnonzero(close.any(axis=0)) + xs.start
            found = (r[0], c[0], r[-1], c[-1]) if len(r) else None
            n_recovered += found is not None and np.abs(np.subtract(found, obj.bbox)).max() <= 1
    assert n_recovered >= 0.9 * n_easy
    assert 0.02 < n_difficult / n_objects < 0.2  # a few difficult objects
    assert n_truncated > 0


def test_params_are_checked(tmp_path):
    with pytest.raises(ValueError, match="min_objects"):
        generate_toy_voc(tmp_path / "a", min_objects=0)
    with pytest.raises(ValueError, match="too large"):
        generate_toy_voc(tmp_path / "a", max_object_size=150)
    with pytest.raises(TypeError):
        generate_toy_voc(tmp_path / "a", n_images=3)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    with pytest.raises(FileExistsError):
        generate_toy_voc(tmp_path / "full", **SMALL)


def test_ensure_is_idempotent_and_repairs(tmp_path):
    root = str(tmp_path / "cache" / "toy")
    assert ensure_toy_voc(root, **SMALL) == root
    reference = tree_bytes(root)
    manifest = os.path.join(root, MANIFEST_NAME)
    stamp = os.stat(manifest).st_mtime_ns
    ensure_toy_voc(root, **SMALL)
    assert os.stat(manifest).st_mtime_ns == stamp  # complete: left alone

    os.remove(os.path.join(root, "JPEGImages", "000004.jpg"))
    assert not is_complete_toy_voc(root, **SMALL)
    ensure_toy_voc(root, **SMALL)
    assert tree_bytes(root) == reference

    open(os.path.join(root, "Annotations", "000002.xml"), "w").close()  # emptied
    ensure_toy_voc(root, **SMALL)
    assert tree_bytes(root) == reference

    ensure_toy_voc(root, **{**SMALL, "n_test": 2})  # other parameters: regenerated
    assert is_complete_toy_voc(root, **{**SMALL, "n_test": 2}) and not is_complete_toy_voc(root, **SMALL)

    with open(manifest) as f:
        text = f.read()
    with open(manifest, "w") as f:
        f.write(text.replace('"version": 1', '"version": 0'))  # a tree from an older generator
    assert not is_complete_toy_voc(root, **{**SMALL, "n_test": 2})
    ensure_toy_voc(root, **{**SMALL, "n_test": 2})
    assert is_complete_toy_voc(root, **{**SMALL, "n_test": 2})
    assert not [n for n in os.listdir(tmp_path / "cache") if n != "toy"]  # no temporary folders left


def test_interrupted_generation_leaves_no_tree(tmp_path, monkeypatch):
    root = str(tmp_path / "toy")
    original = toy.render_toy_image
    calls = []

    def failing(params, split, index):
        calls.append(index)
        if len(calls) > 5:
            raise KeyboardInterrupt
        return original(params, split, index)

    monkeypatch.setattr(toy, "render_toy_image", failing)
    with pytest.raises(KeyboardInterrupt):
        ensure_toy_voc(root, **SMALL)
    assert os.listdir(tmp_path) == []  # neither a half tree nor a temporary folder

    monkeypatch.setattr(toy, "render_toy_image", original)
    ensure_toy_voc(root, **SMALL)
    reference = tree_bytes(root)
    calls.clear()
    monkeypatch.setattr(toy, "render_toy_image", failing)
    with pytest.raises(KeyboardInterrupt):
        ensure_toy_voc(root, **{**SMALL, "seed": 9})  # replacing a finished tree fails midway
    assert tree_bytes(root) == reference  # the old tree is intact
    assert os.listdir(tmp_path) == ["toy"]


def test_ensure_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="refusing"):
        ensure_toy_voc(tmp_path / "photos", **SMALL)
    assert (tmp_path / "photos" / "holiday.jpg").read_bytes() == b"precious"
    (tmp_path / "empty").mkdir()
    ensure_toy_voc(tmp_path / "empty", **SMALL)  # an empty folder is fine
    assert is_complete_toy_voc(tmp_path / "empty", **SMALL)


def test_toy_option_generates_the_default_set(tmp_path):
    opt = types.SimpleNamespace(data="toy", voc_data_dir="/nonexistent", toy_data_dir=str(tmp_path / "toy"),
                                min_size=192, max_size=320, caffe_pretrain=False, label_names=(), seed=0)
    train = Dataset(opt)  # generates the default tree (500 trainval / 150 test) on first use
    test = TestDataset(opt)
    assert len(train) == 500 and len(test) == 150
    assert train.label_names == test.label_names == TOY_LABEL_NAMES
    assert is_complete_toy_voc(opt.toy_data_dir)
    img, bbox, label, scale = train[0]
    assert min(img.shape[1:]) == 192 or max(img.shape[1:]) == 320
    assert read_image(os.path.join(opt.toy_data_dir, "JPEGImages", "000001.jpg")).shape[0] == 3
