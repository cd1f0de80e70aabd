"""The summary table of ``bench/gpu.sh``: images per second and peak memory, ours against torchvision, from
the JSON files that ``bench/inference.py --json`` and ``bench/train.py --json`` write.

Usage: ``.venv/bin/python bench/gpu_table.py RESULTS_FOLDER`` (prints a Markdown table).
"""

import json
import sys
from pathlib import Path

# The targets on an H100 at batch 1 (float32): inference >= 60 img/s, training >= 20 img/s,
# <= 3 GB of GPU memory, ahead of torchvision.
TARGETS = {"inference": 60.0, "train": 20.0}
MEMORY_TARGET_MIB = 3 * 1024


def rows(folder: Path) -> list[dict]:
    """Every result file of ``folder`` as a dict (``bench``, ``device``, ``amp``, ``batch_size``, ``ours``,
    ``torchvision``), sorted by benchmark, precision and batch size."""
    results = [json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))]
    return sorted(results, key=lambda r: (r["bench"], r["amp"], r["batch_size"]))


def table(results: list[dict]) -> str:
    lines = ["| benchmark | precision | batch | ours img/s | torchvision img/s | ours / torchvision time | "
             "ours peak MiB | torchvision peak MiB | target |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        ours, theirs = r["ours"], r["torchvision"]
        target = ""
        if not r["amp"] and r["batch_size"] == 1:
            met = ours["images_per_second"] >= TARGETS[r["bench"]] and (
                ours["peak_memory_mib"] is None or ours["peak_memory_mib"] <= MEMORY_TARGET_MIB)
            target = (f">= {TARGETS[r['bench']]:.0f} img/s, <= 3 GB: {'met' if met else 'MISSED'}")
        lines.append(
            f"| {r['bench']} | {'amp' if r['amp'] else 'float32'} | {r['batch_size']} | "
            f"{ours['images_per_second']:.1f} | {theirs['images_per_second']:.1f} | "
            f"{ours['seconds'] / theirs['seconds']:.2f} | {_mib(ours['peak_memory_mib'])} | "
            f"{_mib(theirs['peak_memory_mib'])} | {target} |")
    return "\n".join(lines)


def _mib(value) -> str:
    return "" if value is None else f"{value:.0f}"


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit(__doc__.split("\n\n")[-1])
    results = rows(Path(argv[0]))
    if not results:
        raise SystemExit(f"no result files in {argv[0]}")
    print(table(results))


if __name__ == "__main__":
    main()
