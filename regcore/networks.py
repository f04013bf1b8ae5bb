"""The registration networks: two U-Net backbones, the affine stage and the registration model.

- `vxm`: the VoxelMorph default U-Net (encoder 16-32-32-32, decoder 32-32-32-32-32-16-16, 3^3
  convs, LeakyReLU 0.2, max-pool down, nearest up, skip concatenation).
- `seed`: the original study's U-Net (encoder 32-64-128-256, 512 bottleneck, two 3^3 convs with
  InstanceNorm and ReLU per level, transposed-conv up; ~22.6 M parameters).
- `AffineHead`: a small CNN predicting `theta` (B, 3, 4) on voxel coordinates about the volume
  centre, exactly the identity at initialisation.
- `RegistrationModel`: affine stage (optional) -> U-Net on (affinely warped moving, fixed) ->
  flow head (optionally a velocity, integrated) -> ONE resampling of the original moving image
  with the composed field.

Displacements are in voxels throughout (docs/ARCHITECTURE.md). The flow head and everything
after it (integration, composition, warping) run in float32 even under autocast: a bf16
displacement of 10 voxels would only be resolved to 1/16 voxel.

Speed (CPU, issue 8) lives in a few named places:
- `Conv3d`: always oneDNN's convolution kernel on the CPU (PyTorch's dispatcher would take a
  ~10x slower im2col kernel for every conv at 32^3 and below).
- `MEMORY_FORMAT`: activations are kept channels-last (NDHWC), oneDNN's native layout, so the
  convolutions run without layout reorders; the input pair is written into a channels-last
  buffer once (`concat_pair`).
- `upsample_concat_conv`: "nearest x2 upsample, concatenate the skip, 3^3 conv" computed as
  one coarse 2^3 conv per output parity plus the skip's conv: the same numbers with ~23 % fewer
  FLOPs for the whole vxm network (312 -> 240 GFLOP at 128^3) and no upsampled tensor.
- `ConvAct`: LeakyReLU applied in place on the convolution's output (no second full-size tensor).
- `upsample_concat`: the nearest x2 upsampling writes straight into a preallocated concatenation
  buffer, next to the skip tensor: no upsampled intermediate, no `torch.cat` copy.
- `RegistrationModel.register`: inference under `torch.inference_mode`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from regcore.config import ModelConfig
from regcore.integrate import integrate_velocity
from regcore.spatial import affine_to_ddf, compose_affine_ddf, warp

__all__ = [
    "RegistrationOutput",
    "RegistrationModel",
    "VxmUNet",
    "SeedUNet",
    "AffineHead",
    "FlowHead",
    "build_model",
    "build_backbone",
    "default_channels",
    "upsample_concat",
    "upsample_concat_conv",
    "concat_pair",
    "count_parameters",
    "MEMORY_FORMAT",
    "FLOW_INIT_STD",
]

#: channels-last 3D (NDHWC): oneDNN's native activation layout on CPU (also good for cuDNN).
MEMORY_FORMAT = torch.channels_last_3d
#: standard deviation of the flow head's initial weights (VoxelMorph): a near-zero field.
FLOW_INIT_STD = 1e-5

_DEFAULT_CHANNELS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    # encoder widths, decoder widths
    "vxm": ((16, 32, 32, 32), (32, 32, 32, 32, 32, 16, 16)),
    # encoder levels 32-64-128-256, last entry the bottleneck; decoder mirrors the encoder
    "seed": ((32, 64, 128, 256, 512), (256, 128, 64, 32)),
}


# -- output -------------------------------------------------------------------------------
@dataclass(frozen=True)
class RegistrationOutput:
    """What one forward pass returns (always all fields; `velocity_vox` None when not
    diffeomorphic).

    theta: (B, 3, 4) affine on voxel coordinates about the centre; [I | 0] without affine stage.
    dense_ddf_vox: (B, 3, D, H, W) the deformable part, voxels (the regularizers act on it).
    total_ddf_vox: (B, 3, D, H, W) affine and dense composed: warped = moving(x + total(x)).
    warped: (B, C, D, H, W) the moving image resampled once with `total_ddf_vox`.
    velocity_vox: (B, 3, D, H, W) the stationary velocity, or None.
    """

    theta: torch.Tensor
    dense_ddf_vox: torch.Tensor
    total_ddf_vox: torch.Tensor
    warped: torch.Tensor
    velocity_vox: torch.Tensor | None


# -- building blocks ------------------------------------------------------------------------
def concat_pair(moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """`cat([moving, fixed], dim=1)` written straight into a channels-last buffer (one copy
    of each input instead of a concatenation followed by a layout conversion)."""
    c = moving.shape[1]
    out = torch.empty((moving.shape[0], c + fixed.shape[1], *moving.shape[2:]),
                      dtype=torch.promote_types(moving.dtype, fixed.dtype), device=moving.device,
                      memory_format=MEMORY_FORMAT)
    out[:, :c].copy_(moving)
    out[:, c:].copy_(fixed)
    return out


def _use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


class _OneDNNConv3d(torch.autograd.Function):
    """A stride-1 3D convolution whose forward AND backward run on oneDNN's kernels.

    Autograd's backward of `mkldnn_convolution` goes through `convolution_backward`, which on a
    batch-1 CPU volume falls back to the slow im2col kernel: ~15x the forward's time (16->16
    channels at 32^3, one thread: forward 10 ms, backward 240 ms). Both gradients of a stride-1
    convolution are convolutions themselves, so oneDNN computes them too (~25 ms):
    - input: the correlation of the output gradient with the spatially flipped, in/out
      transposed kernel, padded by k - 1 - p ("full" correlation);
    - weight: the correlation of the input with the output gradient, with the channels taken as
      the batch and the batch as the channels: out[ci, co, k] = sum_b sum_x x[b, ci, x + k] go[b, co, x].
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


