"""Two processes of one thread (torchrun + DDP, gloo) against one process of two threads, on the toy job.

Both runs train the toy preset on two images per step, so that they follow the same learning curve (the
issue's test: 2 ranks x batch 1 equal 1 process x batch 2 within float tolerance, each image's draws seeded
by itself):

* ``ddp``: ``torchrun --standalone --nproc_per_node=2 train.py train --data=toy`` (torchrun sets
  ``OMP_NUM_THREADS=1``: one thread per process), batch 1 per process;
* ``threads``: ``python train.py train --data=toy --batch-size=2``, PyTorch's two threads in one process.

Each runs in a fresh subprocess with its own run folder; from its ``history.jsonl`` this prints the training
pace (images per second between the first and the last loss point of the first epoch: evaluation and start-up
left out), the wall time of the whole run, and the time (since the first record) and epoch at which the test
mAP first reached 0.9. The two runs take turns, each alone on the machine.

Usage: ``.venv/bin/python bench/ddp_cpu.py [--epoch N]`` (default: the toy preset's epochs; ``--epoch 1``
measures the pace alone in about two minutes).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.floor import cpu_text  # noqa: E402

TARGET_MAP = 0.9
TOY_TRAIN_IMAGES = 500  # the toy preset's trainval split


def command(mode: str, save_dir: str, epoch: int | None) -> tuple[list[str], dict]:
    """The command line and extra environment of one run."""
    options = ["train", "--data=toy", f"--save-dir={save_dir}", "--run-name=bench", "--tensorboard=False"]
    if epoch is not None:
        options.append(f"--epoch={epoch}")
    if mode == "ddp":
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        return [*launcher, str(ROOT / "train.py"), *options], {"OMP_NUM_THREADS": "1"}
    return [sys.executable, str(ROOT / "train.py"), *options, "--batch-size=2"], {}


def summarize(history: list[dict], wall: float) -> dict:
    """Pace, time and epoch to mAP 0.9 and the best mAP of one run's history records."""
    steps_per_epoch = TOY_TRAIN_IMAGES // 2
    loss = [r for r in history if r["name"] == "total_loss" and r["step"] <= steps_per_epoch]
    pace = (loss[-1]["step"] - loss[0]["step"]) * 2 / (loss[-1]["time"] - loss[0]["time"])
    maps = [r for r in history if r["name"] == "test_map"]
    start = min(r["time"] for r in history)
    reached = next((r for r in maps if r["value"] >= TARGET_MAP), None)
    return {
        "images_per_second": pace,
        "wall_s": wall,
        "best_map": max(r["value"] for r in maps),
        "seconds_to_target": None if reached is None else reached["time"] - start,
        "epoch_at_target": None if reached is None else reached["step"] // steps_per_epoch - 1,
    }


def run(mode: str, epoch: int | None) -> dict:
    with tempfile.TemporaryDirectory() as save_dir:
        cmd, env = command(mode, save_dir, epoch)
        start = time.time()
        subprocess.run(cmd, env={**os.environ, **env}, check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        wall = time.time() - start
        history = [json.loads(line) for line in (Path(save_dir) / "bench" / "history.jsonl").open()]
    return summarize(history, wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epoch", type=int, default=None, help="epochs (default: the toy preset's)")
    args = parser.parse_args()
    print(f"toy job, 2 images per step; CPU {cpu_text()}")
    results = {mode: run(mode, args.epoch) for mode in ("threads", "ddp")}
    names = {"threads": "1 process x 2 threads, batch 2", "ddp": "torchrun 2 processes x 1 thread"}
    for mode, r in results.items():
        target = ("not reached" if r["seconds_to_target"] is None else
                  f"{r['seconds_to_target']:.0f} s (epoch {r['epoch_at_target']})")
        print(f"{names[mode]:34s} {r['images_per_second']:.1f} img/s training, run {r['wall_s']:.0f} s, best "
              f"mAP {r['best_map']:.4f}, mAP {TARGET_MAP} at {target}")
    ratio = results["ddp"]["images_per_second"] / results["threads"]["images_per_second"]
    print(f"pace ddp / threads: {ratio:.2f}x")


if __name__ == "__main__":
    main()
