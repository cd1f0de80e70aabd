"""COCO detection data: the images of a split, their boxes, and the category id <-> label mapping.

COCO's own layout (what the COCO download unpacks to, and what labelling tools export as "COCO json")::

    <data_dir>/annotations/instances_<split>.json
    <data_dir>/<split>/<file_name>           (file_name as the json's ``images`` list gives it)

The json is read with pycocotools' :class:`~pycocotools.coco.COCO` (``db.coco``, the ground truth that
:func:`utils.coco_eval.evaluate_coco` scores against). Its "loading annotations... / creating index..."
lines are silenced: the CLI prints its own summary of the data.

Conventions (the differences from VOC):

* COCO boxes are ``[x, y, w, h]`` in continuous, 0-based pixel coordinates (pixel ``j`` spans
  ``[j, j + 1)``); ours are ``(y, x, y + h, x + w)``, no ``+ 1`` or ``- 1`` anywhere, so a detection
  converted back (:func:`utils.coco_eval.coco_results`) gives COCO's numbers exactly.
* COCO has no "difficult". Crowd regions (``iscrowd: 1``) are its closest meaning: COCOeval matches
  detections inside them without counting them as misses or false positives. So ``difficult`` flags crowd
  boxes; training leaves them out (``use_difficult=False``, as torchvision's reference and detectron2 do)
  and the data check still checks them.
* Category ids are arbitrary integers (COCO's own run 1-90 with gaps); label ``l`` is category
  ``label_to_category_id[l]`` and category ``c`` is label ``category_id_to_label[c]``.

Annotation problems of single objects (an unknown category id, a malformed ``bbox``) do not stop the
construction: :meth:`COCOBboxDataset.get_annotation` raises :class:`COCOAnnotationError` naming the image
id and the annotation id, and :mod:`data.check` reports them before training. Problems of the file as a
whole (missing, not JSON, no ``images``/``categories``, entries without ``id``, duplicate ids) raise at
construction.
"""

from __future__ import annotations

import contextlib
import io
import json
import numbers
import os

import numpy as np
from pycocotools.coco import COCO

from data.util import read_image
from data.voc_dataset import AnnotationError

__all__ = ["COCOAnnotationError", "COCOBboxDataset", "coco_annotation_path", "load_coco_quietly"]


class COCOAnnotationError(AnnotationError):
    """A COCO json that cannot be used, or one annotation of it that cannot (``path`` is the json).

    Attributes:
        image_id: the COCO image id concerned, or ``None`` for a problem of the whole file.
        annotation_id: the COCO annotation id concerned, or ``None``.
    """

    def __init__(self, path: str | os.PathLike, reason: str, image_id: int | None = None,
                 annotation_id: int | None = None):
        self.image_id = image_id
        self.annotation_id = annotation_id
        super().__init__(path, reason)


def coco_annotation_path(data_dir: str | os.PathLike, split: str) -> str:
    """``<data_dir>/annotations/instances_<split>.json``, COCO's name for a split's box annotations."""
    return os.path.join(os.fspath(data_dir), "annotations", f"instances_{split}.json")


def load_coco_quietly(dataset: dict) -> COCO:
    """A pycocotools ``COCO`` object over an already loaded json ``dataset``, without its prints.

    (``COCO(path)`` prints three progress lines to stdout; ``redirect_stdout`` swaps ``sys.stdout`` for the
    whole process during the call, harmless here as data sets are built before any worker starts.)
    """
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _well_formed_bbox(bbox) -> bool:
    return isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(_is_number(v) for v in bbox)


