"""Batches and mixed precision: the samplers (aspect-ratio groups, shards, size batches), batched predict and
evaluation equal to one image at a time, bfloat16 autocast training on the CPU, the gradient scaler in
checkpoints."""

import math

import numpy as np
import pytest
import torch
from test_trainer import make_trainer, scene, tiny_model

from data.sampler import aspect_ratio_groups, group_batches, pad_batches, shard, size_batches
from trainer import FasterRCNNTrainer
from utils.amp import autocast, autocast_dtype, grad_scaler
from utils.checkpoint import load_checkpoint


# --- samplers -----------------------------------------------------------------------------------------------
def test_aspect_ratio_groups_are_torchvision_s_bins():
    # bins 2 ** linspace(-1, 1, 7) of W / H: 0.5, 0.63, 0.79, 1, 1.26, 1.59, 2
    sizes = [(100, 40), (100, 50), (100, 70), (100, 100), (100, 99), (100, 130), (100, 170), (100, 300)]
    np.testing.assert_array_equal(aspect_ratio_groups(sizes), [0, 1, 2, 4, 3, 5, 6, 7])
    np.testing.assert_array_equal(aspect_ratio_groups(sizes, factor=0), np.zeros(8))


def test_group_batches_keeps_groups_together_and_uses_every_index_once():
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 3, 50)
    order = rng.permutation(50).tolist()
    for batch_size in (1, 2, 4, 7):
        batches = group_batches(order, groups, batch_size)
        assert sorted(i for b in batches for i in b) == list(range(50))
        n_left = sum(np.count_nonzero(groups == g) % batch_size for g in range(3))
        grouped = batches[:len(batches) - -(-n_left // batch_size)]  # the leftovers come last
        assert all(len(b) == batch_size and len({groups[i] for i in b}) == 1 for b in grouped)
        assert sum(len(b) < batch_size for b in batches) <= 1
        # within a grouped batch, the epoch's order is kept
        position = {index: k for k, index in enumerate(order)}
        assert all([position[i] for i in b] == sorted(position[i] for i in b) for b in grouped)
    assert group_batches(order, groups, 1) == [[i] for i in order]
    # a hand-worked case: groups a a b a b b (indices 0..5 in this order), batches of 2
    assert group_batches([0, 1, 2, 3, 4, 5], np.array([0, 0, 1, 0, 1, 1]), 2) == [[0, 1], [2, 4], [3, 5]]


def test_shards_of_k_processes_are_the_batch_of_one():
    batches = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    padded = pad_batches(batches, 4, order=[9, 8, 7, 6, 5, 4, 3, 2, 1, 0])
    assert padded == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 9, 8]]
    shares = [shard(padded, rank, 2) for rank in range(2)]
    assert shares == [[[0, 1], [4, 5], [8, 9]], [[2, 3], [6, 7], [9, 8]]]
    with pytest.raises(ValueError, match="cannot be shared"):
        shard(batches, 0, 4)


def test_size_batches_group_equal_sizes_only():
    sizes = [(600, 800), (600, 901), (600, 800), (800, 600), (600, 800), (600, 901)]
    assert size_batches(sizes, 2) == [[0, 2], [1, 5], [3], [4]]
    assert size_batches(sizes, 1) == [[i] for i in range(6)]
    assert size_batches(sizes, 8) == [[0, 2, 4], [1, 5], [3]]


# --- batched predict and evaluation -------------------------------------------------------------------------
def _images(n, seed=0, sizes=((64, 80),)):
    rng = np.random.default_rng(seed)
    return [rng.normal(0, 1, (3, *sizes[i % len(sizes)])).astype(np.float32) for i in range(n)]


def test_batched_predict_equals_one_image_at_a_time(one_thread):
    model = tiny_model()
    model.score_thresh = 0.0  # every class of every RoI competes: many detections to compare
    imgs = _images(5, sizes=((64, 80), (72, 80), (64, 80)))
    sizes = [(128, 160)] * 5
    alone = model.predict(imgs, sizes)
    for batch_size in (2, 3, 8):
        batched = model.predict(imgs, sizes, batch_size=batch_size)
        for a, b in zip(alone, batched, strict=True):
            for x, y in zip(a, b, strict=True):
                assert x.shape == y.shape and x.dtype == y.dtype
                np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-4)
        assert sum(len(b) for b in batched[0]) > 20
    with pytest.raises(ValueError, match="batch_size"):
        model.predict(imgs, sizes, batch_size=0)


