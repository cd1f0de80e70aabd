"""Images as the network sees them: resize, normalisation, training flips, and the two datasets.

Shapes: ``(C, H, W)`` images with ``C = 3``; ``(H, W)`` is the original size, ``(H', W')`` the size after
:func:`preprocess`. Boxes are ``(R, 4)`` float32 ``(y_min, x_min, y_max, x_max)``.

Two normalisations, chosen by the pretrained weights the backbone starts from:

* ``'torchvision'``: RGB in ``[0, 1]``, minus the ImageNet mean ``(0.485, 0.456, 0.406)``, divided by
  its std ``(0.229, 0.224, 0.225)``.
* ``'caffe'``: BGR in ``[0, 255]`` minus py-faster-rcnn's pixel means, B 102.9801, G 115.9465, R 122.7717.
  The original subtracted ``[122.7717, 115.9465, 102.9801]`` from the channels *after* reordering them to
  BGR, so the B channel got the R mean and the R channel the B mean (about 20 levels off); this one
  subtracts each mean from its own channel.
"""

import os

import numpy as np
import torch.utils.data

from data.toy_dataset import TOY_LABEL_NAMES, ensure_toy_voc
from data.util import flip_bbox, random_flip, read_image_size, resize_bbox, resize_image
from data.voc_dataset import VOC_BBOX_LABEL_NAMES, VOCBboxDataset

__all__ = ["preprocess", "inverse_normalize", "normalize_of", "resized_size", "Transform", "Dataset",
           "TestDataset", "pad_images", "collate_train", "collate_test", "image_rng"]

_TORCHVISION_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(3, 1, 1)  # RGB
_TORCHVISION_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(3, 1, 1)  # RGB
_CAFFE_MEAN_BGR = np.array([102.9801, 115.9465, 122.7717], dtype=np.float32).reshape(3, 1, 1)  # B, G, R
_NORMALIZE_MODES = ("torchvision", "caffe")


def _check_normalize(normalize: str) -> None:
    if normalize not in _NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {_NORMALIZE_MODES}, got {normalize!r}")


def resized_size(size: tuple[int, int], min_size: int, max_size: int) -> tuple[int, int]:
    """``(H, W)`` -> ``(H', W')``: shorter side to ``min_size`` unless the longer would pass ``max_size``.

    ``scale = min(min_size / min(H, W), max_size / max(H, W))`` and each side is ``H * scale`` rounded to
    the nearest integer (what current scikit-image does with a fractional target shape; skimage 0.14,
    which the original ran, took the ceiling): 375x500 -> 600x800, 333x500 -> 600x901, 281x500 -> 562x1000.
    """
    height, width = size
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def preprocess(
    img: np.ndarray, min_size: int = 600, max_size: int = 1000, normalize: str = "torchvision"
) -> np.ndarray:
    """Resize an image for the network and normalise it.

    The resize is bilinear without anti-aliasing and with mirrored borders, the values of the original's
    ``skimage.transform.resize(..., mode='reflect', anti_aliasing=False)`` (:func:`data.util.resize_image`,
    several times faster); see :func:`resized_size` for the output size.

    Args:
        img: ``(3, H, W)`` RGB in ``[0, 255]`` (any float or integer dtype).
        min_size: target of the shorter side.
        max_size: cap on the longer side.
        normalize: ``'torchvision'`` or ``'caffe'`` (see the module docstring).

    Returns:
        ``(3, H', W')`` float32: normalised RGB (``'torchvision'``) or mean-subtracted BGR (``'caffe'``).
    """
    _check_normalize(normalize)
    if img.ndim != 3 or img.shape[0] != 3:
        raise ValueError(f"preprocess wants a (3, H, W) RGB image, got shape {img.shape}")
    out_h, out_w = resized_size(img.shape[1:], min_size, max_size)
    img = np.asarray(img, dtype=np.float32) / 255.0
    img = resize_image(img, (out_h, out_w))
    if normalize == "caffe":
        # (3, H', W') RGB 0-1 -> BGR 0-255, each channel minus its own mean.
        return img[::-1] * 255.0 - _CAFFE_MEAN_BGR
    return (img - _TORCHVISION_MEAN) / _TORCHVISION_STD


