"""Winograd F(2x2, 3x3) convolutions on the CPU (``model/utils/cpu_conv.py``, ``winograd.cpp``) against
``F.conv2d`` and autograd: values in float64 and float32, gradients (``gradcheck`` and against the stock
backward), the tiling at every size and chunking, and which layers take the path."""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from model.faster_rcnn_vgg16 import decom_vgg16
from model.region_proposal_network import RegionProposalNetwork
from model.utils import cpu_conv


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def random_case(gen: torch.Generator, n: int, c: int, k: int, h: int, w: int, dtype, channels_last: bool):
    x = torch.randn(n, c, h, w, generator=gen, dtype=dtype)
    weight = torch.randn(k, c, 3, 3, generator=gen, dtype=dtype)
    bias = torch.randn(k, generator=gen, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, weight, bias


SHAPES = [  # (N, C, K, H, W): odd and even sizes, 1x1 maps, a channel count past one 64-block, batches
    (1, 3, 5, 7, 9),
    (2, 17, 70, 13, 6),
    (1, 64, 64, 1, 1),
    (3, 8, 8, 2, 3),
    (1, 130, 66, 31, 45),
    (2, 1, 1, 5, 1),
]


def test_extension_is_built():
    # setup.sh builds it (CI runs setup.sh): a broken winograd.cpp must fail here, not fall back silently
    assert cpu_conv.winograd_available()


@pytest.fixture(params=["torch", "onednn"])
def gemm_engine(request, monkeypatch):
    """Both GEMM engines of the Winograd path on any machine: ``torch.bmm`` (Intel CPUs) and oneDNN's matmul
    (AMD CPUs), chosen by the vendor rule that :func:`cpu_conv.use_onednn_gemm` follows."""
    amd = request.param == "onednn"
    monkeypatch.setattr(cpu_conv, "cpu_is_amd", lambda: amd)
    if amd and not cpu_conv.use_onednn_gemm(torch.zeros(1)):
        pytest.skip("this torch build exports no oneDNN matmul")
    return request.param


def test_gemm_engines_against_float64(gemm_engine):
    gen = torch.Generator().manual_seed(11)
    a = torch.randn(16, 70, 130, generator=gen)
    b = torch.randn(16, 66, 130, generator=gen).transpose(1, 2)  # (16, 130, 66), a transposed view
    out = torch.randn(16, 70, 66, generator=gen)
    start = out.clone()
    expected = a.double() @ b.double()
    cpu_conv._gemm(a, b, out, accumulate=True)
    assert rel_err(out.double(), start.double() + expected) < 1e-5
    cpu_conv._gemm(a.transpose(1, 2).contiguous().transpose(1, 2), b, out)  # a transposed too; overwrites
    assert rel_err(out.double(), expected) < 1e-5
    assert not cpu_conv.use_onednn_gemm(a.double())  # float64 always takes torch.bmm


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_forward_equals_conv2d_in_float64(shape, channels_last):
    gen = torch.Generator().manual_seed(hash(shape) % 2**31)
    x, weight, bias = random_case(gen, *shape, torch.float64, channels_last)
    out = cpu_conv.winograd_conv2d(x, weight, bias)
    assert rel_err(out, F.conv2d(x, weight, bias, padding=1)) < 1e-13
    assert out.shape == (shape[0], shape[2], shape[3], shape[4])
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_equals_conv2d_in_float32(shape, gemm_engine):
    gen = torch.Generator().manual_seed(1 + hash(shape) % 2**31)
    x, weight, bias = random_case(gen, *shape, torch.float32, True)
    assert rel_err(cpu_conv.winograd_conv2d(x, weight, bias), F.conv2d(x, weight, bias, padding=1)) < 1e-5
    assert rel_err(cpu_conv.winograd_conv2d(x, weight), F.conv2d(x, weight, padding=1)) < 1e-5


def test_chunks_cover_every_tile_once(monkeypatch):
    # chunks of a few tiles, the last one partial, give the one-chunk result
    gen = torch.Generator().manual_seed(3)
    x, weight, bias = random_case(gen, 2, 6, 4, 9, 11, torch.float64, True)
    whole = cpu_conv.winograd_conv2d(x, weight, bias)
    grad = torch.randn(whole.shape, generator=gen, dtype=torch.float64)
    whole_grad = cpu_conv.winograd_weight_grad(x, grad, weight)
    monkeypatch.setattr(cpu_conv, "CHUNK_BYTES", 16 * 6 * 8 * 7)  # 7 tiles a chunk; 60 tiles
    assert rel_err(cpu_conv.winograd_conv2d(x, weight, bias), whole) < 1e-14
    assert rel_err(cpu_conv.winograd_weight_grad(x, grad, weight), whole_grad) < 1e-14


def test_weight_transform_is_g_g_gt():
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(3, 2, 3, 3, generator=gen, dtype=torch.float64)
    g = torch.tensor(cpu_conv._G, dtype=torch.float64)
    u = cpu_conv.weight_transform(weight)  # (16, K, C)
    for kk in range(3):
        for c in range(2):
            expected = g @ weight[kk, c] @ g.T  # (4, 4)
            assert torch.allclose(u[:, kk, c].view(4, 4), expected, rtol=0, atol=1e-14)
    # the same in channels_last, and of the filters rotated by 180 degrees
    assert torch.equal(cpu_conv.weight_transform(weight.contiguous(memory_format=torch.channels_last)), u)
    rotated = cpu_conv.weight_transform(weight.flip(2, 3))
    assert torch.allclose(cpu_conv.weight_transform(weight, flipped=True), rotated, rtol=0, atol=1e-14)


@pytest.mark.parametrize("with_bias", [True, False])
def test_gradcheck(with_bias):
    gen = torch.Generator().manual_seed(5)
    x, weight, bias = random_case(gen, 2, 3, 4, 5, 6, torch.float64, False)
    inputs = (x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_() if with_bias else None)
    assert torch.autograd.gradcheck(cpu_conv.WinogradConv2dFunction.apply, inputs)


@pytest.mark.parametrize("shape", [(2, 17, 70, 13, 6), (1, 130, 66, 31, 45)])
@pytest.mark.parametrize("weight_format", [torch.contiguous_format, torch.channels_last])
def test_gradients_equal_the_stock_backward(shape, weight_format, gemm_engine):
    gen = torch.Generator().manual_seed(6)
    x, weight, bias = random_case(gen, *shape, torch.float32, True)
    weight = weight.contiguous(memory_format=weight_format)
    grad = torch.randn(shape[0], shape[2], shape[3], shape[4], generator=gen).contiguous(
        memory_format=torch.channels_last)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    ours = torch.autograd.grad(cpu_conv.WinogradConv2dFunction.apply(*leaves), leaves, grad)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    stock = torch.autograd.grad(F.conv2d(*leaves, padding=1), leaves, grad)
    for name, a, b in zip(("input", "weight", "bias"), ours, stock, strict=True):
        assert rel_err(a, b) < 1e-5, name
        assert a.shape == b.shape
    assert ours[1].is_contiguous(memory_format=weight_format)  # the weight gradient in the weight's layout


def test_only_the_gradients_asked_for_are_computed():
    gen = torch.Generator().manual_seed(7)
    x, weight, bias = random_case(gen, 1, 4, 4, 6, 6, torch.float64, False)
    weight.requires_grad_()
    out = cpu_conv.WinogradConv2dFunction.apply(x, weight, bias)  # no input or bias gradient
    (grad_weight,) = torch.autograd.grad(out.sum(), [weight])
    stock = torch.autograd.grad(F.conv2d(x, weight, bias, padding=1).sum(), [weight])[0]
    assert rel_err(grad_weight, stock) < 1e-13


def test_in_place_relu_after_the_layer_trains():
    # the output is a fresh tensor, not a view: nn.ReLU(inplace=True) may follow it, as in VGG16
    gen = torch.Generator().manual_seed(8)
    torch.manual_seed(0)
    stock = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1), nn.ReLU(inplace=True), nn.Conv2d(8, 4, 3, 1, 1)).double()
    ours = cpu_conv.convert(copy.deepcopy(stock))
    x = torch.randn(2, 8, 7, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    with cpu_conv.backend("winograd"):
        out = ours(x)
        grads = torch.autograd.grad(out.square().sum(), [x, *ours.parameters()])
    ref = stock(x)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *stock.parameters()])
    assert rel_err(out, ref) < 1e-12
    for a, b in zip(grads, ref_grads, strict=True):
        assert rel_err(a, b) < 1e-12


