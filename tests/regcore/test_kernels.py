"""regcore.kernels: every speed path against the plain PyTorch op, forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from regcore import kernels


pytestmark = pytest.mark.usefixtures("one_thread")


def _tensors(*shapes, seed=0, channels_last=()):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for index, shape in enumerate(shapes):
        t = torch.randn(shape, generator=gen)
        if index in channels_last:
            t = t.contiguous(memory_format=torch.channels_last_3d)
        out.append(t.requires_grad_())
    return out


def _grads(out, inputs, seed=1):
    """Gradients of <out, w> for a fixed random w (every output position weighs differently)."""
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    return torch.autograd.grad((out * w).sum(), inputs)


def _reference_conv(x, weight, bias, stride, padding):
    """F.conv3d in float64: the oracle, free of float32 rounding."""
    return F.conv3d(x.double(), weight.double(), None if bias is None else bias.double(),
                    stride=stride, padding=padding)


def _assert_close(got, want, tol=1e-4):
    assert got.shape == want.shape
    got, want = got.detach().double(), want.detach().double()
    scale = max(1.0, float(want.abs().max()))
    assert float((got - want).abs().max()) <= tol * scale


# (x shape, weight shape, stride, padding, bias); odd sizes, kernels 1, 2, 3, batches 1 and 2
CONV_CASES = [
    ((1, 4, 8, 8, 8), (6, 4, 3, 3, 3), 1, 1, True),
    ((2, 3, 5, 7, 9), (4, 3, 3, 3, 3), 1, 1, True),
    ((1, 5, 3, 4, 5), (7, 5, 3, 3, 3), 1, 0, False),
    ((1, 2, 5, 5, 3), (3, 2, 2, 2, 2), 1, 1, False),  # the fused path's coarse 2^3 conv
    ((2, 6, 4, 5, 6), (5, 6, 1, 1, 1), 1, 0, True),
    ((1, 4, 8, 8, 8), (6, 4, 3, 3, 3), 2, 1, True),  # stride 2: oneDNN forward, autograd backward
    ((1, 3, 7, 9, 5), (4, 3, 3, 3, 3), 2, 1, False),
]


@pytest.mark.parametrize("x_shape, w_shape, stride, padding, with_bias", CONV_CASES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv3d_matches_f_conv3d(x_shape, w_shape, stride, padding, with_bias, channels_last):
    x, weight, bias = _tensors(x_shape, w_shape, (w_shape[0],),
                               channels_last=(0, 1) if channels_last else ())
    bias = bias if with_bias else None
    inputs = [x, weight] + ([bias] if with_bias else [])
    out = kernels.conv3d(x, weight, bias, stride=stride, padding=padding)
    ref = _reference_conv(x, weight, bias, stride, padding)
    _assert_close(out, ref)
    for got, want in zip(_grads(out, inputs), _grads(ref, inputs)):
        _assert_close(got, want)
        assert got.dtype == torch.float32


@pytest.mark.parametrize("x_shape, w_shape, stride, padding, with_bias", CONV_CASES[:5])
def test_small_stride1_conv_takes_the_onednn_backward(x_shape, w_shape, stride, padding,
                                                      with_bias):
    # the hand-written backward is the path under test: make sure it is the one taken
    x, weight = _tensors(x_shape, w_shape)
    out = kernels.conv3d(x, weight, None, stride=stride, padding=padding)
    assert type(out.grad_fn).__name__ == "_OneDNNConv3dBackward"


def test_large_stride1_conv_keeps_autograds_backward():
    # batch x channels x D x H above the slow-kernel limit: autograd's own backward
    x, weight, bias = _tensors((1, 16, 40, 40, 3), (16, 16, 3, 3, 3), (16,))
    assert 16 * 40 * 40 > kernels._SLOW_BACKWARD_LIMIT
    out = kernels.conv3d(x, weight, bias, padding=1)
    assert type(out.grad_fn).__name__ != "_OneDNNConv3dBackward"
    ref = _reference_conv(x, weight, bias, 1, 1)
    _assert_close(out, ref)
    for got, want in zip(_grads(out, [x, weight, bias]), _grads(ref, [x, weight, bias])):
        _assert_close(got, want)


def test_onednn_backward_of_input_only_and_weight_only():
    # needs_input_grad branches: a frozen weight, then a frozen input
    x, weight = _tensors((1, 3, 5, 6, 7), (4, 3, 3, 3, 3))
    gx_ref, gw_ref = _grads(_reference_conv(x, weight, None, 1, 1), [x, weight])
    (gx,) = _grads(kernels.conv3d(x, weight.detach(), padding=1), [x])
    (gw,) = _grads(kernels.conv3d(x.detach(), weight, padding=1), [weight])
    _assert_close(gx, gx_ref)
    _assert_close(gw, gw_ref)


# coarse x (B, Cx, d, h, w), skip channels, output channels
FUSED_CASES = [
    ((1, 3, 4, 5, 6), 2, 4),
    ((2, 2, 3, 3, 5), 3, 5),
    ((1, 4, 1, 2, 3), 1, 2),
    ((1, 1, 2, 2, 2), 2, 3),
]


@pytest.mark.parametrize("x_shape, skip_channels, out_channels", FUSED_CASES)
def test_upsample_concat_conv_matches_plain_path(x_shape, skip_channels, out_channels):
    b, cx, d, h, w = x_shape
    x, skip, weight, bias = _tensors(x_shape, (b, skip_channels, 2 * d, 2 * h, 2 * w),
                                     (out_channels, cx + skip_channels, 3, 3, 3),
                                     (out_channels,), channels_last=(0, 1))
    inputs = [x, skip, weight, bias]
    fused = kernels.upsample_concat_conv(x, skip, weight, bias)
    with kernels.use(False):
        plain = kernels.upsample_concat_conv(x, skip, weight, bias)
    upsampled = torch.cat([F.interpolate(x.double(), scale_factor=2, mode="nearest"),
                           skip.double()], dim=1)
    ref = _reference_conv(upsampled, weight, bias, 1, 1)
    _assert_close(fused, ref)
    _assert_close(plain, ref)
    for got, mid, want in zip(_grads(fused, inputs), _grads(plain, inputs), _grads(ref, inputs)):
        _assert_close(got, want)
        _assert_close(mid, want)


@pytest.mark.parametrize("enabled", [True, False])
def test_upsample_concat_matches_interpolate_and_cat(enabled):
    x, skip = _tensors((2, 3, 3, 5, 2), (2, 2, 6, 10, 4))
    with kernels.use(enabled):
        out = kernels.upsample_concat(x, skip)
    ref = torch.cat([F.interpolate(x, scale_factor=2, mode="nearest"), skip], dim=1)
    assert torch.equal(out, ref)
    assert out.is_contiguous(memory_format=torch.channels_last_3d) == enabled
    for got, want in zip(_grads(out, [x, skip]), _grads(ref, [x, skip])):
        assert torch.allclose(got, want, atol=1e-5)
    with pytest.raises(ValueError, match=r"^skip of shape \(2, 2, 6, 10, 3\) does not match x"):
        kernels.upsample_concat(x, skip[..., :3])


@pytest.mark.parametrize("enabled", [True, False])
def test_concat_pair_matches_cat(enabled):
    a, b = torch.rand(1, 2, 3, 4, 5), torch.rand(1, 3, 3, 4, 5)
    with kernels.use(enabled):
        out = kernels.concat_pair(a, b)
    assert torch.equal(out, torch.cat([a, b], dim=1))
    assert out.is_contiguous(memory_format=torch.channels_last_3d) == enabled


def test_switch_off_runs_no_onednn_call_and_restores(monkeypatch):
    x, weight = _tensors((1, 2, 4, 4, 4), (3, 2, 3, 3, 3))
    expected = kernels.conv3d(x, weight, padding=1).detach()

    def forbidden(*args, **kwargs):
        raise AssertionError("oneDNN called with kernels off")

    monkeypatch.setattr(torch, "mkldnn_convolution", forbidden)
    with kernels.use(False):
        assert kernels.enabled is False
        out = kernels.conv3d(x, weight, padding=1)
        fused = kernels.upsample_concat_conv(x, torch.rand(1, 1, 8, 8, 8),
                                             torch.rand(2, 3, 3, 3, 3), None)
    assert kernels.enabled is True
    assert torch.allclose(out, expected, atol=1e-5) and fused.shape == (1, 2, 8, 8, 8)
    with pytest.raises(AssertionError, match="oneDNN called"):
        kernels.conv3d(x, weight, padding=1)
