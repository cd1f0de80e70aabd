"""trainer.py and utils/checkpoint.py: losses against hand-worked numbers, training steps on a tiny model,
the optimizer's parameter groups, meters, and the checkpoint format (round trip, safety, atomic writes)."""

import copy
import math
import os
import pickle

import numpy as np
import pytest
import torch

from model import build_faster_rcnn
from model.faster_rcnn_toy import FasterRCNNToy
from trainer import (
    AverageValueMeter,
    ConfusionMeter,
    FasterRCNNTrainer,
    LossTuple,
    NonFiniteLossError,
    fast_rcnn_loc_loss,
    get_optimizer,
    smooth_l1_loss,
)
from utils.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    atomic_save,
    load_checkpoint,
    model_from_checkpoint,
)
from utils.config import Config

N_FG_CLASS = 3


def tiny_model(n_fg_class: int = N_FG_CLASS, seed: int = 0) -> FasterRCNNToy:
    """A few-thousand-parameter toy Faster R-CNN: a train step on a 64x80 image takes milliseconds."""
    torch.manual_seed(seed)
    return FasterRCNNToy(
        n_fg_class,
        anchor_scales=(1, 2),
        channels=(8, 16),
        rpn_channels=16,
        head_channels=8,
        fc_channels=32,
        roi_size=4,
        proposal_creator_params={"n_train_pre_nms": 600, "n_train_post_nms": 100, "min_size": 4},
        min_size=64,
        max_size=96,
    )


def scene(n_box: int = 2, seed: int = 0, height: int = 64, width: int = 80):
    """A batch of one preprocessed-looking image with bright rectangles, and their boxes and labels."""
    rng = np.random.default_rng(seed)
    img = rng.normal(0, 0.1, (1, 3, height, width)).astype(np.float32)
    bbox = np.array([[8, 10, 40, 36], [20, 44, 56, 76]], dtype=np.float32)[:n_box]
    label = np.array([0, 2], dtype=np.int32)[:n_box]
    for (y0, x0, y1, x1), lb in zip(bbox.astype(int), label, strict=True):
        img[0, lb, y0:y1, x0:x1] += 2.0
    return torch.from_numpy(img), torch.from_numpy(bbox)[None], torch.from_numpy(label)[None], 1.0


def make_trainer(seed: int = 0, **kwargs) -> FasterRCNNTrainer:
    return FasterRCNNTrainer(tiny_model(seed=seed), seed=seed, **kwargs)


# --- losses -------------------------------------------------------------------------------------------------
def test_smooth_l1_loss_matches_hand_computed_values():
    # sigma 1: |d| < 1 is quadratic 0.5 d^2, else |d| - 0.5.
    x = torch.tensor([0.5, -2.0, 1.0, 0.0])
    t = torch.zeros(4)
    w = torch.ones(4)
    assert smooth_l1_loss(x, t, w, 1.0).item() == pytest.approx(0.125 + 1.5 + 0.5 + 0.0)
    # sigma 3: the quadratic zone is |d| < 1/9: 0.5*9*0.1^2 = 0.045; 0.5 - 0.5/9.
    x = torch.tensor([0.1, 0.5])
    expected = 0.045 + 0.5 - 0.5 / 9
    assert smooth_l1_loss(x, torch.zeros(2), torch.ones(2), 3.0).item() == pytest.approx(expected)
    # a zero weight removes the element; the weight multiplies the difference, not the loss
    x = torch.tensor([3.0, 0.4])
    w = torch.tensor([0.0, 3.0])
    assert smooth_l1_loss(x, torch.zeros(2), w, 1.0).item() == pytest.approx(1.2 - 0.5)