def conv(c: int, k: int, **kwargs) -> cpu_conv.Conv2d:
    options = {"kernel_size": 3, "stride": 1, "padding": 1} | kwargs
    return cpu_conv.Conv2d(c, k, **options)


def test_use_winograd_rule(monkeypatch):
    big = torch.zeros(1, 128, 40, 40)  # 1600 pixels
    monkeypatch.setattr(cpu_conv, "cpu_is_amd", lambda: False)
    with cpu_conv.backend("auto"):
        assert cpu_conv.use_winograd(big, conv(128, 128))
        with torch.no_grad():
            assert cpu_conv.use_winograd(big, conv(128, 128))  # inference too
        assert not cpu_conv.use_winograd(big[:, :64], conv(64, 128))  # too few channels
        assert not cpu_conv.use_winograd(big, conv(128, 64))
        assert not cpu_conv.use_winograd(big[:, :, :30, :30], conv(128, 128))  # a small map
        assert cpu_conv.use_winograd(torch.zeros(4, 128, 39, 39), conv(128, 128))  # per image, not batch
        assert not cpu_conv.use_winograd(torch.zeros(4, 128, 30, 30), conv(128, 128))
        # AMD CPUs: only where a gradient is needed (training), as measured on a Zen 4
        monkeypatch.setattr(cpu_conv, "cpu_is_amd", lambda: True)
        assert cpu_conv.use_winograd(big, conv(128, 128))  # the weight requires a gradient
        assert not cpu_conv.use_winograd(big, conv(128, 128).requires_grad_(False))
        assert cpu_conv.use_winograd(big.clone().requires_grad_(), conv(128, 128).requires_grad_(False))
        with torch.no_grad():
            assert not cpu_conv.use_winograd(big, conv(128, 128))
            assert cpu_conv.use_winograd(big, conv(128, 128), training=True)
        assert not cpu_conv.use_winograd(big, conv(128, 128), training=False)
        assert not cpu_conv.use_winograd(big[:, :64], conv(64, 128), training=True)  # the rest of the rule
    small = torch.zeros(1, 4, 5, 5)
    with cpu_conv.backend("winograd"):
        assert cpu_conv.use_winograd(small, conv(4, 4))
        assert cpu_conv.use_winograd(small.double(), conv(4, 4).double())
        for other in (conv(4, 4, stride=2), conv(4, 4, kernel_size=1, padding=0), conv(4, 4, dilation=2,
                      padding=2), conv(4, 4, groups=2), conv(4, 4, padding_mode="reflect"),
                      conv(4, 4, padding=0)):
            assert not cpu_conv.use_winograd(small, other)
        assert not cpu_conv.use_winograd(small.bfloat16(), conv(4, 4).bfloat16())
        assert not cpu_conv.use_winograd(small.double(), conv(4, 4))  # dtypes differ
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not cpu_conv.use_winograd(small, conv(4, 4))
    with cpu_conv.backend("native"):
        assert not cpu_conv.use_winograd(big, conv(128, 128))
    monkeypatch.setattr(cpu_conv, "_extension", lambda: None)
    with cpu_conv.backend("winograd"):
        assert not cpu_conv.use_winograd(small, conv(4, 4))
    with pytest.raises(RuntimeError, match="setup.sh"):
        cpu_conv.winograd_conv2d(small, torch.zeros(4, 4, 3, 3))


