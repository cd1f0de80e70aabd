"""Train and evaluate Faster R-CNN from the command line (fire).

    python train.py train [--key=value ...]     # options: utils/config.py (python train.py train --help)
    python train.py train --data=toy            # embedded synthetic data set, small backbone, CPU-friendly
    python train.py eval --load-path=PATH       # per-class AP table and mAP of a checkpoint

A run writes into ``<save_dir>/<run name>/``: ``best.pth`` (best test mAP so far), ``last.pth`` (the end of
the latest epoch: resume from it with ``--load-path``), and the visualizer's ``history.jsonl`` and
``curves.png``. The run folder is ``--run-name`` when given; when resuming from a checkpoint inside
``save_dir`` it is that checkpoint's folder; otherwise a new ``<backbone>_<data>_<date-time>`` folder.
"""

import itertools
import os
import random
import time

import fire
import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from data.dataset import Dataset, TestDataset, inverse_normalize
from model import FasterRCNN, FasterRCNNVGG16
from model.faster_rcnn_toy import FasterRCNNToy
from model.utils.creator_tool import ProposalCreator
from trainer import FasterRCNNTrainer
from utils.checkpoint import checkpoint_config, load_checkpoint, model_from_checkpoint
from utils.config import Config
from utils.eval_tool import eval_detection_voc
from utils.vis_tool import Visualizer, visdom_bbox

__all__ = ["build_model", "evaluate", "train", "eval_checkpoint"]


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
        "normalize": "caffe" if cfg.caffe_pretrain else "torchvision",
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
def evaluate(dataloader, faster_rcnn: FasterRCNN, test_num: int = 10000, progress: bool = True) -> dict:
    """VOC07 11-point AP of ``faster_rcnn`` on the first ``test_num`` images of ``dataloader``.

    Args:
        dataloader: batches of one :class:`data.dataset.TestDataset` item.
        faster_rcnn: the model (its current preset is used: ``'evaluate'`` unless changed).
        test_num: how many images to evaluate (the original evaluated ``test_num + 1``).
        progress: show a tqdm bar.

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


def _plot_step(vis: Visualizer, trainer: FasterRCNNTrainer, img, bbox, label, normalize: str) -> None:
    """The original's pictures of a plot step: ground truth, prediction, both confusion matrices."""
    names = trainer.class_names
    ori_img = inverse_normalize(img[0].numpy(), normalize)
    vis.img("gt_img", visdom_bbox(ori_img, bbox[0].numpy(), label[0].numpy(), label_names=names))
    bboxes, labels, scores = trainer.faster_rcnn.predict([ori_img], visualize=True)
    vis.img("pred_img", visdom_bbox(ori_img, bboxes[0], labels[0], scores[0], label_names=names))
    vis.text(str(trainer.rpn_cm.value().tolist()), win="rpn_cm")
    vis.img("roi_cm", torch.from_numpy(trainer.roi_cm.value()).float()[None])


def _train_one_epoch(trainer, dataloader, vis, cfg: Config, epoch: int, iteration: int) -> int:
    """One pass over ``dataloader``; returns the updated global iteration count."""
    trainer.reset_meters()
    normalize = "caffe" if cfg.caffe_pretrain else "torchvision"
    bar = tqdm(dataloader, desc=f"epoch {epoch}/{cfg.epoch}", dynamic_ncols=True)
    for img, bbox, label, scale in bar:
        trainer.train_step(img, bbox, label, scale)
        iteration += 1
        if iteration % cfg.plot_every == 0:
            vis.plot_many(trainer.get_meter_data(), step=iteration)
            if vis.connected:
                _plot_step(vis, trainer, img, bbox, label, normalize)
        if iteration % 10 == 0:
            bar.set_postfix(loss=f"{trainer.meters['total_loss'].value():.3f}")
    return iteration


