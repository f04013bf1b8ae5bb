"""The networks' speed paths, behind one switch; each computes what its plain op computes.

`kernels.enabled` (default True) selects them; `with kernels.use(False):` runs the plain
PyTorch ops instead (same parameters, same numbers to float rounding). They exist because on a
CPU PyTorch sends small 3D convolutions and their backward to a slow im2col kernel, and because
a nearest-upsampled tensor need not be built to convolve it (docs/PERFORMANCE.md has the
figures).

- `conv3d`: `F.conv3d`, on oneDNN for float32 on the CPU; small stride-1 convs also get a
  oneDNN backward (`_OneDNNConv3d`).
- `concat_pair`, `upsample_concat`: concatenations written into one channels-last buffer.
- `upsample_concat_conv`: `conv(cat([upsample_x2(x), skip]))` as one coarse 2^3 conv per output
  parity plus the skip's conv, without the upsampled tensor.

One guard applies with the switch on or off: under CPU bf16 autocast, convs on volumes under
`_BF16_MIN_SIDE` voxels a side run in float32 (PyTorch's bf16 weight gradient of a channels-last
2^3 volume is intermittently non-finite).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F

__all__ = ["enabled", "use", "MEMORY_FORMAT", "conv3d", "concat_pair", "upsample_concat",
           "upsample_concat_conv"]

#: the one switch: True = the speed paths, False = the plain PyTorch ops
enabled = True

#: channels-last 3D (NDHWC): oneDNN's native activation layout (also good for cuDNN)
MEMORY_FORMAT = torch.channels_last_3d

#: PyTorch's dispatcher takes its slow conv backward for batch x channels x D x H at most this
_SLOW_BACKWARD_LIMIT = 20480

#: convs on volumes under this many voxels a side run in float32 under CPU bf16 autocast
_BF16_MIN_SIDE = 4


@contextlib.contextmanager
def use(flag: bool) -> Iterator[None]:
    """Set `enabled` to `flag` inside the block (e.g. `with kernels.use(False):` for the plain
    ops), restoring the previous value afterwards."""
    global enabled
    previous, enabled = enabled, bool(flag)
    try:
        yield
    finally:
        enabled = previous


# -- convolution ------------------------------------------------------------------------------
def _tiny_under_cpu_bf16(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and min(x.shape[2:]) < _BF16_MIN_SIDE)


def _onednn_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (enabled and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


def _triple(value: int | tuple[int, ...]) -> tuple[int, int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * 3  # type: ignore


def conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           stride: int | tuple[int, ...] = 1, padding: int | tuple[int, ...] = 0,
           dilation: int | tuple[int, ...] = 1, groups: int = 1) -> torch.Tensor:
    """`F.conv3d` (zero padding); with `enabled`, float32 on the CPU runs on oneDNN."""
    if _tiny_under_cpu_bf16(x):
        with torch.autocast("cpu", enabled=False):
            return conv3d(x.float(), weight.float(), None if bias is None else bias.float(),
                          stride, padding, dilation, groups)
    if not _onednn_applies(x, weight):
        return F.conv3d(x, weight, bias, stride, padding, dilation, groups)
    stride, padding, dilation = _triple(stride), _triple(padding), _triple(dilation)
    if stride == (1, 1, 1) and dilation == (1, 1, 1) and groups == 1:
        return _onednn_stride1(x, weight, bias, padding)
    return torch.mkldnn_convolution(x, weight, bias, padding, stride, dilation, groups)


def _onednn_stride1(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    padding: tuple[int, int, int]) -> torch.Tensor:
    """oneDNN forward; a oneDNN backward too where autograd's would take the slow kernel and
    the full-correlation form of the input gradient holds (k - 1 - p >= 0)."""
    small = min(x.shape[1], weight.shape[0]) * x.shape[0] * x.shape[2] * x.shape[3]
    if small <= _SLOW_BACKWARD_LIMIT and all(
            k - 1 - p >= 0 for k, p in zip(weight.shape[2:], padding)):
        return _OneDNNConv3d.apply(x, weight, bias, padding)
    return torch.mkldnn_convolution(x, weight, bias, padding, (1, 1, 1), (1, 1, 1), 1)


class _OneDNNConv3d(torch.autograd.Function):
    """A stride-1 3D convolution whose forward and backward both run on oneDNN.

    Both gradients of a stride-1 convolution are convolutions:
    - input: the output gradient correlated with the flipped, in/out-transposed kernel,
      padded by k - 1 - p ("full" correlation);
    - weight: the input correlated with the output gradient, channels taken as the batch:
      out[ci, co, k] = sum_b sum_x x[b, ci, x + k] go[b, co, x].
    """

    @staticmethod
    def forward(ctx, x, weight, bias, padding):
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        ctx.has_bias = bias is not None
        return torch.mkldnn_convolution(x, weight, bias, padding, (1, 1, 1), (1, 1, 1), 1)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        pad = ctx.padding
        kernel = weight.shape[2:]
        grad_out = grad_out.contiguous(memory_format=MEMORY_FORMAT)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            flipped = weight.flip(2, 3, 4).transpose(0, 1).contiguous(memory_format=MEMORY_FORMAT)
            full = tuple(k - 1 - p for k, p in zip(kernel, pad))
            grad_x = torch.mkldnn_convolution(grad_out, flipped, None, full, (1, 1, 1),
                                              (1, 1, 1), 1)
        if ctx.needs_input_grad[1]:
            grad_w = torch.mkldnn_convolution(
                x.transpose(0, 1).contiguous(), grad_out.transpose(0, 1).contiguous(), None,
                pad, (1, 1, 1), (1, 1, 1), 1).transpose(0, 1)
            grad_w = grad_w.contiguous(memory_format=torch.contiguous_format) \
                if weight.is_contiguous() else grad_w.contiguous(memory_format=MEMORY_FORMAT)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum(dim=(0, 2, 3, 4))
        return grad_x, grad_w, grad_b, None


# -- concatenation and upsampling -------------------------------------------------------------
def concat_pair(moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """`cat([moving, fixed], dim=1)`; with `enabled`, written straight into a channels-last
    buffer (one copy of each input, no layout conversion afterwards)."""
    if not enabled:
        return torch.cat([moving, fixed], dim=1)
    c = moving.shape[1]
    out = torch.empty((moving.shape[0], c + fixed.shape[1], *moving.shape[2:]),
                      dtype=torch.promote_types(moving.dtype, fixed.dtype), device=moving.device,
                      memory_format=MEMORY_FORMAT)
    out[:, :c].copy_(moving)
    out[:, c:].copy_(fixed)
    return out


def _check_skip(x: torch.Tensor, skip: torch.Tensor) -> None:
    b, _, d, h, w = x.shape
    if skip.shape[0] != b or tuple(skip.shape[2:]) != (2 * d, 2 * h, 2 * w):
        raise ValueError(f"skip of shape {tuple(skip.shape)} does not match x of shape "
                         f"{tuple(x.shape)} upsampled by 2")


def upsample_concat(x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """`cat([nearest_upsample_x2(x), skip], dim=1)`.

    x: (B, Cx, d, h, w); skip: (B, Cs, 2d, 2h, 2w) -> (B, Cx + Cs, 2d, 2h, 2w). With `enabled`,
    the upsampling is a broadcast write into a channels-last buffer viewed as
    (B, Cx, d, 2, h, 2, w, 2): no upsampled intermediate and no second copy by `torch.cat`.
    """
    _check_skip(x, skip)
    if not enabled:
        return torch.cat([F.interpolate(x, scale_factor=2, mode="nearest"), skip], dim=1)
    b, cx, d, h, w = x.shape
    dtype = torch.promote_types(x.dtype, skip.dtype)
    out = torch.empty((b, cx + skip.shape[1], 2 * d, 2 * h, 2 * w), dtype=dtype, device=x.device,
                      memory_format=MEMORY_FORMAT)
    blocks = out[:, :cx].unflatten(2, (d, 2)).unflatten(4, (h, 2)).unflatten(6, (w, 2))
    blocks.copy_(x[:, :, :, None, :, None, :, None])
    out[:, cx:].copy_(skip)
    return out


# For fine position X = 2i + p along one axis, the 3 taps k = 0, 1, 2 (offsets -1, 0, +1) of a
# conv on the nearest-upsampled tensor read coarse voxels i - 1 + t of a 2-tap window t = 0, 1:
# parity p = 0: k=0 -> t=0, k=1 -> t=1, k=2 -> t=1; parity p = 1: k=0 -> t=0, k=1 -> t=0,
# k=2 -> t=1. _TAP_MAP[p, k, t] = 1 where tap k lands on window tap t.
_TAP_MAP = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]],
                         [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])


def upsample_concat_conv(x: torch.Tensor, skip: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor | None) -> torch.Tensor:
    """`conv3d(upsample_concat(x, skip), weight, bias, padding=1)` for a 3^3 kernel.

    x: (B, Cx, d, h, w); skip: (B, Cs, 2d, 2h, 2w); weight (O, Cx + Cs, 3, 3, 3) -> (B, O, 2d,
    2h, 2w). With `enabled`: a 3^3 conv of a nearest-upsampled tensor is, for each of the 8
    output parities, a 2^3 conv of the coarse tensor with summed taps (`_TAP_MAP`); all 8 run
    as one coarse conv with 8 O outputs, added into the parity positions of the skip channels'
    ordinary conv. Zero padding matches: the upsampled tensor's padding is the coarse one's.
    """
    if not enabled:
        return conv3d(upsample_concat(x, skip), weight, bias, padding=1)
    _check_skip(x, skip)
    cx = x.shape[1]
    out_channels = weight.shape[0]
    taps = _TAP_MAP.to(device=weight.device, dtype=weight.dtype)
    # (O, Cx, 3, 3, 3) -> (2, 2, 2, O, Cx, 2, 2, 2): parities (pd, ph, pw), window taps
    coarse_weight = torch.einsum("pat,qbu,rcv,oiabc->pqroituv", taps, taps, taps,
                                 weight[:, :cx]).reshape(8 * out_channels, cx, 2, 2, 2)
    coarse = conv3d(x, coarse_weight, None, padding=1)  # (B, 8 O, d + 1, h + 1, w + 1)
    fine = conv3d(skip, weight[:, cx:], bias, padding=1)  # (B, O, 2d, 2h, 2w)
    return _AddParities.apply(fine, coarse)


def _parity_views(fine: torch.Tensor, coarse: torch.Tensor):
    """Pairs (fine positions of one parity, the coarse conv's outputs for them), 8 of them.

    fine (B, O, 2d, 2h, 2w); coarse (B, 8 O, d + 1, h + 1, w + 1) with channel blocks in the
    parity order (pd, ph, pw) of `_TAP_MAP`'s einsum; parity p reads window start i + p.
    """
    _, o, d2, h2, w2 = fine.shape
    d, h, w = d2 // 2, h2 // 2, w2 // 2
    blocks = fine.unflatten(2, (d, 2)).unflatten(4, (h, 2)).unflatten(6, (w, 2))
    index = 0
    for pd in (0, 1):
        for ph in (0, 1):
            for pw in (0, 1):
                yield (blocks[:, :, :, pd, :, ph, :, pw],
                       coarse[:, index * o:(index + 1) * o, pd:pd + d, ph:ph + h, pw:pw + w])
                index += 1


class _AddParities(torch.autograd.Function):
    """fine[parity p] += coarse[block p, shifted by p], in place on `fine`.

    A hand-written backward gathers the coarse gradient once; autograd's own (8 in-place adds
    on strided views) would zero-fill and copy a coarse-sized gradient per parity.
    """

    @staticmethod
    def forward(ctx, fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        ctx.mark_dirty(fine)
        ctx.coarse_shape = coarse.shape
        for fine_part, coarse_part in _parity_views(fine, coarse):
            fine_part.add_(coarse_part)
        return fine

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # the coarse positions no parity reads (its outer faces) get a zero gradient
        grad_coarse = grad.new_zeros(ctx.coarse_shape).contiguous(memory_format=MEMORY_FORMAT)
        for grad_part, coarse_part in _parity_views(grad, grad_coarse):
            coarse_part.copy_(grad_part)
        return grad, grad_coarse
