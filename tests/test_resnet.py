"""The ResNet-50/101 C4 model: shapes and strides, the frozen parts, weights loading, training, checkpoints.

ResNet-101 is checked for structure on the meta device (no memory, no compute); everything that runs uses
ResNet-50 at 128x160, where its layer4 on 16 RoIs is the main cost (about a second per training step on one
core). The ImageNet weights are replaced by a file the tests write (no download). Everything runs on one
torch thread: the same float reductions anywhere, and on a loaded 2-core machine two threads make these
small convolutions tens of times slower.
"""

import contextlib
import urllib.error

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import Bottleneck
from torchvision.ops.misc import FrozenBatchNorm2d

from model import FasterRCNNResNet, arch_of, build_faster_rcnn, canonical_arch
from model.faster_rcnn_resnet import ResNetRoIHead, decom_resnet
from model.utils import cpu_conv
from model.utils.pretrained import PretrainedWeightsError
from trainer import FasterRCNNTrainer
from utils.checkpoint import load_checkpoint, model_from_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

N_FG_CLASS = 3
BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}  # Bottleneck blocks of layer1 ... layer4
HUB_FILES = {50: "resnet50-0676ba61.pth", 101: "resnet101-63fe2227.pth"}  # IMAGENET1K_V1
# small proposal counts: 64 RoIs in training, 16 at test, boxes down to 4 px at 128x160
PROPOSALS = {"n_train_pre_nms": 600, "n_train_post_nms": 64, "n_test_pre_nms": 300, "n_test_post_nms": 16,
             "min_size": 4}


# ---------------------------------------------------------------------------------------------- fixtures


@contextlib.contextmanager
def _one_thread():
    """The ``one_thread`` fixture for the module-scoped fixtures (set up before function-scoped ones)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _resnet50_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A torchvision-layout ResNet-50 state dict (``nn.BatchNorm2d`` keys, ``num_batches_tracked`` and
    ``fc.*`` included) that stands in for the ImageNet weights.

    Random convolutions and BatchNorm affines, with each block's last BatchNorm scale small (trained residual
    branches are small) and BatchNorm statistics measured on random images (so every layer sees normalised
    inputs, as with trained weights). With torchvision's random initialisation and frozen identity
    statistics instead, activations grow about 20x by layer3 and training diverges at once.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = torchvision.models.resnet50(weights=None)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.8, 1.2, generator=gen)
                m.bias.normal_(0, 0.1, generator=gen)
                m.momentum = None  # running statistics = the plain average over the batches seen
        for m in net.modules():  # after the loop above, which visits each block before its bn3
            if isinstance(m, Bottleneck):
                m.bn3.weight.uniform_(0.1, 0.3, generator=gen)
        net.train()
        net(torch.randn(2, 3, 128, 160, generator=gen))
    return net.state_dict()


def _cheap(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every tensor replaced by a constant expanded to its shape: the same keys, shapes and
    dtypes in a file of a few kilobytes."""
    return {k: torch.full((1,) * v.dim(), float(i), dtype=v.dtype).expand(v.shape) for i, (k, v) in
            enumerate(state.items())}


@pytest.fixture(scope="module")
def resnet50_file(tmp_path_factory):
    with _one_thread():
        state = _resnet50_state_dict()
    path = tmp_path_factory.mktemp("weights") / "resnet50_test.pth"
    torch.save(state, path)
    return path, state


def _model(path, seed: int = 0) -> FasterRCNNResNet:
    torch.manual_seed(seed)
    return FasterRCNNResNet(N_FG_CLASS, depth=50, anchor_scales=(2, 4), pretrained=path,
                            proposal_creator_params=PROPOSALS, min_size=128, max_size=160)


@pytest.fixture(scope="module")
def model(resnet50_file):
    """A ResNet-50 model on the test weights, for the tests that do not train it."""
    with _one_thread():
        return _model(resnet50_file[0]).eval()