def test_fast_rcnn_loc_loss_positives_only_divided_by_non_ignored_count():
    pred = torch.tensor([[0.5, 0, 0, 0], [9.0, 9, 9, 9], [7.0, 7, 7, 7], [0, 0, 0, 2.0]])
    gt = torch.zeros(4, 4)
    label = torch.tensor([1, 0, -1, 2])  # positive, negative, ignored, positive
    # rows 0 and 3 count: 0.125 (sigma 1) + 1.5; divided by the 3 non-ignored rows
    assert fast_rcnn_loc_loss(pred, gt, label, 1.0).item() == pytest.approx((0.125 + 1.5) / 3)
    # float64 against a per-element loop with sigma 3
    rng = np.random.default_rng(1)
    pred, gt = rng.normal(size=(50, 4)), rng.normal(size=(50, 4))
    label = rng.integers(-1, 3, 50)
    expected = 0.0
    for i in range(50):
        if label[i] > 0:
            for d in pred[i] - gt[i]:
                expected += 4.5 * d * d if abs(d) < 1 / 9 else abs(d) - 0.5 / 9
    expected /= (label >= 0).sum()
    got = fast_rcnn_loc_loss(torch.from_numpy(pred), torch.from_numpy(gt), torch.from_numpy(label), 3.0)
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_fast_rcnn_loc_loss_is_zero_without_samples_and_gradient_flows_to_positives_only():
    pred = torch.ones(3, 4, requires_grad=True)
    assert fast_rcnn_loc_loss(pred, torch.zeros(3, 4), torch.tensor([-1, -1, -1]), 1.0).item() == 0.0
    loss = fast_rcnn_loc_loss(pred, torch.zeros(3, 4), torch.tensor([1, 0, -1]), 1.0)
    loss.backward()
    assert pred.grad[0].abs().sum() > 0
    assert pred.grad[1:].abs().sum() == 0


# --- optimizer ----------------------------------------------------------------------------------------------
def test_optimizer_groups_biases_get_twice_the_lr_and_no_weight_decay():
    model = tiny_model()
    frozen = model.extractor[0].weight
    frozen.requires_grad_(False)
    opt = get_optimizer(model, lr=0.01, weight_decay=1e-4)
    assert isinstance(opt, torch.optim.SGD)
    weights, biases = opt.param_groups
    assert (weights["lr"], weights["weight_decay"], weights["momentum"]) == (0.01, 1e-4, 0.9)
    assert (biases["lr"], biases["weight_decay"]) == (0.02, 0.0)
    named = dict(model.named_parameters())
    bias_ids = {id(p) for n, p in named.items() if "bias" in n}
    assert {id(p) for p in biases["params"]} == bias_ids
    trainable_weights = {id(p) for n, p in named.items() if "bias" not in n and p.requires_grad}
    assert {id(p) for p in weights["params"]} == trainable_weights
    assert id(frozen) not in trainable_weights | bias_ids
    assert isinstance(get_optimizer(model, use_adam=True), torch.optim.Adam)


@pytest.mark.parametrize("use_adam", [False, True])
def test_fused_optimizer_makes_the_reference_update(use_adam):
    """get_optimizer's fused SGD / Adam gives the update of torch's reference (for-loop) implementation."""
    torch.manual_seed(0)
    model = tiny_model()
    reference_model = copy.deepcopy(model)
    initial = [p.detach().clone() for p in model.parameters()]
    opt = get_optimizer(model, lr=0.01, weight_decay=1e-3, use_adam=use_adam)
    assert all(g["fused"] for g in opt.param_groups)
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "fused": None, "foreach": False,
               "params": [dict(reference_model.named_parameters())[n] for n in _names(model, g["params"])]}
              for g in opt.param_groups]
    reference = (torch.optim.Adam if use_adam else torch.optim.SGD)(groups)
    for _ in range(4):
        grads = [torch.randn_like(p) for p in model.parameters()]
        for m, o in ((model, opt), (reference_model, reference)):
            for p, g in zip(m.parameters(), grads, strict=True):
                p.grad = g.clone()
            o.step()
    for p, q in zip(model.parameters(), reference_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), initial, strict=True))


def _names(model, params):
    ids = {id(p): n for n, p in model.named_parameters()}
    return [ids[id(p)] for p in params]


