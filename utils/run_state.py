"""Where a training run stands, and how it is saved and resumed: the run folder, its checkpoints, the epoch's
sample order, the random generators, the lr decay.

A run writes into ``<save_dir>/<run name>/`` (:func:`run_dir`): ``best.pth`` (best test mAP so far),
``last.pth`` (the latest resumable state: the end of the latest epoch, or where a stop signal ended the run),
and the visualizer's ``history.jsonl`` and ``curves.png``. Every checkpoint carries the :class:`RunState` in
its ``other_info`` and the random generators' states, so that any of them resumes: ``--load-path`` continues
at the same epoch, position in the epoch, weights, optimizer (momentum, lr), best mAP, lr decay and random
state; with ``num_workers=0`` a resumed run trains exactly as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings

import torch
from torch.utils.data import RandomSampler

from data.sampler import group_batches, pad_batches
from utils.distributed import all_gather_objects, barrier, get_rank, get_world_size, is_main_process
from utils.files import remove_stale_temp_files

__all__ = ["RunState", "TrainingRun", "epoch_batches", "epoch_order", "restart_checkpoint", "rng_state",
           "run_dir", "set_rng_state"]


@dataclasses.dataclass
class RunState:
    """Where a run stands; stored in every checkpoint's ``other_info`` so that any of them resumes.

    Attributes:
        epoch: epochs completed (the epoch under way, counted from 0).
        iteration: training steps taken since the start of the run.
        best_map: best test mAP so far (``None`` before the first evaluation).
        lr_decayed: whether the lr decay of ``lr_decay_epoch`` was applied.
        batches: the current epoch's batches (lists of indices into the training set: the global batches of
            all processes under torchrun, ``data/sampler.py``); ``None`` between epochs.
        position: how many of ``batches`` were trained (``len(batches)``: training done, evaluation
            pending).
    """

    epoch: int = 0
    iteration: int = 0
    best_map: float | None = None
    lr_decayed: bool = False
    batches: list[list[int]] | None = None
    position: int = 0

    def other_info(self) -> dict:
        """The plain values to save; ``epoch_batches``/``epoch_position`` only inside an epoch."""
        info = {"epoch": self.epoch, "iteration": self.iteration, "best_map": self.best_map,
                "lr_decayed": self.lr_decayed}
        if self.batches is not None:
            info.update(epoch_batches=[list(b) for b in self.batches], epoch_position=self.position)
        return info

    @classmethod
    def from_other_info(cls, info: dict, n_samples: int, lr_decay_epoch: int) -> RunState:
        """The state saved by :meth:`other_info` (or by an older version of this code, or the original).

        An older checkpoint's ``epoch_order`` (one image per step) continues as batches of one. Saved
        batches that do not fit a training set of ``n_samples`` (the data set changed) are dropped with a
        warning: that epoch restarts from its beginning.
        """
        epoch = int(info.get("epoch", 0))
        state = cls(epoch=epoch, iteration=int(info.get("iteration", 0)), best_map=info.get("best_map"),
                    lr_decayed=bool(info.get("lr_decayed", epoch > lr_decay_epoch)))
        batches = info.get("epoch_batches")
        if batches is None and info.get("epoch_order") is not None:
            batches = [[i] for i in info["epoch_order"]]
        if batches is not None:
            indices = {int(i) for batch in batches for i in batch}
            if indices == set(range(n_samples)):
                state.batches = [[int(i) for i in batch] for batch in batches]
                state.position = int(info.get("epoch_position", 0))
            else:
                warnings.warn(f"the training set has {n_samples} samples, the checkpoint's epoch "
                              f"{len(indices)}: epoch {epoch} restarts from its beginning", stacklevel=2)
        return state

    def where(self) -> str:
        """``'epoch E, step P of N'`` inside an epoch, ``'the start of epoch E'`` between epochs."""
        if self.batches is None:
            return f"the start of epoch {self.epoch}"
        return f"epoch {self.epoch}, step {self.position} of {len(self.batches)}"


def run_dir(save_dir: str, run_name: str, load_path: str | None, backbone: str, data: str) -> str:
    """The run folder: ``save_dir/run_name`` when a name is given; when resuming from a checkpoint inside
    ``save_dir``, that checkpoint's folder; otherwise a new ``save_dir/<backbone>_<data>_<date-time>``, or
    ``<backbone>_<data>_<run id>`` under torchrun with a rendezvous id (``--rdzv-id``, or ``--standalone``'s),
    which a restarted job (``--max-restarts``) finds again. Under torchrun rank 0 decides and the others take
    its folder (``utils.distributed.broadcast_object``)."""
    if run_name:
        return os.path.join(save_dir, run_name)
    if load_path:
        folder = os.path.dirname(os.path.abspath(load_path))
        if os.path.dirname(folder) == os.path.abspath(save_dir):
            return folder
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    suffix = run_id if run_id != "none" else time.strftime("%Y%m%d-%H%M%S")
    return os.path.join(save_dir, f"{backbone}_{data}_{suffix}")


def restart_checkpoint(folder: str) -> str | None:
    """The checkpoint a job restarted by torchrun (``--max-restarts``) continues from: the run folder's
    ``last.pth`` when this is a restart (``TORCHELASTIC_RESTART_COUNT > 0``) and the file exists."""
    path = os.path.join(folder, "last.pth")
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0 and os.path.isfile(path):
        return path
    return None


def epoch_order(n_samples: int, seed: int | None, epoch: int) -> list[int]:
    """The sample order of an epoch: the one ``DataLoader(shuffle=True)`` would draw. Seeded runs draw it
    from ``seed + epoch``, so it does not depend on where the run was resumed (nor on the process under
    torchrun: every process draws the same order); unseeded runs from torch's global generator."""
    generator = None if seed is None else torch.Generator().manual_seed(seed + epoch)
    return list(RandomSampler(range(n_samples), generator=generator))


def epoch_batches(order: list[int], groups, batch_size: int, world_size: int = 1) -> list[list[int]]:
    """The global batches of an epoch: ``order`` cut into batches of ``batch_size x world_size`` images of
    similar aspect ratio (``groups``: ``data.sampler.aspect_ratio_groups``); under torchrun the incomplete
    batches are filled up so that every process gets ``batch_size`` images (``data.sampler.pad_batches``).
    One process, one image per step: ``[[i] for i in order]``."""
    batches = group_batches(order, groups, batch_size * world_size)
    return pad_batches(batches, batch_size * world_size, order) if world_size > 1 else batches


def rng_state(trainer, dataset) -> dict:
    """The random generators this process must continue when resumed: the target creators' (the
    trainer's), the flips' (the training set's, in the main process) and torch's; plain values and a
    tensor."""
    return {"creators": trainer.rng_state(), "flips": dataset.rng_state(), "torch": torch.get_rng_state()}


def set_rng_state(rng: dict | None, trainer, dataset) -> None:
    """Restore what :func:`rng_state` saved (nothing for ``None``: a checkpoint without it)."""
    if not rng:
        return
    trainer.set_rng_state(rng["creators"])
    dataset.set_rng_state(rng["flips"])
    torch.set_rng_state(rng["torch"].cpu())  # the checkpoint was read onto the model's device


class TrainingRun:
    """The checkpoints of one run and the decisions at the end of an epoch: best checkpoint, lr decay.

    Under torchrun every process holds a ``TrainingRun`` and calls the same methods at the same points; rank
    0 alone writes the files (the run folder must be on storage every machine sees, where the others read
    ``best.pth`` back at the lr decay), with every process's random generators in the checkpoint.

    Args:
        trainer: a ``trainer.FasterRCNNTrainer``.
        dataset: the training ``data.dataset.Dataset`` (its flip generator is saved).
        vis: the ``utils.vis_tool.Visualizer`` (its state is saved; it logs the decisions).
        state: the :class:`RunState`, updated in place by the training loop and here.
        folder: the run folder (:func:`run_dir`); temp files of killed writes in it are removed now.
        lr_decay_epoch, lr_decay: after epoch ``lr_decay_epoch`` (0-based) the lr is multiplied by
            ``lr_decay``, once.
    """

    def __init__(self, trainer, dataset, vis, state: RunState, folder: str, lr_decay_epoch: int,
                 lr_decay: float):
        self.trainer, self.dataset, self.vis, self.state = trainer, dataset, vis, state
        self.lr_decay_epoch, self.lr_decay = lr_decay_epoch, lr_decay
        self.paths = {"best": os.path.join(folder, "best.pth"), "last": os.path.join(folder, "last.pth")}
        self.saved = False  # whether last.pth holds the current state
        if is_main_process():
            remove_stale_temp_files(folder)

    def resume(self, path: str) -> dict:
        """Load the checkpoint at ``path`` into the trainer and this run (state, random generators); apply
        the lr decay a checkpoint written just before it still lacks. Returns the checkpoint."""
        ckpt = self.trainer.load(path)
        info = ckpt["other_info"]
        self.state = RunState.from_other_info(info, len(self.dataset), self.lr_decay_epoch)
        ranks = info.get("rng_ranks")  # every process's, under torchrun
        if ranks is not None and len(ranks) == get_world_size():
            set_rng_state(ranks[get_rank()], self.trainer, self.dataset)
        elif get_rank() == 0:
            set_rng_state(info.get("rng"), self.trainer, self.dataset)
        if ckpt.get("vis_info") is not None:
            self.vis.load_state_dict(ckpt["vis_info"])
        if self.state.epoch > self.lr_decay_epoch and not self.state.lr_decayed:
            self.decay_lr()  # resumed from a best.pth written just before the decay
        return ckpt

    def save(self, name: str) -> None:
        """Write the current state to ``best.pth`` or ``last.pth`` (rank 0, once every process arrived)."""
        states = all_gather_objects(rng_state(self.trainer, self.dataset))
        if is_main_process():
            ranks = {"rng_ranks": states} if len(states) > 1 else {}
            self.trainer.save(self.paths[name], vis_info=self.vis.state_dict(), **self.state.other_info(),
                              rng=states[0], **ranks)
        barrier()  # the file is complete before any process reads it or leaves
        self.saved = name == "last"

    def end_of_epoch(self, eval_map: float | None) -> None:
        """Best checkpoint (if improved; ``eval_map`` None: not evaluated), lr decay, then ``last.pth``; the
        epoch counts as completed.

        After epoch ``lr_decay_epoch`` the best checkpoint is reloaded, model *and* optimizer (the original
        kept the latest momentum buffers with the best weights), then the lr is scaled by ``lr_decay``.
        """
        state, vis = self.state, self.vis
        epoch = state.epoch
        state.epoch, state.batches, state.position = epoch + 1, None, 0
        if eval_map is not None and (state.best_map is None or eval_map > state.best_map):
            state.best_map = eval_map
            self.save("best")
        if epoch == self.lr_decay_epoch:
            if os.path.exists(self.paths["best"]):
                self.trainer.load(self.paths["best"])
                vis.log(f"epoch {epoch}: reloaded {self.paths['best']}")
            else:  # resumed into a new run folder, best mAP from the old run not beaten yet: keep going as is
                vis.log(f"epoch {epoch}: no {self.paths['best']} to reload; the lr decays on the current "
                        "weights")
            self.decay_lr()
        self.save("last")
        vis.save()

    def decay_lr(self) -> None:
        self.trainer.scale_lr(self.lr_decay)
        self.state.lr_decayed = True
        self.vis.log(f"lr decayed to {self.trainer.lr:.3g}")
