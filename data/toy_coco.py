"""The embedded toy data set written in COCO's layout (``--data=toy-coco``), so the COCO path runs anywhere.

The images and boxes are those of the toy VOC tree (:mod:`data.toy_dataset`, made first in a folder of its
own and reused); this module writes them as COCO does::

    <root>/annotations/instances_trainval.json, instances_test.json
    <root>/trainval/<id>.jpg, <root>/test/<id>.jpg     (hard links to the VOC tree's JPEGs, else copies)
    <root>/toy_coco_manifest.json                       generator versions and parameters, written last

What the conversion decides:

* Image ids: the VOC id as an integer (``000007`` -> 7), ``file_name`` ``000007.jpg``; ``width`` and
  ``height`` from the image file.
* Category ids: :data:`TOY_COCO_CATEGORY_IDS`, deliberately not ``1..6`` (irregular gaps, as COCO's own
  1-90 for 80 classes), so that any code that takes a category id for a label, or a label plus one, fails
  on the toy set. Sorted by id they are in :data:`data.toy_dataset.TOY_LABEL_NAMES` order, so label ``l``
  means the same shape in both trees.
* Boxes: the VOC XML holds 1-based inclusive pixel indices, the box of pixel columns ``xmin - 1 ..
  xmax - 1`` (0-based); in COCO's continuous coordinates (pixel ``j`` spans ``[j, j + 1)``) that is ``x =
  xmin - 1``, ``w = xmax - xmin + 1`` (likewise ``y``, ``h``), the rule detectron2's VOC loader uses
  (``xmin - 1`` and ``xmax`` as corners). So for the same object :class:`data.voc_dataset.VOCBboxDataset`
  gives ``(y_min, x_min, y_max, x_max)`` and :class:`data.coco_dataset.COCOBboxDataset` gives
  ``(y_min, x_min, y_max + 1, x_max + 1)``: equal top-left corners, and the COCO bottom-right corner one
  pixel further (the edge past the last pixel instead of the last pixel's index).
* ``area``: the box area ``w * h`` (COCO's own is the segment's area; the toy has no segments).
* Difficult objects become ``iscrowd: 1``: COCO has no "difficult"; a crowd region is what COCOeval
  ignores (a detection on it is neither a hit nor a false positive, and missing it costs nothing), the
  closest meaning. ``truncated`` has no COCO field and is dropped.

Generation is deterministic (the same parameters give byte-identical json files) and :func:`ensure_toy_coco`
is idempotent and safe to interrupt, as :func:`data.toy_dataset.ensure_toy_voc`.
"""

import dataclasses
import json
import os
import shutil

from PIL import Image

from data.toy_dataset import (
    GENERATOR_VERSION,
    TOY_LABEL_NAMES,
    ToyParams,
    ensure_toy_voc,
    manifest_matches,
    replace_tree,
)
from data.voc_dataset import VOCBboxDataset

__all__ = ["TOY_COCO_CATEGORY_IDS", "TOY_COCO_SPLITS", "COCO_GENERATOR_VERSION", "voc_split_to_coco",
           "generate_toy_coco", "is_complete_toy_coco", "ensure_toy_coco"]

# The category id of each toy class, in TOY_LABEL_NAMES order: increasing, irregular gaps (see above).
TOY_COCO_CATEGORY_IDS = (2, 3, 5, 8, 13, 21)
TOY_COCO_SPLITS = ("trainval", "test")
# Bump whenever a change makes this module write different files (the toy VOC generator has its own).
COCO_GENERATOR_VERSION = 1
MANIFEST_NAME = "toy_coco_manifest.json"