#: PyTorch's heuristic sends a batch-1 conv backward to the slow kernel when
#: batch x channels x D x H is at most this; above it, autograd's own backward is as fast.
_SLOW_BACKWARD_LIMIT = 20480


def _onednn_conv3d(x, weight, bias, padding):
    """oneDNN forward; oneDNN backward too where autograd's would take the slow kernel (small
    volumes or few channels) and the full-correlation trick holds (stride 1, k > p)."""
    small = min(x.shape[1], weight.shape[0]) * x.shape[0] * x.shape[2] * x.shape[3]
    if small <= _SLOW_BACKWARD_LIMIT and all(
            k - 1 - p >= 0 for k, p in zip(weight.shape[2:], padding)):
        return _OneDNNConv3d.apply(x, weight, bias, tuple(padding))
    return torch.mkldnn_convolution(x, weight, bias, padding, (1, 1, 1), (1, 1, 1), 1)


#: Below this many voxels along any axis, a conv under CPU bf16 autocast runs in float32:
#: PyTorch's bf16 oneDNN weight gradient of a channels-last 2^3 volume is intermittently
#: non-finite (uninitialised memory), and volumes this small cost nothing in float32.
_BF16_MIN_SIDE = 4


def _tiny_under_cpu_bf16(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and min(x.shape[2:]) < _BF16_MIN_SIDE)


