"""Cost of the data check that ``train.py train`` runs before training (``data/check.py``).

Writes ``--n`` VOC-sized JPEGs (500x375, distinct crops of scikit-image's astronaut with noise, quality 90)
with two-object XMLs into a temporary VOC tree, then times ``check_dataset`` (full decode of every image,
XML parsing and box checks) with 1, 2 and 4 reader threads, against a header-only pass (PIL reads the size
without decoding, and the XML is parsed) that could not catch a truncated file. Prints ms per image and the
estimate for VOC07 trainval + test (5011 + 4952 images). The files are read from the page cache after the
first repetition, as in a second run of training.

Usage: ``.venv/bin/python bench/data_check.py [--n 1000] [--reps 3]``
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as skdata

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.check import check_dataset  # noqa: E402
from data.voc_dataset import VOCBboxDataset  # noqa: E402

VOC07_IMAGES = 5011 + 4952


def write_tree(root: str, n: int) -> None:
    for sub in ("Annotations", "JPEGImages", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    photo = Image.fromarray(skdata.astronaut()).resize((700, 525))
    rng = np.random.default_rng(0)
    ids = [f"{i:06d}" for i in range(n)]
    for image_id in ids:
        x, y = rng.integers(0, 200), rng.integers(0, 150)
        crop = np.asarray(photo.crop((x, y, x + 500, y + 375)), dtype=np.int16)
        noisy = np.clip(crop + rng.integers(-8, 9, crop.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(os.path.join(root, "JPEGImages", f"{image_id}.jpg"), quality=90)
        objects = "".join(
            f"<object><name>person</name><difficult>0</difficult><bndbox><xmin>{10 + k}</xmin>"
            f"<ymin>{20 + k}</ymin><xmax>{200 + k}</xmax><ymax>{300 + k}</ymax></bndbox></object>"
            for k in range(2))
        with open(os.path.join(root, "Annotations", f"{image_id}.xml"), "w") as f:
            f.write(f"<annotation><size><width>500</width><height>375</height></size>{objects}</annotation>")
    with open(os.path.join(root, "ImageSets", "Main", "trainval.txt"), "w") as f:
        f.write("".join(i + "\n" for i in ids))


def header_only(db: VOCBboxDataset) -> None:
    for i in range(len(db)):
        with Image.open(db.image_path(i)) as img:
            img.size  # noqa: B018 (reads the header only)
        db.get_annotation(i)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="images in the tree")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    print(f"CPUs: {os.cpu_count()}, images: {args.n} x 500x375 JPEG")
    with tempfile.TemporaryDirectory() as root:
        write_tree(root, args.n)
        db = VOCBboxDataset(root)
        runs = {"header only (no decode)": lambda: header_only(db)}
        for n_threads in (1, 2, 4):
            runs[f"check_dataset, {n_threads} thread(s)"] = (
                lambda n_threads=n_threads: check_dataset(db, progress=False, n_threads=n_threads))
        times = {name: [] for name in runs}
        for _ in range(args.reps):  # interleaved repetitions
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
        base = statistics.median(times["header only (no decode)"])
        for name, values in times.items():
            per_image = statistics.median(values) / args.n
            print(f"{name:<28} {per_image * 1e3:6.2f} ms/image   VOC07 (9963 images): "
                  f"{per_image * VOC07_IMAGES:5.1f} s   x{statistics.median(values) / base:4.1f} header-only")


if __name__ == "__main__":
    main()
