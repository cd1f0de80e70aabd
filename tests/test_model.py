"""The model: RPN anchors and score layout, forward/backward, predict, per-class NMS, weights loading, arch.

A full VGG16 forward at 600x800 takes about 2 s on 2 cores, so the tests share one randomly initialised
model (built with ``min_size=240``, so ``predict`` works at about 240x360) and use small inputs.
"""

import urllib.error

import numpy as np
import pytest
import torch
import torchvision
from skimage import data as skimage_data
from torch.nn import functional as F

from data.dataset import preprocess
from model import FasterRCNNVGG16, arch_of, build_faster_rcnn
from model.faster_rcnn import _batched_nms, _loc2bbox
from model.faster_rcnn_vgg16 import decom_vgg16
from model.region_proposal_network import RegionProposalNetwork, _enumerate_shifted_anchor
from model.utils.bbox_tools import generate_anchor_base, loc2bbox
from model.utils.nms import non_maximum_suppression
from model.utils.pretrained import PretrainedWeightsError

N_FG_CLASS = 20
FROZEN_CONVS = (0, 2, 5, 7)  # conv1_1, conv1_2, conv2_1, conv2_2 in extractor / VGG16 features
TRAINABLE_CONVS = (10, 12, 14, 17, 19, 21, 24, 26, 28)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return FasterRCNNVGG16(n_fg_class=N_FG_CLASS, min_size=240, max_size=400)


@pytest.fixture
def confident_head(model):
    """Make the head sure of foreground class ``label`` (score bias); restored afterwards."""
    saved = model.head.score.bias.detach().clone()

    def set_bias(bias):
        with torch.no_grad():
            model.head.score.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))

    yield set_bias
    set_bias(saved)


def _image(h=224, w=288, seed=0):
    return torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _random_bbox(rng, n, size=200.0):
    yx = rng.uniform(0, size, (n, 2))
    hw = rng.uniform(4, size / 2, (n, 2))
    return np.concatenate((yx, yx + hw), axis=1).astype(np.float32)


# ---------------------------------------------------------------------------------------------- RPN


def test_enumerate_shifted_anchor_matches_loop():
    rng = np.random.default_rng(0)
    anchor_base = rng.normal(0, 50, (5, 4)).astype(np.float32)
    height, width, stride = 3, 7, 16
    anchor = _enumerate_shifted_anchor(anchor_base, stride, height, width)
    expected = []
    for y in range(height):
        for x in range(width):
            for a in range(len(anchor_base)):
                expected.append(anchor_base[a] + np.array([y * stride, x * stride, y * stride, x * stride]))
    assert anchor.dtype == np.float32
    np.testing.assert_array_equal(anchor, np.array(expected, dtype=np.float32))


def test_enumerate_shifted_anchor_centres():
    # the 9 standard anchors of cell (y, x) are centred on (16 y + 8, 16 x + 8)
    anchor = _enumerate_shifted_anchor(generate_anchor_base(), 16, 37, 50).reshape(37, 50, 9, 4)
    centre = (anchor[..., :2] + anchor[..., 2:]) / 2
    ys, xs = np.meshgrid(np.arange(37), np.arange(50), indexing="ij")
    np.testing.assert_allclose(centre[..., 0], np.repeat(16 * ys[..., None] + 8, 9, axis=2), atol=1e-4)
    np.testing.assert_allclose(centre[..., 1], np.repeat(16 * xs[..., None] + 8, 9, axis=2), atol=1e-4)


def test_rpn_shapes_and_proposal_caps():
    torch.manual_seed(0)
    rpn = RegionProposalNetwork(in_channels=8, mid_channels=8)
    with torch.no_grad():  # scatter the boxes so that enough of them survive NMS for the caps to bind
        rpn.loc.weight.normal_(0, 1.0)
    n, hh, ww = 2, 38, 50
    x = torch.randn(n, 8, hh, ww)
    img_size = (hh * 16, ww * 16)
    for training, cap in ((True, 2000), (False, 300)):
        rpn.train(training)
        rpn_locs, rpn_scores, rois, roi_indices, anchor = rpn(x, img_size)
        s = hh * ww * 9
        assert rpn_locs.shape == (n, s, 4) and rpn_scores.shape == (n, s, 2)
        assert anchor.shape == (s, 4) and anchor.dtype == np.float32
        assert rois.dtype == np.float32 and roi_indices.dtype == np.int32
        np.testing.assert_array_equal(np.bincount(roi_indices, minlength=n), [cap, cap])
        assert np.all(roi_indices[:-1] <= roi_indices[1:])
        assert rois[:, 0::2].min() >= 0 and rois[:, 0::2].max() <= img_size[0]
        assert rois[:, 1::2].min() >= 0 and rois[:, 1::2].max() <= img_size[1]
        assert rpn_locs.requires_grad and rpn_scores.requires_grad