def test_evaluation_does_not_depend_on_the_test_batch_size(tmp_path, one_thread):
    from data.dataset import TestDataset
    from data.toy_dataset import TOY_LABEL_NAMES, generate_toy_voc
    from utils.config import Config
    from utils.evaluation import detect, eval_loader, score

    root = generate_toy_voc(tmp_path / "voc", n_trainval=1, n_test=8, seed=4, min_side=96, max_side=104)
    cfg = Config.parse({"data": "voc", "voc_data_dir": str(root), "label_names": TOY_LABEL_NAMES,
                        "min_size": 96, "max_size": 128})
    testset = TestDataset(cfg)
    sizes = testset.input_sizes()
    assert len(set(sizes)) < len(sizes)  # some images share a size: real batches
    torch.manual_seed(0)
    model = tiny_model(n_fg_class=len(TOY_LABEL_NAMES))
    model.score_thresh = 0.01
    results = {}
    for batch_size in (1, 3):
        loader = eval_loader(testset, batch_size=batch_size)
        largest = max(sizes.count(s) for s in sizes)
        assert max(len(b) for b in loader.batch_sampler) == min(batch_size, largest)
        found = sorted(detect(loader, model, progress=False), key=lambda d: d.index)
        results[batch_size] = (found, score(found, testset))
    for a, b in zip(results[1][0], results[3][0], strict=True):
        np.testing.assert_allclose(a.bbox, b.bbox, rtol=1e-5, atol=1e-4)
        np.testing.assert_array_equal(a.label, b.label)
    assert results[1][1]["map"] == pytest.approx(results[3][1]["map"], abs=1e-9)


# --- mixed precision ----------------------------------------------------------------------------------------
def test_autocast_dtypes_and_the_scaler_only_on_cuda():
    assert autocast_dtype("cpu") == torch.bfloat16 and autocast_dtype("cuda") == torch.float16
    assert not grad_scaler("cpu", True).is_enabled() and not grad_scaler("cuda", False).is_enabled()
    with autocast("cpu", True):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    with autocast("cpu", False):
        assert not torch.is_autocast_enabled("cpu")


def test_bfloat16_training_on_the_cpu_gives_finite_losses_that_decrease(one_thread):
    trainer = FasterRCNNTrainer(tiny_model(), seed=0, lr=0.01, amp=True)
    assert trainer.amp and not trainer.scaler.is_enabled()
    batch = scene()
    seen = {}

    def record(module, args, out):
        seen.setdefault("dtype", out.dtype)

    hook = trainer.faster_rcnn.rpn.conv1.register_forward_hook(record)
    first = [trainer.train_step(*batch).total_loss.item() for _ in range(3)]
    hook.remove()
    assert seen["dtype"] == torch.bfloat16  # the network ran under autocast
    for _ in range(30):
        losses = trainer.train_step(*batch)
        assert all(math.isfinite(v.item()) and v.dtype == torch.float32 for v in losses)
    last = [trainer.train_step(*batch).total_loss.item() for _ in range(3)]
    assert np.mean(last) < 0.6 * np.mean(first)
    assert all(p.dtype == torch.float32 for p in trainer.faster_rcnn.parameters())  # float32 master weights
    # predict under autocast decodes in float32
    img = batch[0][0].numpy()
    with autocast("cpu", True):
        bboxes, labels, scores = trainer.faster_rcnn.predict([img], [(64, 80)], score_thresh=0.0)
    assert bboxes[0].dtype == np.float32 and len(bboxes[0]) > 0


def test_the_gradient_scaler_is_saved_and_restored(tmp_path):
    trainer = make_trainer()
    # the CPU has no float16 scaler in training (bfloat16 needs none); a CPU GradScaler stands in for the
    # CUDA one to check the checkpoint path
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1)
    trainer.train_step(*scene())
    assert trainer.scaler.get_scale() == 2048.0  # grown after one finite step
    path = trainer.save(tmp_path / "last.pth")
    assert load_checkpoint(path)["scaler"]["scale"] == 2048.0
    resumed = make_trainer(seed=1)
    resumed.scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    resumed.load(path)
    assert resumed.scaler.get_scale() == 2048.0
    assert resumed.scaler.state_dict() == trainer.scaler.state_dict()
    # a trainer without a scaler (float32) writes none
    assert "scaler" not in load_checkpoint(make_trainer().save(tmp_path / "fp32.pth"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_float16_training_steps_on_cuda_use_the_scaler():
    trainer = FasterRCNNTrainer(tiny_model().cuda(), seed=0, lr=0.01, amp=True)
    assert trainer.scaler.is_enabled() and trainer.scaler.get_scale() == 65536.0
    batch = scene()
    losses = [trainer.train_step(*batch).total_loss.item() for _ in range(20)]
    assert all(math.isfinite(v) for v in losses) and np.mean(losses[-3:]) < np.mean(losses[:3])
    assert trainer.scaler._growth_tracker is not None
