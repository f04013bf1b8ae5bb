"""The registration networks: two U-Net backbones, the affine stage and the registration model.

- `vxm`: the VoxelMorph default U-Net (encoder 16-32-32-32, decoder 32-32-32-32-32-16-16, 3^3
  convs, LeakyReLU 0.2, max-pool down, nearest up, skip concatenation).
- `seed`: the original study's U-Net (encoder 32-64-128-256, 512 bottleneck, two 3^3 convs with
  InstanceNorm and ReLU per level, transposed-conv up; ~22.6 M parameters).
- `AffineHead`: a small CNN predicting `theta` (B, 3, 4) on voxel coordinates about the volume
  centre, exactly the identity at initialisation (the study's affine stage).
- `AffineFitHead`: the affine stage as a weighted least-squares fit (`fit_affine`) of per-voxel
  targets that a small CNN predicts from the pair and its Demons force; also the identity at
  initialisation (`model.affine_head = "fit"`).
- `RegistrationModel`: affine stage (optional) -> U-Net on (affinely warped moving, fixed) ->
  flow head (optionally a velocity, integrated) -> ONE resampling of the original moving image
  with the composed field.

Displacements are in voxels throughout (docs/ARCHITECTURE.md). The flow head and everything
after it (integration, composition, warping) run in float32 even under autocast: a bf16
displacement of 10 voxels would only be resolved to 1/16 voxel.

The convolutions and concatenations go through `regcore.kernels`, which holds the CPU speed
paths behind one switch (`kernels.use(False)` gives the plain PyTorch ops, same numbers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from regcore import kernels
from regcore.config import ModelConfig
from regcore.integrate import integrate_velocity
from regcore.spatial import centred_grid_vox, affine_to_ddf, compose_affine_ddf, warp

__all__ = [
    "RegistrationOutput",
    "RegistrationModel",
    "VxmUNet",
    "SeedUNet",
    "AffineHead",
    "AffineFitHead",
    "fit_affine",
    "FlowHead",
    "build_model",
    "build_backbone",
    "default_channels",
    "upsample_field",
    "demons_force",
    "count_parameters",
    "FLOW_INIT_STD",
]

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
    pass_warped: the moving image warped by the field after each pass but the last (empty with
        one pass): what the next pass sees, and what `loss.pass_weight` compares.
    """

    theta: torch.Tensor
    dense_ddf_vox: torch.Tensor
    total_ddf_vox: torch.Tensor
    warped: torch.Tensor
    velocity_vox: torch.Tensor | None
    pass_warped: tuple[torch.Tensor, ...] = ()