def test_rpn_ranks_proposals_by_softmax_foreground_channel():
    """Logits per location are [a0_bg, a0_fg, a1_bg, a1_fg, ...]; proposals are ranked by the softmax
    foreground probability, not by the raw foreground logit (the original's issue #67)."""
    rpn = RegionProposalNetwork(in_channels=1, mid_channels=1)
    p, q = 3, 4  # base anchors 3 (128 x 128) and 4 (256 x 256)
    with torch.no_grad():
        for layer in (rpn.conv1, rpn.score, rpn.loc):
            layer.weight.zero_()
            layer.bias.zero_()
        rpn.conv1.weight[0, 0, 1, 1] = 1.0  # h = relu(x)
        # [bg, fg] logits: p has fg logit 5, fg probability sigmoid(1); q fg logit 3, probability sigmoid(6)
        rpn.score.weight[2 * p: 2 * p + 2, 0, 0, 0] = torch.tensor([4.0, 5.0])
        rpn.score.weight[2 * q: 2 * q + 2, 0, 0, 0] = torch.tensor([-3.0, 3.0])
    rpn.eval()
    hh, ww, cy, cx = 38, 50, 5, 7
    x = torch.zeros(1, 1, hh, ww)
    x[0, 0, cy, cx] = 1.0  # only cell (5, 7) differs from probability 0.5
    rpn_locs, rpn_scores, rois, _, anchor = rpn(x, (hh * 16, ww * 16))

    k = (cy * ww + cx) * 9  # first anchor of the cell
    np.testing.assert_allclose(rpn_scores[0, k + p].detach().numpy(), [4.0, 5.0])
    np.testing.assert_allclose(rpn_scores[0, k + q].detach().numpy(), [-3.0, 3.0])
    np.testing.assert_array_equal(rpn_locs.detach().numpy(), 0)
    np.testing.assert_allclose(anchor[k + q], generate_anchor_base()[q] + [80, 112, 80, 112])
    # q first (probability 0.9975 > 0.73 although its fg logit is lower), then p; boxes = clipped anchors
    np.testing.assert_allclose(rois[0], np.clip(anchor[k + q], 0, None), atol=1e-4)
    np.testing.assert_allclose(rois[1], anchor[k + p], atol=1e-4)


# ---------------------------------------------------------------------------------------------- forward


def test_forward_shapes_train_and_eval(model, monkeypatch):
    seen = []
    layer = model.rpn.proposal_layer
    original_call = type(layer).__call__
    monkeypatch.setattr(type(layer), "__call__", lambda self, *a, **kw: seen.append(kw["training"])
                        or original_call(self, *a, **kw))
    x = _image()
    n_class = N_FG_CLASS + 1
    try:
        for training, cap in ((True, 2000), (False, 300)):
            model.train(training)
            with torch.no_grad():
                roi_cls_locs, roi_scores, rois, roi_indices = model(x, scale=1.0)
            r = len(rois)
            assert 0 < r <= cap
            assert roi_cls_locs.shape == (r, n_class * 4) and roi_scores.shape == (r, n_class)
            assert rois.shape == (r, 4) and rois.dtype == np.float32
            assert roi_indices.shape == (r,) and roi_indices.dtype == np.int32 and not roi_indices.any()
            assert rois[:, 0::2].min() >= 0 and rois[:, 2].max() <= 224
            assert rois[:, 1::2].min() >= 0 and rois[:, 3].max() <= 288
            assert torch.isfinite(roi_cls_locs).all() and torch.isfinite(roi_scores).all()
    finally:
        model.eval()
    assert seen == [True, False]