def _trainer(model: FasterRCNNResNet) -> FasterRCNNTrainer:
    # 16 sampled RoIs instead of 128: layer4 on each RoI is most of a step's cost
    return FasterRCNNTrainer(model, seed=0, proposal_target_params={"n_sample": 16})


def scene(seed: int = 0, height: int = 128, width: int = 160):
    """A batch of one preprocessed-looking image with two bright rectangles, their boxes and labels."""
    rng = np.random.default_rng(seed)
    img = rng.normal(0, 0.5, (1, 3, height, width)).astype(np.float32)
    bbox = np.array([[16, 20, 80, 72], [40, 88, 112, 152]], dtype=np.float32)
    label = np.array([0, 2], dtype=np.int32)
    for (y0, x0, y1, x1), lb in zip(bbox.astype(int), label, strict=True):
        img[0, lb, y0:y1, x0:x1] += 2.0
    return torch.from_numpy(img), torch.from_numpy(bbox)[None], torch.from_numpy(label)[None], 1.0


def _frozen_names(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if not p.requires_grad]


# ---------------------------------------------------------------------------------------------- structure


@pytest.mark.parametrize("depth", [50, 101])
def test_structure_shapes_and_strides_on_the_meta_device(depth):
    with torch.device("meta"):
        model = FasterRCNNResNet(n_fg_class=80, depth=depth)
        features = model.extractor(torch.empty(1, 3, 224, 320))
        top = model.head.top(torch.empty(5, 1024, 14, 14))
    assert features.shape == (1, 1024, 14, 20) and top.shape == (5, 2048, 7, 7)
    extractor = model.extractor
    # the convolutions are cpu_conv.Conv2d (Winograd on the CPU where it is faster), as VGG16's
    assert [type(m) for m in extractor[:4]] == [cpu_conv.Conv2d, FrozenBatchNorm2d, nn.ReLU, nn.MaxPool2d]
    convs = [m for m in [*extractor.modules(), *model.head.top.modules()] if isinstance(m, nn.Conv2d)]
    assert all(type(m) is cpu_conv.Conv2d for m in convs)
    assert tuple(len(extractor[i]) for i in (4, 5, 6)) + (len(model.head.top),) == BLOCKS[depth]
    # torchvision's blocks stride in the 3x3 convolution: layer2, layer3 and layer4 halve, layer1 does not
    assert [extractor[i][0].conv2.stride for i in (4, 5, 6)] + [model.head.top[0].conv2.stride] == [
        (1, 1), (2, 2), (2, 2), (2, 2)]
    assert (model.rpn.conv1.in_channels, model.rpn.conv1.out_channels) == (1024, 512)
    assert model.head.cls_loc.weight.shape == (81 * 4, 2048) and model.head.score.weight.shape == (81, 2048)
    assert model.feat_stride == 16 and model.n_class == 81 and model.head.roi.outh == 14
    assert arch_of(model)["name"] == f"resnet{depth}" and model.normalize == "torchvision"

    # every normalisation frozen (buffers), conv1 and layer1 frozen, everything else trainable
    assert not any(isinstance(m, nn.modules.batchnorm._NormBase) for m in model.modules())
    n_bn = 1 + 3 * sum(BLOCKS[depth]) + 4  # bn1, three per block, one per stage's downsample
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules()) == n_bn
    assert not any(".bn" in name or "downsample.1" in name for name, _ in model.named_parameters())
    frozen = _frozen_names(model)
    assert frozen and all(name.startswith(("extractor.0.", "extractor.4.")) for name in frozen)
    assert len(frozen) == 1 + 3 * BLOCKS[depth][0] + 1  # conv1, layer1's convolutions and its downsample
    model.train()
    assert _frozen_names(model) == frozen  # train mode unfreezes nothing


