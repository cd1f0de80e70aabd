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

import functools
import os
import random
import sys
import warnings

import fire
import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from data.check import check_splits
from data.dataset import Dataset, TestDataset, collate_train, image_rng, normalize_of, resized_size
from data.sampler import aspect_ratio_groups, shard
from data.util import DataError
from model import FasterRCNN, FasterRCNNResNet, FasterRCNNVGG16
from model.faster_rcnn_toy import FasterRCNNToy
from model.utils import cpu_conv
from model.utils.pretrained import PretrainedWeightsError
from trainer import FasterRCNNTrainer, NonFiniteLossError
from utils.checkpoint import CheckpointError
from utils.config import Config, ConfigError
from utils.distributed import (
    barrier,
    broadcast_object,
    cleanup,
    describe_failure,
    get_rank,
    get_world_size,
    init_distributed,
    is_main_process,
)
from utils.evaluation import ap_table, eval_loader, evaluate, evaluate_checkpoint
from utils.interrupt import StopRequested, StopSignals, ignore_stop_signals
from utils.memory_format import choose_memory_format, keep_onednn_primitives, release_mkl_buffers
from utils.run_state import RunState, TrainingRun, epoch_batches, epoch_order, restart_checkpoint, run_dir
from utils.vis_tool import Visualizer, plot_evaluation, plot_training_pictures

__all__ = ["build_model", "evaluates_after", "train", "eval_checkpoint", "main"]


def build_model(cfg: Config, n_fg_class: int) -> FasterRCNN:
    """The model that ``cfg`` describes, with ``n_fg_class`` foreground classes, on the CPU.

    VGG16 and the ResNets start from torchvision's ImageNet weights (or the file ``backbone_weights``), VGG16
    from the converted caffe weights at ``caffe_pretrain_path`` with ``caffe_pretrain`` (and caffe
    normalisation); none when ``load_path`` will replace every weight anyway. The toy backbone starts from
    scratch.
    """
    common = {
        "n_fg_class": n_fg_class,
        "ratios": cfg.ratios,
        "anchor_scales": cfg.anchor_scales,
        "min_size": cfg.min_size,
        "max_size": cfg.max_size,
        "normalize": normalize_of(cfg),
        "proposal_creator_params": {
            "nms_thresh": cfg.rpn_nms_thresh,
            "n_train_pre_nms": cfg.n_train_pre_nms,
            "n_train_post_nms": cfg.n_train_post_nms,
            "n_test_pre_nms": cfg.n_test_pre_nms,
            "n_test_post_nms": cfg.n_test_post_nms,
            "min_size": cfg.proposal_min_size,
        },
    }
    if cfg.backbone == "toy":
        return FasterRCNNToy(**common)
    if cfg.load_path:
        pretrained = None
    elif cfg.caffe_pretrain:
        pretrained = cfg.caffe_pretrain_path
    else:
        pretrained = cfg.backbone_weights or "torchvision"
    if cfg.backbone in ("resnet50", "resnet101"):
        return FasterRCNNResNet(depth=int(cfg.backbone[len("resnet"):]), pretrained=pretrained, **common)
    return FasterRCNNVGG16(pretrained=pretrained, use_drop=cfg.use_drop, **common)


def seed_everything(seed: int | None) -> None:
    """Seed Python, numpy and torch (nothing for ``None``: a different run each time)."""
    if seed is not None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)