def test_backward_reaches_trainable_layers_only(model):
    model.train()
    model.zero_grad(set_to_none=True)
    x = _image(128, 160, seed=1)
    # extractor, RPN and head as the trainer runs them, with a loss touching every output
    features = model.extractor(x)
    rpn_locs, rpn_scores, rois, roi_indices, _ = model.rpn(features, x.shape[2:])
    roi_cls_locs, roi_scores = model.head(features, rois[:64], roi_indices[:64])
    loss = rpn_locs.square().mean() + F.log_softmax(rpn_scores, 2)[..., 1].mean()
    loss = loss + roi_cls_locs.square().mean() + F.log_softmax(roi_scores, 1)[:, 0].mean()
    loss.backward()
    model.eval()

    for i in FROZEN_CONVS:
        for p in model.extractor[i].parameters():
            assert not p.requires_grad and p.grad is None
    for i in TRAINABLE_CONVS:
        assert model.extractor[i].weight.requires_grad
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    model.zero_grad(set_to_none=True)


def test_channels_last_same_features_and_names(model):
    x = _image(seed=2)
    keys = list(model.state_dict())
    rois = np.array([[10, 20, 100, 200], [0, 0, 224, 288]], dtype=np.float32)
    with torch.no_grad():
        ref_features = model.extractor(x)
        ref_head = model.head(ref_features, rois, np.zeros(2, np.int32))
        model.to(memory_format=torch.channels_last)
        try:
            assert model._extractor_memory_format() == torch.channels_last
            features = model.extractor(x.contiguous(memory_format=torch.channels_last))
            assert features.is_contiguous(memory_format=torch.channels_last)
            head = model.head(features, rois, np.zeros(2, np.int32))
            assert list(model.state_dict()) == keys
        finally:
            model.to(memory_format=torch.contiguous_format)
    assert model._extractor_memory_format() == torch.contiguous_format
    torch.testing.assert_close(features, ref_features, rtol=1e-4, atol=1e-4)
    for a, b in zip(head, ref_head, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_head_pools_rois_in_x_y_order(model):
    """The head swaps (y, x) to RoIPooling2D's (batch_index, x_min, y_min, x_max, y_max)."""
    features = torch.randn(2, 512, 14, 18)
    rois = np.array([[16, 32, 112, 64], [0, 80, 48, 288]], dtype=np.float32)  # (y_min, x_min, y_max, x_max)
    roi_indices = np.array([1, 0], dtype=np.int32)
    with torch.no_grad():
        roi_cls_locs, roi_scores = model.head(features, rois, roi_indices)
        boxes = torch.tensor([[1, 32, 16, 64, 112], [0, 80, 0, 288, 48]], dtype=torch.float32)
        pool = torchvision.ops.roi_pool(features, boxes, (7, 7), 1 / 16)
        fc7 = model.head.classifier(pool.flatten(1))
    torch.testing.assert_close(roi_cls_locs, model.head.cls_loc(fc7), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(roi_scores, model.head.score(fc7), rtol=1e-5, atol=1e-5)


def test_head_init_and_layout(model):
    assert model.head.cls_loc.weight.shape == (84, 4096) and model.head.score.weight.shape == (21, 4096)
    assert 0.0007 < model.head.cls_loc.weight.std() < 0.0013 and 0.007 < model.head.score.weight.std() < 0.013
    assert 0.007 < model.rpn.conv1.weight.std() < 0.013
    assert model.n_class == 21 and model.feat_stride == 16
    classifier = [type(m) for m in model.head.classifier]
    assert classifier == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear, torch.nn.ReLU]


# ---------------------------------------------------------------------------------------------- predict


def _check_detections(bboxes, labels, scores, sizes, n_fg_class=N_FG_CLASS):
    for bbox, label, score, (h, w) in zip(bboxes, labels, scores, sizes, strict=True):
        assert bbox.dtype == np.float32 and label.dtype == np.int32 and score.dtype == np.float32
        assert bbox.shape == (len(label), 4) and score.shape == label.shape
        assert np.all(bbox[:, 0::2] >= 0) and np.all(bbox[:, 0::2] <= h)
        assert np.all(bbox[:, 1::2] >= 0) and np.all(bbox[:, 1::2] <= w)
        assert np.all((label >= 0) & (label < n_fg_class))
        assert np.all((score >= 0) & (score <= 1))
        assert np.all(np.diff(label) >= 0)  # class by class
        for lab in np.unique(label):
            assert np.all(np.diff(score[label == lab]) <= 0)  # best first within a class


def test_predict_visualize_on_photo_restores_mode_and_thresholds(model, confident_head):
    bias = np.zeros(N_FG_CLASS + 1, np.float32)
    bias[5] = 12.0  # the head is sure of head class 5, i.e. label 4
    confident_head(bias)
    img = skimage_data.astronaut().transpose(2, 0, 1).astype(np.float32)  # (3, 512, 512) RGB 0-255
    model.train()
    model.nms_thresh, model.score_thresh = 0.45, 0.2
    bboxes, labels, scores = model.predict([img], visualize=True)
    assert model.training and (model.nms_thresh, model.score_thresh) == (0.45, 0.2)
    model.eval()
    model.use_preset("evaluate")
    _check_detections(bboxes, labels, scores, [(512, 512)])
    assert len(labels[0]) > 0 and np.all(labels[0] == 4) and np.all(scores[0] > 0.7)


def test_predict_preprocessed_equals_visualize(model, confident_head):
    bias = np.zeros(N_FG_CLASS + 1, np.float32)
    bias[[3, 8]] = 12.0  # two classes at about 0.11 each: above the evaluate threshold 0.05 only
    bias[11] = 14.0  # one at about 0.79: above the visualize threshold 0.7
    confident_head(bias)
    raw = skimage_data.chelsea().transpose(2, 0, 1).astype(np.float32)  # (3, 300, 451)
    size = raw.shape[1:]
    pre = preprocess(raw, model.min_size, model.max_size, model.normalize)
    model.eval()
    bboxes, labels, scores = model.predict([pre], [torch.tensor(size)])  # the evaluate preset
    _check_detections(bboxes, labels, scores, [size])
    assert set(np.unique(labels[0])) == {2, 7, 10}

    model.use_preset("visualize")
    try:
        expected = model.predict([pre], [size])
    finally:
        model.use_preset("evaluate")
    got = model.predict([raw], visualize=True)
    assert len(got[1][0]) > 0 and np.all(got[1][0] == 10)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a[0], b[0])
    assert (model.nms_thresh, model.score_thresh) == (0.3, 0.05) and not model.training

    with pytest.raises(ValueError, match="sizes"):
        model.predict([pre])


