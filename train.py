"""Train and evaluate Faster R-CNN from the command line.

    python train.py train [--key=value ...]     # options: utils/config.py (python train.py train --help)
    python train.py train --data=toy            # embedded synthetic data set, small backbone, CPU-friendly
    python train.py eval --load-path=PATH       # per-class AP table and mAP of a checkpoint

A run writes into ``<save_dir>/<run name>/``: ``best.pth`` (best test mAP so far), ``last.pth`` (the latest
resumable state: the end of the latest epoch, or where Ctrl-C stopped the run), and the visualizer's
``history.jsonl`` and ``curves.png``. The run folder is ``--run-name`` when given; when resuming from a
checkpoint inside ``save_dir`` it is that checkpoint's folder; otherwise a new
``<backbone>_<data>_<date-time>`` folder.

Before training, every sample of the trainval and test splits is checked (``data/check.py``); bad samples stop
the run with one report listing every bad file, unless ``--skip-bad-samples`` leaves them out with a warning
each. Images without objects train as background only.

Stopping and resuming (``utils/interrupt.py``). Ctrl-C (SIGINT) or SIGTERM lets the current step finish,
writes ``last.pth`` with the position inside the epoch (the epoch's sample order and how many of its samples
were trained), prints the command that resumes, and exits with status 130 (143 for SIGTERM); a second Ctrl-C
quits at once without saving, except during a checkpoint write, which always completes. ``--load-path``
resumes any checkpoint of a run where it was written: epoch, position in the epoch, weights, optimizer
(momentum, lr), best mAP, whether the lr has decayed, and the random generators (the target creators', the
flips' when ``num_workers=0``, torch's), so that a resumed run with ``num_workers=0`` trains exactly as an
uninterrupted one. A SIGKILL loses the steps since the last checkpoint, never a checkpoint: every write is
atomic (``utils/checkpoint.py``), and the temp files of killed writes are removed when a run starts.

A NaN or infinite loss stops the run before that step changes the weights, naming the iteration, the epoch and
the image; no checkpoint is written, so ``best.pth`` and ``last.pth`` stay the last good ones.

Exit status: 0 done; 1 the run failed (bad samples, a non-finite loss); 2 a usage error (unknown command or
option, a value of the wrong type, a missing data folder or checkpoint, a checkpoint refused or for another
model); 130 / 143 stopped by SIGINT / SIGTERM after saving.
"""

import dataclasses
import itertools
import os
import random
import sys
import time
import warnings

import fire
import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler
from tqdm import tqdm

from data.check import check_splits
from data.dataset import Dataset, TestDataset, inverse_normalize, normalize_of
from data.util import DataError
from model import FasterRCNN, FasterRCNNVGG16
from model.faster_rcnn_toy import FasterRCNNToy
from model.utils.creator_tool import ProposalCreator
from trainer import FasterRCNNTrainer, NonFiniteLossError
from utils.checkpoint import (
    CheckpointError,
    checkpoint_config,
    load_checkpoint,
    model_from_checkpoint,
    remove_stale_temp_files,
)
from utils.config import Config, ConfigError
from utils.eval_tool import eval_detection_voc
from utils.interrupt import StopRequested, StopSignals, ignore_stop_signals
from utils.vis_tool import Visualizer, visdom_bbox

__all__ = ["RunState", "build_model", "evaluate", "train", "eval_checkpoint", "main"]