def test_extractor_output_size_is_ceil_of_input_over_16(model):
    for h, w in ((128, 160), (100, 130), (33, 17)):  # (224, 320) and ResNet-101: on the meta device above
        with torch.no_grad():
            features = model.extractor(torch.randn(1, 3, h, w))
        assert features.shape == (1, 1024, -(-h // 16), -(-w // 16)), (h, w)


def test_head_pools_14x14_in_x_y_order_then_layer4_and_average(model):
    """An independent reference: torchvision's roi_pool (the same Caffe semantics as RoIPooling2D),
    layer4, the mean over the 7x7 cells, the two linear layers."""
    torch.manual_seed(1)
    features = torch.randn(2, 1024, 10, 12)
    rois = np.array([[16, 32, 112, 64], [0, 80, 48, 190], [5, 5, 150, 190]], dtype=np.float32)  # (y, x)
    roi_indices = np.array([1, 0, 1], dtype=np.int32)
    shapes = []
    hook = model.head.top.register_forward_hook(lambda m, i, o: shapes.append((i[0].shape, o.shape)))
    try:
        with torch.no_grad():
            roi_cls_locs, roi_scores = model.head(features, rois, roi_indices)
    finally:
        hook.remove()
    assert shapes == [((3, 1024, 14, 14), (3, 2048, 7, 7))]
    assert roi_cls_locs.shape == (3, (N_FG_CLASS + 1) * 4) and roi_scores.shape == (3, N_FG_CLASS + 1)

    boxes = torch.tensor([[1, 32, 16, 64, 112], [0, 80, 0, 190, 48], [1, 5, 5, 190, 150]],
                         dtype=torch.float32)  # (batch_index, x_min, y_min, x_max, y_max)
    with torch.no_grad():
        pool = torchvision.ops.roi_pool(features, boxes, (14, 14), 1 / 16)
        h = model.head.top(pool).mean(dim=(2, 3))
        torch.testing.assert_close(roi_cls_locs, model.head.cls_loc(h), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(roi_scores, model.head.score(h), rtol=1e-5, atol=1e-5)
        # tensors work as numpy arrays do; no RoI gives empty outputs
        again = model.head(features, torch.from_numpy(rois), torch.from_numpy(roi_indices))
        empty = model.head(features, np.zeros((0, 4), np.float32), np.zeros(0, np.int32))
    torch.testing.assert_close(again[0], roi_cls_locs, rtol=0, atol=0)
    assert empty[0].shape == (0, (N_FG_CLASS + 1) * 4) and empty[1].shape == (0, N_FG_CLASS + 1)


def test_head_init():
    torch.manual_seed(0)
    with torch.device("meta"):
        top = decom_resnet(50)[1]
    head = ResNetRoIHead(21, 14, 1 / 16, top)
    assert 0.0007 < head.cls_loc.weight.std() < 0.0013 and 0.007 < head.score.weight.std() < 0.013
    assert not head.cls_loc.bias.any() and not head.score.bias.any()


def test_channels_last_with_frozen_conv1_same_outputs(model):
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    rois = np.array([[10, 20, 60, 90], [0, 0, 64, 96]], dtype=np.float32)

    def outputs(x):
        features = model.extractor(x)
        rpn_locs, rpn_scores, *_ = model.rpn(features, x.shape[2:])
        return (features, rpn_locs, rpn_scores, *model.head(features, rois, np.zeros(2, np.int32)))

    with torch.no_grad():
        expected = outputs(x)
        model.to(memory_format=torch.channels_last)
        try:
            # conv1 is frozen but still a parameter: the memory-format rule reads it
            assert not model.extractor[0].weight.requires_grad
            assert model._extractor_memory_format() == torch.channels_last
            got = outputs(x.contiguous(memory_format=torch.channels_last))
        finally:
            model.to(memory_format=torch.contiguous_format)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    assert model._extractor_memory_format() == torch.contiguous_format
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------- weights


def _loaded_state(extractor: nn.Sequential, top: nn.Sequential) -> dict[str, torch.Tensor]:
    """The decomposed backbone's tensors under torchvision's key names."""
    parts = {"conv1": extractor[0], "bn1": extractor[1], "layer1": extractor[4], "layer2": extractor[5],
             "layer3": extractor[6], "layer4": top}
    return {f"{prefix}.{k}": v for prefix, part in parts.items() for k, v in part.state_dict().items()}


def _check_loaded(extractor, top, state):
    loaded = _loaded_state(extractor, top)
    expected = {k: v for k, v in state.items() if not k.startswith("fc.") and "num_batches_tracked" not in k}
    assert list(loaded) == list(expected)
    for k, v in expected.items():
        assert torch.equal(loaded[k], v.float()), k
        assert loaded[k].dtype == torch.float32 and loaded[k].device.type == "cpu", k
        assert loaded[k].is_contiguous(), k
    assert not extractor[0].weight.requires_grad and not extractor[4][0].conv1.weight.requires_grad
    assert extractor[5][0].conv1.weight.requires_grad and top[0].conv1.weight.requires_grad


def test_decom_resnet_loads_a_torchvision_state_dict_file(resnet50_file):
    path, state = resnet50_file
    assert "layer1.0.bn1.num_batches_tracked" in state and "fc.weight" in state  # nn.BatchNorm2d layout
    extractor, top = decom_resnet(50, pretrained=path)
    _check_loaded(extractor, top, state)
    # frozen BatchNorm computes what torchvision's BatchNorm computes in eval mode with the same weights
    # (the reference in float64)
    r = torchvision.models.resnet50(weights=None)
    r.load_state_dict(state)
    r.double().eval()
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = r.layer3(r.layer2(r.layer1(r.maxpool(r.relu(r.bn1(r.conv1(x.double())))))))
        features = extractor(x)
        torch.testing.assert_close(features, expected.float(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(top(features), r.layer4(expected).float(), rtol=1e-4, atol=1e-4)


def test_decom_resnet_loads_a_file_without_num_batches_tracked_or_fc(tmp_path, resnet50_file):
    # torchvision's IMAGENET1K_V1 files predate num_batches_tracked; a backbone-only file has no fc
    state = {k: v for k, v in _cheap(resnet50_file[1]).items()
             if "num_batches_tracked" not in k and not k.startswith("fc.")}
    torch.save(state, tmp_path / "v1_layout.pth")
    extractor, top = decom_resnet(50, pretrained=str(tmp_path / "v1_layout.pth"))
    _check_loaded(extractor, top, state)


def test_decom_resnet_bad_files_are_clear_errors_naming_the_file(tmp_path, resnet50_file):
    state = _cheap(resnet50_file[1])
    missing = dict(state)
    del missing["layer3.5.bn3.running_var"]
    cases = {
        "missing.pth": (missing, "missing keys.*layer3.5.bn3.running_var"),
        "shape.pth": (dict(state, **{"conv1.weight": torch.zeros(64, 3, 5, 5)}),
                      r"conv1.weight: \(64, 3, 5, 5\) instead of \(64, 3, 7, 7\)"),
        "extra.pth": (dict(state, **{"layer5.0.weight": torch.zeros(1)}), "unexpected keys.*layer5.0.weight"),
        "checkpoint.pth": ({"model": {}, "arch": {}}, "Faster R-CNN checkpoint"),
        "list.pth": ([1, 2], "expected a ResNet state dict, found a list"),
        "vgg16.pth": ({"features.0.weight": torch.zeros(64, 3, 3, 3)}, "missing keys.*conv1.weight"),
    }
    for name, (content, message) in cases.items():
        torch.save(content, tmp_path / name)
        with pytest.raises(PretrainedWeightsError, match=message) as info:
            decom_resnet(50, pretrained=tmp_path / name)
        assert name in str(info.value)
    # a ResNet-50 file for a ResNet-101: layer3's blocks 6 ... 22 are missing
    with pytest.raises(PretrainedWeightsError, match=r"ResNet-101 state dict.*missing keys.*layer3\.6\."):
        decom_resnet(101, pretrained=tmp_path / "missing.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a state dict")
    with pytest.raises(PretrainedWeightsError, match="garbage.pth"):
        decom_resnet(50, pretrained=str(tmp_path / "garbage.pth"))
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        decom_resnet(50, pretrained=tmp_path / "nowhere.pth")
    with pytest.raises(ValueError, match="depth must be one of"):
        decom_resnet(34)


def _no_download(*args, **kwargs):
    raise urllib.error.URLError("network is unreachable")


@pytest.mark.parametrize("depth", [50, 101])
def test_torchvision_weights_offline_error_names_the_hub_cache_file(tmp_path, monkeypatch, depth):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_download)
    with pytest.raises(PretrainedWeightsError) as info:
        FasterRCNNResNet(depth=depth, pretrained="torchvision")
    message = str(info.value)
    assert str(tmp_path / "checkpoints" / HUB_FILES[depth]) in message  # the V1 weights
    assert f"ResNet-{depth}" in message and "pretrained=PATH" in message
    assert "network is unreachable" in message
    assert info.value.__cause__ is None and info.value.__context__ is None


def test_torchvision_weights_load_from_the_hub_cache(tmp_path, monkeypatch, resnet50_file):
    path, state = resnet50_file
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / HUB_FILES[50]).symlink_to(path)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_download)
    extractor, top = decom_resnet(50, pretrained="torchvision")
    _check_loaded(extractor, top, state)


# ---------------------------------------------------------------------------------------------- training


def test_a_training_step_updates_only_the_trainable_parts(resnet50_file):
    model = _model(resnet50_file[0]).train()
    trainer = _trainer(model)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in optimised for name, p in model.named_parameters() if name in frozen)
    buffers = {name for name, _ in model.named_buffers()}
    assert any(name.endswith("running_var") for name in buffers)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    losses = trainer.train_step(*scene())
    assert all(np.isfinite(v.item()) for v in losses)
    assert model.training
    after = model.state_dict()
    for name in buffers & set(before):  # BatchNorm statistics and affines
        assert torch.equal(after[name], before[name]), name
    for name, p in model.named_parameters():
        if name in frozen:
            assert p.grad is None and torch.equal(p, before[name]), name
        else:
            assert p.grad is not None and not torch.equal(p, before[name]), name


def _mean_loss(trainer: FasterRCNNTrainer, batch) -> float:
    """The total loss of ``batch`` averaged over three fixed samplings of anchors and RoIs."""
    values = []
    for seed in (11, 12, 13):
        trainer.rng = np.random.default_rng(seed)
        with torch.no_grad():
            values.append(trainer.forward(*batch).total_loss.item())
    trainer.rng = np.random.default_rng(0)
    return float(np.mean(values))


def test_a_few_steps_on_one_image_lower_the_loss(resnet50_file):
    trainer = _trainer(_model(resnet50_file[0]).train())
    batch = scene()
    before = _mean_loss(trainer, batch)
    for _ in range(10):
        trainer.train_step(*batch)
    after = _mean_loss(trainer, batch)
    assert after < 0.6 * before, (before, after)


# ---------------------------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_rebuilds_the_same_detector(tmp_path, model):
    path = FasterRCNNTrainer(model).save(tmp_path / "resnet50.pth", save_optimizer=False)
    ckpt = load_checkpoint(path)
    assert ckpt["arch"] == arch_of(model) and ckpt["arch"]["name"] == "resnet50"
    rebuilt = model_from_checkpoint(ckpt, path)
    assert type(rebuilt) is FasterRCNNResNet and rebuilt.depth == 50 and arch_of(rebuilt) == arch_of(model)
    assert rebuilt.rpn.proposal_creator_params == model.rpn.proposal_creator_params
    for (k, v), (k2, v2) in zip(model.state_dict().items(), rebuilt.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2), k

    img = scene()[0][0].numpy()
    expected = model.predict([img], [(128, 160)], score_thresh=0.0)
    got = rebuilt.predict([img], [(128, 160)], score_thresh=0.0)
    assert len(expected[0][0]) > 0
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_array_equal(e[0], g[0])

    # resuming into a freshly built model of the same architecture
    resumed = FasterRCNNTrainer(_model(None, seed=1))
    resumed.load(path)
    torch.testing.assert_close(resumed.faster_rcnn.state_dict(), model.state_dict(), rtol=0, atol=0)


@pytest.mark.parametrize("depth", [50, 101])
def test_build_faster_rcnn_rebuilds_resnet_archs(depth):
    with torch.device("meta"):
        model = FasterRCNNResNet(
            n_fg_class=80, depth=depth, anchor_scales=(4, 8, 16, 32), rpn_channels=1024,
            proposal_creator_params={"n_test_post_nms": 1000}, min_size=800, max_size=1333)
        arch = arch_of(model)
        rebuilt = build_faster_rcnn(arch)
    assert arch["name"] == f"resnet{depth}" and "depth" not in arch and "pretrained" not in arch
    assert all(isinstance(v, (str, int, float, bool, list, dict)) for v in arch.values())
    assert canonical_arch(arch) == arch  # recorded in full
    assert type(rebuilt) is FasterRCNNResNet and rebuilt.depth == depth and arch_of(rebuilt) == arch
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()}
    assert rebuilt.rpn.conv1.out_channels == 1024 and rebuilt.rpn.proposal_layer.n_test_post_nms == 1000
    assert (rebuilt.min_size, rebuilt.max_size) == (800, 1333)

    # an arch written without the proposal settings means the original's counts
    old = {k: v for k, v in arch.items() if k != "proposal_creator_params"}
    assert canonical_arch(old)["proposal_creator_params"]["n_test_post_nms"] == 300
    # entries of another backbone, or a depth the name contradicts, are refused before anything is built
    with pytest.raises(ValueError, match=rf"'resnet{depth}'.*use_drop"):
        build_faster_rcnn(dict(arch, use_drop=False))
    with pytest.raises(ValueError, match=rf"'resnet{depth}'.*depth"):
        build_faster_rcnn(dict(arch, depth=152))