def test_scale_lr_scales_every_group():
    trainer = make_trainer(lr=0.01)
    trainer.scale_lr(0.1)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx([0.001, 0.002])
    assert trainer.lr == pytest.approx(0.001)


# --- meters -------------------------------------------------------------------------------------------------
def test_meters():
    meter = AverageValueMeter()
    assert math.isnan(meter.value())
    for v in (1.0, 2.0, 6.0):
        meter.add(v)
    assert meter.value() == pytest.approx(3.0)
    meter.reset()
    assert math.isnan(meter.value())

    rng = np.random.default_rng(0)
    scores, target = rng.normal(size=(40, 5)), rng.integers(0, 5, 40)
    cm = ConfusionMeter(5)
    cm.add(torch.from_numpy(scores), torch.from_numpy(target))
    expected = np.zeros((5, 5), dtype=np.int64)
    for s, t in zip(scores, target, strict=True):
        expected[t, s.argmax()] += 1
    np.testing.assert_array_equal(cm.value(), expected)
    with pytest.raises(ValueError, match="5 classes"):
        cm.add(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))


# --- training steps -----------------------------------------------------------------------------------------
def test_train_step_gives_four_finite_losses_and_updates_weights_and_meters():
    trainer = make_trainer()
    before = [p.detach().clone() for p in trainer.faster_rcnn.parameters()]
    losses = trainer.train_step(*scene())
    assert isinstance(losses, LossTuple)
    values = [v.item() for v in losses]
    assert all(math.isfinite(v) for v in values)
    assert all(v >= 0 for v in values)
    assert values[4] == pytest.approx(sum(values[:4]), rel=1e-6)
    assert values[1] > 0 and values[3] > 0  # untrained classifiers are not certain
    changed = [not torch.equal(b, p) for b, p in zip(before, trainer.faster_rcnn.parameters(), strict=True)]
    assert all(changed)
    meters = trainer.get_meter_data()
    assert meters == pytest.approx(dict(zip(LossTuple._fields, values, strict=True)), rel=1e-6)
    assert 0 < trainer.rpn_cm.value().sum() <= 256
    assert trainer.roi_cm.value().shape == (N_FG_CLASS + 1, N_FG_CLASS + 1)
    assert 0 < trainer.roi_cm.value().sum() <= 128
    assert trainer.roi_cm.value()[1:].sum() > 0  # the ground truth boxes are among the head's samples
    trainer.reset_meters()
    assert trainer.rpn_cm.value().sum() == 0 and math.isnan(trainer.get_meter_data()["total_loss"])


def test_a_few_steps_on_one_image_lower_the_loss():
    trainer = make_trainer(lr=0.01)
    batch = scene()
    first = [trainer.train_step(*batch).total_loss.item() for _ in range(3)]
    for _ in range(30):
        trainer.train_step(*batch)
    last = [trainer.train_step(*batch).total_loss.item() for _ in range(3)]
    assert np.mean(last) < 0.5 * np.mean(first)


def test_background_only_image_trains_as_all_negative():
    trainer = make_trainer()
    img, _, _, scale = scene()
    losses = trainer.train_step(img, torch.zeros(1, 0, 4), torch.zeros(1, 0, dtype=torch.int32), scale)
    assert all(math.isfinite(v.item()) for v in losses)
    assert losses.rpn_loc_loss.item() == 0 and losses.roi_loc_loss.item() == 0
    assert losses.rpn_cls_loss.item() > 0 and losses.roi_cls_loss.item() > 0
    rpn_cm, roi_cm = trainer.rpn_cm.value(), trainer.roi_cm.value()
    assert rpn_cm[1].sum() == 0 and rpn_cm[0].sum() > 0  # every sampled anchor is background
    assert roi_cm[1:].sum() == 0 and roi_cm[0].sum() > 0  # every sampled RoI is background
    # numpy inputs work too
    losses = trainer.forward(img.numpy(), np.zeros((1, 0, 4), np.float32), np.zeros((1, 0), np.int32), 1.0)
    assert math.isfinite(losses.total_loss.item())