def build_model(cfg: Config, n_fg_class: int) -> FasterRCNN:
    """The model that ``cfg`` describes, with ``n_fg_class`` foreground classes, on the CPU.

    VGG16 starts from torchvision's ImageNet weights, or from the converted caffe weights at
    ``caffe_pretrain_path`` with ``caffe_pretrain`` (and caffe normalisation); not when ``load_path`` will
    replace every weight anyway. The toy backbone starts from scratch.
    """
    proposal_creator_params = {
        "nms_thresh": cfg.rpn_nms_thresh,
        "n_train_pre_nms": cfg.n_train_pre_nms,
        "n_train_post_nms": cfg.n_train_post_nms,
        "n_test_pre_nms": cfg.n_test_pre_nms,
        "n_test_post_nms": cfg.n_test_post_nms,
        "min_size": cfg.proposal_min_size,
    }
    common = {
        "n_fg_class": n_fg_class,
        "ratios": cfg.ratios,
        "anchor_scales": cfg.anchor_scales,
        "min_size": cfg.min_size,
        "max_size": cfg.max_size,
        "normalize": normalize_of(cfg),
    }
    if cfg.backbone == "toy":
        return FasterRCNNToy(proposal_creator_params=proposal_creator_params, **common)
    if cfg.load_path:
        pretrained = None
    else:
        pretrained = cfg.caffe_pretrain_path if cfg.caffe_pretrain else "torchvision"
    model = FasterRCNNVGG16(pretrained=pretrained, use_drop=cfg.use_drop, **common)
    # FasterRCNNVGG16 builds its RPN with the original's proposal settings; use the configured ones
    # (they are not part of its checkpoint arch: `train.py eval` uses the original's).
    model.rpn.proposal_layer = ProposalCreator(**proposal_creator_params)
    return model


@torch.no_grad()
def evaluate(dataloader, faster_rcnn: FasterRCNN, test_num: int = 10000, progress: bool = True,
             stop: StopSignals | None = None) -> dict:
    """VOC07 11-point AP of ``faster_rcnn`` on the first ``test_num`` images of ``dataloader``.

    Args:
        dataloader: batches of one :class:`data.dataset.TestDataset` item.
        faster_rcnn: the model (its current preset is used: ``'evaluate'`` unless changed).
        test_num: how many images to evaluate (the original evaluated ``test_num + 1``).
        progress: show a tqdm bar.
        stop: checked after each image (:meth:`utils.interrupt.StopSignals.check` raises ``StopRequested``).

    Returns:
        ``eval_detection_voc``'s dict: ``'ap'`` ``(n_fg_class,)`` (NaN for a class without ground truth)
        and ``'map'``.
    """
    pred_bboxes, pred_labels, pred_scores = [], [], []
    gt_bboxes, gt_labels, gt_difficults = [], [], []
    total = min(test_num, len(dataloader))
    batches = itertools.islice(dataloader, test_num)
    for imgs, sizes, gt_bbox, gt_label, gt_difficult in tqdm(
        batches, total=total, desc="eval", disable=not progress, leave=False, dynamic_ncols=True
    ):
        size = (int(sizes[0][0]), int(sizes[1][0]))
        bboxes, labels, scores = faster_rcnn.predict(imgs, [size])
        pred_bboxes += bboxes
        pred_labels += labels
        pred_scores += scores
        gt_bboxes.append(gt_bbox[0].numpy())
        gt_labels.append(gt_label[0].numpy())
        gt_difficults.append(gt_difficult[0].numpy())
        if stop is not None:
            stop.check()
    return eval_detection_voc(
        pred_bboxes, pred_labels, pred_scores, gt_bboxes, gt_labels, gt_difficults, use_07_metric=True
    )


def _seed_everything(seed: int | None) -> torch.Generator | None:
    """Seed Python, numpy and torch; return the generator that shuffles the training set (None: unseeded)."""
    if seed is None:
        return None
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _run_dir(cfg: Config) -> str:
    """The run folder (see the module docstring)."""
    if cfg.run_name:
        return os.path.join(cfg.save_dir, cfg.run_name)
    if cfg.load_path:
        folder = os.path.dirname(os.path.abspath(cfg.load_path))
        if os.path.dirname(folder) == os.path.abspath(cfg.save_dir):
            return folder
    return os.path.join(cfg.save_dir, f"{cfg.backbone}_{cfg.data}_{time.strftime('%Y%m%d-%H%M%S')}")


