"""Detect objects in images with a trained checkpoint: one picture and one JSON file per image.

    python demo.py IMAGE_OR_FOLDER... --load-path=CKPT [--out=demo_out] [--score-thresh=0.7] [--device=auto]

``CKPT`` is a checkpoint of ours (``checkpoints/<run>/best.pth``) or one of the original
simple-faster-rcnn-pytorch's (read with weights-only loading: no code in a file ever runs); a folder stands
for its ``best.pth`` when it has one, else the newest ``best.pth`` under it (``--load-path=checkpoints``: the
latest run's best), else its newest ``*.pth``; the one taken is named on stderr. An input folder stands for
its ``.jpg/.jpeg/.png/.bmp`` files (sorted, not recursive). For each image ``<stem>.<ext>``, ``--out``
receives:

* ``<stem>.jpg`` (``.png`` for PNG and BMP inputs): the image with the detections drawn, labelled
  ``"class name: score"``;
* ``<stem>.json``: ``{"image": path, "size": [H, W], "bbox_order": "y_min, x_min, y_max, x_max",
  "detections": [{"bbox": [y_min, x_min, y_max, x_max], "label": int, "class_name": str, "score": float},
  ...], ...}`` with boxes in pixels of the original image.

Detection uses ``predict(..., visualize=True, score_thresh=...)``: the ``visualize`` preset (NMS 0.3,
score > 0.7), ``--score-thresh`` replacing its score threshold. An image that is missing or cannot be read is
reported on stderr and the others are still done. Exit status: 0 when every image was done, 1 when some
failed, 2 when nothing could start (no input, a bad checkpoint, a bad option).

The notebook ``demo.ipynb`` uses :func:`find_checkpoint` and :func:`demo_image` from here.
"""

import glob
import json
import os
import sys

import fire
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tqdm import tqdm

from data.util import DataError, read_image
from utils.checkpoint import load_checkpoint, model_from_checkpoint
from utils.config import resolve_device
from utils.memory_format import choose_memory_format, keep_onednn_primitives, release_mkl_buffers
from utils.vis_tool import vis_bbox