def inverse_normalize(img: np.ndarray, normalize: str = "torchvision") -> np.ndarray:
    """Undo the normalisation of :func:`preprocess` (not its resize), e.g. to display a network input.

    The exact inverse, without clipping: a preprocessed image comes back in ``[0, 255]`` up to rounding.
    (The original's torchvision branch used an approximate mean 0.45 and std 0.225 and clipped.)

    Args:
        img: ``(3, H', W')`` float array as returned by :func:`preprocess` with the same ``normalize``.
        normalize: ``'torchvision'`` or ``'caffe'``.

    Returns:
        ``(3, H', W')`` float32 RGB, 0-255 scale.
    """
    _check_normalize(normalize)
    img = np.asarray(img, dtype=np.float32)
    if normalize == "caffe":
        return (img + _CAFFE_MEAN_BGR)[::-1].copy()  # BGR -> RGB
    return (img * _TORCHVISION_STD + _TORCHVISION_MEAN) * 255.0


class Transform:
    """Training transform: :func:`preprocess`, boxes resized to match, random horizontal flip.

    Args:
        min_size, max_size, normalize: as in :func:`preprocess`.
        rng: draws the flips (``None``: a fresh, unseeded generator).
    """

    def __init__(
        self,
        min_size: int = 600,
        max_size: int = 1000,
        normalize: str = "torchvision",
        rng: np.random.Generator | None = None,
    ):
        _check_normalize(normalize)
        self.min_size = min_size
        self.max_size = max_size
        self.normalize = normalize
        self.rng = np.random.default_rng() if rng is None else rng

    def __call__(self, in_data, rng: np.random.Generator | None = None):
        """``(img (3, H, W), bbox (R, 4), label (R,))`` -> ``(img (3, H', W'), bbox (R, 4), label, scale)``.

        ``scale = H' / H`` (a float); ``bbox`` is in pixels of the resized (and maybe flipped) image.
        ``rng`` overrides the transform's own generator for this call.
        """
        img, bbox, label = in_data
        _, in_h, in_w = img.shape
        img = preprocess(img, self.min_size, self.max_size, self.normalize)
        _, out_h, out_w = img.shape
        scale = out_h / in_h
        bbox = resize_bbox(bbox, (in_h, in_w), (out_h, out_w))
        img, params = random_flip(img, x_random=True, return_param=True, rng=self.rng if rng is None else rng)
        bbox = flip_bbox(bbox, (out_h, out_w), x_flip=params["x_flip"])
        return img, bbox, label, scale


_STREAMS = {"flip": 0, "creators": 1}


def image_rng(seed: int, epoch: int, index: int, stream: str) -> np.random.Generator:
    """The generator of one image's random draws in one epoch: its flip (``stream='flip'``) or its target
    creators' samples (``'creators'``), seeded by ``(seed, epoch, index, stream)``: the draws of an image do
    not depend on the batch or the process it is trained in (K processes with B images each train as one
    process with K x B)."""
    return np.random.default_rng([seed, epoch, index, _STREAMS[stream]])


def normalize_of(opt) -> str:
    """The input normalisation that ``opt`` selects: ``'caffe'`` with ``caffe_pretrain``, else
    ``'torchvision'``."""
    return "caffe" if opt.caffe_pretrain else "torchvision"