@dataclasses.dataclass
class RunState:
    """Where a run stands; stored in every checkpoint's ``other_info`` so that any of them resumes.

    Attributes:
        epoch: epochs completed (the epoch under way, counted from 0).
        iteration: training steps taken since the start of the run.
        best_map: best test mAP so far (``None`` before the first evaluation).
        lr_decayed: whether the lr decay of ``lr_decay_epoch`` was applied.
        order: the current epoch's sample order (indices into the training set); ``None`` between epochs.
        position: how many samples of ``order`` were trained (``len(order)``: training done, evaluation
            pending).
    """

    epoch: int = 0
    iteration: int = 0
    best_map: float | None = None
    lr_decayed: bool = False
    order: list[int] | None = None
    position: int = 0

    def other_info(self) -> dict:
        """The plain values to save; ``epoch_order``/``epoch_position`` only inside an epoch."""
        info = {"epoch": self.epoch, "iteration": self.iteration, "best_map": self.best_map,
                "lr_decayed": self.lr_decayed}
        if self.order is not None:
            info.update(epoch_order=list(self.order), epoch_position=self.position)
        return info

    @classmethod
    def from_other_info(cls, info: dict, n_samples: int, lr_decay_epoch: int) -> "RunState":
        """The state saved by :meth:`other_info` (or by an older version of this script, or the original).

        A saved epoch order that does not fit a training set of ``n_samples`` (the data set changed) is
        dropped with a warning: that epoch restarts from its beginning.
        """
        epoch = int(info.get("epoch", 0))
        state = cls(epoch=epoch, iteration=int(info.get("iteration", 0)), best_map=info.get("best_map"),
                    lr_decayed=bool(info.get("lr_decayed", epoch > lr_decay_epoch)))
        order = info.get("epoch_order")
        if order is not None:
            if sorted(order) == list(range(n_samples)):
                state.order, state.position = [int(i) for i in order], int(info.get("epoch_position", 0))
            else:
                warnings.warn(f"the training set has {n_samples} samples, the checkpoint's epoch order "
                              f"{len(order)}: epoch {epoch} restarts from its beginning", stacklevel=2)
        return state


def _epoch_order(n_samples: int, generator: torch.Generator | None, seed: int | None,
                 epoch: int) -> list[int]:
    """The sample order of an epoch: the one ``DataLoader(shuffle=True)`` would draw; seeded runs draw it from
    ``seed + epoch``, so it does not depend on where the run was resumed."""
    if generator is not None:
        generator.manual_seed(seed + epoch)
    return list(RandomSampler(range(n_samples), generator=generator))


def _rng_state(trainer: FasterRCNNTrainer, dataset: Dataset) -> dict:
    """The random generators a resumed run must continue (plain values and a tensor)."""
    return {"creators": trainer.rng.bit_generator.state, "flips": dataset.tsf.rng.bit_generator.state,
            "torch": torch.get_rng_state()}


def _set_rng_state(rng: dict | None, trainer: FasterRCNNTrainer, dataset: Dataset) -> None:
    if not rng:
        return
    trainer.rng.bit_generator.state = rng["creators"]
    dataset.tsf.rng.bit_generator.state = rng["flips"]
    torch.set_rng_state(rng["torch"].cpu())  # the checkpoint was read onto the model's device


def _plot_step(vis: Visualizer, trainer: FasterRCNNTrainer, img, bbox, label) -> None:
    """The original's pictures of a plot step: ground truth, prediction, both confusion matrices."""
    names = trainer.class_names
    ori_img = inverse_normalize(img[0].numpy(), trainer.faster_rcnn.normalize)
    vis.img("gt_img", visdom_bbox(ori_img, bbox[0].numpy(), label[0].numpy(), label_names=names))
    bboxes, labels, scores = trainer.faster_rcnn.predict([ori_img], visualize=True)
    vis.img("pred_img", visdom_bbox(ori_img, bboxes[0], labels[0], scores[0], label_names=names))
    vis.text(str(trainer.rpn_cm.value().tolist()), win="rpn_cm")
    vis.img("roi_cm", torch.from_numpy(trainer.roi_cm.value()).float()[None])


