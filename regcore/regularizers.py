"""The study's five regularizers, each a pure function of the displacement in voxels -> scalar.

Every function takes `ddf_vox` `(B, 3, D, H, W)` (voxels; channel k moves spatial axis k),
returns a differentiable 0-d tensor with one fixed reduction (a mean over batch, channels and
voxels), and uses whole-tensor stencils (slices, pooling): no Python loop over voxels. Weights
are applied in one place, `regcore.losses.compute_loss`.

The study's versions of these terms were inert (its field was in normalised units) or wrong
(folds got no gradient, the log term rewarded expansion, no mixed second derivatives); these are
the corrected definitions, stated in each docstring.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from regcore.config import DEFAULT_MAX_DISPLACEMENT_MM, REGULARIZERS
from regcore.spatial import check_ddf, jacobian_det

__all__ = [
    "smoothness",
    "magnitude",
    "rigidity",
    "jacobian_penalty",
    "bending_energy",
    "REGULARIZER_FNS",
    "regularizer_terms",
    "JACOBIAN_MARGIN",
    "DEFAULT_MAX_DISPLACEMENT_MM",
]

#: det J below this margin is penalised by the fold hinge (and the log term is clamped there).
JACOBIAN_MARGIN = 0.1


def _checked(ddf_vox: torch.Tensor, min_size: int) -> torch.Tensor:
    ddf_vox = check_ddf(ddf_vox)
    if min(ddf_vox.shape[2:]) < min_size:
        raise ValueError(f"expected every spatial size of ddf >= {min_size}, "
                         f"got {tuple(ddf_vox.shape[2:])}")
    # half precision is too coarse for differences and determinants
    return ddf_vox.float() if ddf_vox.dtype in (torch.float16, torch.bfloat16) else ddf_vox


def smoothness(ddf_vox: torch.Tensor) -> torch.Tensor:
    """Diffusion regularizer: sum over the 3 axes of the mean squared forward difference.

    smooth = sum_k mean_{b, c, x} (u_c(x + e_k) - u_c(x))^2. For a linear field u = A x this is
    sum_{c,k} A_ck^2 / 3, the value of MONAI's `DiffusionLoss` (central differences, sum over
    axes, mean over batch, channels, voxels).
    """
    u = _checked(ddf_vox, 2)
    return ((u[:, :, 1:] - u[:, :, :-1]).pow(2).mean()
            + (u[:, :, :, 1:] - u[:, :, :, :-1]).pow(2).mean()
            + (u[:, :, :, :, 1:] - u[:, :, :, :, :-1]).pow(2).mean())


def _spacing_tensor(spacing_mm, like: torch.Tensor) -> torch.Tensor:
    """`spacing_mm` ((3,) or (B, 3), mm along D, H, W) as a `(B or 1, 3, 1, 1, 1)` tensor."""
    s = torch.as_tensor(spacing_mm, dtype=like.dtype, device=like.device)
    if s.ndim == 1:
        s = s[None]
    if s.ndim != 2 or s.shape[1] != 3 or s.shape[0] not in (1, like.shape[0]):
        raise ValueError(f"expected spacing_mm of shape (3,) or ({like.shape[0]}, 3), got "
                         f"{tuple(s.shape)}")
    if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
        raise ValueError(f"spacing_mm == {s.tolist()}, must be positive finite numbers (mm)")
    return s.reshape(s.shape[0], 3, 1, 1, 1)


def magnitude(ddf_vox: torch.Tensor, spacing_mm,
              max_displacement_mm: float = DEFAULT_MAX_DISPLACEMENT_MM) -> torch.Tensor:
    """Squared hinge on the displacement length above a threshold in mm, relative to it.

    magnitude = mean_{b, x} relu(|u(x)|_mm / max_displacement_mm - 1)^2, |u|_mm the Euclidean
    norm of the 3 channels each scaled by its axis' spacing. Zero (with zero gradient) while
    every voxel moves less than the threshold; the same for a field resampled to another grid,
    and unit-free (1 where a voxel moves twice the threshold).

    Args:
        spacing_mm: voxel size along (D, H, W) in mm, `(3,)` or one row per batch item `(B, 3)`.
    """
    u = _checked(ddf_vox, 1)
    if (isinstance(max_displacement_mm, bool) or not isinstance(max_displacement_mm, (int, float))
            or not math.isfinite(max_displacement_mm) or max_displacement_mm <= 0):
        raise ValueError(f"max_displacement_mm == {max_displacement_mm!r}, must be a finite "
                         "number > 0")
    u_mm = u * _spacing_tensor(spacing_mm, u)
    # clamp before sqrt: the gradient of sqrt at 0 is infinite (and 0 * inf = NaN)
    norm_mm = u_mm.pow(2).sum(dim=1).clamp_min(1e-12).sqrt()
    return F.relu(norm_mm / max_displacement_mm - 1.0).pow(2).mean()


def rigidity(ddf_vox: torch.Tensor) -> torch.Tensor:
    """Local rigidity: squared deviation of the field from its 3x3x3 local mean.

    rigidity = mean_{b, c, x inside} (u_c(x) - mean_{|y - x|_inf <= 1} u_c(y))^2, over the
    voxels whose whole neighbourhood lies in the volume (each axis cropped by 1; no padding,
    which would make an affine field non-affine at the edge). The 27-point mean of an affine
    function is its centre value, so any affine field scores exactly 0, edges included: this
    penalises local non-affinity, not displacement. Every spatial size must be >= 3.
    """
    u = _checked(ddf_vox, 3)
    # separable 3-tap box sums over the valid neighbourhoods (3 x 2 additions per voxel; much
    # cheaper than avg_pool3d's backward on CPU)
    p = u[:, :, :-2] + u[:, :, 1:-1] + u[:, :, 2:]
    p = p[:, :, :, :-2] + p[:, :, :, 1:-1] + p[:, :, :, 2:]
    p = p[:, :, :, :, :-2] + p[:, :, :, :, 1:-1] + p[:, :, :, :, 2:]
    return (u[:, :, 1:-1, 1:-1, 1:-1] - p / 27.0).pow(2).mean()


def jacobian_penalty(ddf_vox: torch.Tensor, margin: float = JACOBIAN_MARGIN) -> torch.Tensor:
    """Fold hinge plus a symmetric log-volume term on det J (J = I + grad u, u in voxels).

    jacobian = mean_x relu(margin - det J)^2 + mean_x log(max(det J, margin))^2.

    - The hinge keeps a gradient on folded voxels (det J <= 0), pushing det J up towards the
      margin; the study clamped det J to [1e-6, 10] first, which zeroed exactly that gradient.
    - The log term is symmetric in expansion and compression (log 2 and log 1/2 cost the same)
      and is minimal at det J = 1, so expansion is never rewarded (the study's term was). It is
      clamped at the margin so it stays finite; below the margin the hinge takes over.
    Both parts are 0 for any volume-preserving field without folds.
    """
    if not isinstance(margin, (int, float)) or isinstance(margin, bool) or not 0 < margin < 1:
        raise ValueError(f"margin == {margin!r}, must be a number in (0, 1)")
    det = jacobian_det(_checked(ddf_vox, 2))
    fold = F.relu(margin - det).pow(2).mean()
    log_volume = torch.log(det.clamp_min(margin)).pow(2).mean()
    return fold + log_volume


def bending_energy(ddf_vox: torch.Tensor) -> torch.Tensor:
    """Bending energy with the mixed terms.

    bending = mean_{b, c, x} [ sum_i (d2u_c/dx_i^2)^2 + 2 sum_{i<j} (d2u_c/dx_i dx_j)^2 ],
    evaluated on the interior voxels (each spatial axis cropped by 1) with the compact stencils
    u(x+e_i) - 2u(x) + u(x-e_i) and [u(x+e_i+e_j) - u(x+e_i-e_j) - u(x-e_i+e_j) + u(x-e_i-e_j)]/4.
    Zero for any linear (affine) field; exact for quadratic fields, where it equals MONAI's
    `BendingEnergyLoss(normalize=False)` (whose wider central-difference stencils are exact too).
    """
    u = _checked(ddf_vox, 3)
    c = slice(1, -1)
    lo, hi = slice(None, -2), slice(2, None)
    inner = u[:, :, c, c, c]
    d2_dd = u[:, :, hi, c, c] - 2 * inner + u[:, :, lo, c, c]
    d2_hh = u[:, :, c, hi, c] - 2 * inner + u[:, :, c, lo, c]
    d2_ww = u[:, :, c, c, hi] - 2 * inner + u[:, :, c, c, lo]
    # the 4-point mixed stencil is a central difference of a central difference
    g_d = (u[:, :, hi] - u[:, :, lo]) / 2  # (B, 3, D-2, H, W)
    g_h = (u[:, :, c, hi] - u[:, :, c, lo]) / 2  # (B, 3, D-2, H-2, W)
    d2_dh = (g_d[:, :, :, hi, c] - g_d[:, :, :, lo, c]) / 2
    d2_dw = (g_d[:, :, :, c, hi] - g_d[:, :, :, c, lo]) / 2
    d2_hw = (g_h[:, :, :, :, hi] - g_h[:, :, :, :, lo]) / 2
    energy = (d2_dd.pow(2) + d2_hh.pow(2) + d2_ww.pow(2)
              + 2 * (d2_dh.pow(2) + d2_dw.pow(2) + d2_hw.pow(2)))
    return energy.mean()


#: `config.REGULARIZERS` name -> function of ddf_vox (magnitude also takes the spacing and its
#: threshold; `regularizer_terms` passes them).
REGULARIZER_FNS: dict[str, Callable[..., torch.Tensor]] = {
    "smooth": smoothness,
    "magnitude": magnitude,
    "rigidity": rigidity,
    "jacobian": jacobian_penalty,
    "bending": bending_energy,
}
assert tuple(REGULARIZER_FNS) == REGULARIZERS  # internal invariant: one list of names


def regularizer_terms(ddf_vox: torch.Tensor, spacing_mm,
                      max_displacement_mm: float = DEFAULT_MAX_DISPLACEMENT_MM
                      ) -> dict[str, torch.Tensor]:
    """All five regularizers of `ddf_vox`, unweighted, by name in `REGULARIZERS` order.

    `spacing_mm` ((3,) or (B, 3), mm) and `max_displacement_mm` are the magnitude term's."""
    terms = {}
    for name, fn in REGULARIZER_FNS.items():
        terms[name] = (fn(ddf_vox, spacing_mm, max_displacement_mm) if name == "magnitude"
                       else fn(ddf_vox))
    return terms