# ---------------------------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_predict_cuda_matches_cpu(model):
    img = scene()[0][0].numpy()
    expected = model.predict([img], [(128, 160)], score_thresh=0.0)
    model.to("cuda")
    try:
        got = model.predict([img], [(128, 160)], score_thresh=0.0)
    finally:
        model.to("cpu")
    np.testing.assert_allclose(got[2][0], expected[2][0], atol=1e-3)
    np.testing.assert_allclose(got[0][0], expected[0][0], atol=0.5)


def test_train_py_builds_the_resnet_of_its_options(resnet50_file):
    """``--backbone=resnet50`` with ``--backbone-weights`` (the offline path) builds the C4 model from that
    file, with the run's anchors and proposal counts; ``--caffe-pretrain`` (VGG16's caffe weights) is
    refused."""
    from train import build_model
    from utils.config import Config, ConfigError

    path, state = resnet50_file
    cfg = Config.parse({"backbone": "resnet50", "backbone_weights": str(path), "n_test_post_nms": 77,
                        "min_size": 128, "max_size": 160})
    model = build_model(cfg, n_fg_class=3)
    assert isinstance(model, FasterRCNNResNet) and model.arch["name"] == "resnet50"
    assert model.arch["proposal_creator_params"]["n_test_post_nms"] == 77 and model.normalize == "torchvision"
    assert torch.equal(model.extractor[0].weight, state["conv1.weight"])
    with pytest.raises(ConfigError, match="--caffe-pretrain .* needs --backbone=vgg16"):
        Config.parse({"backbone": "resnet101", "caffe_pretrain": True})