class _Run:
    """One training run: the pieces :func:`train` composes, and the saving of its state."""

    def __init__(self, cfg: Config, trainer: FasterRCNNTrainer, dataset: Dataset, vis: Visualizer,
                 state: RunState, run_dir: str):
        self.cfg, self.trainer, self.dataset, self.vis, self.state = cfg, trainer, dataset, vis, state
        self.paths = {"best": os.path.join(run_dir, "best.pth"), "last": os.path.join(run_dir, "last.pth")}
        self.saved = False  # whether last.pth holds the current state

    def save(self, name: str) -> None:
        """Write the current state to ``best.pth`` or ``last.pth``."""
        self.trainer.save(self.paths[name], vis_info=self.vis.state_dict(), **self.state.other_info(),
                          rng=_rng_state(self.trainer, self.dataset))
        self.saved = name == "last"

    def train_one_epoch(self, stop: StopSignals) -> None:
        """Train the rest of the current epoch (``state.order`` from ``state.position``)."""
        cfg, trainer, state = self.cfg, self.trainer, self.state
        trainer.reset_meters()
        remaining = state.order[state.position:]
        loader = DataLoader(self.dataset, batch_size=1, sampler=remaining, num_workers=cfg.num_workers,
                            worker_init_fn=ignore_stop_signals)
        bar = tqdm(loader, desc=f"epoch {state.epoch}/{cfg.epoch}", initial=state.position,
                   total=len(state.order), dynamic_ncols=True)
        for index, (img, bbox, label, scale) in zip(remaining, bar, strict=True):
            try:
                trainer.train_step(img, bbox, label, scale)
            except NonFiniteLossError as e:
                raise NonFiniteLossError(self._non_finite_message(e, index)) from None
            self.saved = False
            state.position += 1
            state.iteration += 1
            if state.iteration % cfg.plot_every == 0:
                self.vis.plot_many(trainer.get_meter_data(), step=state.iteration)
                if self.vis.connected:
                    _plot_step(self.vis, trainer, img, bbox, label)
            if state.iteration % 10 == 0:
                bar.set_postfix(loss=f"{trainer.meters['total_loss'].value():.3f}")
            stop.check()

    def _non_finite_message(self, error: NonFiniteLossError, index: int) -> str:
        last = self.paths["last"]
        kept = (f"the last good checkpoint is {last} (resume with --load-path={last})" if os.path.exists(last)
                else "no checkpoint was written yet")
        state = self.state
        return (f"{error} at iteration {state.iteration + 1} (epoch {state.epoch}, sample "
                f"{state.position + 1} of {len(state.order)}), image id {self.dataset.ids[index]!r} "
                f"({self.dataset.db.image_path(index)}). Training stopped before this step changed the "
                f"weights; {kept}.")

    def end_of_epoch(self, eval_map: float | None) -> None:
        """Best checkpoint (if improved; ``eval_map`` None: not evaluated), lr decay, then ``last.pth``; the
        epoch counts as completed.

        After epoch ``lr_decay_epoch`` the best checkpoint is reloaded, model *and* optimizer (the original
        kept the latest momentum buffers with the best weights), then the lr is scaled by ``lr_decay``.
        """
        cfg, trainer, state, vis = self.cfg, self.trainer, self.state, self.vis
        epoch = state.epoch
        state.epoch, state.order, state.position = epoch + 1, None, 0
        if eval_map is not None and (state.best_map is None or eval_map > state.best_map):
            state.best_map = eval_map
            self.save("best")
        if epoch == cfg.lr_decay_epoch:
            if os.path.exists(self.paths["best"]):
                trainer.load(self.paths["best"])
                vis.log(f"epoch {epoch}: reloaded {self.paths['best']}")
            else:  # resumed into a new run folder, best mAP from the old run not beaten yet: keep going as is
                vis.log(f"epoch {epoch}: no {self.paths['best']} to reload; the lr decays on the current "
                        "weights")
            self.decay_lr()
        self.save("last")
        vis.save()

    def decay_lr(self) -> None:
        self.trainer.scale_lr(self.cfg.lr_decay)
        self.state.lr_decayed = True
        self.vis.log(f"lr decayed to {self.trainer.lr:.3g}")


def evaluates_after(epoch: int, cfg: Config) -> bool:
    """Whether epoch ``epoch`` (0-based) ends with an evaluation: every ``eval_every`` epochs, and always the
    lr-decay epoch (its best checkpoint is reloaded) and the last epoch."""
    return (epoch + 1) % cfg.eval_every == 0 or epoch in (cfg.lr_decay_epoch, cfg.epoch - 1)