def train_one_epoch(run: TrainingRun, cfg: Config, stop: StopSignals, per_image_draws: bool = False) -> None:
    """Train the rest of the current epoch (``run.state.batches`` from ``run.state.position``; under
    torchrun this process's share of each); plot every ``plot_every`` steps; stop safely between steps on a
    signal (every process at the same step).

    ``per_image_draws``: each image's target creators draw from ``data.dataset.image_rng`` (seeded runs of
    several images per step), not from the trainer's one stream.
    """
    trainer, state, vis = run.trainer, run.state, run.vis
    trainer.reset_meters()
    remaining = shard(state.batches[state.position:], get_rank(), get_world_size())
    loader = DataLoader(run.dataset, batch_sampler=remaining, num_workers=cfg.num_workers,
                        collate_fn=functools.partial(collate_train, multiple=trainer.faster_rcnn.feat_stride),
                        worker_init_fn=ignore_stop_signals)
    bar = tqdm(loader, desc=f"epoch {state.epoch}/{cfg.epoch}", initial=state.position,
               total=len(state.batches), dynamic_ncols=True, disable=not is_main_process())
    for batch, (imgs, bboxes, labels, scales, sizes) in zip(remaining, bar, strict=True):
        rngs = [image_rng(cfg.seed, state.epoch, i, "creators") for i in batch] if per_image_draws else None
        try:
            trainer.train_step(imgs, bboxes, labels, scales, sizes, rngs)
        except NonFiniteLossError as e:
            raise NonFiniteLossError(_non_finite_message(e, run, batch)) from None
        run.saved = False
        state.position += 1
        state.iteration += 1
        _test_crash(state.iteration)
        if state.iteration % cfg.plot_every == 0:
            vis.plot_many({**trainer.get_meter_data(), "lr": trainer.lr}, step=state.iteration)
            height, width = sizes[0]
            plot_training_pictures(vis, trainer, imgs[0, :, :height, :width], bboxes[0], labels[0])
        if state.iteration % 10 == 0:
            bar.set_postfix(loss=f"{trainer.meters['total_loss'].value():.3f}")
        stop.check(every_process=True)


# Test-only: "RANK:ITERATION" makes that process die (exit status 3) after that iteration, in the first
# attempt of a torchrun job (tests/test_distributed.py: --max-restarts resumes from last.pth). Unset in use.
CRASH_ENV = "SIMPLE_FASTER_RCNN_TEST_CRASH"


def _test_crash(iteration: int) -> None:
    crash = os.environ.get(CRASH_ENV)
    if crash and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        rank, at = (int(v) for v in crash.split(":"))
        if rank == get_rank() and at == iteration:
            os._exit(3)


def _non_finite_message(error: NonFiniteLossError, run: TrainingRun, batch: list[int]) -> str:
    last = run.paths["last"]
    kept = (f"the last good checkpoint is {last} (resume with --load-path={last})" if os.path.exists(last)
            else "no checkpoint was written yet")
    state = run.state
    images = ", ".join(f"{run.dataset.ids[i]!r} ({run.dataset.db.image_path(i)})" for i in batch)
    return (f"{error} at iteration {state.iteration + 1} (epoch {state.epoch}, step {state.position + 1} "
            f"of {len(state.batches)}), image id {images}. Training stopped before this step changed the "
            f"weights; {kept}.")


def evaluates_after(epoch: int, cfg: Config) -> bool:
    """Whether epoch ``epoch`` (0-based) ends with an evaluation: every ``eval_every`` epochs, and always the
    lr-decay epoch (its best checkpoint is reloaded) and the last epoch."""
    return (epoch + 1) % cfg.eval_every == 0 or epoch in (cfg.lr_decay_epoch, cfg.epoch - 1)


def train(**kwargs) -> float | None:
    """Train as configured by ``kwargs`` (options of ``utils/config.py``); returns the best test mAP (COCO AP
    for COCO data). Under torchrun, every process runs this with the same options (see the module
    docstring).

    Raises:
        utils.config.ConfigError, FileNotFoundError, utils.checkpoint.CheckpointError: bad options, a
            missing data folder or checkpoint, a checkpoint refused or for another model.
        model.utils.pretrained.PretrainedWeightsError: ImageNet weights that cannot be had.
        data.check.DataCheckError: bad samples (without ``skip_bad_samples``).
        trainer.NonFiniteLossError: a NaN or infinite loss (see the module docstring).
        utils.interrupt.StopRequested: SIGINT or SIGTERM; ``last.pth`` was written first.
        DistributedError: under torchrun, another process stopped answering.
    """
    keep_onednn_primitives()  # before the first convolution: images of many sizes reuse their kernels
    release_mkl_buffers()
    cfg = Config.parse(kwargs)
    cpu_conv.set_backend(cfg.cpu_conv)
    device = init_distributed(cfg.torch_device(), cfg.dist_timeout)
    try:
        return _train(cfg, device)
    except RuntimeError as e:
        if get_world_size() > 1 and _is_collective_failure(e):
            raise DistributedError(describe_failure(e, cfg.dist_timeout)) from None
        raise
    finally:
        cleanup()