class Conv3d(nn.Conv3d):
    """`nn.Conv3d` that always takes oneDNN's kernel for float32 on the CPU.

    PyTorch's dispatcher falls back to its im2col kernel (`slow_conv3d`) for batch 1 whenever
    batch x channels x D x H <= 20480 (a heuristic tuned for 2D), i.e. for every 3D conv of the
    U-Net at 32^3 and below; there oneDNN is ~8-10x faster on this machine (16->32 channels at
    32^3: 0.10 s -> 0.01 s, one thread) and gives the same result to float rounding. Other
    devices, dtypes and autocast take the ordinary path (bf16 goes to oneDNN where the CPU
    supports it).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _tiny_under_cpu_bf16(x):
            with torch.autocast("cpu", enabled=False):
                return self.forward(x.float())
        if self.padding_mode == "zeros" and _use_onednn(x, self.weight):
            if self.stride == (1, 1, 1) and self.dilation == (1, 1, 1) and self.groups == 1:
                return _onednn_conv3d(x, self.weight, self.bias, self.padding)
            return torch.mkldnn_convolution(x, self.weight, self.bias, self.padding, self.stride,
                                            self.dilation, self.groups)
        return super().forward(x)


def _conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            padding: int) -> torch.Tensor:
    """Functional form of `Conv3d` (stride 1)."""
    if _tiny_under_cpu_bf16(x):
        with torch.autocast("cpu", enabled=False):
            return _conv3d(x.float(), weight.float(), None if bias is None else bias.float(),
                           padding)
    if _use_onednn(x, weight):
        return _onednn_conv3d(x, weight, bias, (padding,) * 3)
    return F.conv3d(x, weight, bias, padding=padding)


class ConvAct(nn.Module):
    """3^3 convolution (padding 1) followed by an in-place LeakyReLU(0.2)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv = Conv3d(in_channels, out_channels, 3, stride=stride, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in place: the conv output is a fresh tensor nobody else holds; LeakyReLU's backward
        # needs only its output (the sign is preserved for slope > 0)
        return F.leaky_relu_(self.conv(x), 0.2)


def upsample_concat(x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """`cat([nearest_upsample_x2(x), skip], dim=1)` written into one preallocated buffer.

    x: (B, Cx, d, h, w); skip: (B, Cs, 2d, 2h, 2w) -> (B, Cx + Cs, 2d, 2h, 2w), channels-last.
    The upsampled copy is a broadcast write into the buffer viewed as (B, Cx, d, 2, h, 2, w, 2),
    so no upsampled intermediate exists and `torch.cat` never copies it a second time. Autograd
    handles the slice writes (its backward sums the gradient over each 2x2x2 block, which is
    exactly the adjoint of nearest upsampling).
    """
    b, cx, d, h, w = x.shape
    if skip.shape[0] != b or tuple(skip.shape[2:]) != (2 * d, 2 * h, 2 * w):
        raise ValueError(f"skip of shape {tuple(skip.shape)} does not match x of shape "
                         f"{tuple(x.shape)} upsampled by 2")
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


def upsample_concat_conv(x: torch.Tensor, skip: torch.Tensor, conv: nn.Conv3d) -> torch.Tensor:
    """`leaky_relu(conv(upsample_concat(x, skip)), 0.2)` without upsampling anything.

    x: (B, Cx, d, h, w); skip: (B, Cs, 2d, 2h, 2w); conv: 3^3, padding 1, Cx + Cs -> O.
    A 3^3 conv of a nearest-upsampled tensor is, for each of the 8 parities of the output
    position, a 2^3 conv of the coarse tensor with summed taps (`_TAP_MAP`). All 8 run as ONE
    coarse 2^3 conv with 8 x O outputs (8 x 8 instead of 27 x 8 multiply-adds per coarse voxel
    and channel pair: 3.4x fewer for the upsampled channels); their outputs are added into the
    parity positions of the skip channels' ordinary conv. Exact up to float rounding, with the
    same parameters (and state dict) as the plain path; zero padding matches because the
    upsampled tensor's padding is the coarse tensor's padding.
    """
    b, cx, d, h, w = x.shape
    weight = conv.weight  # (O, Cx + Cs, 3, 3, 3)
    out_channels = weight.shape[0]
    taps = _TAP_MAP.to(device=weight.device, dtype=weight.dtype)
    # (O, Cx, 3, 3, 3) -> (2, 2, 2, O, Cx, 2, 2, 2): parities (pd, ph, pw), window taps
    coarse_weight = torch.einsum("pat,qbu,rcv,oiabc->pqroituv", taps, taps, taps,
                                 weight[:, :cx]).reshape(8 * out_channels, cx, 2, 2, 2)
    coarse = _conv3d(x, coarse_weight, None, padding=1)  # (B, 8 O, d + 1, h + 1, w + 1)
    y = _conv3d(skip, weight[:, cx:], conv.bias, padding=1)  # (B, O, 2d, 2h, 2w)
    return F.leaky_relu_(_AddParities.apply(y, coarse), 0.2)


def _parity_views(fine: torch.Tensor, coarse: torch.Tensor):
    """Pairs (fine positions of one parity, the coarse conv's outputs for them), 8 of them.

    fine (B, O, 2d, 2h, 2w); coarse (B, 8 O, d + 1, h + 1, w + 1) with channel blocks in the
    parity order (pd, ph, pw) of `_TAP_MAP`'s einsum; parity p reads window start i + p.
    """
    b, o, d2, h2, w2 = fine.shape
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

    A hand-written backward: autograd's own (8 in-place adds on strided views) would zero-fill
    and copy a full coarse-sized gradient per parity, 8x the memory traffic; here the gradient
    of the coarse tensor is gathered once.
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


class VxmUNet(nn.Module):
    """VoxelMorph's U-Net.

    Encoder: for each width, a ConvAct at the current resolution (kept as a skip) then a 2x
    max-pool. Decoder: the first `len(enc)` convs are each followed by nearest x2 upsampling and
    concatenation with the matching skip; the remaining convs run at full resolution.
    Input (B, in_channels, D, H, W) with D, H, W divisible by 2^len(enc); output
    (B, dec[-1], D, H, W).
    """

    def __init__(self, in_channels: int, enc: Sequence[int], dec: Sequence[int]):
        super().__init__()
        enc, dec = tuple(enc), tuple(dec)
        if len(dec) < len(enc):
            raise ValueError(f"model.dec_channels == {dec}, must have at least as many entries "
                             f"as model.enc_channels == {enc} (one upsampling per level)")
        self.levels = len(enc)
        self.encoder = nn.ModuleList()
        prev = in_channels
        for width in enc:
            self.encoder.append(ConvAct(prev, width))
            prev = width
        self.up_convs = nn.ModuleList()
        skip_widths = list(enc[::-1])
        for width, skip in zip(dec[:self.levels], skip_widths):
            self.up_convs.append(ConvAct(prev, width))
            prev = width + skip
        self.full_res = nn.ModuleList()
        for width in dec[self.levels:]:
            self.full_res.append(ConvAct(prev, width))
            prev = width
        self.out_channels = prev

        #: compute each "upsample, concatenate, conv" as `upsample_concat_conv` (same result,
        #: ~30 % fewer FLOPs in the whole network); False = the plain three steps
        self.fuse_upsample = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for conv in self.encoder:
            x = conv(x)
            skips.append(x)
            x = F.max_pool3d(x, 2)
        # each conv of the decoder but the first reads an upsampled-and-concatenated tensor
        x = self.up_convs[0](x)
        after_upsample = [*self.up_convs[1:], *self.full_res]
        for level, skip in enumerate(reversed(skips)):
            if level < len(after_upsample) and self.fuse_upsample:
                x = upsample_concat_conv(x, skip, after_upsample[level].conv)
            else:
                x = upsample_concat(x, skip)
                if level < len(after_upsample):
                    x = after_upsample[level](x)
        for conv in after_upsample[self.levels:]:
            x = conv(x)
        return x


class _DoubleConv(nn.Sequential):
    """Two (3^3 conv, InstanceNorm, ReLU) blocks: one level of the study's U-Net."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            Conv3d(in_channels, out_channels, 3, padding=1),
            nn.InstanceNorm3d(out_channels, affine=True),
            nn.ReLU(inplace=True),
            Conv3d(out_channels, out_channels, 3, padding=1),
            nn.InstanceNorm3d(out_channels, affine=True),
            nn.ReLU(inplace=True),
        )


class SeedUNet(nn.Module):
    """The original study's U-Net.

    `enc` lists the encoder widths followed by the bottleneck width (default 32-64-128-256 and
    512); `dec` the decoder widths, one per encoder level (default the encoder mirrored). Each
    level is a `_DoubleConv`; down by 2x max-pool, up by a 2x2x2 transposed convolution to the
    decoder width, then concatenation with the skip. Input spatial sizes divisible by
    2^(len(enc) - 1); output (B, dec[-1], D, H, W).
    """

    def __init__(self, in_channels: int, enc: Sequence[int], dec: Sequence[int]):
        super().__init__()
        enc, dec = tuple(enc), tuple(dec)
        if len(enc) < 2:
            raise ValueError(f"model.enc_channels == {enc}, must list at least one encoder width "
                             "and the bottleneck width for the seed backbone")
        if len(dec) != len(enc) - 1:
            raise ValueError(f"model.dec_channels == {dec}, must have {len(enc) - 1} entries (one "
                             f"per encoder level of model.enc_channels == {enc}) for the seed "
                             "backbone")
        self.levels = len(enc) - 1
        self.encoder = nn.ModuleList()
        prev = in_channels
        for width in enc[:-1]:
            self.encoder.append(_DoubleConv(prev, width))
            prev = width
        self.bottleneck = _DoubleConv(prev, enc[-1])
        prev = enc[-1]
        self.ups = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for width, skip in zip(dec, enc[-2::-1]):
            self.ups.append(nn.ConvTranspose3d(prev, width, 2, stride=2))
            self.decoder.append(_DoubleConv(width + skip, width))
            prev = width
        self.out_channels = prev

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
            x = F.max_pool3d(x, 2)
        x = self.bottleneck(x)
        for up, block, skip in zip(self.ups, self.decoder, reversed(skips)):
            x = block(torch.cat([up(x), skip], dim=1))
        return x


class FlowHead(nn.Module):
    """3^3 conv to the 3 displacement channels; weights N(0, 1e-5), bias 0: a near-zero field
    at initialisation. Always evaluated in float32 (see the module docstring)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = Conv3d(in_channels, 3, 3, padding=1)
        nn.init.normal_(self.conv.weight, 0.0, FLOW_INIT_STD)
        nn.init.zeros_(self.conv.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        with torch.autocast(features.device.type, enabled=False):
            flow = self.conv(features.float())
        # contiguous NCDHW: the layout the spatial and regularizer code is written for
        return flow.contiguous()


class AffineHead(nn.Module):
    """A small CNN predicting the affine `theta` (B, 3, 4) from (moving, fixed).

    Two levels of (3^3 conv stride 2, ReLU, 2x max-pool) -> global average pool -> FC -> ReLU ->
    FC to 12 numbers: 9 for the matrix A (row-major) and 3 for the translation.

    The last layer has zero weights and bias [I | 0], so theta is exactly the identity at
    initialisation. Translation scaling: the network predicts `t_raw`, and the translation in
    voxels is `t_vox[k] = t_raw[k] * (size[k] - 1) / 2`, i.e. t_raw = 1 moves by half the volume
    along axis k (grid_sample's normalised unit). A moves a voxel at distance up to
    (size - 1) / 2 from the centre by that much per unit change, so with this scaling a unit
    change of any of the 12 outputs moves voxels by a comparable amount and the optimiser sees
    a well-conditioned problem (raw voxel translations would need ~60x larger outputs at 128^3).
    """

    def __init__(self, in_channels: int, widths: tuple[int, int] = (16, 32), hidden: int = 64):
        super().__init__()
        self.features = nn.Sequential(
            Conv3d(in_channels, widths[0], 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool3d(2),
            Conv3d(widths[0], widths[1], 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool3d(2),
        )
        self.fc1 = nn.Linear(widths[1], hidden)
        self.fc2 = nn.Linear(hidden, 12)
        nn.init.zeros_(self.fc2.weight)
        with torch.no_grad():
            self.fc2.bias.copy_(torch.cat([torch.eye(3).flatten(), torch.zeros(3)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, D, H, W) moving and fixed concatenated -> theta (B, 3, 4), t in voxels."""
        pooled = self.features(x).mean(dim=(2, 3, 4))  # (B, widths[1])
        with torch.autocast(x.device.type, enabled=False):
            raw = self.fc2(F.relu(self.fc1(pooled.float())))  # (B, 12)
        matrix = raw[:, :9].view(-1, 3, 3)
        half_extent = torch.tensor([(s - 1) / 2.0 for s in x.shape[2:]], device=x.device,
                                   dtype=raw.dtype)
        translation_vox = raw[:, 9:] * half_extent  # (B, 3)
        return torch.cat([matrix, translation_vox.unsqueeze(-1)], dim=2)


# -- the model ------------------------------------------------------------------------------
class RegistrationModel(nn.Module):
    """moving, fixed (B, C, D, H, W) -> `RegistrationOutput` (see `forward`)."""

    def __init__(self, backbone: nn.Module, in_channels: int, affine: bool,
                 diffeomorphic: bool = False, int_steps: int = 7, backbone_name: str = ""):
        super().__init__()
        self.backbone = backbone
        self.flow = FlowHead(backbone.out_channels)
        self.affine_head = AffineHead(2 * in_channels) if affine else None
        self.in_channels = in_channels
        self.diffeomorphic = diffeomorphic
        self.int_steps = int_steps
        self.backbone_name = backbone_name
        #: spatial sizes must be multiples of this (one 2x pooling per level)
        self.size_divisor = 2 ** backbone.levels

    def check_inputs(self, moving: torch.Tensor, fixed: torch.Tensor) -> None:
        """Raise TypeError/ValueError naming the input, its shape and the expected one."""
        c = self.in_channels
        for name, value in (("moving", moving), ("fixed", fixed)):
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"expected {name} to be a torch.Tensor, got {type(value).__name__}")
            if value.ndim != 5 or value.shape[1] != c:
                raise ValueError(f"expected {name} of shape (B, {c}, D, H, W), got "
                                 f"{tuple(value.shape)}")
            if not value.is_floating_point():
                raise TypeError(f"expected {name} with a floating dtype, got {value.dtype}")
        if moving.shape != fixed.shape:
            raise ValueError(f"moving and fixed must have the same shape, got {tuple(moving.shape)} "
                             f"and {tuple(fixed.shape)}")
        n = self.size_divisor
        name = self.backbone_name or "U-Net"
        if any(s % n for s in moving.shape[2:]):
            raise ValueError(f"spatial sizes {tuple(moving.shape[2:])} must be divisible by "
                             f"{n} (2^{self.backbone.levels}: one 2x pooling per level of the "
                             f"{name} backbone)")
        if isinstance(self.backbone, SeedUNet) and min(moving.shape[2:]) < 2 * n:
            raise ValueError(f"spatial sizes {tuple(moving.shape[2:])} must be at least {2 * n} "
                             f"for the {name} backbone: its InstanceNorm needs more than one voxel "
                             f"after {self.backbone.levels} poolings")

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> RegistrationOutput:
        """Register `moving` to `fixed`, both (B, C, D, H, W) with C = `in_channels`.

        The U-Net sees the affinely warped moving image and the fixed image; the returned
        `warped` is ONE resampling of the original moving image with the composed field.
        """
        self.check_inputs(moving, fixed)
        batch = moving.shape[0]
        shape = tuple(moving.shape[2:])
        pair = concat_pair(moving, fixed)  # (B, 2C, D, H, W) channels-last
        if self.affine_head is not None:
            theta = self.affine_head(pair)
            moved = warp(moving, affine_to_ddf(theta, shape))
            pair = concat_pair(moved, fixed)
        else:
            theta = torch.eye(3, 4, device=moving.device, dtype=torch.float32).expand(batch, 3, 4)
        flow = self.flow(self.backbone(pair))  # (B, 3, D, H, W) float32
        velocity = None
        if self.diffeomorphic:
            velocity, dense = flow, integrate_velocity(flow, self.int_steps)
        else:
            dense = flow
        total = compose_affine_ddf(theta, dense) if self.affine_head is not None else dense
        warped = warp(moving, total)
        return RegistrationOutput(theta=theta, dense_ddf_vox=dense, total_ddf_vox=total,
                                  warped=warped, velocity_vox=velocity)

    def register(self, moving: torch.Tensor, fixed: torch.Tensor) -> RegistrationOutput:
        """Inference: `forward` under `torch.inference_mode` (no autograd bookkeeping)."""
        with torch.inference_mode():
            return self(moving, fixed)


# -- construction ---------------------------------------------------------------------------
def default_channels(backbone: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(encoder widths, decoder widths) of a backbone's defaults."""
    if backbone not in _DEFAULT_CHANNELS:
        raise ValueError(f"model.backbone == {backbone!r}, must be one of "
                         f"{', '.join(_DEFAULT_CHANNELS)}")
    return _DEFAULT_CHANNELS[backbone]


def build_backbone(model_cfg: ModelConfig, in_channels: int) -> nn.Module:
    """The U-Net of `model_cfg.backbone` for `in_channels` input channels (moving + fixed)."""
    enc_default, dec_default = default_channels(model_cfg.backbone)
    enc = tuple(model_cfg.enc_channels) or enc_default
    dec = tuple(model_cfg.dec_channels)
    if model_cfg.backbone == "vxm":
        return VxmUNet(in_channels, enc, dec or dec_default)
    # seed: the decoder mirrors the encoder levels unless given
    return SeedUNet(in_channels, enc, dec or tuple(enc[-2::-1]))


def build_model(model_cfg: ModelConfig, in_channels: int, affine: bool) -> RegistrationModel:
    """The registration model of a config.

    Args:
        model_cfg: `Config.model` (backbone, channel widths, diffeomorphic, int_steps).
        in_channels: channels of ONE image (5 for one-hot seg4, 1 for intensity); the U-Net
            sees moving and fixed concatenated (2 x in_channels).
        affine: whether the affine stage is on (the variant's `affine` factor).
    """
    if not isinstance(model_cfg, ModelConfig):
        raise TypeError(f"model_cfg is a {type(model_cfg).__name__}, expected "
                        "regcore.config.ModelConfig")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels == {in_channels!r}, must be a positive integer")
    if not isinstance(affine, bool):
        raise TypeError(f"affine == {affine!r}, must be True or False")
    backbone = build_backbone(model_cfg, 2 * in_channels)
    model = RegistrationModel(backbone, in_channels, affine, model_cfg.diffeomorphic,
                              model_cfg.int_steps, model_cfg.backbone)
    return model.to(memory_format=MEMORY_FORMAT)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