def train(**kwargs) -> float | None:
    """Train as configured by ``kwargs`` (options of ``utils/config.py``); returns the best test mAP.

    Raises:
        utils.config.ConfigError, FileNotFoundError, utils.checkpoint.CheckpointError: bad options, a
            missing data folder or checkpoint, a checkpoint refused or for another model.
        data.check.DataCheckError: bad samples (without ``skip_bad_samples``).
        trainer.NonFiniteLossError: a NaN or infinite loss (see the module docstring).
        utils.interrupt.StopRequested: SIGINT or SIGTERM; ``last.pth`` was written first.
    """
    cfg = Config.parse(kwargs)
    print(cfg)
    device = cfg.torch_device()
    shuffle_generator = _seed_everything(cfg.seed)

    dataset = Dataset(cfg)
    testset = TestDataset(cfg)
    for report in check_splits([dataset, testset], skip_bad_samples=cfg.skip_bad_samples):
        print(report.summary())
    test_loader = DataLoader(testset, batch_size=1, shuffle=False, num_workers=cfg.test_num_workers,
                             pin_memory=device.type == "cuda", worker_init_fn=ignore_stop_signals)

    model = build_model(cfg, len(dataset.label_names)).to(device)
    if device.type == "cpu":
        # oneDNN's convolutions run faster on channels-last maps (bench/train.py, bench/inference.py)
        model.to(memory_format=torch.channels_last)
    trainer = FasterRCNNTrainer.from_config(model, cfg, class_names=dataset.label_names)
    state, vis_info = RunState(), None
    if cfg.load_path:
        ckpt = trainer.load(cfg.load_path)
        info, vis_info = ckpt["other_info"], ckpt.get("vis_info")
        state = RunState.from_other_info(info, len(dataset), cfg.lr_decay_epoch)
        _set_rng_state(info.get("rng"), trainer, dataset)
        where = f", sample {state.position} of {len(state.order)}" if state.order is not None else ""
        print(f"resumed from {cfg.load_path}: epoch {state.epoch}{where}, lr {trainer.lr:.3g}, "
              f"best mAP {state.best_map}")

    run_dir = _run_dir(cfg)
    remove_stale_temp_files(run_dir)
    # history.jsonl/curves.png are rewritten at most every 30 s and at the end of each epoch (vis.save):
    # drawing curves.png takes about half a second, 10% of the time at the Visualizer's default of 5 s.
    vis = Visualizer(env=cfg.env, server=cfg.visdom_server, port=cfg.port, log_dir=run_dir,
                     use_visdom=cfg.use_visdom, flush_every=30.0)
    if vis_info is not None:
        vis.load_state_dict(vis_info)
    vis.text(str(list(dataset.label_names)), win="labels")
    run = _Run(cfg, trainer, dataset, vis, state, run_dir)
    if state.epoch > cfg.lr_decay_epoch and not state.lr_decayed:
        run.decay_lr()  # resumed from a best.pth written just before the decay

    eval_map = None
    with StopSignals() as stop:
        try:
            while state.epoch < cfg.epoch:
                if state.order is None:
                    state.order = _epoch_order(len(dataset), shuffle_generator, cfg.seed, state.epoch)
                run.train_one_epoch(stop)
                losses = trainer.get_meter_data()
                evaluated = evaluates_after(state.epoch, cfg)
                if evaluated:
                    eval_map = float(evaluate(test_loader, model, cfg.test_num, stop=stop)["map"])
                    vis.plot("test_map", eval_map, step=state.iteration)
                    vis.log(f"epoch {state.epoch}: lr {trainer.lr:.3g}, map {eval_map:.4f}, loss {losses}")
                    print(f"epoch {state.epoch}: test mAP {eval_map:.4f}, train loss "
                          f"{losses['total_loss']:.4f}, lr {trainer.lr:.3g}")
                else:
                    vis.log(f"epoch {state.epoch}: lr {trainer.lr:.3g}, not evaluated, loss {losses}")
                    print(f"epoch {state.epoch}: train loss {losses['total_loss']:.4f}, lr {trainer.lr:.3g} "
                          f"(evaluated every {cfg.eval_every} epochs)")
                with stop.critical():
                    run.end_of_epoch(eval_map if evaluated else None)
                stop.check()
        except StopRequested:
            with stop.critical():
                if not run.saved:
                    run.save("last")
                vis.save()
            where = (f"epoch {state.epoch}, sample {state.position} of {len(state.order)}"
                     if state.order is not None else f"the start of epoch {state.epoch}")
            print(f"stopped at {where}; saved {run.paths['last']}. Resume with the same options and "
                  f"--load-path={run.paths['last']}")
            raise

    if eval_map is not None:
        print(f"final test mAP: {eval_map:.4f}")
    print(f"best test mAP: {state.best_map}, checkpoint: {run.paths['best']} "
          f"(resume from {run.paths['last']})")
    return state.best_map


