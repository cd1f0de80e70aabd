"""Pascal VOC detection data: the ids of a split, their images and their box annotations.

A VOC tree holds ``ImageSets/Main/<split>.txt`` (one image id a line), ``Annotations/<id>.xml`` and
``JPEGImages/<id>.jpg``. Any tree in that layout works (the toy set of ``data/toy_dataset.py`` is one),
with its own class list.

The XML is parsed with ``xml.etree.ElementTree``: the files are local and trusted by the user who points
the code at them (``defusedxml`` would matter for files fetched from elsewhere).
"""

import os
import xml.etree.ElementTree as ET

import numpy as np

from data.util import DataError, read_image, read_image_size

__all__ = ["VOC_BBOX_LABEL_NAMES", "AnnotationError", "VOCBboxDataset"]

VOC_BBOX_LABEL_NAMES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)


class AnnotationError(DataError):
    """An annotation file that is missing, not XML, or holds an object that cannot be read."""


def _child_text(element: ET.Element, tag: str, xml_path: str) -> str:
    child = element.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise AnnotationError(xml_path, f"<{element.tag}> has no <{tag}> value")
    return child.text.strip()


def _child_number(element: ET.Element, tag: str, xml_path: str) -> float:
    text = _child_text(element, tag, xml_path)
    try:
        return float(text)
    except ValueError:
        raise AnnotationError(xml_path, f"<{tag}> is not a number: {text!r}") from None


class VOCBboxDataset:
    """Bounding boxes of a VOC-layout data set.

    Item ``i`` is ``(img, bbox, label, difficult)``:

    * ``img``: ``(3, H, W)`` float32 RGB in ``[0, 255]``;
    * ``bbox``: ``(R, 4)`` float32, ``(y_min, x_min, y_max, x_max)``, the XML's 1-based pixel indices
      minus 1 (so 0-based inclusive indices, as the original);
    * ``label``: ``(R,)`` int32 in ``[0, len(label_names))``;
    * ``difficult``: ``(R,)`` bool (the original returned uint8).

    An image whose XML lists no (kept) object gives ``(0, 4)`` / ``(0,)`` arrays.

    Args:
        data_dir: root of the tree (the folder that holds ``ImageSets``, ``Annotations``, ``JPEGImages``).
        split: name of the id list in ``ImageSets/Main`` (``'trainval'``, ``'test'``, ...).
        use_difficult: keep objects marked difficult (else they are left out).
        return_difficult: accepted for compatibility and ignored, as in the original: ``difficult`` is
            always returned.
        label_names: the class names; an object's label is the index of its ``<name>`` in this list,
            matched after stripping spaces and ignoring case.

    Raises:
        FileNotFoundError: the split file does not exist (the message names it).
        ValueError: two class names are equal up to case.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str = "trainval",
        use_difficult: bool = False,
        return_difficult: bool = False,
        label_names: tuple[str, ...] = VOC_BBOX_LABEL_NAMES,
    ):
        self.data_dir = os.fspath(data_dir)
        self.split = split
        self.use_difficult = use_difficult
        self.return_difficult = return_difficult
        self.label_names = tuple(label_names)
        self._label_index = {name.strip().lower(): i for i, name in enumerate(self.label_names)}
        if len(self._label_index) != len(self.label_names):
            raise ValueError(f"label_names has names equal up to case: {self.label_names}")

        id_list_file = os.path.join(self.data_dir, "ImageSets", "Main", f"{split}.txt")
        if not os.path.isfile(id_list_file):
            raise FileNotFoundError(
                f"VOC split file not found: {id_list_file} (data_dir={self.data_dir!r}, split={split!r})")
        with open(id_list_file) as f:
            self.ids = [line.strip() for line in f if line.strip()]

    def __len__(self) -> int:
        return len(self.ids)

    def annotation_path(self, i: int) -> str:
        """Path of the XML file of item ``i``."""
        return os.path.join(self.data_dir, "Annotations", f"{self.ids[i]}.xml")

    def image_path(self, i: int) -> str:
        """Path of the JPEG file of item ``i``."""
        return os.path.join(self.data_dir, "JPEGImages", f"{self.ids[i]}.jpg")

    def image_size(self, i: int) -> tuple[int, int]:
        """``(H, W)`` of item ``i``'s image, from the file's header (not the XML's ``<size>``, which tools
        sometimes get wrong)."""
        return read_image_size(self.image_path(i))

    def get_annotation(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The boxes of item ``i`` without reading its image.

        Returns:
            ``(bbox (R, 4) float32, label (R,) int32, difficult (R,) bool)`` as in the item.

        Raises:
            AnnotationError: the XML is missing or unparseable, an object has an unknown class name or
                a box coordinate that is missing or not a number (the error names the XML file).
        """
        xml_path = self.annotation_path(i)
        try:
            root = ET.parse(xml_path).getroot()
        except FileNotFoundError:
            raise AnnotationError(xml_path, "no such file") from None
        except (ET.ParseError, OSError) as e:
            raise AnnotationError(xml_path, f"cannot parse XML ({e})") from e

        bbox, label, difficult = [], [], []
        for obj in root.iter("object"):
            # A missing <difficult> tag means 0, as in the VOC devkit.
            has_flag = obj.find("difficult") is not None
            obj_difficult = has_flag and _child_number(obj, "difficult", xml_path) == 1
            if obj_difficult and not self.use_difficult:
                continue
            name = _child_text(obj, "name", xml_path)
            if name.lower() not in self._label_index:
                raise AnnotationError(
                    xml_path, f"unknown class name {name!r}; known names: {', '.join(self.label_names)}")
            bndbox = obj.find("bndbox")
            if bndbox is None:
                raise AnnotationError(xml_path, f"object {name!r} has no <bndbox>")
            # (y_min, x_min, y_max, x_max), 1-based in the XML -> 0-based.
            bbox.append([_child_number(bndbox, t, xml_path) - 1 for t in ("ymin", "xmin", "ymax", "xmax")])
            label.append(self._label_index[name.lower()])
            difficult.append(obj_difficult)

        bbox = np.array(bbox, dtype=np.float32).reshape(-1, 4)  # (R, 4), also when R == 0
        return bbox, np.array(label, dtype=np.int32), np.array(difficult, dtype=bool)

    def get_example(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Item ``i``: ``(img, bbox, label, difficult)`` (see the class docstring).

        Raises:
            AnnotationError: see :meth:`get_annotation`.
            data.util.ImageReadError: the image is missing or unreadable (the error names it).
        """
        bbox, label, difficult = self.get_annotation(i)
        img = read_image(self.image_path(i), color=True)
        return img, bbox, label, difficult

    __getitem__ = get_example