def _train(cfg: Config, device: torch.device) -> float | None:
    rank, world_size, main = get_rank(), get_world_size(), is_main_process()
    say = print if main else _silent
    say(cfg)
    seed_everything(process_seed(cfg.seed, rank))

    # data: both splits checked before anything is trained; images of similar aspect ratio batched together
    dataset = Dataset(cfg, rank=rank)
    testset = TestDataset(cfg)
    for report in check_splits([dataset, testset], skip_bad_samples=cfg.skip_bad_samples, progress=main):
        say(report.summary())
    images_per_step = cfg.batch_size * world_size  # in every step, over every process
    groups = aspect_ratio_groups(dataset.image_sizes() if images_per_step > 1 else [(1, 1)] * len(dataset))
    # seeded runs of several images per step draw each image's flip and samples from its own generator
    per_image_draws = cfg.seed is not None and images_per_step > 1
    loader = eval_loader(testset, cfg.test_num, cfg.test_batch_size, cfg.test_num_workers,
                         pin_memory=device.type == "cuda", worker_init_fn=ignore_stop_signals)

    # model and trainer (rank 0 fetches the ImageNet weights first); the lr of one image per step times the
    # images per step with --scale-lr
    if not main:
        barrier()
    model = build_model(cfg, len(dataset.label_names)).to(device)
    if main:
        barrier()
    # the extractor's memory format that trains fastest on this CPU (rank 0 measures, once per machine)
    size = resized_size(dataset.image_size(0), cfg.min_size, cfg.max_size)
    memory_format = broadcast_object(
        choose_memory_format(model, "training", size, cfg.memory_format, amp=cfg.amp) if main else None)
    model.to(memory_format=memory_format)
    lr = cfg.lr * images_per_step if cfg.scale_lr else cfg.lr
    trainer = FasterRCNNTrainer.from_config(model, cfg, class_names=dataset.label_names, lr=lr)

    # the run: its folder, dashboard, checkpoints; resumed from --load-path (or last.pth after a restart)
    folder = broadcast_object(run_dir(cfg.save_dir, cfg.run_name, cfg.load_path, cfg.backbone, cfg.data))
    load_path = cfg.load_path or restart_checkpoint(folder)
    # history.jsonl/curves.png are rewritten at most every 30 s and at the end of each epoch (vis.save):
    # drawing curves.png takes about half a second, 10% of the time at the Visualizer's default of 5 s.
    vis = Visualizer(env=cfg.env, server=cfg.visdom_server, port=cfg.port, log_dir=folder if main else None,
                     use_visdom=cfg.use_visdom and main, flush_every=30.0,
                     tensorboard=cfg.tensorboard if main else False)
    run = TrainingRun(trainer, dataset, vis, RunState(), folder, cfg.lr_decay_epoch, cfg.lr_decay)
    if load_path:
        run.resume(load_path)
        say(f"resumed from {load_path}: {run.state.where()}, lr {trainer.lr:.3g}, best {run.state.best_map}")
    trainer.distribute()  # under torchrun: gradients averaged over the processes
    vis.text(str(list(dataset.label_names)), win="labels")

    state, eval_map, metric = run.state, None, "COCO AP" if testset.metric == "coco" else "mAP"
    with StopSignals() as stop, vis:
        try:
            while state.epoch < cfg.epoch:
                if state.batches is None:  # rank 0's, for unseeded runs
                    order = epoch_order(len(dataset), cfg.seed, state.epoch)
                    state.batches = broadcast_object(epoch_batches(order, groups, cfg.batch_size, world_size))
                dataset.set_epoch(state.epoch if per_image_draws else None)
                train_one_epoch(run, cfg, stop, per_image_draws)
                losses = trainer.get_meter_data()
                evaluated = evaluates_after(state.epoch, cfg)
                if evaluated:
                    # one process checks for a stop between test images; several decide together afterwards
                    local_stop = None if world_size > 1 else stop
                    result = evaluate(loader, model, testset, amp=cfg.amp, stop=local_stop)
                    eval_map = float(result["map"])
                    plot_evaluation(vis, result, state.iteration)
                    vis.log(f"epoch {state.epoch}: lr {trainer.lr:.3g}, {metric} {eval_map:.4f}, "
                            f"loss {losses}")
                    say(f"epoch {state.epoch}: test {metric} {eval_map:.4f}, train loss "
                        f"{losses['total_loss']:.4f}, lr {trainer.lr:.3g}")
                else:
                    vis.log(f"epoch {state.epoch}: lr {trainer.lr:.3g}, not evaluated, loss {losses}")
                    say(f"epoch {state.epoch}: train loss {losses['total_loss']:.4f}, lr {trainer.lr:.3g} "
                        f"(evaluated every {cfg.eval_every} epochs)")
                with stop.critical():
                    run.end_of_epoch(eval_map if evaluated else None)
                stop.check(every_process=True)
        except StopRequested:
            with stop.critical():
                if not run.saved:
                    run.save("last")
                vis.save()
            say(f"stopped at {state.where()}; saved {run.paths['last']}. Resume with the same options and "
                f"--load-path={run.paths['last']}")
            raise

    if eval_map is not None:
        say(f"final test {metric}: {eval_map:.4f}")
    say(f"best test {metric}: {state.best_map}, checkpoint: {run.paths['best']} "
        f"(resume from {run.paths['last']})")
    return state.best_map