def test_backend_names():
    with pytest.raises(ValueError, match="auto"):
        cpu_conv.set_backend("fast")
    with cpu_conv.backend("native"):
        assert cpu_conv.get_backend() == "native"
    assert cpu_conv.get_backend() == "auto"


def test_module_forward_follows_the_rule_and_keeps_parameters():
    torch.manual_seed(0)
    stock = nn.Conv2d(6, 5, 3, 1, 1)
    layer = cpu_conv.convert(nn.Sequential(stock))[0]
    assert layer is stock and type(layer) is cpu_conv.Conv2d  # retyped in place, same parameters
    assert list(dict(layer.named_parameters())) == ["weight", "bias"]
    x = torch.randn(2, 6, 9, 8)
    with cpu_conv.backend("winograd"), torch.no_grad():
        fast = layer(x)
    with cpu_conv.backend("native"), torch.no_grad():
        native = layer(x)
    assert not torch.equal(fast, native)  # two paths (float rounding differs) ...
    assert rel_err(fast, native) < 1e-5  # ... one function
    assert type(cpu_conv.to_native(nn.Sequential(layer))[0]) is nn.Conv2d


def test_vgg16_and_rpn_layers_take_the_path():
    extractor, _ = decom_vgg16()
    convs = [m for m in extractor if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13 and all(type(m) is cpu_conv.Conv2d for m in convs)
    assert [k for k in extractor.state_dict()][:2] == ["0.weight", "0.bias"]  # the original's keys
    rpn = RegionProposalNetwork(512, 512)
    assert type(rpn.conv1) is cpu_conv.Conv2d
    # the extractor's features on a VGG-size map: Winograd for conv3_1 ... conv5_3 against the stock layers
    x = torch.rand(1, 3, 192, 256).contiguous(memory_format=torch.channels_last)
    extractor = extractor.to(memory_format=torch.channels_last).eval()
    with torch.no_grad():
        with cpu_conv.backend("winograd"):
            fast = extractor(x)
        with cpu_conv.backend("native"):
            native = extractor(x)
    assert rel_err(fast, native) < 1e-4
