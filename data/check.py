"""Check a data set (VOC or COCO layout) before training: every listed sample must be usable.

For each id of a split, :func:`check_dataset` verifies that

* the image exists and decodes completely (a truncated file or one that is not an image is caught here, not
  hours into training) into RGB (grayscale, CMYK, palette... images are fine: :func:`data.util.read_image`
  converts them);
* the annotation XML exists and parses, and every ``<object>`` in it (difficult ones included) has a known
  class name and a box with finite coordinates, positive area and inside the image;
* for a COCO data set (:class:`data.coco_dataset.COCOBboxDataset`, ``db.box_convention == 'coco'``): every
  annotation of the image (crowd ones included) has a category id the json lists and a ``bbox`` of four
  finite numbers with positive area inside the image, and the decoded image has the ``width`` and
  ``height`` the json records (a mismatch, e.g. from a tool that applied the EXIF rotation, would misplace
  every box). Messages name the image id, its file and the annotation id.

"Inside the image" is judged against the decoded image's size, in VOC's convention: the XML holds 1-based
inclusive pixel indices, so a box spans ``1 <= xmin < xmax <= W`` (``W`` the image width; likewise ``y``
with ``H``). One pixel of tolerance is allowed on each side (``0 <= xmin`` and ``xmax <= W + 1``): tools
that write 0-based indices, or the right/bottom image edge, produce such boxes and they train fine. A box
touching the border is valid. Zero area (``xmin == xmax``) is an error: the original's box arithmetic uses
``xmax - xmin`` as the width (no ``+ 1``), so such a box would make a log of zero in the regression targets.

COCO boxes are ``[x, y, w, h]`` in continuous 0-based coordinates, so inside means ``0 <= x`` and
``x + w <= W`` (and the same for ``y``, ``h``, ``H``), with the same one pixel of tolerance on each side;
zero or negative ``w`` or ``h`` is "no area". A db without ``box_convention`` is judged as VOC.

An image whose XML lists no object (or only difficult ones, which training leaves out) is not an error: it
trains as background only (every anchor and RoI a negative). Such images are counted in the report.

Checking costs one full decode per image, about 1 ms for a 500x375 JPEG on one core of our CPUs (so about
5 s for VOC07 trainval); the files are read by a small thread pool (PIL releases the GIL while decoding).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm import tqdm

from data.util import DataError, read_image

__all__ = [
    "BOX_TOLERANCE",
    "BadSampleWarning",
    "DataCheckError",
    "DataReport",
    "Problem",
    "check_dataset",
    "check_sample",
    "check_splits",
]

# Pixels a box may reach past the image (see the module docstring).
BOX_TOLERANCE = 1.0
# Below this many ids the check runs in the calling thread (a pool is not worth starting).
_MIN_IDS_FOR_THREADS = 64


class BadSampleWarning(UserWarning):
    """A bad sample is skipped (``--skip-bad-samples``)."""


@dataclasses.dataclass(frozen=True)
class Problem:
    """What is wrong with one file of one sample.

    Attributes:
        index: the sample's index in the split.
        image_id: its id (the line of ``ImageSets/Main/<split>.txt``; for COCO, the int image id).
        path: the file at fault (the image, the annotation XML or the COCO json).
        reason: what is wrong, in words.
    """

    index: int
    image_id: str | int
    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclasses.dataclass
class DataReport:
    """The result of :func:`check_dataset` for one split.

    Attributes:
        data_dir: root of the VOC (or COCO) tree.
        split: the split checked.
        n_checked: number of ids checked.
        problems: every problem found, in id order (a sample may have several).
        empty: ids of the samples without any object used (they train as background only).
        seconds: wall time of the check.
    """

    data_dir: str
    split: str
    n_checked: int
    problems: list[Problem]
    empty: list[str]
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def bad_indices(self) -> list[int]:
        """Sorted indices of the samples with at least one problem."""
        return sorted({p.index for p in self.problems})

    def summary(self) -> str:
        """One line: counts of checked, bad and empty samples."""
        return (f"{self.split} ({self.data_dir}): {self.n_checked} samples checked in {self.seconds:.1f} s, "
                f"{len(self.bad_indices)} bad, {len(self.empty)} without objects (background only)")

    def format(self) -> str:
        """The summary, then one indented line per problem: ``path: reason``."""
        return "\n".join([self.summary(), *(f"  {p}" for p in self.problems)])


class DataCheckError(DataError):
    """The data set has bad samples; ``reports`` holds every problem found (see :func:`check_splits`)."""

    def __init__(self, reports: list[DataReport], skipping: bool = False):
        self.reports = reports
        n_bad = sum(r.n_checked and len(r.bad_indices) for r in reports)
        if skipping:
            empty = [r.split for r in reports if _nothing_left(r)]
            head = f"no good sample left in {', '.join(empty)} after leaving out the bad ones"
        else:
            head = (f"{n_bad} bad sample(s), nothing was trained. Fix or remove these files, or pass "
                    "--skip-bad-samples to leave these samples out with a warning")
        lines = [head + ":", *(r.format() for r in reports if not r.ok)]
        super().__init__(reports[0].data_dir if reports else "", "\n".join(lines))

    def __str__(self) -> str:
        return self.reason


def _box_problems(bbox: np.ndarray, label: np.ndarray, size: tuple[int, int], names) -> list[str]:
    """Reasons why boxes do not fit an image of ``size = (H, W)``; ``bbox`` as the VOC reader gives them
    (0-based: the XML's values minus 1). Messages quote the XML's own (1-based) values."""
    height, width = size
    reasons = []
    for r, (box, lb) in enumerate(zip(bbox.tolist(), label.tolist(), strict=True)):
        y_min, x_min, y_max, x_max = (v + 1 for v in box)  # back to the XML's values
        what = (f"object {r + 1} ({names[lb]!r}) box xmin={x_min:g} ymin={y_min:g} xmax={x_max:g} "
                f"ymax={y_max:g}")
        if not all(math.isfinite(v) for v in box):
            reasons.append(f"{what}: a coordinate is not a finite number")
        elif x_max <= x_min or y_max <= y_min:
            reasons.append(f"{what}: no area (needs xmin < xmax and ymin < ymax)")
        elif (min(x_min, y_min) < 1 - BOX_TOLERANCE or x_max > width + BOX_TOLERANCE
              or y_max > height + BOX_TOLERANCE):
            reasons.append(f"{what}: outside the {width}x{height} (width x height) image")
    return reasons


def _coco_box_problems(bbox: np.ndarray, label: np.ndarray, size: tuple[int, int], names,
                       annotation_ids: list) -> list[str]:
    """Reasons why COCO boxes do not fit an image of ``size = (H, W)``; ``bbox`` as the COCO reader gives
    them (``(y, x, y + h, x + w)``). Messages quote COCO's ``[x, y, w, h]`` and the annotation id."""
    height, width = size
    reasons = []
    for box, lb, ann_id in zip(bbox.tolist(), label.tolist(), annotation_ids, strict=True):
        y_min, x_min, y_max, x_max = box
        what = (f"annotation id {ann_id} ({names[lb]!r}) bbox x={x_min:g} y={y_min:g} w={x_max - x_min:g} "
                f"h={y_max - y_min:g}")
        if not all(math.isfinite(v) for v in box):
            reasons.append(f"{what}: a coordinate is not a finite number")
        elif x_max <= x_min or y_max <= y_min:
            reasons.append(f"{what}: no area (needs w > 0 and h > 0)")
        elif (min(x_min, y_min) < -BOX_TOLERANCE or x_max > width + BOX_TOLERANCE
              or y_max > height + BOX_TOLERANCE):
            reasons.append(f"{what}: outside the {width}x{height} (width x height) image")
    return reasons


def _is_coco(db) -> bool:
    return getattr(db, "box_convention", "voc") == "coco"


def check_sample(db, i: int) -> tuple[list[Problem], bool]:
    """Check sample ``i`` of ``db`` (see the module docstring).

    Args:
        db: a :class:`data.voc_dataset.VOCBboxDataset` or :class:`data.coco_dataset.COCOBboxDataset` (its
            ``use_difficult`` decides which objects the sample uses; every object is checked either way).
        i: the sample's index.

    Returns:
        ``(problems, empty)``: the problems found (an empty list for a good sample) and whether the sample
        uses no object. A COCO sample's reasons start with its image id and file (``image id 42
        (000042.jpg) ...``), as the path of its annotation problems is the json shared by every sample.
    """
    image_id = db.ids[i]
    coco = _is_coco(db)
    where = f"{db.describe(i)}: " if coco else ""
    problems = []
    try:
        size = read_image(db.image_path(i), dtype=np.uint8).shape[1:]  # full decode: catches truncation
    except DataError as e:
        problems.append(Problem(i, image_id, e.path, where + e.reason))
        size = None
    if coco and size is not None and db.image_size(i) not in (None, tuple(size)):
        (json_h, json_w), (height, width) = db.image_size(i), size
        reason = f"{where}the image is {width}x{height} (width x height) but the json says {json_w}x{json_h}"
        problems.append(Problem(i, image_id, db.image_path(i), reason))
    every_object = copy.copy(db)  # the same ids, all objects
    every_object.use_difficult = True
    try:
        bbox, label, difficult = every_object.get_annotation(i)
    except DataError as e:
        problems.append(Problem(i, image_id, e.path, e.reason))  # a COCO reason names the ids already
        return problems, False
    if size is not None and coco:
        reasons = _coco_box_problems(bbox, label, size, db.label_names, every_object.annotation_ids(i))
        problems += [Problem(i, image_id, db.annotation_path(i), where + reason) for reason in reasons]
    elif size is not None:
        problems += [Problem(i, image_id, db.annotation_path(i), reason)
                     for reason in _box_problems(bbox, label, size, db.label_names)]
    n_used = len(label) if db.use_difficult else int((~difficult).sum())
    return problems, n_used == 0


def check_dataset(db, progress: bool = True, n_threads: int | None = None) -> DataReport:
    """Check every sample of a split (see the module docstring).

    Args:
        db: a :class:`data.voc_dataset.VOCBboxDataset` or :class:`data.coco_dataset.COCOBboxDataset`.
        progress: show a tqdm bar.
        n_threads: reader threads; default ``min(8, CPU count)`` (the calling thread alone for small splits).

    Returns:
        A :class:`DataReport`. A split that lists no id at all is reported as a problem of its split file.
    """
    start = time.perf_counter()
    n = len(db)
    if n_threads is None:
        n_threads = min(8, os.cpu_count() or 1) if n >= _MIN_IDS_FOR_THREADS else 1
    bar = tqdm(total=n, desc=f"checking {db.split}", disable=not progress, leave=False, dynamic_ncols=True)

    def check(i):
        result = check_sample(db, i)
        bar.update()
        return result

    if n_threads > 1:
        with ThreadPoolExecutor(n_threads) as pool:
            results = list(pool.map(check, range(n)))
    else:
        results = [check(i) for i in range(n)]
    bar.close()
    problems = [p for sample_problems, _ in results for p in sample_problems]
    empty = [db.ids[i] for i, (_, is_empty) in enumerate(results) if is_empty]
    if n == 0 and _is_coco(db):
        what = "no image with an object" if db.skip_empty else "no image"
        problems.append(Problem(-1, "", db.annotation_file, f"lists {what}"))
    elif n == 0:
        split_file = os.path.join(db.data_dir, "ImageSets", "Main", f"{db.split}.txt")
        problems.append(Problem(-1, "", split_file, "lists no image id"))
    return DataReport(db.data_dir, db.split, n, problems, empty, time.perf_counter() - start)


def _nothing_left(report: DataReport) -> bool:
    return report.n_checked == 0 or len(report.bad_indices) == report.n_checked


def check_splits(datasets, skip_bad_samples: bool = False, progress: bool = True) -> list[DataReport]:
    """Check the data sets of a run; stop with one report, or leave the bad samples out.

    Args:
        datasets: :class:`data.dataset.Dataset` / :class:`data.dataset.TestDataset` objects (anything with
            a ``db`` to check and a ``drop(indices)`` method).
        skip_bad_samples: when true, each bad sample costs one :class:`BadSampleWarning` and is dropped
            from its data set (which then serves only the good ones); a split left with no sample at all is
            still an error.
        progress: show tqdm bars.

    Returns:
        The reports, one per data set, in order.

    Raises:
        DataCheckError: some sample is bad (and ``skip_bad_samples`` is false), or nothing is left to use.
    """
    reports = [check_dataset(d.db, progress=progress) for d in datasets]
    if all(r.ok for r in reports):
        return reports
    if not skip_bad_samples or any(_nothing_left(r) for r in reports):
        raise DataCheckError(reports, skipping=skip_bad_samples)
    for dataset, report in zip(datasets, reports, strict=True):
        for p in report.problems:
            warnings.warn(f"skipping sample {p.image_id!r} of {report.split}: {p}", BadSampleWarning,
                          stacklevel=2)
        dataset.drop(report.bad_indices)
    return reports