def _grads(model) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters() if p.requires_grad]


def test_a_batch_of_two_gives_the_mean_losses_and_gradients_of_its_images(one_thread):
    """The same sampled targets (each image's creators drawing from its own generator), the same weights:
    a batch's losses and gradients are the mean of each image's alone."""
    scenes = [scene(n_box=2, seed=1), scene(n_box=1, seed=2)]
    trainer = make_trainer()
    alone_losses, alone_grads = [], []
    for k, (img, bbox, label, scale) in enumerate(scenes):
        trainer.faster_rcnn.zero_grad()
        losses = trainer.forward(img, bbox, label, scale, rngs=[np.random.default_rng(10 + k)])
        losses.total_loss.backward()
        alone_losses.append(torch.stack(list(losses)).detach())
        alone_grads.append(_grads(trainer.faster_rcnn))
    trainer.faster_rcnn.zero_grad()
    imgs = torch.cat([img for img, *_ in scenes])
    bboxes, labels = [bbox[0] for _, bbox, _, _ in scenes], [label[0] for _, _, label, _ in scenes]
    losses = trainer.forward(imgs, bboxes, labels, [1.0, 1.0],
                             rngs=[np.random.default_rng(10), np.random.default_rng(11)])
    losses.total_loss.backward()
    torch.testing.assert_close(torch.stack(list(losses)).detach(), (alone_losses[0] + alone_losses[1]) / 2,
                               rtol=1e-5, atol=1e-6)
    for got, a, b in zip(_grads(trainer.faster_rcnn), *alone_grads, strict=True):
        torch.testing.assert_close(got, (a + b) / 2, rtol=1e-4, atol=1e-6)


def test_one_image_in_a_list_is_the_batch_of_one():
    img, bbox, label, scale = scene()
    a, b = make_trainer(seed=5), make_trainer(seed=5)
    la = torch.stack(list(a.forward(img, bbox, label, scale)))
    lb = torch.stack(list(b.forward(img, [bbox[0].numpy()], [label[0].numpy()], [scale], sizes=[(64, 80)])))
    assert torch.equal(la, lb)


def test_padding_never_makes_anchors_proposals_or_targets_outside_an_image():
    """Two images of different sizes, padded to one: each image's proposals, positive and negative anchors
    and sampled RoIs lie inside its own size; the padding is zeros at the bottom and right."""
    from data.dataset import collate_train, pad_images

    small, big = scene(seed=1, height=48, width=56), scene(seed=2, height=64, width=80)
    items = [(img[0].numpy(), bbox[0].numpy().clip(0, [h, w, h, w]), label[0].numpy(), 1.0)
             for (img, bbox, label, _), (h, w) in ((small, (48, 56)), (big, (64, 80)))]
    imgs, bboxes, labels, scales, sizes = collate_train(items, multiple=4)
    assert imgs.shape == (2, 3, 64, 80) and sizes == [(48, 56), (64, 80)]
    assert torch.equal(imgs[0, :, :48, :56], torch.from_numpy(items[0][0]))
    assert not imgs[0, :, 48:].any() and not imgs[0, :, :, 56:].any()
    assert pad_images([items[0][0]] * 2, multiple=16).shape == (2, 3, 48, 56)  # one size: no padding
    assert pad_images([items[0][0], items[1][0][:, :50, :70]], multiple=16).shape == (2, 3, 64, 80)

    trainer = make_trainer()
    loss = trainer.loss
    model = trainer.faster_rcnn
    features = model.extractor(imgs)
    _, _, rois, roi_indices, anchor = model.rpn(features, sizes, scales)
    rngs = [np.random.default_rng(0)] * 2
    gt_rpn_loc, gt_rpn_label, sample_roi, sample_index, _, _ = loss._targets(
        rois, roi_indices, anchor, bboxes, labels, sizes, rngs)
    assert set(roi_indices.tolist()) == {0, 1} and set(sample_index.tolist()) == {0, 1}
    for i, (height, width) in enumerate(sizes):
        for boxes in (rois[roi_indices == i], sample_roi[sample_index == i]):
            assert (boxes >= 0).all()
            assert (boxes[:, [0, 2]] <= height).all() and (boxes[:, [1, 3]] <= width).all()
        inside = ((anchor[:, :2] >= 0).all(1) & (anchor[:, 2] <= height) & (anchor[:, 3] <= width))
        assert (gt_rpn_label[i][~inside] == -1).all() and (gt_rpn_label[i][inside] >= 0).any()
        assert not gt_rpn_loc[i][~inside].any()
    # the small image has anchors inside the big one that are outside itself: ignored for it alone
    inside_big = (anchor[:, 2] <= 64) & (anchor[:, 3] <= 80) & (anchor[:, :2] >= 0).all(1)
    inside_small = (anchor[:, 2] <= 48) & (anchor[:, 3] <= 56) & (anchor[:, :2] >= 0).all(1)
    assert (inside_big & ~inside_small).any()
    losses = trainer.train_step(imgs, bboxes, labels, scales, sizes)
    assert all(math.isfinite(v.item()) for v in losses)