def _split_db(opt, train: bool, use_difficult: bool, split: str | None = None):
    """The reader of the split that ``opt`` selects (``VOCBboxDataset`` or ``COCOBboxDataset``); generates
    the toy set on first use.

    ``opt.data``: ``'voc'`` (``voc_data_dir``, splits ``trainval``/``test``), ``'toy'`` (the generated set
    as VOC), ``'coco'`` (``coco_dir``, splits ``coco_train``/``coco_val``), ``'toy-coco'`` (the generated set
    in COCO's layout). ``split`` replaces the test split's name.
    """
    label_names = tuple(getattr(opt, "label_names", None) or ())
    if opt.data in ("voc", "toy"):
        if opt.data == "toy":
            data_dir, default_names = opt.toy_data_dir, TOY_LABEL_NAMES
            ensure_toy_voc(data_dir)
        else:
            data_dir, default_names = opt.voc_data_dir, VOC_BBOX_LABEL_NAMES
        if not os.path.isdir(data_dir):
            raise FileNotFoundError(
                f"data folder not found: {data_dir} (--voc-data-dir). Pascal VOC 2007 is a download: see the "
                "README's section 'Train on Pascal VOC 2007'; --data=toy trains on a generated data set "
                "without any download")
        split = split or ("trainval" if train else "test")
        return VOCBboxDataset(data_dir, split=split, use_difficult=use_difficult,
                              label_names=label_names or default_names)
    if opt.data in ("coco", "toy-coco"):
        from data.coco_dataset import COCOBboxDataset
        from data.toy_coco import ensure_toy_coco

        if opt.data == "toy-coco":
            data_dir = ensure_toy_coco(opt.toy_coco_dir, voc_root=opt.toy_data_dir)  # the same images
            split = split or ("trainval" if train else "test")
        else:
            data_dir = opt.coco_dir
            split = split or (opt.coco_train if train else opt.coco_val)
            if not os.path.isdir(data_dir):
                raise FileNotFoundError(
                    f"COCO folder not found: {data_dir} (--coco-dir; it holds "
                    "annotations/instances_<split>.json and one image folder per split). --data=toy-coco "
                    "trains on a generated data set in COCO's layout without any download")
        return COCOBboxDataset(data_dir, split, use_difficult=use_difficult, label_names=label_names or None,
                               skip_empty=train and bool(getattr(opt, "coco_skip_empty", False)))
    raise ValueError(f"opt.data must be 'voc', 'toy', 'coco' or 'toy-coco', got {opt.data!r}")


class _VOCSplit:
    """What both data sets share: the split they read (``db``: a ``VOCBboxDataset`` or a
    ``COCOBboxDataset``), its ids and class names, image sizes, and dropping samples."""

    db: VOCBboxDataset

    @property
    def ids(self) -> list:
        """The image id of each item: ``ids[i]`` is item ``i``'s."""
        return self.db.ids

    @property
    def label_names(self) -> tuple[str, ...]:
        """The class names in label order."""
        return tuple(self.db.label_names)

    @property
    def metric(self) -> str:
        """How the split is scored: ``'voc'`` (VOC07 11-point mAP) or ``'coco'`` (COCO AP)."""
        return "coco" if getattr(self.db, "box_convention", "voc") == "coco" else "voc"

    def image_size(self, i: int) -> tuple[int, int]:
        """``(H, W)`` of item ``i``'s original image, without decoding it (the file's header, or COCO's
        json)."""
        size = self.db.image_size(i)
        return size if size is not None else read_image_size(self.db.image_path(i))

    def image_sizes(self) -> list[tuple[int, int]]:
        """:meth:`image_size` of every item."""
        return [self.image_size(i) for i in range(len(self))]

    def drop(self, indices) -> None:
        """Stop serving the items at ``indices`` (e.g. the bad samples found by :mod:`data.check`); the
        others keep their order and are renumbered ``0 .. len - 1``."""
        dropped = set(indices)
        self.db.ids = [image_id for i, image_id in enumerate(self.db.ids) if i not in dropped]

    def __len__(self) -> int:
        return len(self.db)