def test_predict_matches_per_class_reference(model, confident_head):
    """predict's on-device decoding and class-offset NMS equal the original's numpy, one class at a time."""
    rng = np.random.default_rng(3)
    confident_head(rng.uniform(0, 2.5, N_FG_CLASS + 1).astype(np.float32))
    img = _image(240, 320, seed=3)[0]
    size = (300, 400)
    bboxes, labels, scores = model.predict([img], [size])

    with torch.no_grad():
        roi_cls_loc, roi_score, rois, _ = model(img[None], scale=240 / 300)
    roi = rois / np.array([0.8, 0.8, 0.8, 0.8], np.float32)
    std, mean = np.tile([0.1, 0.1, 0.2, 0.2], 21), np.zeros(84)
    roi_cls_loc = (roi_cls_loc.numpy() * std + mean).astype(np.float32)
    cls_bbox = loc2bbox(np.repeat(roi, 21, axis=0), roi_cls_loc.reshape(-1, 4)).reshape(-1, 21, 4)
    cls_bbox[..., 0::2] = np.clip(cls_bbox[..., 0::2], 0, 300)
    cls_bbox[..., 1::2] = np.clip(cls_bbox[..., 1::2], 0, 400)
    prob = F.softmax(roi_score, dim=1).numpy()
    ref_bbox, ref_label, ref_score = [], [], []
    for c in range(1, 21):
        mask = prob[:, c] > 0.05
        bbox_c, prob_c = cls_bbox[mask, c], prob[mask, c]
        keep = non_maximum_suppression(bbox_c, 0.3, prob_c)
        ref_bbox.append(bbox_c[keep])
        ref_label.append(np.full(len(keep), c - 1))
        ref_score.append(prob_c[keep])
    ref_label = np.concatenate(ref_label)
    assert len(np.unique(ref_label)) >= 3 and len(ref_label) > 10
    np.testing.assert_array_equal(labels[0], ref_label)
    np.testing.assert_allclose(scores[0], np.concatenate(ref_score), rtol=1e-6)
    np.testing.assert_allclose(bboxes[0], np.concatenate(ref_bbox), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batched_nms_equals_per_class_loop(seed):
    rng = np.random.default_rng(seed)
    n, n_label = 600, 7
    bbox = torch.from_numpy(_random_bbox(rng, n))
    score = torch.from_numpy(np.round(rng.uniform(0, 1, n), 1).astype(np.float32))  # many ties
    label = torch.from_numpy(rng.integers(0, n_label, n))
    thresh = 0.4
    keep = _batched_nms(bbox, score, label, thresh, max_coord=300.0)
    expected = []
    for c in range(n_label):
        idx = torch.nonzero(label == c)[:, 0]
        kept = non_maximum_suppression(bbox[idx].numpy(), thresh, score[idx].numpy())
        expected.append(idx[torch.from_numpy(kept.astype(np.int64))])
    torch.testing.assert_close(keep, torch.cat(expected))
    assert len(keep) < n  # something was suppressed


def test_batched_nms_rejects_non_positive_thresh():
    bbox = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    with pytest.raises(ValueError, match="> 0"):
        _batched_nms(bbox, torch.ones(1), torch.zeros(1, dtype=torch.int64), 0.0, max_coord=10.0)


def test_loc2bbox_torch_matches_numpy():
    rng = np.random.default_rng(0)
    src = _random_bbox(rng, 50)
    loc = rng.normal(0, 0.5, (50, 3, 4)).astype(np.float32)
    got = _loc2bbox(torch.from_numpy(src)[:, None, :], torch.from_numpy(loc))
    expected = loc2bbox(src, loc.reshape(50, 12)).reshape(50, 3, 4)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_predict_cuda_matches_cpu(model, confident_head):
    bias = np.zeros(N_FG_CLASS + 1, np.float32)
    bias[5] = 12.0
    confident_head(bias)
    img = skimage_data.astronaut().transpose(2, 0, 1).astype(np.float32)
    expected = model.predict([img], visualize=True)
    model.to("cuda")
    try:
        got = model.predict([img], visualize=True)
    finally:
        model.to("cpu")
    np.testing.assert_array_equal(got[1][0], expected[1][0])
    np.testing.assert_allclose(got[0][0], expected[0][0], atol=0.5)


# ---------------------------------------------------------------------------------------------- weights


def _vgg16_state_dict(seed=0):
    """A torchvision-layout VGG16 state dict: random convs, and fc6/fc7/fc8 as cheap constant tensors
    (expanded from one value, so the file stays small) whose values identify them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in torchvision.models.vgg16(weights=None).state_dict().items()}
    state = {}
    for i, (k, shape) in enumerate(shapes.items()):
        if k.startswith("features"):
            state[k] = torch.randn(shape, generator=gen) * 0.01
        else:
            state[k] = torch.full((1,) * len(shape), float(i)).expand(shape)
    return state


@pytest.fixture(scope="module")
def vgg16_file(tmp_path_factory):
    state = _vgg16_state_dict()
    path = tmp_path_factory.mktemp("weights") / "vgg16_converted.pth"
    torch.save(state, path)
    return path, state


def _check_loaded(extractor, classifier, state, use_drop):
    for i in FROZEN_CONVS + TRAINABLE_CONVS:
        torch.testing.assert_close(extractor[i].weight, state[f"features.{i}.weight"], rtol=0, atol=0)
        torch.testing.assert_close(extractor[i].bias, state[f"features.{i}.bias"], rtol=0, atol=0)
        assert extractor[i].weight.requires_grad == (i not in FROZEN_CONVS)
        assert extractor[i].weight.device.type == "cpu" and extractor[i].weight.is_contiguous()
    fc6, fc7 = classifier[0], classifier[3 if use_drop else 2]
    assert torch.equal(fc6.weight, state["classifier.0.weight"]) and fc6.weight.requires_grad
    assert torch.equal(fc7.bias, state["classifier.3.bias"]) and fc7.bias.requires_grad


@pytest.mark.parametrize("use_drop", [False, True])
def test_decom_vgg16_loads_state_dict_file(vgg16_file, use_drop):
    path, state = vgg16_file
    extractor, classifier = decom_vgg16(pretrained=path, use_drop=use_drop)
    assert len(extractor) == 30 and isinstance(extractor[29], torch.nn.ReLU)
    expected = ["0", "2"] if not use_drop else ["0", "3"]
    assert sorted({k.split(".")[0] for k in classifier.state_dict()}) == expected
    assert any(isinstance(m, torch.nn.Dropout) for m in classifier) == use_drop
    _check_loaded(extractor, classifier, state, use_drop)


def test_decom_vgg16_bad_files(tmp_path, vgg16_file):
    _, state = vgg16_file
    missing = dict(state)
    del missing["features.28.bias"]
    wrong_shape = dict(state, **{"features.0.weight": torch.zeros(64, 3, 5, 5)})
    extra = dict(state, **{"features.30.weight": torch.zeros(1)})
    cases = {
        "missing.pth": (missing, "missing keys.*features.28.bias"),
        "shape.pth": (wrong_shape, r"features.0.weight: \(64, 3, 5, 5\) instead of \(64, 3, 3, 3\)"),
        "extra.pth": (extra, "unexpected keys.*features.30.weight"),
        "checkpoint.pth": ({"model": {}, "config": {}}, "Faster R-CNN checkpoint"),
    }
    for name, (content, message) in cases.items():
        torch.save(content, tmp_path / name)
        with pytest.raises(ValueError, match=message) as info:
            decom_vgg16(pretrained=tmp_path / name)
        assert name in str(info.value)
    (tmp_path / "garbage.pth").write_bytes(b"not a state dict")
    with pytest.raises(PretrainedWeightsError, match="garbage.pth"):
        decom_vgg16(pretrained=str(tmp_path / "garbage.pth"))
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        decom_vgg16(pretrained=tmp_path / "nowhere.pth")


def _no_download(*args, **kwargs):
    raise urllib.error.URLError("network is unreachable")


def test_decom_vgg16_torchvision_offline_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_download)
    with pytest.raises(PretrainedWeightsError) as info:
        decom_vgg16(pretrained="torchvision")
    message = str(info.value)
    assert str(tmp_path / "checkpoints" / "vgg16-397923af.pth") in message
    assert "pretrained=PATH" in message and "misc/convert_caffe_pretrain.py" in message
    assert "network is unreachable" in message
    # one error, not a chain of three tracebacks (the download's, urllib's, ours)
    assert info.value.__cause__ is None and info.value.__context__ is None


def test_decom_vgg16_torchvision_from_hub_cache(tmp_path, monkeypatch, vgg16_file):
    path, state = vgg16_file
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "vgg16-397923af.pth").symlink_to(path)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_download)
    extractor, classifier = decom_vgg16(pretrained="torchvision")
    _check_loaded(extractor, classifier, state, use_drop=False)


# ---------------------------------------------------------------------------------------------- arch


def test_build_faster_rcnn_rebuilds_arch(model):
    arch = arch_of(model)
    assert arch["name"] == "vgg16" and arch["n_fg_class"] == N_FG_CLASS and arch["min_size"] == 240
    assert all(isinstance(v, (str, int, float, bool, list, dict)) for v in arch.values())
    rebuilt = build_faster_rcnn(arch)
    assert type(rebuilt) is FasterRCNNVGG16 and arch_of(rebuilt) == arch
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    assert (rebuilt.min_size, rebuilt.max_size) == (240, 400)
    with pytest.raises(ValueError, match="'resnet152'"):
        build_faster_rcnn(dict(arch, name="resnet152"))
    unknown = r"'resnet101' has entries its constructor does not take: \['use_drop'\]"
    with pytest.raises(ValueError, match=unknown):
        build_faster_rcnn(dict(arch, name="resnet101"))  # refused before a ResNet-101 is built


def test_use_drop_and_preset_names(vgg16_file):
    path, _ = vgg16_file
    m = FasterRCNNVGG16(n_fg_class=3, pretrained=path, use_drop=True, normalize="caffe")
    keys = [k for k in m.state_dict() if k.startswith("head.")]
    assert keys == ["head.classifier.0.weight", "head.classifier.0.bias", "head.classifier.3.weight",
                    "head.classifier.3.bias", "head.cls_loc.weight", "head.cls_loc.bias", "head.score.weight",
                    "head.score.bias"]
    assert m.head.cls_loc.out_features == 16 and m.n_class == 4
    assert arch_of(m)["use_drop"] is True and arch_of(m)["normalize"] == "caffe"
    with pytest.raises(ValueError, match="preset"):
        m.use_preset("fast")
    m.use_preset("visualize")
    assert (m.nms_thresh, m.score_thresh) == (0.3, 0.7)


# ---------------------------------------------------------------------------------------------- CPU linear


def _linear_inputs(shape, n_out, seed, bias=True):
    """Random float32 ``x`` ``(*shape)``, ``weight`` ``(n_out, shape[-1])``, ``bias`` ``(n_out,)`` or None."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    weight = torch.randn(n_out, shape[-1], generator=g) / shape[-1] ** 0.5
    return x, weight, torch.randn(n_out, generator=g) if bias else None


@pytest.mark.parametrize("shape,n_out,bias", [((300, 1000), 512, True), ((2, 5, 64), 40, True),
                                              ((1, 8), 3, False)])
def test_onednn_linear_matches_float64_reference(shape, n_out, bias):
    """Forward without and with a graph, and all three gradients, against float64 autograd of F.linear."""
    from model.utils import cpu_linear

    x, weight, b = _linear_inputs(shape, n_out, seed=len(shape) + n_out, bias=bias)
    upstream = torch.randn(*shape[:-1], n_out, generator=torch.Generator().manual_seed(7))
    leaves64 = [t.double().requires_grad_() for t in (x, weight) + ((b,) if bias else ())]
    ref = F.linear(*leaves64, *(() if bias else (None,)))
    ref_grads = torch.autograd.grad(ref, leaves64, upstream.double())
    tol = dict(rtol=1e-5, atol=1e-5 * shape[-1] ** 0.5)

    with torch.no_grad():
        out = cpu_linear.onednn_linear(x, weight, b)
    assert out.shape == ref.shape and out.dtype == torch.float32 and out.grad_fn is None
    torch.testing.assert_close(out, ref.detach().float(), **tol)

    leaves = [t.clone().requires_grad_() for t in (x, weight) + ((b,) if bias else ())]
    out = cpu_linear.onednn_linear(*leaves, *(() if bias else (None,)))
    assert out.grad_fn is not None
    torch.testing.assert_close(out.detach(), ref.detach().float(), **tol)
    grads = torch.autograd.grad(out, leaves, upstream)
    for grad, ref_grad, leaf in zip(grads, ref_grads, leaves, strict=True):
        assert grad.shape == leaf.shape
        torch.testing.assert_close(grad, ref_grad.float(), rtol=1e-5, atol=1e-4 * x.shape[0] ** 0.5)


def test_onednn_linear_computes_only_the_gradients_asked():
    from model.utils import cpu_linear

    x, weight, bias = _linear_inputs((16, 32), 8, seed=3)
    weight.requires_grad_()
    out = cpu_linear.onednn_linear(x, weight, bias)  # only the weight needs a gradient (a frozen input)
    out.square().sum().backward()
    ref = weight.detach().clone().requires_grad_()
    F.linear(x, ref, bias).square().sum().backward()
    torch.testing.assert_close(weight.grad, ref.grad, rtol=1e-5, atol=1e-5)
    assert x.grad is None and bias.grad is None


def test_cpu_linear_device_rule(monkeypatch):
    """oneDNN only for float32 CPU tensors with rows, outside autocast, per backend and CPU vendor."""
    from model.utils import cpu_linear

    x, weight, _ = _linear_inputs((4, 6), 3, seed=0)
    with cpu_linear.backend("onednn"):
        assert cpu_linear.use_onednn(x, weight)
        assert not cpu_linear.use_onednn(x.double(), weight.double())
        assert not cpu_linear.use_onednn(x[:0], weight)  # no rows
        assert not cpu_linear.use_onednn(x.to("meta"), weight.to("meta"))  # another device: nn.Linear's path
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not cpu_linear.use_onednn(x, weight)
            assert cpu_linear.linear(x, weight).dtype == torch.bfloat16  # autocast applies, as to F.linear
        if torch.cuda.is_available():
            assert not cpu_linear.use_onednn(x.cuda(), weight.cuda())
    with cpu_linear.backend("native"):
        assert not cpu_linear.use_onednn(x, weight)
    for amd in (True, False):  # 'auto': oneDNN on AMD CPUs only
        monkeypatch.setattr(cpu_linear, "cpu_is_amd", lambda amd=amd: amd)
        with cpu_linear.backend("auto"):
            assert cpu_linear.use_onednn(x, weight) is amd
    assert cpu_linear.get_backend() == "auto"
    with pytest.raises(ValueError, match="backend"):
        cpu_linear.set_backend("mkl")


def test_cpu_is_amd_reads_the_vendor(tmp_path):
    from model.utils import cpu_linear

    for vendor, expected in (("AuthenticAMD", True), ("GenuineIntel", False)):
        path = tmp_path / f"{vendor}.txt"
        path.write_text(f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: 25\n\nprocessor\t: 1\n")
        assert cpu_linear.cpu_is_amd(str(path)) is expected
    assert cpu_linear.cpu_is_amd(str(tmp_path / "missing")) is False


def test_head_onednn_matches_native():
    """VGG16RoIHead on oneDNN: nn.Linear's outputs and fc6/fc7 gradients; module hooks on the native path.

    A small head (fc6 25088 -> 256) whose fc biases keep every ReLU active: a pre-activation within float32
    rounding of 0 could otherwise switch its ReLU between the two paths and move a whole gradient row.
    """
    from model.faster_rcnn_vgg16 import VGG16RoIHead
    from model.utils import cpu_linear

    torch.manual_seed(5)
    classifier = torch.nn.Sequential(torch.nn.Linear(512 * 49, 256), torch.nn.ReLU(),
                                     torch.nn.Linear(256, 4096), torch.nn.ReLU())
    with torch.no_grad():
        classifier[0].bias.fill_(20.0)
        classifier[2].bias.fill_(20.0)
    head = VGG16RoIHead(n_class=N_FG_CLASS + 1, roi_size=7, spatial_scale=1 / 16, classifier=classifier)
    features = torch.randn(1, 512, 15, 20, generator=torch.Generator().manual_seed(4))
    rois = _random_bbox(np.random.default_rng(4), 40, size=240.0)
    indices = np.zeros(len(rois), np.int32)
    results, seen = {}, []
    hook = head.classifier[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    for name in ("native", "onednn"):
        head.zero_grad(set_to_none=True)
        with cpu_linear.backend(name):
            roi_cls_locs, roi_scores = head(features, rois, indices)
            (roi_cls_locs.square().sum() + roi_scores.logsumexp(1).sum()).backward()
        assert (roi_cls_locs.shape, roi_scores.shape) == ((40, 84), (40, 21))
        results[name] = (roi_cls_locs.detach(), roi_scores.detach(),
                         *(head.classifier[i].weight.grad for i in (0, 2)),
                         *(head.classifier[i].bias.grad for i in (0, 2)))
    hook.remove()
    assert seen == [(40, 256)]  # the native run only: the oneDNN path does not call the module
    for got, expected in zip(results["onednn"], results["native"], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def test_predict_same_detections_on_onednn(model, confident_head):
    from model.utils import cpu_linear

    bias = np.zeros(N_FG_CLASS + 1, np.float32)
    bias[[2, 9]] = 12.0
    confident_head(bias)
    raw = skimage_data.chelsea().transpose(2, 0, 1).astype(np.float32)
    results = {}
    for name in ("native", "onednn"):
        with cpu_linear.backend(name):
            results[name] = model.predict([raw], visualize=True, score_thresh=0.05)
    (bbox, label, score), (ref_bbox, ref_label, ref_score) = ([r[0] for r in results[k]] for k in results)
    assert len(ref_label) > 0
    np.testing.assert_array_equal(label, ref_label)
    np.testing.assert_allclose(bbox, ref_bbox, rtol=1e-4, atol=1e-2)
    np.testing.assert_allclose(score, ref_score, rtol=1e-4, atol=1e-6)