def test_a_train_step_crosses_between_host_and_device_a_fixed_few_times(monkeypatch):
    """On a GPU, what leaves the device goes through ``.cpu()``, ``.tolist()`` or ``.item()``, and what
    enters it from numpy through ``torch.from_numpy``/``as_tensor``/``tensor``. Counted on the CPU: the RPN's
    outputs go to the host once, the targets come back once, the loss values once, whatever the number of
    images (the CPU-only RoI pooling's numpy views are not crossings and are not counted)."""
    counts = {}

    def counting(name, original, numpy_only=False):
        def wrapped(*args, **kwargs):
            if not numpy_only or isinstance(args[0], np.ndarray):
                counts[name] = counts.get(name, 0) + 1
            return original(*args, **kwargs)
        return wrapped

    for name in ("cpu", "tolist", "item"):
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch, "from_numpy", counting("from_numpy", torch.from_numpy))
    for name in ("as_tensor", "tensor"):
        monkeypatch.setattr(torch, name, counting(name, getattr(torch, name), numpy_only=True))
    trainer = make_trainer()
    for n in (1, 2):
        img, bbox, label, scale = scene()
        bboxes, labels = [bbox[0].numpy()] * n, [label[0].numpy()] * n  # as a DataLoader gives them
        counts.clear()
        trainer.train_step(img.repeat(n, 1, 1, 1), bboxes, labels, [scale] * n)
        assert counts.get("cpu", 0) + counts.get("tolist", 0) + counts.get("item", 0) == 2, counts
        assert counts.get("from_numpy", 0) + counts.get("as_tensor", 0) + counts.get("tensor", 0) == 1, counts


def test_non_finite_loss_stops_before_the_optimizer_step():
    trainer = make_trainer()
    trainer.train_step(*scene())
    params = [p.detach().clone() for p in trainer.faster_rcnn.parameters()]
    state = trainer.optimizer.state_dict()["state"]
    optim_state = {k: v["momentum_buffer"].clone() for k, v in state.items()}
    img, bbox, label, scale = scene()
    img[0, :, :4, :4] = float("nan")
    with pytest.raises(NonFiniteLossError, match="non-finite loss"):
        trainer.train_step(img, bbox, label, scale)
    for before, p in zip(params, trainer.faster_rcnn.parameters(), strict=True):
        assert torch.equal(before, p)
    for k, v in trainer.optimizer.state_dict()["state"].items():
        assert torch.equal(optim_state[k], v["momentum_buffer"])