def voc_split_to_coco(
    voc_root: str | os.PathLike,
    split: str,
    label_names: tuple[str, ...],
    category_ids: tuple[int, ...],
    first_annotation_id: int = 1,
) -> dict:
    """One split of a VOC tree as a COCO instances json (a ``dict`` ready for ``json.dump``).

    Args:
        voc_root: the VOC tree; its image ids must be decimal numbers (they become COCO's integer ids).
        split: the id list to convert (``ImageSets/Main/<split>.txt``).
        label_names: the VOC class names in label order.
        category_ids: the COCO category id of each name (same length, distinct).
        first_annotation_id: id of the first annotation; the others follow in order.

    Returns:
        ``{"info", "licenses", "images", "annotations", "categories"}``; every VOC object is an annotation
        (difficult ones with ``iscrowd: 1``), boxes converted as the module docstring says.

    Raises:
        ValueError: an image id is not a number, or ``category_ids`` does not fit ``label_names``.
        data.util.DataError: an XML or image of the tree cannot be read.
    """
    if len(category_ids) != len(label_names) or len(set(category_ids)) != len(category_ids):
        raise ValueError(f"need one distinct category id per name: {label_names} vs {category_ids}")
    db = VOCBboxDataset(voc_root, split=split, use_difficult=True, label_names=label_names)
    images, annotations = [], []
    ann_id = first_annotation_id
    for i, voc_id in enumerate(db.ids):
        if not voc_id.isdigit():
            raise ValueError(f"VOC image id {voc_id!r} of {split} is not a number (COCO ids are integers)")
        with Image.open(db.image_path(i)) as img:  # reads the header only
            width, height = img.size
        images.append({"id": int(voc_id), "file_name": f"{voc_id}.jpg", "width": width, "height": height})
        bbox, label, difficult = db.get_annotation(i)
        for (y_min, x_min, y_max, x_max), lb, diff in zip(bbox.tolist(), label.tolist(), difficult.tolist(),
                                                          strict=True):
            # 0-based inclusive pixel indices -> continuous [x, y, w, h] (the "+ 1" of the last pixel).
            w, h = x_max - x_min + 1, y_max - y_min + 1
            annotations.append({"id": ann_id, "image_id": int(voc_id), "category_id": category_ids[lb],
                                "bbox": [x_min, y_min, w, h], "area": w * h, "iscrowd": int(diff)})
            ann_id += 1
    categories = [{"id": c, "name": n, "supercategory": "shape"}
                  for c, n in sorted(zip(category_ids, label_names, strict=True))]
    info = {"description": f"split {split!r} of a VOC tree, converted by simple-faster-rcnn-pytorch "
                           "data/toy_coco.py"}
    return {"info": info, "licenses": [], "images": images, "annotations": annotations,
            "categories": categories}


def _manifest(params: ToyParams) -> dict:
    return {
        "generator": "simple-faster-rcnn-pytorch data/toy_coco.py",
        "version": COCO_GENERATOR_VERSION,
        "toy_voc_version": GENERATOR_VERSION,
        "params": dataclasses.asdict(params),
        "categories": [{"id": c, "name": n}
                       for c, n in zip(TOY_COCO_CATEGORY_IDS, TOY_LABEL_NAMES, strict=True)],
    }


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not supported
        shutil.copyfile(src, dst)


