"""Scaling and squaring: a stationary velocity field -> a (diffeomorphic) displacement field."""

from __future__ import annotations

import torch

from regcore.spatial import check_ddf, warp

__all__ = ["integrate_velocity"]


def integrate_velocity(velocity_vox: torch.Tensor, steps: int = 7,
                       padding: str = "border") -> torch.Tensor:
    """Integrate a stationary velocity field by scaling and squaring.

    u_0 = v / 2^steps, then `steps` times u <- u + u o (id + u), i.e. u(x) + u(x + u(x)), which
    composes the transform with itself; after n steps u = exp(v) for a smooth v.

    Args:
        velocity_vox: `(B, 3, D, H, W)` velocity in voxels.
        steps: number of squarings (>= 0; 0 returns v itself, VoxelMorph uses 7).
        padding: how the field is extrapolated outside the volume when composing ("border"
            repeats the edge displacement; "zeros" is VoxelMorph's and MONAI's default).

    Returns:
        The displacement `(B, 3, D, H, W)` in voxels.
    """
    velocity_vox = check_ddf(velocity_vox, "velocity_vox")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps == {steps!r}, must be an integer >= 0")
    ddf_vox = velocity_vox / (2.0 ** steps)
    for _ in range(steps):
        ddf_vox = ddf_vox + warp(ddf_vox, ddf_vox, mode="bilinear", padding=padding)
    return ddf_vox