def test_creator_sampling_is_reproducible_from_the_trainer_seed():
    a, b, c = make_trainer(seed=3), make_trainer(seed=3), FasterRCNNTrainer(tiny_model(seed=3), seed=4)
    la = [v.item() for v in a.train_step(*scene())]
    lb = [v.item() for v in b.train_step(*scene())]
    lc = [v.item() for v in c.train_step(*scene())]
    assert la == lb
    assert la != lc


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_train_step_on_cuda_follows_the_model():
    trainer = FasterRCNNTrainer(tiny_model().cuda(), seed=0)
    losses = trainer.train_step(*scene())
    assert losses.total_loss.device.type == "cuda"
    assert math.isfinite(losses.total_loss.item())


# --- checkpoints --------------------------------------------------------------------------------------------
def _walk(value):
    """Every leaf of a checkpoint dict."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _walk(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _walk(v)
    else:
        yield value


def test_checkpoint_round_trip_resumes_model_optimizer_epoch_and_best_map(tmp_path):
    cfg = Config.parse({"lr": 0.005, "seed": 3})
    trainer = FasterRCNNTrainer.from_config(tiny_model(), cfg, class_names=("a", "b", "c"))
    for _ in range(2):
        trainer.train_step(*scene())
    trainer.scale_lr(0.5)
    path = trainer.save(tmp_path / "run" / "last.pth", epoch=3, best_map=np.float64(0.5), iteration=7)
    assert os.listdir(tmp_path / "run") == ["last.pth"]  # no temp file left

    raw = torch.load(path, weights_only=True)  # plain containers and tensors only
    assert raw["format"] == CHECKPOINT_FORMAT
    assert all(isinstance(x, (str, int, float, bool, type(None), torch.Tensor)) for x in _walk(raw))
    assert raw["other_info"] == {"epoch": 3, "best_map": 0.5, "iteration": 7, "lr": pytest.approx(0.0025)}
    assert raw["class_names"] == ["a", "b", "c"]
    assert raw["arch"]["name"] == "toy" and raw["arch"]["n_fg_class"] == N_FG_CLASS
    assert Config.from_dict(raw["config"]) == cfg

    resumed = FasterRCNNTrainer.from_config(tiny_model(seed=1), cfg)  # other initial weights
    ckpt = resumed.load(path)
    assert ckpt["other_info"]["epoch"] == 3 and ckpt["other_info"]["best_map"] == 0.5
    assert resumed.class_names == ["a", "b", "c"]
    assert resumed.lr == pytest.approx(0.0025)
    for p, q in zip(trainer.faster_rcnn.state_dict().values(), resumed.faster_rcnn.state_dict().values(),
                    strict=True):
        assert torch.equal(p, q)
    # with the same sampling, the next step is the same: the momentum buffers came back too
    trainer.rng, resumed.rng = np.random.default_rng(9), np.random.default_rng(9)
    trainer.train_step(*scene(seed=1))
    resumed.train_step(*scene(seed=1))
    for p, q in zip(trainer.faster_rcnn.parameters(), resumed.faster_rcnn.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)

    # weights only: the optimizer keeps its fresh state
    fresh = FasterRCNNTrainer.from_config(tiny_model(seed=1), cfg)
    fresh.load(path, load_optimizer=False)
    assert fresh.optimizer.state_dict()["state"] == {}
    assert fresh.lr == pytest.approx(0.005)


def test_model_from_checkpoint_rebuilds_the_same_detector(tmp_path):
    trainer = make_trainer()
    trainer.train_step(*scene())
    path = trainer.save(tmp_path / "best.pth", save_optimizer=False)
    ckpt = load_checkpoint(path)
    assert "optimizer" not in ckpt
    model = model_from_checkpoint(ckpt, path)
    assert (model.min_size, model.max_size) == (64, 96)
    img = scene()[0][0].numpy()
    model.score_thresh = trainer.faster_rcnn.score_thresh = 0.0
    expected = trainer.faster_rcnn.predict([img], [(64, 80)])
    got = model.predict([img], [(64, 80)])
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_array_equal(e[0], g[0])


def test_checkpoint_for_another_class_count_or_backbone_is_a_clear_error(tmp_path):
    path = str(make_trainer().save(tmp_path / "toy3.pth"))
    other = FasterRCNNTrainer(tiny_model(n_fg_class=5))
    with pytest.raises(CheckpointError) as e:
        other.load(path)
    assert f"checkpoint {path!r} was trained for 3 classes with backbone 'toy'" in str(e.value)
    assert "this model has 5 classes, backbone 'toy'" in str(e.value)

    ckpt = torch.load(path, weights_only=True)
    ckpt["arch"] = {"name": "vgg16", "n_fg_class": 20, "ratios": [0.5, 1, 2], "anchor_scales": [8, 16, 32]}
    torch.save(ckpt, tmp_path / "vgg.pth")
    with pytest.raises(CheckpointError, match="20 classes with backbone 'vgg16'; this model has 3 classes, "
                                              "backbone 'toy'"):
        make_trainer().load(tmp_path / "vgg.pth")


class _Payload:
    """Unpickling this object would create a file: the refused checkpoint must never do that."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_with_a_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload_ran"
    path = str(make_trainer().save(tmp_path / "evil.pth"))
    ckpt = torch.load(path, weights_only=True)
    ckpt["other_info"]["extra"] = _Payload(str(marker))
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="refused"):
        make_trainer().load(path)
    assert not marker.exists()