__all__ = ["IMAGE_SUFFIXES", "BBOX_ORDER", "demo_image", "detect", "detections_record", "draw_detections",
           "expand_inputs", "find_checkpoint", "load_model", "main", "run_demo"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
BBOX_ORDER = "y_min, x_min, y_max, x_max"
# Pictures are drawn at the image's size, enlarged so that the longer side has at least this many pixels
# (captions stay readable on small images).
_MIN_PICTURE_SIDE = 640


class DemoError(Exception):
    """Something that stops the demo before any image: its message is the whole report."""


def find_checkpoint(path: str | os.PathLike = "checkpoints") -> str:
    """The checkpoint that ``path`` names: ``path`` itself if it is a file; for a folder, its ``best.pth``
    (a run folder), else the newest ``best.pth`` under it (``checkpoints/``: the latest run's best), else the
    newest ``*.pth`` under it.

    Raises:
        FileNotFoundError: ``path`` does not exist or holds no ``*.pth`` file.
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint file or folder at {path!r}")
    if os.path.isfile(os.path.join(path, "best.pth")):
        return os.path.join(path, "best.pth")
    for pattern in ("best.pth", "*.pth"):
        candidates = glob.glob(os.path.join(glob.escape(path), "**", pattern), recursive=True)
        if candidates:
            return max(candidates, key=os.path.getmtime)
    raise FileNotFoundError(f"no *.pth checkpoint under {path!r}: train one first, e.g. "
                            "`python train.py train --data=toy`")


def _which(folder: str, path: str) -> str:
    """Why :func:`find_checkpoint` took ``path`` in ``folder``, in words."""
    if os.path.basename(path) != "best.pth":
        return f"no best.pth under {folder}: its newest *.pth"
    if os.path.samefile(os.path.dirname(path), folder):
        return "the folder's best.pth"
    return f"the newest best.pth under {folder}"


def load_model(load_path: str | os.PathLike, device: str = "auto"):
    """The model of a checkpoint (a file, or a folder: :func:`find_checkpoint`, named on stderr), on
    ``device``, in eval mode, in the memory format that infers fastest on this CPU
    (``utils.memory_format``, measured once per machine), with its class names.

    Returns:
        ``(model, class_names, ckpt)``: the ``FasterRCNN``, its ``n_fg_class`` names, the checkpoint dict.

    Raises:
        DemoError: no such file, or a file that is not a usable checkpoint (the message names it).
    """
    load_path = os.fspath(load_path)
    try:
        torch_device = resolve_device(device)
        if os.path.isdir(load_path):  # a run folder, or checkpoints/
            folder, load_path = load_path, find_checkpoint(load_path)
            print(f"checkpoint: {load_path} ({_which(folder, load_path)})", file=sys.stderr)
        ckpt = load_checkpoint(load_path)
        model = model_from_checkpoint(ckpt, load_path)
    except (OSError, ValueError) as e:  # FileNotFoundError, CheckpointError, ConfigError, an unknown arch
        raise DemoError(str(e)) from e
    model.to(torch_device).eval()
    # a landscape photo at the model's input size (the format's advantage hardly depends on the size)
    size = (model.min_size, min(model.max_size, round(model.min_size * 4 / 3)))
    model.to(memory_format=choose_memory_format(model, "inference", size, log=_report))
    return model, list(ckpt["class_names"]), ckpt


def demo_image(ckpt: dict) -> tuple[np.ndarray, str]:
    """An image that fits the checkpoint: a toy test image for a toy model, a photo otherwise.

    The toy image is the first test image of the toy data set in the checkpoint's ``config['toy_data_dir']``;
    when that folder is gone it is rendered again (the generator is deterministic). The photo is
    scikit-image's ``astronaut`` (public domain, shipped with scikit-image).

    Returns:
        ``(img, source)``: ``(3, H, W)`` float32 RGB in ``[0, 255]``, and where it came from.
    """
    config = ckpt.get("config", {})
    if config.get("data") == "toy" or ckpt["arch"].get("name") == "toy":
        toy_dir = config.get("toy_data_dir") or ""
        split_file = os.path.join(toy_dir, "ImageSets", "Main", "test.txt")
        if os.path.isfile(split_file):
            with open(split_file) as f:
                image_id = f.readline().strip()
            path = os.path.join(toy_dir, "JPEGImages", f"{image_id}.jpg")
            return read_image(path), path
        from data.toy_dataset import ToyParams, render_toy_image

        image, _ = render_toy_image(ToyParams(), "test", 0)  # (H, W, 3) uint8
        return image.transpose(2, 0, 1).astype(np.float32), "toy test image 0 (rendered)"
    from skimage import data

    return data.astronaut().transpose(2, 0, 1).astype(np.float32), "skimage.data.astronaut()"


def detect(model, img: np.ndarray, score_thresh: float | None = None):
    """Detections in one image with the ``visualize`` preset (``score_thresh`` replacing its 0.7).

    Args:
        model: a ``FasterRCNN``.
        img: ``(3, H, W)`` RGB in ``[0, 255]``.
        score_thresh: keep detections scoring above this; ``None``: the preset's.

    Returns:
        ``(bbox (K, 4) float32, label (K,) int32, score (K,) float32)``, boxes
        ``(y_min, x_min, y_max, x_max)`` in pixels of ``img``.
    """
    bboxes, labels, scores = model.predict([img], visualize=True, score_thresh=score_thresh)
    return bboxes[0], labels[0], scores[0]


def draw_detections(img: np.ndarray, bbox, label, score, class_names) -> Figure:
    """An off-screen figure of ``img`` with its detections (``vis_bbox``), sized to the image, no axes."""
    height, width = img.shape[1:]
    zoom = max(1.0, _MIN_PICTURE_SIDE / max(height, width))
    dpi = 100
    fig = Figure(figsize=(width * zoom / dpi, height * zoom / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    vis_bbox(img, bbox, label, score, ax=ax, label_names=class_names)
    ax.set_axis_off()
    return fig


def detections_record(image_path: str, size, bbox, label, score, class_names) -> dict:
    """The JSON record of one image's detections (see the module docstring)."""
    return {
        "image": image_path,
        "size": [int(size[0]), int(size[1])],
        "bbox_order": BBOX_ORDER,
        "detections": [
            {"bbox": [float(v) for v in b], "label": int(lb), "class_name": class_names[int(lb)],
             "score": float(s)}
            for b, lb, s in zip(bbox, label, score, strict=True)
        ],
    }


def _record_json(record: dict) -> str:
    """``record`` as indented JSON text."""
    return json.dumps(record, indent=2) + "\n"


def expand_inputs(inputs) -> tuple[list[str], list[str]]:
    """Image files named by ``inputs`` (files, and folders expanded to their images), and the problems.

    Returns:
        ``(paths, problems)``: the image paths in order (a folder's sorted by name), and one message per
        input that does not exist or is a folder without images.
    """
    paths, problems = [], []
    for item in inputs:
        item = str(item)
        if os.path.isdir(item):
            found = sorted(os.path.join(item, name) for name in os.listdir(item)
                           if name.lower().endswith(IMAGE_SUFFIXES)
                           and os.path.isfile(os.path.join(item, name)))
            if not found:
                problems.append(f"{item}: no {'/'.join(IMAGE_SUFFIXES)} images in this folder")
            paths += found
        elif os.path.exists(item):
            paths.append(item)
        else:
            problems.append(f"{item}: no such file or folder")
    return paths, problems


def _output_stem(path: str, used: set[str]) -> str:
    """``path``'s stem, with ``_2``, ``_3``... appended when an earlier input had the same one."""
    stem = os.path.splitext(os.path.basename(path))[0]
    candidate, n = stem, 1
    while candidate in used:
        n += 1
        candidate = f"{stem}_{n}"
    used.add(candidate)
    return candidate


def _report(message: str) -> None:
    tqdm.write(f"demo.py: {message}", file=sys.stderr)


def run_demo(inputs, load_path, out: str = "demo_out", score_thresh: float | None = None,
             device: str = "auto") -> int:
    """Do the work of ``demo.py`` (module docstring) and return its exit status."""
    try:
        if not inputs:
            raise DemoError("no image given: python demo.py IMAGE_OR_FOLDER... --load-path=CKPT")
        if load_path is None or isinstance(load_path, bool):  # absent, or a bare --load-path
            raise DemoError("--load-path=CKPT is required (a checkpoint of ours or of the original)")
        if score_thresh is not None and not (isinstance(score_thresh, (int, float))
                                             and 0 <= score_thresh < 1):
            raise DemoError(f"--score-thresh must be a number in [0, 1), got {score_thresh!r}")
        model, class_names, _ = load_model(str(load_path), device)
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as e:
            raise DemoError(f"--out={out!r}: cannot create the output folder ({e})") from e
    except DemoError as e:
        print(f"demo.py: error: {e}", file=sys.stderr)
        return 2

    paths, problems = expand_inputs(inputs)
    for problem in problems:
        _report(problem)
    used: set[str] = set()
    n_done = 0
    for path in tqdm(paths, desc="demo", unit="image", disable=len(paths) < 2, dynamic_ncols=True):
        stem = _output_stem(path, used)
        try:
            img = read_image(path)
            bbox, label, score = detect(model, img, score_thresh)
        except (DataError, ValueError, RuntimeError) as e:
            _report(str(e) if isinstance(e, DataError) else f"{path}: {e}")  # a DataError names the file
            problems.append(path)
            continue
        ext = ".jpg" if path.lower().endswith((".jpg", ".jpeg")) else ".png"
        draw_detections(img, bbox, label, score, class_names).savefig(os.path.join(out, stem + ext))
        record = detections_record(path, img.shape[1:], bbox, label, score, class_names)
        with open(os.path.join(out, stem + ".json"), "w") as f:
            f.write(_record_json(record))
        n_done += 1
    failed = f", {len(problems)} failed (see above)" if problems else ""
    print(f"demo.py: {n_done} image(s) done, pictures and JSON in {out}/{failed}", file=sys.stderr)
    return 1 if problems else 0


def main(*inputs, load_path: str | None = None, out: str = "demo_out", score_thresh: float | None = None,
         device: str = "auto", **unknown) -> None:
    """Detect objects in images with a checkpoint (ours or the original simple-faster-rcnn-pytorch's).

    For each image, writes OUT/<stem>.jpg (.png for PNG/BMP inputs) with the detections drawn, and
    OUT/<stem>.json with them: boxes (y_min, x_min, y_max, x_max) in pixels of the image, labels, class
    names and scores. Exit status: 0 all done, 1 some images failed (named on stderr), 2 nothing done (no
    input, a bad checkpoint or option).

    Args:
        inputs: image files (.jpg .jpeg .png .bmp) and folders of them.
        load_path: the checkpoint file.
        out: output folder (created when missing).
        score_thresh: keep detections scoring above this (default: the visualize preset's 0.7).
        device: auto (cuda when available), cpu, cuda or cuda:N.
    """
    keep_onednn_primitives()  # images of many sizes: keep every size's kernels
    release_mkl_buffers()
    # Options that are not parameters land in ``unknown`` (fire would run first and complain afterwards).
    if unknown.keys() & {"help", "h"}:
        print(__doc__)
        return
    if unknown:
        flags = ", ".join("--" + key.replace("_", "-") for key in unknown)
        print(f"demo.py: error: unknown option {flags}; the options are --load-path, --out, --score-thresh, "
              "--device (python demo.py --help)", file=sys.stderr)
        raise SystemExit(2)
    status = run_demo(inputs, load_path, out=str(out), score_thresh=score_thresh, device=str(device))
    if status:
        raise SystemExit(status)


if __name__ == "__main__":
    fire.Fire(main)
