"""A torchrun worker for tests/test_distributed.py: a few DDP training steps of the tiny model on scenes of
its own, reporting every step's parameters from every rank.

    torchrun --nproc_per_node=2 tests/distributed_worker.py OUT.json STEPS [NAN_RANK NAN_STEP]

Each rank trains on its own scene (seeded by the rank); after each step every rank's parameter checksum is
gathered and rank 0 writes ``{"checksums": [[rank 0's, rank 1's, ...] per step], "errors": {...}}``. With
``NAN_RANK`` and ``NAN_STEP``, that rank's image of that step holds a NaN: every rank must stop before the
step changes the weights.
"""

import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from test_trainer import make_trainer, scene  # noqa: E402

from trainer import NonFiniteLossError  # noqa: E402
from utils.distributed import all_gather_objects, cleanup, get_rank, init_distributed  # noqa: E402


def checksum(model) -> list[float]:
    """Per-parameter float64 sums (exact enough to tell any difference of these small tensors)."""
    return [float(p.detach().double().sum() + p.detach().double().abs().sum()) for p in model.parameters()]


def main() -> None:
    out, steps = sys.argv[1], int(sys.argv[2])
    nan_rank, nan_step = (int(sys.argv[3]), int(sys.argv[4])) if len(sys.argv) > 4 else (-1, -1)
    torch.set_num_threads(1)
    init_distributed(torch.device("cpu"), timeout_s=60)
    rank = get_rank()
    trainer = make_trainer(seed=rank)  # different initial weights: DDP must give every rank rank 0's
    trainer.distribute()
    checksums, errors = [all_gather_objects(checksum(trainer.faster_rcnn))], {}
    for step in range(steps):
        img, bbox, label, scale = scene(seed=10 * step + rank)
        if rank == nan_rank and step == nan_step:
            img[0, :, :4, :4] = float("nan")
        try:
            trainer.train_step(img, bbox, label, scale, rngs=[np.random.default_rng([step, rank])])
        except NonFiniteLossError as e:
            errors[rank] = str(e)
            checksums.append(all_gather_objects(checksum(trainer.faster_rcnn)))
            break
        checksums.append(all_gather_objects(checksum(trainer.faster_rcnn)))
    errors = {k: v for part in all_gather_objects(errors) for k, v in part.items()}
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"checksums": checksums, "errors": errors}, f)
    cleanup()


if __name__ == "__main__":
    main()