def test_unreadable_or_foreign_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_checkpoint(tmp_path / "missing.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pth"):
        load_checkpoint(tmp_path / "garbage.pth")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "state.pth")
    with pytest.raises(CheckpointError, match="not a checkpoint of this project"):
        load_checkpoint(tmp_path / "state.pth")
    with pytest.raises(TypeError, match="cannot store a object"):
        make_trainer().save(tmp_path / "bad.pth", note=object())
    assert not os.path.exists(tmp_path / "bad.pth")


def test_failed_write_leaves_the_existing_checkpoint_intact_and_no_temp_file(tmp_path, monkeypatch):
    trainer = make_trainer()
    path = tmp_path / "last.pth"
    trainer.save(path, epoch=1)
    before = path.read_bytes()

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    trainer.train_step(*scene())
    with pytest.raises(OSError, match="disk full"):
        trainer.save(path, epoch=2)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["last.pth"]
    monkeypatch.undo()
    assert load_checkpoint(path)["other_info"]["epoch"] == 1


def test_atomic_save_replaces_and_creates_folders(tmp_path):
    path = tmp_path / "a" / "b" / "x.pth"
    atomic_save({"v": 1}, path)
    atomic_save({"v": 2}, path)
    assert torch.load(path, weights_only=True) == {"v": 2}
    assert os.listdir(path.parent) == ["x.pth"]


def test_build_faster_rcnn_knows_the_toy_backbone():
    model = tiny_model()
    rebuilt = build_faster_rcnn(model.arch)
    assert type(rebuilt) is FasterRCNNToy
    assert rebuilt.arch == model.arch
    assert [k for k in rebuilt.state_dict()] == [k for k in model.state_dict()]
    assert pickle.loads(pickle.dumps(model.arch)) == model.arch


# --- one record of a model's settings: the proposal counts in the arch --------------------------------------
def test_vgg16_records_its_proposal_settings_and_old_archs_mean_the_original_ones():
    from model import FasterRCNNVGG16, arch_of, canonical_arch
    from utils.checkpoint import check_arch

    original = {"nms_thresh": 0.7, "n_train_pre_nms": 12000, "n_train_post_nms": 2000,
                "n_test_pre_nms": 6000, "n_test_post_nms": 300, "min_size": 16}
    with torch.device("meta"):  # VGG16's shapes without its memory or its random init
        model = FasterRCNNVGG16(n_fg_class=3, proposal_creator_params={"n_test_post_nms": 7, "min_size": 4})
        default = FasterRCNNVGG16(n_fg_class=3)
    arch = arch_of(model)
    assert arch["proposal_creator_params"] == {**original, "n_test_post_nms": 7, "min_size": 4}
    assert (model.rpn.proposal_layer.n_test_post_nms, model.rpn.proposal_layer.min_size) == (7, 4)
    with torch.device("meta"):
        rebuilt = build_faster_rcnn(arch)
    assert rebuilt.rpn.proposal_layer.n_test_post_nms == 7 and arch_of(rebuilt) == arch

    # an arch written before the counts were recorded means the original's
    old = {k: v for k, v in arch_of(default).items() if k != "proposal_creator_params"}
    assert canonical_arch(old)["proposal_creator_params"] == original
    check_arch(old, arch_of(default))  # fits the default model...
    with pytest.raises(CheckpointError, match="proposal_creator_params"):
        check_arch(old, arch)  # ...and not one with other counts


