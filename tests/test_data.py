"""data/: image reading, the VOC reader, preprocessing, flips, and the Dataset/TestDataset contracts."""

import os
import types

import numpy as np
import pytest
import torch
from PIL import Image

from data.dataset import Dataset, TestDataset, Transform, inverse_normalize, preprocess
from data.util import ImageReadError, flip_bbox, random_flip, read_image, resize_bbox, resize_image
from data.voc_dataset import VOC_BBOX_LABEL_NAMES, AnnotationError, VOCBboxDataset

# ----------------------------------------------------------------------------------------------------
# read_image


def rgb_pattern(h=12, w=16):
    """``(H, W, 3)`` uint8 with distinct values per channel."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack(((y * 20) % 256, (x * 15) % 256, (y * 7 + x * 11) % 256), axis=2).astype(np.uint8)


def test_read_image_rgb_png_is_exact(tmp_path):
    rgb = rgb_pattern()
    Image.fromarray(rgb).save(tmp_path / "a.png")
    img = read_image(tmp_path / "a.png")
    assert img.shape == (3, 12, 16) and img.dtype == np.float32
    np.testing.assert_array_equal(img, rgb.transpose(2, 0, 1))
    assert read_image(tmp_path / "a.png", dtype=np.uint8).dtype == np.uint8


def test_read_image_rgb_jpeg_is_close(tmp_path):
    rgb = np.zeros((32, 48, 3), np.uint8)
    rgb[8:24, 8:40] = (200, 60, 30)
    Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=95)
    img = read_image(tmp_path / "a.jpg")
    assert img.shape == (3, 32, 48)
    assert np.abs(img - rgb.transpose(2, 0, 1)).mean() < 3


def test_read_image_gray_modes(tmp_path):
    gray = np.arange(12 * 16, dtype=np.uint8).reshape(12, 16)
    Image.fromarray(gray, mode="L").save(tmp_path / "l.png")
    img = read_image(tmp_path / "l.png")
    assert img.shape == (3, 12, 16)
    for c in range(3):
        np.testing.assert_array_equal(img[c], gray)
    one = read_image(tmp_path / "l.png", color=False)
    assert one.shape == (1, 12, 16)
    np.testing.assert_array_equal(one[0], gray)

    Image.fromarray(gray > 100).save(tmp_path / "bw.png")  # mode '1'
    assert Image.open(tmp_path / "bw.png").mode == "1"
    np.testing.assert_array_equal(read_image(tmp_path / "bw.png")[1], np.where(gray > 100, 255, 0))


def test_read_image_16_bit_png_is_rescaled(tmp_path):
    # 257 * k is k on the 8-bit scale; PIL's own conversion would clip everything above 255 to 255.
    values = (257 * np.arange(0, 256, 17)).astype(np.uint16).reshape(4, 4)
    values[3, 3] = 65535
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    expected = np.round(values / 257.0)
    img = read_image(tmp_path / "g16.png")
    assert img.shape == (3, 4, 4)
    np.testing.assert_array_equal(img[2], expected)
    np.testing.assert_array_equal(read_image(tmp_path / "g16.png", color=False)[0], expected)


def test_read_image_cmyk_jpeg(tmp_path):
    cmyk = np.zeros((16, 16, 4), np.uint8)
    cmyk[:, :8] = (0, 255, 255, 0)  # red
    cmyk[:, 8:] = (255, 0, 255, 0)  # green
    Image.fromarray(cmyk, mode="CMYK").save(tmp_path / "c.jpg", quality=95)
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    img = read_image(tmp_path / "c.jpg")
    assert img.shape == (3, 16, 16)
    np.testing.assert_allclose(img[:, 4:12, 1:6].mean(axis=(1, 2)), (255, 0, 0), atol=8)
    np.testing.assert_allclose(img[:, 4:12, 10:15].mean(axis=(1, 2)), (0, 255, 0), atol=8)


def test_read_image_rgba_drops_alpha(tmp_path):
    rgba = np.concatenate((rgb_pattern(), np.zeros((12, 16, 1), np.uint8)), axis=2)
    rgba[:6, :, 3] = 255  # top half opaque, bottom half fully transparent
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), rgba[:, :, :3].transpose(2, 0, 1))
    la = np.stack((rgba[:, :, 0], rgba[:, :, 3]), axis=2)
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_image(tmp_path / "la.png", color=False)[0], rgba[:, :, 0])


def test_read_image_palette(tmp_path):
    index = (np.arange(4 * 6).reshape(4, 6) % 3).astype(np.uint8)
    palette = [255, 0, 0, 0, 255, 0, 10, 20, 250]  # red, green, blue-ish
    img = Image.fromarray(index, mode="P")
    img.putpalette(palette)
    img.save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    colors = np.array(palette, dtype=np.float32).reshape(3, 3)
    np.testing.assert_array_equal(read_image(tmp_path / "p.png"), colors[index].transpose(2, 0, 1))
    # color=False gives luminance (ITU-R 601-2: L = 0.299 R + 0.587 G + 0.114 B), not palette indices.
    luma = colors @ np.array([0.299, 0.587, 0.114])
    gray = read_image(tmp_path / "p.png", color=False)
    assert gray.shape == (1, 4, 6)
    np.testing.assert_allclose(gray[0], luma[index], atol=1)


def test_read_image_bad_files_name_the_file(tmp_path):
    Image.fromarray(rgb_pattern(64, 64)).save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    # PIL opens the truncated file lazily without complaint; read_image must decode it and fail.
    with Image.open(tmp_path / "cut.jpg") as lazy:
        assert lazy.size == (64, 64)
    (tmp_path / "text.jpg").write_text("not an image\n")
    cases = (("cut.jpg", "truncated"), ("text.jpg", "cannot identify"), ("missing.jpg", "no such"))
    for name, cause in cases:
        path = tmp_path / name
        with pytest.raises(ImageReadError, match=cause) as info:
            read_image(path)
        assert str(path) in str(info.value) and info.value.path == str(path)
        assert isinstance(info.value, ValueError)


# ----------------------------------------------------------------------------------------------------
# Boxes and flips


def test_resize_bbox():
    bbox = np.array([[10, 20, 30, 40]], dtype=np.float32)
    out = resize_bbox(bbox, (100, 200), (50, 600))
    np.testing.assert_allclose(out, [[5, 60, 15, 120]])
    assert out.dtype == np.float32 and bbox[0, 0] == 10  # input untouched


@pytest.mark.parametrize("y_flip,x_flip", [(False, True), (True, False), (True, True)])
def test_flip_bbox_follows_flipped_content(y_flip, x_flip):
    # Pixels rows [5, 12) x cols [3, 20) are marked; box corners are pixel edges (5, 3, 12, 20).
    img = np.zeros((1, 30, 41), np.float32)
    img[:, 5:12, 3:20] = 1
    bbox = np.array([[5, 3, 12, 20]], dtype=np.float32)
    flipped = img[:, ::-1 if y_flip else 1, ::-1 if x_flip else 1]
    fb = flip_bbox(bbox, (30, 41), y_flip=y_flip, x_flip=x_flip)[0].astype(int)
    rows, cols = np.flatnonzero(flipped[0].any(axis=1)), np.flatnonzero(flipped[0].any(axis=0))
    assert (fb[0], fb[1], fb[2], fb[3]) == (rows[0], cols[0], rows[-1] + 1, cols[-1] + 1)


def test_random_flip_uses_the_generator():
    img = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    draws = [random_flip(img, x_random=True, return_param=True, rng=np.random.default_rng(s))[1]["x_flip"]
             for s in range(200)]
    assert 70 < sum(draws) < 130  # about half
    a = [random_flip(img, y_random=True, x_random=True, return_param=True, rng=np.random.default_rng(7))[1]
         for _ in range(3)]
    assert a[0] == a[1] == a[2]
    rng = np.random.default_rng(0)
    for _ in range(20):
        out, param = random_flip(img, y_random=True, x_random=True, return_param=True, copy=True, rng=rng)
        expected = img[:, ::-1 if param["y_flip"] else 1, ::-1 if param["x_flip"] else 1]
        np.testing.assert_array_equal(out, expected)
        assert out.flags.c_contiguous
    assert random_flip(img, rng=rng) is img  # nothing enabled: no flip


# ----------------------------------------------------------------------------------------------------
# preprocess / inverse_normalize


@pytest.mark.parametrize("size,expected", [
    ((375, 500), (600, 800)),
    ((500, 375), (800, 600)),
    ((333, 500), (600, 901)),  # 500 * 600 / 333 = 900.9
    ((281, 500), (562, 1000)),  # the 1000 cap binds: scale 2
    ((100, 1000), (100, 1000)),
])
def test_preprocess_output_size(size, expected):
    img = np.full((3, *size), 128, np.float32)
    out = preprocess(img)
    assert out.shape == (3, *expected) and out.dtype == np.float32


def test_preprocess_resize_is_pixel_centre_bilinear():
    # A horizontal ramp img[x] = x resized by 2 (no anti-aliasing): output pixel j samples input
    # coordinate (j + 0.5) / 2 - 0.5, so away from the borders out[j] = (j + 0.5) / 2 - 0.5 exactly.
    ramp = np.broadcast_to(np.arange(50, dtype=np.float32), (3, 40, 50))
    out = inverse_normalize(preprocess(ramp, min_size=80, max_size=1000, normalize="caffe"), "caffe")
    assert out.shape == (3, 80, 100)
    j = np.arange(2, 98)
    np.testing.assert_allclose(out[0, 40, j], (j + 0.5) / 2 - 0.5, atol=1e-3)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_resize_image_matches_the_originals_skimage_resize(dtype):
    # The original resized with skimage (bilinear, mirrored borders, no anti-aliasing): same values on
    # random images and sizes, up- and down-sampling, 1-pixel sides included.
    from skimage.transform import resize

    rng = np.random.default_rng()
    for _ in range(200):
        (h, w), (out_h, out_w) = rng.integers(1, 40, 2), rng.integers(1, 90, 2)
        img = rng.uniform(0, 255, (3, h, w)).astype(dtype)
        expected = resize(img, (3, out_h, out_w), order=1, mode="reflect", anti_aliasing=False)
        out = resize_image(img, (out_h, out_w))
        assert out.shape == (3, out_h, out_w) and out.dtype == dtype
        np.testing.assert_allclose(out, expected, rtol=0, atol=1e-4 if dtype == np.float32 else 1e-9)


def test_resize_image_hand_worked_borders():
    # [0, 10, 30] (3 pixels) to 6: samples at x = (j + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25, 1.75, 2.25.
    # x = -0.25 lies between pixel -1 (mirrored: pixel 1 = 10) and pixel 0; x = 2.25 between pixel 2 and
    # pixel 3 (mirrored: pixel 1).
    img = np.array([0, 10, 30], np.float64).reshape(1, 1, 3)
    out = resize_image(img, (1, 6))[0, 0]
    np.testing.assert_allclose(out, [2.5, 2.5, 7.5, 15, 25, 25])
    # 4 pixels to 2: exact midpoints, no border involved
    np.testing.assert_allclose(resize_image(np.arange(4.0).reshape(1, 4, 1), (2, 1))[0, :, 0], [0.5, 2.5])
    # a single pixel spreads everywhere
    np.testing.assert_allclose(resize_image(np.full((2, 1, 1), 7.0), (3, 5)), np.full((2, 3, 5), 7.0))
    with pytest.raises(ValueError, match="C, H, W"):
        resize_image(np.zeros((4, 4)), (2, 2))


def test_normalisation_on_a_solid_colour():
    img = np.empty((3, 20, 30), np.float32)
    img[0], img[1], img[2] = 200, 100, 50  # R, G, B
    caffe = preprocess(img, min_size=20, normalize="caffe")
    # Caffe: BGR order, each channel minus its own mean (B 102.9801, G 115.9465, R 122.7717).
    np.testing.assert_allclose(caffe[:, 5, 5], [50 - 102.9801, 100 - 115.9465, 200 - 122.7717], atol=1e-3)
    np.testing.assert_allclose(caffe.std(axis=(1, 2)), 0, atol=1e-3)
    tv = preprocess(img, min_size=20)
    expected = (np.array([200, 100, 50]) / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    np.testing.assert_allclose(tv[:, 5, 5], expected, atol=1e-5)
    with pytest.raises(ValueError, match="normalize"):
        preprocess(img, normalize="bgr")


@pytest.mark.parametrize("normalize", ["torchvision", "caffe"])
def test_inverse_normalize_round_trip(normalize):
    img = np.random.default_rng(0).uniform(0, 255, (3, 24, 32)).astype(np.float32)
    out = preprocess(img, min_size=24, max_size=1000, normalize=normalize)  # scale 1: resize is identity
    back = inverse_normalize(out, normalize)
    assert back.shape == img.shape and back.dtype == np.float32
    np.testing.assert_allclose(back, img, atol=2e-3)


def test_transform_scales_and_flips_boxes_with_the_image():
    img = np.zeros((3, 50, 80), np.float32)
    img[:, 10:20, 5:30] = 255
    bbox = np.array([[10, 5, 20, 30]], dtype=np.float32)
    tsf = Transform(100, 1000, rng=np.random.default_rng(3))
    seen = set()
    for _ in range(12):
        out, out_bbox, label, scale = tsf((img, bbox, np.zeros(1, np.int32)))
        assert out.shape == (3, 100, 160) and scale == 2.0
        y0, x0, y1, x1 = out_bbox[0].astype(int)
        inside = out[0, y0 + 1:y1 - 1, x0 + 1:x1 - 1].mean()
        assert inside > out[0].mean() + 1  # the bright rectangle is where the box says
        seen.add(bool(x0 != 10))
    assert seen == {True, False}  # both flipped and unflipped draws happened


# ----------------------------------------------------------------------------------------------------
# VOC reader


def write_voc_tree(root, images, splits):
    """``images``: id -> (hw, [(name, (xmin, ymin, xmax, ymax) 1-based, difficult or None)]).

    Each object is painted as a bright rectangle on a dark image, so box and content can be compared.
    """
    for sub in ("Annotations", "JPEGImages", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    for image_id, ((h, w), objects) in images.items():
        rgb = np.full((h, w, 3), 20, np.uint8)
        xml = ["<annotation>", f"<filename>{image_id}.jpg</filename>",
               f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size>"]
        for name, (xmin, ymin, xmax, ymax), difficult in objects:
            rgb[ymin - 1:ymax, xmin - 1:xmax] = 230
            flag = "" if difficult is None else f"<difficult>{difficult}</difficult>"
            xml.append(f"<object><name>{name}</name><pose>Left</pose><truncated>0</truncated>{flag}"
                       f"<bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax>"
                       f"<ymax>{ymax}</ymax></bndbox></object>")
        xml.append("</annotation>")
        Image.fromarray(rgb).save(os.path.join(root, "JPEGImages", f"{image_id}.jpg"), quality=95)
        with open(os.path.join(root, "Annotations", f"{image_id}.xml"), "w") as f:
            f.write("\n".join(xml))
    for split, ids in splits.items():
        with open(os.path.join(root, "ImageSets", "Main", f"{split}.txt"), "w") as f:
            f.write("".join(f"{i}\n" for i in ids))


IMAGES = {
    "000005": ((60, 80), [("dog", (11, 21, 40, 50), 0), ("Person ", (51, 6, 70, 30), 1),
                          ("cat", (3, 3, 8, 9), None)]),
    "000007": ((50, 40), []),
    "000009": ((40, 70), [("horse", (31, 11, 60, 30), 0)]),
}


@pytest.fixture
def voc_root(tmp_path):
    root = tmp_path / "VOC2007"
    splits = {"trainval": ["000005", "000007"], "test": ["000005", "000007", "000009"]}
    write_voc_tree(str(root), IMAGES, splits)
    return root


def test_voc_boxes_labels_and_difficult(voc_root):
    ds = VOCBboxDataset(voc_root, split="trainval")
    assert len(ds) == 2 and ds.ids == ["000005", "000007"]
    img, bbox, label, difficult = ds[0]
    assert img.shape == (3, 60, 80) and img.dtype == np.float32
    # Difficult "Person" left out; missing <difficult> means 0; boxes (y, x) order, XML minus 1.
    np.testing.assert_array_equal(bbox, [[20, 10, 49, 39], [2, 2, 8, 7]])
    assert bbox.dtype == np.float32
    np.testing.assert_array_equal(label, [VOC_BBOX_LABEL_NAMES.index(n) for n in ("dog", "cat")])
    assert label.dtype == np.int32
    assert difficult.dtype == bool and not difficult.any()

    _, bbox, label, difficult = VOCBboxDataset(voc_root, use_difficult=True).get_example(0)
    assert len(bbox) == 3
    np.testing.assert_array_equal(bbox[1], [5, 50, 29, 69])
    assert label[1] == VOC_BBOX_LABEL_NAMES.index("person")  # name stripped, case ignored
    np.testing.assert_array_equal(difficult, [False, True, False])


def test_voc_image_without_objects(voc_root):
    img, bbox, label, difficult = VOCBboxDataset(voc_root)[1]
    assert img.shape == (3, 50, 40)
    assert bbox.shape == (0, 4) and bbox.dtype == np.float32
    assert label.shape == (0,) and label.dtype == np.int32
    assert difficult.shape == (0,) and difficult.dtype == bool


def test_voc_custom_class_list(voc_root):
    names = ("horse", "cat", "dog", "person")
    ds = VOCBboxDataset(voc_root, split="test", use_difficult=True, label_names=names)
    np.testing.assert_array_equal(ds[0][2], [2, 3, 1])
    np.testing.assert_array_equal(ds[2][2], [0])
    with pytest.raises(AnnotationError, match="unknown class name 'dog'") as info:
        VOCBboxDataset(voc_root, label_names=("horse", "cat"))[0]
    assert info.value.path.endswith(os.path.join("Annotations", "000005.xml"))
    with pytest.raises(ValueError, match="equal up to case"):
        VOCBboxDataset(voc_root, label_names=("Cat", "cat"))


def test_voc_errors_name_the_file(voc_root):
    with pytest.raises(FileNotFoundError, match=r"ImageSets.Main.val\.txt"):
        VOCBboxDataset(voc_root, split="val")

    xml = voc_root / "Annotations" / "000009.xml"
    good = xml.read_text()
    xml.write_text(good[: len(good) // 2])
    ds = VOCBboxDataset(voc_root, split="test")
    with pytest.raises(AnnotationError, match="cannot parse XML") as info:
        ds[2]
    assert str(xml) in str(info.value)
    xml.write_text(good.replace("<xmax>60</xmax>", "<xmax>sixty</xmax>"))
    with pytest.raises(AnnotationError, match="not a number: 'sixty'"):
        ds.get_annotation(2)
    xml.unlink()
    with pytest.raises(AnnotationError, match="no such file"):
        ds[2]

    (voc_root / "JPEGImages" / "000007.jpg").unlink()
    with pytest.raises(ImageReadError, match="000007.jpg"):
        ds[1]
    assert len(ds.get_annotation(1)[0]) == 0  # annotations still readable without the image


# ----------------------------------------------------------------------------------------------------
# Dataset / TestDataset


def make_opt(root, **kwargs):
    opt = dict(data="voc", voc_data_dir=str(root), toy_data_dir=None, min_size=120, max_size=1000,
               caffe_pretrain=False, label_names=None, seed=0)
    opt.update(kwargs)
    return types.SimpleNamespace(**opt)


def test_dataset_item_contract(voc_root):
    ds = Dataset(make_opt(voc_root))
    assert len(ds) == 2 and ds.label_names == VOC_BBOX_LABEL_NAMES
    img, bbox, label, scale = ds[0]
    assert img.shape == (3, 120, 160) and img.dtype == np.float32 and img.flags.c_contiguous
    assert isinstance(scale, float) and scale == 2.0
    assert bbox.dtype == np.float32 and bbox.flags.c_contiguous and label.dtype == np.int32
    raw = np.array([[20, 10, 49, 39], [2, 2, 8, 7]], np.float32) * 2  # difficult object dropped
    assert np.allclose(bbox, raw) or np.allclose(bbox, flip_bbox(raw, (120, 160), x_flip=True))
    # The box holds the painted rectangle (bright) in the network's input.
    y0, x0, y1, x1 = bbox[0].astype(int)
    assert img[0, y0 + 2:y1 - 2, x0 + 2:x1 - 2].mean() > img[0].mean() + 0.5

    img, bbox, label, scale = ds[1]  # no objects
    assert bbox.shape == (0, 4) and label.shape == (0,)


def test_dataset_flips_are_seeded(voc_root):
    def flips(ds):
        return [bool(ds[0][1][0, 1] != 20) for _ in range(16)]

    a = flips(Dataset(make_opt(voc_root, seed=5)))
    assert a == flips(Dataset(make_opt(voc_root, seed=5)))
    assert a != flips(Dataset(make_opt(voc_root, seed=6)))
    assert 0 < sum(a) < 16


def test_dataloader_workers_draw_different_flips(tmp_path):
    root = tmp_path / "same_image"
    write_voc_tree(str(root), {"000005": IMAGES["000005"]}, {"trainval": ["000005"] * 16})
    ds = Dataset(make_opt(root))
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    flipped = [bool(bbox[0, 1] != 20) for _, bbox, _, _ in loader]
    # Worker 0 loads items 0, 2, 4...; worker 1 items 1, 3, 5...: the same seed in both would give equal
    # sequences.
    assert flipped[0::2] != flipped[1::2]


def test_test_dataset_item_contract(voc_root):
    names = ("horse", "cat", "dog", "person")
    ds = TestDataset(make_opt(voc_root, min_size=80, caffe_pretrain=True, label_names=names))
    assert len(ds) == 3 and ds.label_names == names
    img, size, bbox, label, difficult = ds[0]
    assert img.shape == (3, 80, 107) and img.dtype == np.float32  # opt.min_size honoured
    assert size == (60, 80) and all(isinstance(s, int) for s in size)
    np.testing.assert_array_equal(bbox, [[20, 10, 49, 39], [5, 50, 29, 69], [2, 2, 8, 7]])  # original pixels
    np.testing.assert_array_equal(label, [2, 3, 1])
    np.testing.assert_array_equal(difficult, [False, True, False])
    # Caffe normalisation: the dark (20, 20, 20) background is 20 minus each channel's mean, BGR order.
    np.testing.assert_allclose(img[:, 0, 0], [20 - 102.9801, 20 - 115.9465, 20 - 122.7717], atol=4)
    assert len(TestDataset(make_opt(voc_root), use_difficult=False)[0][2]) == 2


def test_dataset_bad_options(voc_root, tmp_path):
    with pytest.raises(ValueError, match="opt.data"):
        Dataset(make_opt(voc_root, data="pascal"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        TestDataset(make_opt(tmp_path / "nowhere"))