class DistributedError(RuntimeError):
    """Under torchrun, a collective operation failed: another process died or hangs (the message names the
    ranks that fell behind)."""


def _is_collective_failure(error: RuntimeError) -> bool:
    words = ("gloo", "NCCL", "Timed out", "timed out", "Connection closed", "Connection reset")
    return isinstance(error, torch.distributed.DistError) or any(word in str(error) for word in words)


def process_seed(seed: int | None, rank: int) -> int | None:
    """The seed of this process's global generators (Python, numpy, torch): ``seed`` on rank 0, one derived
    from ``(seed, rank)`` on the others (``None`` stays unseeded)."""
    if seed is None or rank == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def _silent(*args, **kwargs) -> None:
    """What ``print`` is on the processes other than rank 0."""


def eval_checkpoint(**kwargs) -> float:
    """Evaluate ``--load-path`` on its test split; prints the per-class AP table and the mAP.

    The model, its class names, sizes, normalisation and proposal settings come from the checkpoint; other
    options (``--voc-data-dir``, ``--test-num``, ``--device``...) may be given.
    """
    keep_onednn_primitives()
    release_mkl_buffers()
    cfg = Config.parse(kwargs)
    cpu_conv.set_backend(cfg.cpu_conv)
    load_path = cfg.load_path
    if not load_path:
        raise ConfigError("eval needs --load-path=CHECKPOINT")
    result, class_names, n_images = evaluate_checkpoint(load_path, kwargs)
    eval_map = float(result["map"])
    if is_main_process():  # after evaluate_checkpoint, torchrun's ranks are told apart by the environment
        print(ap_table(result, class_names))
        name = "COCO AP" if result["metric"] == "coco" else "mAP"
        print(f"{name}: {eval_map:.4f} ({n_images} test images, checkpoint {load_path})")
    if result.get("results_path"):
        print(f"detections in COCO's results format: {result['results_path']}")
    return eval_map


COMMANDS = {"train": train, "eval": eval_checkpoint}
USAGE = """usage: python train.py COMMAND [--key=value ...]

commands:
  train   train a detector; python train.py train --help lists the options and their defaults
  eval    evaluate a checkpoint: python train.py eval --load-path=CHECKPOINT [--key=value ...]"""
# Errors about what the command line names or the machine lacks (exit status 2), and failures of a run
# (exit status 1).
USAGE_ERRORS = (ConfigError, CheckpointError, FileNotFoundError, PretrainedWeightsError)
RUN_ERRORS = (DataError, NonFiniteLossError, DistributedError)


def _command_help(command: str) -> str:
    doc = COMMANDS[command].__doc__.split("\n\n")[0]
    return f"usage: python train.py {command} [--key=value ...]\n\n{doc}\n\n{Config.help_text()}"


def _short_warning(message, category, filename, lineno, line=None) -> str:
    return f"train.py: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    """The command line: ``train.py COMMAND [--key=value ...]``; returns the exit status.

    Options are parsed by fire (``--ratios=0.5,1,2``, ``--use-adam``...), then checked by ``Config``. Errors
    the user can fix, and what the machine lacks (data, ImageNet weights offline), are one
    ``train.py: error: ...`` paragraph on stderr, without a traceback (the exit status says which kind: see
    the module docstring).
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