def generate_toy_coco(root: str | os.PathLike, voc_root: str | os.PathLike, **params) -> str:
    """Write the toy set in COCO's layout under ``root``, from the toy VOC tree at ``voc_root``.

    Args:
        root: the folder to write; it must not exist or be empty.
        voc_root: a complete toy VOC tree made with the same ``params`` (see
            :func:`data.toy_dataset.ensure_toy_voc`).
        **params: fields of :class:`data.toy_dataset.ToyParams` (recorded in the manifest).

    Returns:
        ``root`` as a string.

    Raises:
        FileExistsError: ``root`` exists and is not empty.
    """
    p = ToyParams(**params)
    root = os.fspath(root)
    if os.path.exists(root) and (not os.path.isdir(root) or os.listdir(root)):
        raise FileExistsError(f"generate_toy_coco writes into a new or empty folder; {root} is not empty")
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    first_annotation_id = 1  # annotation ids are unique across the two splits
    for split in TOY_COCO_SPLITS:
        dataset = voc_split_to_coco(voc_root, split, TOY_LABEL_NAMES, TOY_COCO_CATEGORY_IDS,
                                    first_annotation_id)
        first_annotation_id += len(dataset["annotations"])
        os.makedirs(os.path.join(root, split), exist_ok=True)
        for image in dataset["images"]:
            _link_or_copy(os.path.join(voc_root, "JPEGImages", image["file_name"]),
                          os.path.join(root, split, image["file_name"]))
        with open(os.path.join(root, "annotations", f"instances_{split}.json"), "w") as f:
            json.dump(dataset, f)
    # Written last: a tree with a manifest is a finished tree.
    with open(os.path.join(root, MANIFEST_NAME), "w") as f:
        json.dump(_manifest(p), f, indent=2, sort_keys=True)
        f.write("\n")
    return root


def is_complete_toy_coco(root: str | os.PathLike, **params) -> bool:
    """Whether ``root`` holds a finished toy COCO tree made by these generator versions with these
    parameters: the manifest, each split's json (parsed, with the expected number of images) and every
    image it lists (present, not empty; not decoded)."""
    p = ToyParams(**params)
    root = os.fspath(root)
    if not manifest_matches(os.path.join(root, MANIFEST_NAME), _manifest(p)):
        return False
    for split, n_images in zip(TOY_COCO_SPLITS, (p.n_trainval, p.n_test), strict=True):
        try:
            with open(os.path.join(root, "annotations", f"instances_{split}.json")) as f:
                images = json.load(f)["images"]
        except (OSError, ValueError, KeyError, TypeError):
            return False
        if len(images) != n_images:
            return False
        for image in images:
            path = os.path.join(root, split, image["file_name"])
            if not os.path.isfile(path) or os.path.getsize(path) == 0:
                return False
    return True


def ensure_toy_coco(root: str | os.PathLike, voc_root: str | os.PathLike | None = None, **params) -> str:
    """Make sure ``root`` holds the toy COCO tree for ``params``; make it if missing, incomplete or stale.

    The toy VOC tree comes first (:func:`data.toy_dataset.ensure_toy_voc` at ``voc_root``, reused when it
    is already there); the COCO tree is written in a temporary sibling folder of ``root`` and renamed into
    place, so an interrupted run never leaves a half-written tree at ``root``. An existing toy COCO tree
    made by other versions or parameters is replaced; any other non-empty folder is left alone.

    Args:
        root: the COCO tree's folder (created with its parents when needed); pass it as ``--coco-dir``.
        voc_root: where the toy VOC tree is (or is made); default ``<root>_voc`` beside ``root``. Pointing
            it at the ``--data=toy`` cache shares the images (hard links) when both use the same
            parameters; with other parameters the two runs would regenerate it in turn.
        **params: fields of :class:`data.toy_dataset.ToyParams`.

    Returns:
        ``root`` as a string.

    Raises:
        FileExistsError: ``root`` (or ``voc_root``) is a non-empty folder, or a file, that is not a toy tree.
    """
    root = os.fspath(root)
    if is_complete_toy_coco(root, **params):
        return root
    if os.path.exists(root) and not os.path.isfile(os.path.join(root, MANIFEST_NAME)):
        if not os.path.isdir(root) or os.listdir(root):
            raise FileExistsError(f"{root} exists and is not a toy COCO data set (no {MANIFEST_NAME}); "
                                  "refusing to overwrite it")
    parent, name = os.path.split(os.path.abspath(root))
    voc_root = ensure_toy_voc(os.path.join(parent, f"{name}_voc") if voc_root is None else voc_root, **params)
    return replace_tree(root, lambda tmp: generate_toy_coco(tmp, voc_root, **params),
                        lambda path: is_complete_toy_coco(path, **params))