class Dataset(_VOCSplit):
    """Training data: ``trainval`` split without difficult objects, resized and randomly flipped.

    Item ``i`` is ``(img, bbox, label, scale)``: ``img`` ``(3, H', W')`` float32 normalised (see
    :func:`preprocess`), ``bbox`` ``(R, 4)`` float32 in pixels of ``img``, ``label`` ``(R,)`` int32,
    ``scale = H' / H`` float. Arrays are contiguous (no negative strides).

    Args:
        opt: any object with the attributes ``data`` (``'voc'``, ``'toy'``, ``'coco'``, ``'toy-coco'``), the
            folder of that data set (``voc_data_dir``, ``toy_data_dir``, ``coco_dir`` with ``coco_train`` and
            ``coco_val``, ``toy_coco_dir``; the toy sets are generated there on first use), ``min_size``,
            ``max_size``, ``caffe_pretrain`` (caffe normalisation when true), and optionally
            ``label_names`` (empty or ``None``: the data set's own names), ``seed`` (flip generator seed;
            ``None`` or missing: unseeded) and ``coco_skip_empty``.
        rank: the process under torchrun; process ``r > 0`` draws its flips from ``(seed, r)``.

    Flips come from a ``numpy.random.Generator`` seeded with ``opt.seed``. After :meth:`set_epoch` (seeded
    runs of several images per step), each image's flip comes from its own generator
    (:func:`image_rng` of the seed, the epoch and the image), so it does not depend on which process or batch
    the image is in. Otherwise the flips are one stream of draws, the original's: in the main process
    (``num_workers=0``) the sequence of flips is reproducible. In a DataLoader worker the generator is
    re-seeded from ``(opt.seed, worker seed)``, the worker seed being the one torch gives each worker
    (different per worker and per epoch, reproducible under ``torch.manual_seed``), so workers do not
    repeat each other's flips.
    """

    def __init__(self, opt, rank: int = 0):
        self.db = _split_db(opt, train=True, use_difficult=False)
        self.seed = getattr(opt, "seed", None)
        entropy = self.seed if rank == 0 or self.seed is None else [self.seed, rank]
        self.tsf = Transform(opt.min_size, opt.max_size, normalize_of(opt), np.random.default_rng(entropy))
        self.epoch = None
        self._worker_seed = None
        self._worker_rng = None

    def set_epoch(self, epoch: int | None) -> None:
        """Draw each image's flip from :func:`image_rng` ``(seed, epoch, index)`` (``None``, or an unseeded
        data set: the stream of draws)."""
        self.epoch = epoch

    def _flip_rng(self, idx: int) -> np.random.Generator:
        if self.epoch is not None and self.seed is not None:
            return image_rng(self.seed, self.epoch, idx, "flip")
        info = torch.utils.data.get_worker_info()
        if info is None:
            return self.tsf.rng
        if self._worker_seed != info.seed:
            entropy = [info.seed] if self.seed is None else [self.seed, info.seed]
            self._worker_seed = info.seed
            self._worker_rng = np.random.default_rng(entropy)
        return self._worker_rng

    def rng_state(self) -> dict:
        """The state of the flips' generator of the main process (plain values), for a resumable checkpoint
        (the workers' generators derive from torch's seeds; see the class docstring)."""
        return self.tsf.rng.bit_generator.state

    def set_rng_state(self, state: dict) -> None:
        """Continue the flips' generator from :meth:`rng_state`."""
        self.tsf.rng.bit_generator.state = state

    def __getitem__(self, idx: int):
        ori_img, bbox, label, _ = self.db.get_example(idx)
        img, bbox, label, scale = self.tsf((ori_img, bbox, label), rng=self._flip_rng(idx))
        return np.ascontiguousarray(img), np.ascontiguousarray(bbox), label.copy(), scale