def _ap_table(ap: np.ndarray, class_names, eval_map: float) -> str:
    width = max(len("mAP"), *(len(n) for n in class_names))
    lines = [f"{'class':<{width}}  AP", "-" * (width + 8)]
    lines += [f"{name:<{width}}  {value:.4f}" for name, value in zip(class_names, ap, strict=True)]
    lines += ["-" * (width + 8), f"{'mAP':<{width}}  {eval_map:.4f}"]
    return "\n".join(lines)


def eval_checkpoint(**kwargs) -> float:
    """Evaluate ``--load-path`` on its test split; prints the per-class AP table and the mAP.

    The model, its class names, sizes and normalisation come from the checkpoint; other options
    (``--voc-data-dir``, ``--test-num``, ``--device``...) may be given.
    """
    load_path = Config.parse(kwargs).load_path
    if not load_path:
        raise ConfigError("eval needs --load-path=CHECKPOINT")
    ckpt = load_checkpoint(load_path)
    arch = ckpt["arch"]
    from_checkpoint = {"label_names": ckpt["class_names"] or ()}
    for key in ("min_size", "max_size"):  # preprocess test images as the model was trained
        if key in arch:
            from_checkpoint[key] = arch[key]
    if "normalize" in arch:
        from_checkpoint["caffe_pretrain"] = arch["normalize"] == "caffe"
    cfg = Config.parse({**from_checkpoint, **kwargs}, base=checkpoint_config(ckpt))
    model = model_from_checkpoint(ckpt, load_path).to(cfg.torch_device())
    testset = TestDataset(cfg)
    (report,) = check_splits([testset], skip_bad_samples=cfg.skip_bad_samples)
    print(report.summary())
    loader = DataLoader(testset, batch_size=1, shuffle=False, num_workers=cfg.test_num_workers,
                        worker_init_fn=ignore_stop_signals)
    result = evaluate(loader, model, cfg.test_num)
    eval_map = float(result["map"])
    print(_ap_table(result["ap"], testset.label_names, eval_map))
    print(f"mAP: {eval_map:.4f} ({min(cfg.test_num, len(testset))} test images, checkpoint {load_path})")
    return eval_map


COMMANDS = {"train": train, "eval": eval_checkpoint}
USAGE = """usage: python train.py COMMAND [--key=value ...]

commands:
  train   train a detector; python train.py train --help lists the options and their defaults
  eval    evaluate a checkpoint: python train.py eval --load-path=CHECKPOINT [--key=value ...]"""
# Errors about what the command line names (exit status 2), and failures of a run (exit status 1).
USAGE_ERRORS = (ConfigError, CheckpointError, FileNotFoundError)
RUN_ERRORS = (DataError, NonFiniteLossError)


def _command_help(command: str) -> str:
    doc = COMMANDS[command].__doc__.split("\n\n")[0]
    return f"usage: python train.py {command} [--key=value ...]\n\n{doc}\n\n{Config.help_text()}"


def _short_warning(message, category, filename, lineno, line=None) -> str:
    return f"train.py: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    """The command line: ``train.py COMMAND [--key=value ...]``; returns the exit status.

    Options are parsed by fire (``--ratios=0.5,1,2``, ``--use-adam``...), then checked by ``Config``. Errors
    the user can fix are one ``train.py: error: ...`` paragraph on stderr, without a traceback (the exit
    status says which kind: see the module docstring).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command, args = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"train.py: error: unknown command {command!r} (commands: {', '.join(COMMANDS)}; "
              "python train.py --help)", file=sys.stderr)
        return 2
    if any(arg in ("-h", "--help") for arg in args):
        print(_command_help(command))
        return 0
    warnings.formatwarning = _short_warning
    try:
        # train/eval print their own report; fire must not print their return value (a float) after it
        fire.Fire(COMMANDS[command], command=args, name=f"train.py {command}", serialize=lambda result: None)
    except StopRequested as e:
        return e.exit_code
    except KeyboardInterrupt:
        print("\ntrain.py: interrupted", file=sys.stderr)
        return 130
    except USAGE_ERRORS + RUN_ERRORS as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, USAGE_ERRORS) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