def test_resuming_or_evaluating_uses_the_checkpoint_s_own_proposal_counts(tmp_path):
    path = make_trainer().save(tmp_path / "last.pth")  # trained with 600 -> 100 training proposals
    model = model_from_checkpoint(load_checkpoint(path), path)
    assert (model.rpn.proposal_layer.n_train_pre_nms, model.rpn.proposal_layer.n_train_post_nms) == (600, 100)
    torch.manual_seed(0)
    other = FasterRCNNToy(N_FG_CLASS, anchor_scales=(1, 2), channels=(8, 16), rpn_channels=16,
                          head_channels=8, fc_channels=32, roi_size=4, min_size=64, max_size=96,
                          proposal_creator_params={"n_train_pre_nms": 600, "n_train_post_nms": 200,
                                                   "min_size": 4})
    with pytest.raises(CheckpointError, match="proposal_creator_params"):
        FasterRCNNTrainer(other).load(path)


# --- checkpoint writers and run files -----------------------------------------------------------------------
def test_every_checkpoint_writer_builds_the_same_complete_dictionary(tmp_path):
    from utils.checkpoint import make_checkpoint
    from utils.original_checkpoint import convert_original_checkpoint

    trainer = make_trainer()
    raw = torch.load(trainer.save(tmp_path / "t.pth", epoch=1), weights_only=True)
    expected = make_checkpoint(trainer.faster_rcnn.state_dict(), trainer.faster_rcnn.arch,
                               trainer.class_names, config=trainer.config,
                               other_info={"epoch": 1, "lr": trainer.lr},
                               optimizer=trainer.optimizer.state_dict())
    assert raw.keys() == expected.keys() and raw["arch"] == expected["arch"]
    assert raw["other_info"] == expected["other_info"] and raw["class_names"] == expected["class_names"]

    # the original's checkpoint, converted: the same layout, a complete arch (the original's proposals)
    with torch.device("meta"):
        from model import FasterRCNNVGG16

        state = FasterRCNNVGG16(n_fg_class=20).state_dict()
    converted = convert_original_checkpoint({"model": state, "config": {"caffe_pretrain": False},
                                             "other_info": {"best_map": np.float64(0.7)}})
    assert set(converted) == {"format", "model", "arch", "class_names", "config", "other_info"}
    assert converted["arch"]["proposal_creator_params"]["n_test_post_nms"] == 300
    assert converted["other_info"]["best_map"] == 0.7 and type(converted["other_info"]["best_map"]) is float


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_checkpoints_and_run_files_get_the_permissions_of_the_user_s_umask(tmp_path, umask):
    from utils.vis_tool import Visualizer

    old = os.umask(umask)
    try:
        ckpt = make_trainer().save(tmp_path / "run" / "last.pth")
        vis = Visualizer(log_dir=tmp_path / "run", use_visdom=False)
        vis.plot("loss", 1.0)
        vis.flush()
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    assert (os.stat(tmp_path / "plain").st_mode & 0o777) == expected  # what open() gives
    for path in (ckpt, tmp_path / "run" / "history.jsonl", tmp_path / "run" / "curves.png"):
        assert (os.stat(path).st_mode & 0o777) == expected, path