class TestDataset(_VOCSplit):
    """Evaluation data: a split with difficult objects kept and flagged, boxes in original pixels.

    Item ``i`` is ``(img, size, bbox, label, difficult)``: ``img`` ``(3, H', W')`` float32 preprocessed,
    ``size = (H, W)`` the original size as ints, ``bbox`` ``(R, 4)`` float32 in original pixels, ``label``
    ``(R,)`` int32, ``difficult`` ``(R,)`` bool. Unlike the original (which always used 600/1000), the
    resize follows ``opt.min_size`` / ``opt.max_size``.

    Args:
        opt: as for :class:`Dataset` (``seed`` unused).
        split: the split to read; ``None``: the data set's test split (``test``, or ``coco_val``).
        use_difficult: keep difficult objects (COCO: crowd regions), flagged in ``difficult``.
    """

    __test__ = False  # a data set, not a pytest test class

    def __init__(self, opt, split: str | None = None, use_difficult: bool = True):
        self.db = _split_db(opt, train=False, use_difficult=use_difficult, split=split)
        self.min_size = opt.min_size
        self.max_size = opt.max_size
        self.normalize = normalize_of(opt)

    def __getitem__(self, idx: int):
        ori_img, bbox, label, difficult = self.db.get_example(idx)
        img = preprocess(ori_img, self.min_size, self.max_size, self.normalize)
        size = (int(ori_img.shape[1]), int(ori_img.shape[2]))
        return img, size, bbox, label, difficult

    def input_sizes(self) -> list[tuple[int, int]]:
        """``(H', W')`` of every item's preprocessed image (what :func:`data.sampler.size_batches` groups)."""
        return [resized_size(size, self.min_size, self.max_size) for size in self.image_sizes()]


def pad_images(imgs, multiple: int) -> torch.Tensor:
    """Stack ``(3, H_i, W_i)`` images into one ``(N, 3, H, W)`` float32 tensor.

    Images of one size are stacked as they are (a batch of one is the image itself, as the original
    trained). Otherwise each is padded with zeros (the mean colour, after normalisation) at the bottom and
    right to the largest height and width, rounded up to a multiple of ``multiple`` (the feature stride, so
    that every feature cell covers whole pixels of every image).
    """
    imgs = [torch.as_tensor(img, dtype=torch.float32) for img in imgs]
    shapes = {tuple(img.shape) for img in imgs}
    if len(shapes) == 1:
        return torch.stack(imgs)
    height = -(-max(img.shape[1] for img in imgs) // multiple) * multiple
    width = -(-max(img.shape[2] for img in imgs) // multiple) * multiple
    batch = imgs[0].new_zeros((len(imgs), imgs[0].shape[0], height, width))
    for out, img in zip(batch, imgs, strict=True):
        out[:, :img.shape[1], :img.shape[2]] = img
    return batch


def collate_train(batch, multiple: int = 16):
    """A training batch from :class:`Dataset` items: ``(imgs, bboxes, labels, scales, sizes)``.

    ``imgs`` ``(N, 3, H, W)`` float32 (:func:`pad_images`), then per image: ``bboxes`` ``(R_i, 4)`` and
    ``labels`` ``(R_i,)`` arrays, ``scales`` floats, ``sizes`` its ``(H_i, W_i)`` inside ``imgs``.
    ``DataLoader(..., collate_fn=functools.partial(collate_train, multiple=model.feat_stride))``.
    """
    imgs, bboxes, labels, scales = zip(*batch, strict=True)
    sizes = [tuple(img.shape[1:]) for img in imgs]
    return pad_images(imgs, multiple), list(bboxes), list(labels), [float(s) for s in scales], sizes


def collate_test(batch):
    """An evaluation batch from :class:`TestDataset` items of one preprocessed size (``data.sampler.
    size_batches``): ``(imgs (N, 3, H', W') float32, sizes, bboxes, labels, difficults)`` with the original
    ``(H, W)`` and the ground truth per image."""
    imgs, sizes, bboxes, labels, difficults = zip(*batch, strict=True)
    if len({img.shape for img in imgs}) != 1:
        shapes = sorted({img.shape for img in imgs})
        raise ValueError(f"an evaluation batch holds images of several sizes {shapes}; batch them with "
                         "data.sampler.size_batches")
    return torch.stack([torch.as_tensor(img) for img in imgs]), list(sizes), list(bboxes), list(labels), \
        list(difficults)