# -- building blocks ------------------------------------------------------------------------
class Conv3d(nn.Conv3d):
    """`nn.Conv3d` computed by `kernels.conv3d` (oneDNN on the CPU while `kernels.enabled`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros":
            return super().forward(x)
        return kernels.conv3d(x, self.weight, self.bias, self.stride, self.padding,
                              self.dilation, self.groups)


class ConvAct(nn.Module):
    """3^3 convolution (padding 1) followed by an in-place LeakyReLU(0.2)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv = Conv3d(in_channels, out_channels, 3, stride=stride, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in place: the conv output is a fresh tensor nobody else holds; LeakyReLU's backward
        # needs only its output (the sign is preserved for slope > 0)
        return F.leaky_relu_(self.conv(x), 0.2)

    def forward_upsampled(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """`self(cat([nearest_upsample_x2(x), skip], dim=1))`."""
        return F.leaky_relu_(
            kernels.upsample_concat_conv(x, skip, self.conv.weight, self.conv.bias), 0.2)


class VxmUNet(nn.Module):
    """VoxelMorph's U-Net.

    Encoder: for each width, a ConvAct at the current resolution (kept as a skip) then a 2x
    max-pool. Decoder: the first `len(enc)` convs are each followed by nearest x2 upsampling and
    concatenation with the matching skip; the remaining convs run at full resolution.
    Input (B, in_channels, D, H, W) with D, H, W divisible by 2^len(enc); output
    (B, dec[-1], D, H, W).
    """

    def __init__(self, in_channels: int, enc: Sequence[int], dec: Sequence[int],
                 coarse_levels: int = 0):
        super().__init__()
        enc, dec = tuple(enc), tuple(dec)
        if len(dec) < len(enc):
            raise ValueError(f"model.dec_channels == {dec}, must have at least as many entries "
                             f"as model.enc_channels == {enc} (one upsampling per level)")
        if not 0 <= coarse_levels < len(enc):
            raise ValueError(f"model.flow_levels == {coarse_levels}, must be below the number of "
                             f"encoder levels ({len(enc)})")
        self.levels = len(enc)
        #: the decoder stops this many upsamplings short: output at 1 / 2^coarse_levels
        self.coarse_levels = coarse_levels
        self.encoder = nn.ModuleList()
        prev = in_channels
        for width in enc:
            self.encoder.append(ConvAct(prev, width))
            prev = width
        self.up_convs = nn.ModuleList()
        skip_widths = list(enc[::-1])
        for index, (width, skip) in enumerate(zip(dec[:self.levels], skip_widths)):
            self.up_convs.append(ConvAct(prev, width))
            prev = width + skip if index < self.levels - coarse_levels else width
        self.full_res = nn.ModuleList()
        for width in dec[self.levels:]:
            self.full_res.append(ConvAct(prev, width))
            prev = width
        self.out_channels = prev

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for conv in self.encoder:
            x = conv(x)
            skips.append(x)
            x = F.max_pool3d(x, 2)
        x = self.up_convs[0](x)
        # the decoder's later convs in order: each of the first `levels` reads the upsampled
        # features concatenated with a skip (with fewer convs, the last level is only upsampled);
        # with `coarse_levels` the decoder stops that many upsamplings short
        later = iter([*self.up_convs[1:], *self.full_res])
        for skip in list(reversed(skips))[:self.levels - self.coarse_levels]:
            conv = next(later, None)
            x = kernels.upsample_concat(x, skip) if conv is None else conv.forward_upsampled(x, skip)
        for conv in later:
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


class AffineFitHead(nn.Module):
    """The affine stage as a fit: a small CNN predicts where each voxel should go, and the
    affine `theta` (B, 3, 4) is the weighted least-squares fit of those targets.

    The CNN sees (moving, fixed) and their Demons force on `demons_scales` scales (the forces
    are local displacement estimates, so the targets are nearly a linear function of the input),
    works on a grid 2x coarser, and outputs on a grid 4x coarser a displacement d (3 channels,
    voxels of that grid) and a weight logit. With x_c the voxel positions about the centre
    and y = x_c + d, theta = argmin sum_x w(x) |A x_c + t - y(x)|^2, solved from the 4 x 4
    normal equations with a small ridge towards [I | 0]. Unlike global pooling the fit keeps
    where each estimate was made, which is what a rotation or a scaling is made of.

    The last convolution has zero weights, so d = 0 and theta is exactly the identity at
    initialisation.
    """

    def __init__(self, in_channels: int, demons_scales: int = 3, width: int = 16,
                 ridge: float = 1e-3):
        super().__init__()
        self.in_channels = in_channels
        self.demons_scales = demons_scales
        self.ridge = ridge
        channels = (2 + 3 * demons_scales) * in_channels
        act = lambda: nn.LeakyReLU(0.2, inplace=True)  # noqa: E731
        self.features = nn.Sequential(
            Conv3d(channels, width, 3, padding=1), act(),
            Conv3d(width, width, 3, padding=1), act(),
            Conv3d(width, width, 3, stride=2, padding=1), act(),
            Conv3d(width, width, 3, padding=1), act(),
        )
        self.out = Conv3d(width, 4, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        """pair: (B, 2C, D, H, W) moving and fixed concatenated -> theta (B, 3, 4), t in voxels."""
        c = self.in_channels
        moving, fixed = pair[:, :c], pair[:, c:]
        shape = tuple(pair.shape[2:])
        inputs = torch.cat([pair, *demons_pyramid(moving, fixed, self.demons_scales)], dim=1)
        head = self.out(self.features(F.avg_pool3d(inputs, 2)))
        with torch.autocast(pair.device.type, enabled=False):
            head = head.float()
            target = upsample_field(head[:, :3], shape)  # (B, 3, D, H, W) voxels of the grid
            weight = F.softplus(F.interpolate(head[:, 3:], size=shape, mode="trilinear",
                                              align_corners=True))  # (B, 1, D, H, W)
            return fit_affine(target, weight, self.ridge)


def fit_affine(ddf_vox: torch.Tensor, weight: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """The affine theta (B, 3, 4) (voxel coordinates about the centre) whose displacement is
    closest to `ddf_vox` (B, 3, D, H, W) in the `weight` (B, 1, D, H, W) least-squares sense,
    with a ridge of `ridge` x the mean diagonal of the normal matrix towards [I | 0] (so a zero
    field or a zero weight gives the identity). Coordinates are divided by the largest
    half extent for the solve, so the 4 x 4 system is well conditioned at any size."""
    shape = tuple(ddf_vox.shape[2:])
    batch = ddf_vox.shape[0]
    scale = max((s - 1) / 2.0 for s in shape) or 1.0
    xc = centred_grid_vox(shape, ddf_vox.device, ddf_vox.dtype).flatten(2) / scale  # (1, 3, N)
    ones = torch.ones_like(xc[:, :1])
    x_h = torch.cat([xc, ones], dim=1).expand(batch, 4, -1)  # (B, 4, N)
    y = xc + ddf_vox.flatten(2) / scale  # (B, 3, N)
    w = weight.flatten(2)  # (B, 1, N)
    normal = torch.einsum("bin,bjn->bij", x_h * w, x_h)  # (B, 4, 4)
    rhs = torch.einsum("bin,bjn->bij", y * w, x_h)  # (B, 3, 4)
    # + 1e-6: a zero weight everywhere leaves only the ridge, whose solution is the identity
    lam = ridge * normal.diagonal(dim1=1, dim2=2).mean(dim=1).view(-1, 1, 1) + 1e-6
    eye4 = torch.eye(4, device=ddf_vox.device, dtype=ddf_vox.dtype)
    theta_n = torch.linalg.solve(normal + lam * eye4, (rhs + lam * eye4[:3]).transpose(1, 2)
                                 ).transpose(1, 2)  # (B, 3, 4); normal is symmetric
    return torch.cat([theta_n[:, :, :3], theta_n[:, :, 3:] * scale], dim=2)


# -- the model ------------------------------------------------------------------------------
class RegistrationModel(nn.Module):
    """moving, fixed (B, C, D, H, W) -> `RegistrationOutput` (see `forward`)."""

    def __init__(self, backbone: nn.Module, in_channels: int, affine: bool,
                 diffeomorphic: bool = False, int_steps: int = 7, backbone_name: str = "",
                 demons_input: int = 0, passes: int = 1, max_flow_vox: float = 0.0,
                 affine_head: str = "cnn"):
        super().__init__()
        #: soft bound on each pass's flow in voxels of its grid (0: none)
        self.max_flow_vox = float(max_flow_vox)
        #: the U-Net applied this many times, each pass to the pair registered so far
        self.passes = passes
        self.backbone = backbone
        #: the U-Net also sees the Demons force of the pair on this many scales (0: none)
        self.demons_input = demons_input
        self.flow = FlowHead(backbone.out_channels)
        heads = {"cnn": lambda: AffineHead(2 * in_channels),
                 "fit": lambda: AffineFitHead(in_channels)}
        self.affine_head = heads[affine_head]() if affine else None
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
        pair = kernels.concat_pair(moving, fixed)  # (B, 2C, D, H, W)
        if self.affine_head is not None:
            theta = self.affine_head(pair)
            moved = warp(moving, affine_to_ddf(theta, shape))
            pair = kernels.concat_pair(moved, fixed)
        else:
            theta = torch.eye(3, 4, device=moving.device, dtype=torch.float32).expand(batch, 3, 4)
        flow = self._flow(pair)  # (B, 3, d, h, w) float32, d = D / 2^flow_levels
        velocity = None
        if self.diffeomorphic:
            velocity = upsample_field(flow if self.max_flow_vox <= 0 else
                                      self.max_flow_vox * torch.tanh(flow / self.max_flow_vox),
                                      shape)
        dense = self._field(flow, shape)
        total = compose_affine_ddf(theta, dense) if self.affine_head is not None else dense
        pass_warped = []
        for _ in range(self.passes - 1):
            # the same U-Net again on the pair as registered so far; its residual field r is
            # applied first: dense'(x) = r(x) + dense(x + r(x)) (one field, one resampling; a
            # composition of diffeomorphisms when each r is integrated)
            pass_warped.append(warp(moving, total))
            moved = kernels.concat_pair(pass_warped[-1], fixed)
            residual = self._field(self._flow(moved), shape)
            dense = residual + warp(dense, residual)
            total = compose_affine_ddf(theta, dense) if self.affine_head is not None else dense
        warped = warp(moving, total)
        return RegistrationOutput(theta=theta, dense_ddf_vox=dense, total_ddf_vox=total,
                                  warped=warped, velocity_vox=velocity,
                                  pass_warped=tuple(pass_warped))

    def _field(self, flow: torch.Tensor, shape) -> torch.Tensor:
        """The displacement of one pass on the full grid: the flow itself, or when
        diffeomorphic the flow as a velocity integrated on its own grid (VoxelMorph); with
        `max_flow_vox` > 0 the flow is first bounded softly, B tanh(flow / B) (unchanged where
        small), so one bad step cannot send the passes into a runaway."""
        if self.max_flow_vox > 0:
            flow = self.max_flow_vox * torch.tanh(flow / self.max_flow_vox)
        if self.diffeomorphic:
            return upsample_field(integrate_velocity(flow, self.int_steps), shape)
        return upsample_field(flow, shape)

    def _flow(self, pair: torch.Tensor) -> torch.Tensor:
        """The flow head on the U-Net of (moving, fixed) channels-last, Demons forces added."""
        if self.demons_input:
            pair = torch.cat([pair, *demons_pyramid(pair[:, :self.in_channels],
                                                    pair[:, self.in_channels:],
                                                    self.demons_input)], dim=1
                             ).contiguous(memory_format=kernels.MEMORY_FORMAT)
        return self.flow(self.backbone(pair))

    def register(self, moving: torch.Tensor, fixed: torch.Tensor) -> RegistrationOutput:
        """Inference: `forward` under `torch.inference_mode` (no autograd bookkeeping)."""
        with torch.inference_mode():
            return self(moving, fixed)


def demons_force(moving: torch.Tensor, fixed: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """The normalised Demons force of each channel, (B, 3 C, D, H, W) in voxels.

    u_k = (f - m) dm/dx_k / (|grad m|^2 + (f - m)^2 + eps): the optical-flow step that moves
    the moving image towards the fixed one (bounded by 1/2 voxel). A U-Net computes the
    product of a difference and a gradient only slowly from the two images; given it as an
    input, a field that registers is nearly a linear function of its inputs.
    """
    m, f = moving.float(), fixed.float()
    grads = torch.gradient(m, dim=(2, 3, 4))  # central differences, one-sided at the borders
    diff = f - m
    denom = sum(g * g for g in grads) + diff * diff + eps
    return torch.cat([diff * g / denom for g in grads], dim=1)


def demons_pyramid(moving: torch.Tensor, fixed: torch.Tensor, scales: int) -> list[torch.Tensor]:
    """`demons_force` on the full grid and on `scales - 1` grids each 2x coarser (average
    pooling), every force upsampled back and in voxels of the full grid: the coarse forces
    reach displacements the fine one (at most 1/2 voxel) cannot."""
    forces = []
    m, f = moving, fixed
    for level in range(scales):
        if level:
            m, f = F.avg_pool3d(m, 2), F.avg_pool3d(f, 2)
        forces.append(upsample_field_channels(demons_force(m, f), tuple(moving.shape[2:])))
    return forces


def upsample_field_channels(fields_vox: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """`upsample_field` for (B, 3 k, d, h, w): k displacement fields stacked on the channels."""
    b, c = fields_vox.shape[:2]
    stacked = fields_vox.reshape(b * c // 3, 3, *fields_vox.shape[2:])
    return upsample_field(stacked, shape).reshape(b, c, *shape)


def upsample_field(field_vox: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """A displacement (B, 3, d, h, w) in voxels of its grid, resampled trilinearly onto the
    grid `shape` of the same extent and rescaled to its voxels (align_corners geometry: a grid
    of n voxels spans n - 1 intervals). The field itself when the shapes agree."""
    small = tuple(field_vox.shape[2:])
    if small == tuple(shape):
        return field_vox
    scale = torch.tensor([(n - 1) / (m - 1) for m, n in zip(small, shape)],
                         device=field_vox.device, dtype=field_vox.dtype).view(1, 3, 1, 1, 1)
    return F.interpolate(field_vox, size=tuple(shape), mode="trilinear",
                         align_corners=True) * scale


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
        return VxmUNet(in_channels, enc, dec or dec_default, model_cfg.flow_levels)
    if model_cfg.flow_levels:
        raise ValueError(f"model.flow_levels == {model_cfg.flow_levels}, the seed backbone "
                         f"predicts the flow at full resolution only (0)")
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
    demons = {"images": 0, "demons": 1, "demons2": 2, "demons3": 3}[model_cfg.pair_input]
    backbone = build_backbone(model_cfg, (2 + 3 * demons) * in_channels)
    model = RegistrationModel(backbone, in_channels, affine, model_cfg.diffeomorphic,
                              model_cfg.int_steps, model_cfg.backbone, demons_input=demons,
                              passes=model_cfg.passes, max_flow_vox=model_cfg.max_flow_vox,
                              affine_head=model_cfg.affine_head)
    return model.to(memory_format=kernels.MEMORY_FORMAT)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