def _end_of_epoch(trainer, cfg: Config, paths: dict, epoch: int, eval_map: float, state: dict, vis) -> None:
    """The one place where a run's state is saved: best (if improved), lr decay, then ``last.pth``.

    ``state`` holds ``best_map`` and ``iteration`` and is updated in place. After epoch ``lr_decay_epoch`` the
    best checkpoint is reloaded, model *and* optimizer (the original kept the latest momentum buffers with
    the best weights), then the lr is scaled by ``lr_decay``.
    """
    if state["best_map"] is None or eval_map > state["best_map"]:
        state["best_map"] = eval_map
        trainer.save(paths["best"], epoch=epoch + 1, best_map=eval_map, iteration=state["iteration"],
                     vis_info=vis.state_dict())
    if epoch == cfg.lr_decay_epoch:
        if os.path.exists(paths["best"]):
            trainer.load(paths["best"])
            vis.log(f"epoch {epoch}: reloaded {paths['best']}")
        else:  # resumed into a new run folder, best mAP from the old run not beaten yet: keep going as is
            vis.log(f"epoch {epoch}: no {paths['best']} to reload; the lr decays on the current weights")
        trainer.scale_lr(cfg.lr_decay)
        vis.log(f"epoch {epoch}: lr decayed to {trainer.lr:.3g}")
    trainer.save(paths["last"], epoch=epoch + 1, best_map=state["best_map"], iteration=state["iteration"],
                 vis_info=vis.state_dict())
    vis.save()


def train(**kwargs) -> float | None:
    """Train as configured by ``kwargs`` (options of ``utils/config.py``); returns the best test mAP."""
    cfg = Config.parse(kwargs)
    print(cfg)
    device = cfg.torch_device()
    shuffle_generator = _seed_everything(cfg.seed)

    dataset = Dataset(cfg)
    testset = TestDataset(cfg)
    train_loader = DataLoader(dataset, batch_size=1, shuffle=True, num_workers=cfg.num_workers,
                              generator=shuffle_generator)
    test_loader = DataLoader(testset, batch_size=1, shuffle=False, num_workers=cfg.test_num_workers,
                             pin_memory=device.type == "cuda")

    model = build_model(cfg, len(dataset.label_names)).to(device)
    trainer = FasterRCNNTrainer.from_config(model, cfg, class_names=dataset.label_names)
    state = {"best_map": None, "iteration": 0}
    start_epoch = 0
    vis_info = None
    if cfg.load_path:
        ckpt = trainer.load(cfg.load_path)
        info, vis_info = ckpt["other_info"], ckpt.get("vis_info")
        start_epoch = int(info.get("epoch", 0))
        state = {"best_map": info.get("best_map"), "iteration": int(info.get("iteration", 0))}
        print(f"resumed from {cfg.load_path}: epoch {start_epoch}, lr {trainer.lr:.3g}, "
              f"best mAP {state['best_map']}")

    run_dir = _run_dir(cfg)
    paths = {"best": os.path.join(run_dir, "best.pth"), "last": os.path.join(run_dir, "last.pth")}
    vis = Visualizer(env=cfg.env, server=cfg.visdom_server, port=cfg.port, log_dir=run_dir,
                     use_visdom=cfg.use_visdom)
    if vis_info is not None:
        vis.load_state_dict(vis_info)
    vis.text(str(list(dataset.label_names)), win="labels")

    eval_map = None
    for epoch in range(start_epoch, cfg.epoch):
        if shuffle_generator is not None:  # the data order of an epoch does not depend on resuming
            shuffle_generator.manual_seed(cfg.seed + epoch)
        state["iteration"] = _train_one_epoch(trainer, train_loader, vis, cfg, epoch, state["iteration"])
        eval_map = float(evaluate(test_loader, model, cfg.test_num)["map"])
        losses = trainer.get_meter_data()
        vis.plot("test_map", eval_map, step=state["iteration"])
        vis.log(f"epoch {epoch}: lr {trainer.lr:.3g}, map {eval_map:.4f}, loss {losses}")
        print(f"epoch {epoch}: test mAP {eval_map:.4f}, train loss {losses['total_loss']:.4f}, "
              f"lr {trainer.lr:.3g}")
        _end_of_epoch(trainer, cfg, paths, epoch, eval_map, state, vis)

    if eval_map is not None:
        print(f"final test mAP: {eval_map:.4f}")
    print(f"best test mAP: {state['best_map']}, checkpoint: {paths['best']} (resume from {paths['last']})")
    return state["best_map"]


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
        raise SystemExit("eval needs --load-path=CHECKPOINT")
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
    loader = DataLoader(testset, batch_size=1, shuffle=False, num_workers=cfg.test_num_workers)
    result = evaluate(loader, model, cfg.test_num)
    eval_map = float(result["map"])
    print(_ap_table(result["ap"], testset.label_names, eval_map))
    print(f"mAP: {eval_map:.4f} ({min(cfg.test_num, len(testset))} test images, checkpoint {load_path})")
    return eval_map


if __name__ == "__main__":
    # train/eval print their own report; fire must not print their return value (a float) after it
    fire.Fire({"train": train, "eval": eval_checkpoint},
              serialize=lambda result: None if isinstance(result, float) else result)