def _read_json(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            dataset = json.load(f)
    except FileNotFoundError:
        raise COCOAnnotationError(path, "no such file (COCO annotations expected here)") from None
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise COCOAnnotationError(path, f"cannot parse JSON ({e})") from e
    if not isinstance(dataset, dict):
        raise COCOAnnotationError(path, f"not a COCO json: the top level is a {type(dataset).__name__}, "
                                        "not an object with 'images', 'annotations' and 'categories'")
    return dataset


def _check_entries(dataset: dict, path: str) -> None:
    """File-level checks: the lists exist, entries carry the keys pycocotools indexes by, ids are unique."""
    required = {"images": ("id", "file_name"), "annotations": ("id", "image_id", "category_id"),
                "categories": ("id", "name")}
    dataset.setdefault("annotations", [])  # e.g. COCO's image_info_test2017.json: images only
    for key, fields in required.items():
        entries = dataset.get(key)
        if not isinstance(entries, list):
            raise COCOAnnotationError(path, f"no {key!r} list")
        seen = set()
        for n, entry in enumerate(entries):
            if not isinstance(entry, dict) or any(f not in entry for f in fields):
                raise COCOAnnotationError(
                    path, f"{key}[{n}] is not an object with the keys {', '.join(fields)}: {entry!r:.200}")
            if key != "annotations" and not _is_int(entry["id"]):
                raise COCOAnnotationError(path, f"{key}[{n}] has a non-integer id {entry['id']!r}")
            unhashable = [f for f in fields if f.endswith("id") and isinstance(entry[f], (list, dict))]
            if unhashable:  # pycocotools indexes by these: a list or an object there breaks it
                raise COCOAnnotationError(path, f"{key}[{n}]: {unhashable[0]} is not a number: "
                                                f"{entry[unhashable[0]]!r:.100}")
            if entry["id"] in seen:
                raise COCOAnnotationError(path, f"{key}[{n}]: id {entry['id']!r} appears twice")
            seen.add(entry["id"])


def _label_mapping(categories: list[dict], label_names, path: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """``(label_names, label_to_category_id)``: all categories sorted by id, or those ``label_names`` name."""
    by_id = sorted(categories, key=lambda c: c["id"])
    if label_names is None:
        return tuple(str(c["name"]) for c in by_id), tuple(int(c["id"]) for c in by_id)
    index = {}
    for c in by_id:
        index.setdefault(str(c["name"]).strip().lower(), []).append(int(c["id"]))
    label_names = tuple(label_names)
    keys = [name.strip().lower() for name in label_names]
    if len(set(keys)) != len(keys):
        raise ValueError(f"label_names has names equal up to case: {label_names}")
    ids = []
    for name, key in zip(label_names, keys, strict=True):
        found = index.get(key, [])
        if len(found) != 1:
            what = "no category" if not found else f"{len(found)} categories (ids {found})"
            raise ValueError(f"label name {name!r} matches {what} of {path}; its categories: "
                             + ", ".join(f"{c['id']} {c['name']!r}" for c in by_id))
        ids.append(found[0])
    return label_names, tuple(ids)


class COCOBboxDataset:
    """Bounding boxes of a COCO-format data set; the same interface as
    :class:`data.voc_dataset.VOCBboxDataset` (``ids``, ``get_annotation``, ``get_example``, paths).

    Item ``i`` is ``(img, bbox, label, difficult)``:

    * ``img``: ``(3, H, W)`` float32 RGB in ``[0, 255]``;
    * ``bbox``: ``(R, 4)`` float32, ``(y_min, x_min, y_max, x_max)`` = COCO's ``(y, x, y + h, x + w)``,
      continuous 0-based pixel coordinates;
    * ``label``: ``(R,)`` int32 in ``[0, len(label_names))``;
    * ``difficult``: ``(R,)`` bool, true for crowd boxes (``iscrowd: 1``), which are only present with
      ``use_difficult=True``.

    Objects come in the json's order. An image without (kept) objects gives ``(0, 4)`` / ``(0,)`` arrays.

    Args:
        data_dir: root of the COCO tree (the folder that holds ``annotations/``).
        split: the split name: annotations ``annotations/instances_<split>.json``, images in ``<split>/``.
        use_difficult: keep crowd boxes (flagged in ``difficult``); else they are left out (training).
        label_names: ``None``: every category of the json, sorted by id, named as the json names them.
            Else the class names in label order: each must name exactly one category of the json
            (matched after stripping spaces, ignoring case), and the categories not named are left out
            of the boxes (training on a subset); a name that matches no category is an error.
        skip_empty: leave out the images without an object kept (under ``use_difficult``: so an image
            with only crowd boxes is empty in training), as torchvision's detection reference
            (``_coco_remove_images_without_annotations``) and detectron2
            (``filter_images_with_only_crowd_annotations``) do for training. Default keep them: they
            train as background only, and evaluation must see every image. An image whose only objects
            are malformed is kept, so that the data check reports it.
        annotation_file: the json, when it is not at COCO's place (an export of a labelling tool).
        image_dir: the folder the json's ``file_name`` values are relative to, when not
            ``<data_dir>/<split>``.

    Attributes:
        ids: COCO image ids (ints) in increasing order; item ``i`` is image ``ids[i]``. Rewriting it (as
            :meth:`data.dataset._VOCSplit.drop` does) changes the items served.
        coco: the pycocotools ``COCO`` of the json (all its images and annotations, crowd included), the
            ground truth of :func:`utils.coco_eval.evaluate_coco`. An annotation without ``area`` gets its
            box area ``w * h`` (COCOeval needs one to sort objects into small/medium/large).
        label_names: class names in label order.
        label_to_category_id: ``tuple`` of ints, ``label_to_category_id[label]`` is the category id.
        category_id_to_label: ``dict`` int -> int, its inverse (only the categories in use).
        box_convention: ``'coco'`` (class attribute): tells :mod:`data.check` how to judge boxes.

    Raises:
        COCOAnnotationError: the json is missing or unparseable, or a list or an entry of it is malformed
            (see the module docstring).
        ValueError: ``label_names`` does not fit the json's categories.
    """

    box_convention = "coco"

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str = "train2017",
        use_difficult: bool = False,
        label_names: tuple[str, ...] | None = None,
        skip_empty: bool = False,
        annotation_file: str | os.PathLike | None = None,
        image_dir: str | os.PathLike | None = None,
    ):
        self.data_dir = os.fspath(data_dir)
        self.split = split
        self.use_difficult = use_difficult
        self.skip_empty = skip_empty
        self.annotation_file = (coco_annotation_path(self.data_dir, split) if annotation_file is None
                                else os.fspath(annotation_file))
        self.image_dir = os.path.join(self.data_dir, split) if image_dir is None else os.fspath(image_dir)

        dataset = _read_json(self.annotation_file)
        _check_entries(dataset, self.annotation_file)
        for ann in dataset["annotations"]:
            if "area" not in ann and _well_formed_bbox(ann.get("bbox")):
                ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
        self.coco = load_coco_quietly(dataset)
        self.label_names, self.label_to_category_id = _label_mapping(
            dataset["categories"], label_names, self.annotation_file)
        self.category_id_to_label = {c: label for label, c in enumerate(self.label_to_category_id)}
        self._category_names = {c["id"]: str(c["name"]) for c in dataset["categories"]}

        self.ids = sorted(self.coco.imgs)
        if skip_empty:
            self.ids = [image_id for image_id in self.ids if self._n_kept(image_id) > 0]

    def _selected(self, ann: dict) -> bool:
        """The annotation belongs to the sample: not a crowd box left out, not an unselected category."""
        if ann.get("iscrowd", 0) and not self.use_difficult:
            return False
        # A category of the json that label_names did not select is left out; an unknown one is kept
        # (get_annotation reports it).
        category_id = ann["category_id"]
        return category_id in self.category_id_to_label or category_id not in self._category_names

    def _n_kept(self, image_id: int) -> int:
        return sum(self._selected(ann) for ann in self.coco.imgToAnns.get(image_id, ()))

    def __len__(self) -> int:
        return len(self.ids)

    def image_id(self, i: int) -> int:
        """COCO image id of item ``i``."""
        return self.ids[i]

    def annotation_path(self, i: int) -> str:
        """The json file (the same for every item)."""
        return self.annotation_file

    def image_path(self, i: int) -> str:
        """Path of the image file of item ``i``: ``image_dir`` joined with its ``file_name``."""
        return os.path.join(self.image_dir, self.coco.imgs[self.ids[i]]["file_name"])

    def image_size(self, i: int) -> tuple[int, int] | None:
        """``(H, W)`` of item ``i`` as the json records it (``None`` without ``height`` and ``width``)."""
        info = self.coco.imgs[self.ids[i]]
        height, width = info.get("height"), info.get("width")
        return (int(height), int(width)) if _is_number(height) and _is_number(width) else None

    def describe(self, i: int) -> str:
        """``"image id 42 (000042.jpg)"``: how messages name item ``i``."""
        return f"image id {self.ids[i]} ({self.coco.imgs[self.ids[i]]['file_name']})"

    def category_name(self, category_id) -> str | None:
        """The json's name of a category id, ``None`` for an id it does not list."""
        return self._category_names.get(category_id)

    def _annotations(self, i: int) -> list[dict]:
        return [ann for ann in self.coco.imgToAnns.get(self.ids[i], ()) if self._selected(ann)]

    def annotation_ids(self, i: int) -> list:
        """COCO annotation ids of the objects :meth:`get_annotation` ``(i)`` returns, in its order."""
        return [ann["id"] for ann in self._annotations(i)]

    def _error(self, i: int, ann: dict, reason: str) -> COCOAnnotationError:
        return COCOAnnotationError(self.annotation_file,
                                   f"{self.describe(i)} annotation id {ann['id']}: {reason}",
                                   image_id=self.ids[i], annotation_id=ann["id"])

    def get_annotation(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The boxes of item ``i`` without reading its image.

        Returns:
            ``(bbox (R, 4) float32, label (R,) int32, difficult (R,) bool)`` as in the item.

        Raises:
            COCOAnnotationError: an object has a category id the json does not list, or a ``bbox`` that
                is not four numbers (the message names the image id and the annotation id). Non-finite,
                empty or out-of-image boxes are returned as they are: :mod:`data.check` judges them.
        """
        bbox, label, difficult = [], [], []
        for ann in self._annotations(i):
            category_id = ann["category_id"]
            if category_id not in self.category_id_to_label:
                known = ", ".join(str(c) for c in sorted(self._category_names))
                raise self._error(i, ann, f"unknown category id {category_id!r} "
                                          f"(the json's categories: {known})")
            box = ann.get("bbox")
            if not _well_formed_bbox(box):
                raise self._error(i, ann, f"bbox is not four numbers [x, y, w, h]: {box!r:.100}")
            x, y, w, h = (float(v) for v in box)
            bbox.append((y, x, y + h, x + w))  # [x, y, w, h] -> (y_min, x_min, y_max, x_max)
            label.append(self.category_id_to_label[category_id])
            difficult.append(bool(ann.get("iscrowd", 0)))

        bbox = np.array(bbox, dtype=np.float32).reshape(-1, 4)  # (R, 4), also when R == 0
        return bbox, np.array(label, dtype=np.int32), np.array(difficult, dtype=bool)

    def get_example(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Item ``i``: ``(img, bbox, label, difficult)`` (see the class docstring).

        Raises:
            COCOAnnotationError: see :meth:`get_annotation`.
            data.util.ImageReadError: the image is missing or unreadable (the error names it).
        """
        bbox, label, difficult = self.get_annotation(i)
        img = read_image(self.image_path(i), color=True)
        return img, bbox, label, difficult

    __getitem__ = get_example

