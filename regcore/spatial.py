"""Grids, warping, affine transforms, composition and the Jacobian determinant.

Conventions (docs/ARCHITECTURE.md):
- images `(B, C, D, H, W)`; label maps `(B, 1, D, H, W)` or `(B, D, H, W)` integer;
- displacement fields `ddf_vox` `(B, 3, D, H, W)` **in voxels**, channel k moves spatial axis k
  (D, H, W order); the warped moving image is `M(x + u(x))` on the fixed grid;
- an affine `theta` `(B, 3, 4)` acts on voxel coordinates about the centre c = (size - 1) / 2:
  `x' = A (x - c) + c + t`.

Normalised grid coordinates exist only in `_to_grid_sample_coords`, the one place that calls
`torch.nn.functional.grid_sample`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "check_ddf",
    "identity_grid_vox",
    "centred_grid_vox",
    "warp",
    "affine_to_ddf",
    "compose_affine_ddf",
    "jacobian_det",
    "WARP_MODES",
    "PADDINGS",
]

WARP_MODES = ("bilinear", "nearest")
PADDINGS = ("border", "zeros")

_GRID_CACHE: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
_GRID_CACHE_SIZE = 8


def check_ddf(ddf_vox: object, name: str = "ddf") -> torch.Tensor:
    """Raise unless `ddf_vox` is a floating tensor of shape (B, 3, D, H, W); return it."""
    if not isinstance(ddf_vox, torch.Tensor):
        raise TypeError(f"expected {name} to be a torch.Tensor, got {type(ddf_vox).__name__}")
    if ddf_vox.ndim != 5 or ddf_vox.shape[1] != 3:
        raise ValueError(f"expected {name} of shape (B, 3, D, H, W), got {tuple(ddf_vox.shape)}")
    if not ddf_vox.is_floating_point():
        raise TypeError(f"expected {name} with a floating dtype, got {ddf_vox.dtype}")
    return ddf_vox


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} == {value!r}, must be one of {', '.join(choices)}")


def identity_grid_vox(shape: Sequence[int], device: torch.device | str | None = None,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Voxel coordinates of every voxel, `(1, 3, D, H, W)`: channel k holds the index along axis k.

    Cached per (shape, device, dtype) so that a training loop does not rebuild it each step;
    the returned tensor is shared: never modify it in place.
    """
    shape = tuple(int(s) for s in shape)
    device = torch.device(device) if device is not None else torch.device("cpu")
    key = (shape, str(device), dtype)
    grid = _GRID_CACHE.get(key)
    if grid is None:
        axes = [torch.arange(s, device=device, dtype=dtype) for s in shape]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0).unsqueeze(0)
        _GRID_CACHE[key] = grid
        if len(_GRID_CACHE) > _GRID_CACHE_SIZE:
            _GRID_CACHE.popitem(last=False)
    else:
        _GRID_CACHE.move_to_end(key)
    return grid


def _to_grid_sample_coords(pos_vox: torch.Tensor) -> torch.Tensor:
    """Voxel positions `(B, 3, D, H, W)` -> grid_sample's grid `(B, D, H, W, 3)`.

    With align_corners=True, voxel index 0 maps to -1 and index size-1 to +1. grid_sample wants
    the last dimension ordered (x, y, z) = (W, H, D), the reverse of our channel order: the flip
    happens here and nowhere else.
    """
    sizes = pos_vox.shape[2:]
    scale = torch.tensor([2.0 / max(s - 1, 1) for s in sizes], device=pos_vox.device,
                         dtype=pos_vox.dtype).view(1, 3, 1, 1, 1)
    normalised = pos_vox * scale - 1.0
    return normalised.permute(0, 2, 3, 4, 1).flip(-1)


def _warp_integer(image: torch.Tensor, ddf_vox: torch.Tensor, padding: str) -> torch.Tensor:
    """Exact warp for an integer-valued field: pure indexing, no interpolation.

    Used when no gradient with respect to the field is needed, so that the zero field is a
    bitwise identity and integer shifts move voxels exactly (grid_sample's float round trip
    through normalised coordinates is off by ~1e-7 voxel and would blend neighbours).
    """
    b, c = image.shape[:2]
    sizes = image.shape[2:]
    pos = (identity_grid_vox(sizes, ddf_vox.device, ddf_vox.dtype) + ddf_vox).round().long()
    inside = torch.ones_like(pos[:, 0], dtype=torch.bool)
    clamped = []
    for k, s in enumerate(sizes):
        inside &= (pos[:, k] >= 0) & (pos[:, k] <= s - 1)
        clamped.append(pos[:, k].clamp(0, s - 1))
    flat_index = (clamped[0] * sizes[1] + clamped[1]) * sizes[2] + clamped[2]  # (B, D, H, W)
    flat_index = flat_index.reshape(b, 1, -1).expand(b, c, -1)
    out = image.reshape(b, c, -1).gather(2, flat_index).reshape(image.shape)
    if padding == "zeros":
        out = out * inside.unsqueeze(1).to(out.dtype) if out.is_floating_point() else \
            torch.where(inside.unsqueeze(1), out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out


def warp(image: torch.Tensor, ddf_vox: torch.Tensor, mode: str = "bilinear",
         padding: str = "border") -> torch.Tensor:
    """Warp `image` with the displacement `ddf_vox`: out(x) = image(x + u(x)).

    Args:
        image: `(B, C, D, H, W)` float (images, one-hot or probability maps) or integer (label
            maps; also accepted as `(B, D, H, W)`).
        ddf_vox: `(B, 3, D, H, W)` displacement in voxels, same B and (D, H, W) as `image`.
        mode: "bilinear" (trilinear in 3D; images and probability maps) or "nearest" (labels).
        padding: "border" (repeat the edge value) or "zeros" (0 outside the volume).

    Returns:
        The warped image, same shape and dtype as `image` (integer labels come back as
        integers; bilinear interpolation of integer labels is refused: use "nearest").

    When no gradient with respect to `ddf_vox` is required, the zero field returns a copy of
    the image (a bitwise identity) and any other integer-valued field (integer shifts) is
    applied by exact indexing. Otherwise grid_sample with align_corners=True does the
    resampling; its round trip through normalised coordinates is exact to ~1e-7 voxel.

    Raises:
        TypeError / ValueError naming the offending argument, its value and what was expected.
    """
    ddf_vox = check_ddf(ddf_vox)
    _check_choice("mode", mode, WARP_MODES)
    _check_choice("padding", padding, PADDINGS)
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"expected image to be a torch.Tensor, got {type(image).__name__}")
    squeeze = False
    if image.ndim == 4 and not image.is_floating_point():
        image, squeeze = image.unsqueeze(1), True
    if image.ndim != 5:
        raise ValueError(f"expected image of shape (B, C, D, H, W), got {tuple(image.shape)}")
    if image.shape[0] != ddf_vox.shape[0]:
        raise ValueError(
            f"batch size mismatch: image has {image.shape[0]}, ddf has {ddf_vox.shape[0]}")
    if image.shape[2:] != ddf_vox.shape[2:]:
        raise ValueError(f"spatial shape mismatch: image has {tuple(image.shape[2:])}, "
                         f"ddf has {tuple(ddf_vox.shape[2:])}")
    is_integer = not image.is_floating_point()
    if is_integer and mode != "nearest":
        raise ValueError(f"mode == {mode!r} for an integer label map of dtype {image.dtype}, "
                         "must be 'nearest'")

    needs_grad = torch.is_grad_enabled() and ddf_vox.requires_grad
    if not needs_grad and not bool(ddf_vox.any()):
        out = image.clone()  # the zero field: identity, no resampling
    # frac(u) is NaN for NaN and inf, which go to grid_sample
    elif not needs_grad and bool((torch.frac(ddf_vox) == 0).all()):
        out = _warp_integer(image, ddf_vox, padding)
    else:
        source = image.to(ddf_vox.dtype) if (is_integer or image.dtype != ddf_vox.dtype) else image
        pos_vox = identity_grid_vox(image.shape[2:], ddf_vox.device, ddf_vox.dtype) + ddf_vox
        out = F.grid_sample(source, _to_grid_sample_coords(pos_vox), mode=mode,
                            padding_mode=padding, align_corners=True)
        if is_integer:
            out = out.round().to(image.dtype)
        elif out.dtype != image.dtype:
            out = out.to(image.dtype)
    return out.squeeze(1) if squeeze else out


def _check_theta(theta: object) -> torch.Tensor:
    if not isinstance(theta, torch.Tensor):
        raise TypeError(f"expected theta to be a torch.Tensor, got {type(theta).__name__}")
    if theta.ndim != 3 or tuple(theta.shape[1:]) != (3, 4):
        raise ValueError(f"expected theta of shape (B, 3, 4), got {tuple(theta.shape)}")
    if not theta.is_floating_point():
        raise TypeError(f"expected theta with a floating dtype, got {theta.dtype}")
    return theta


def centred_grid_vox(shape: Sequence[int], device, dtype) -> torch.Tensor:
    """x - c for every voxel, (1, 3, D, H, W), c = (size - 1) / 2 (exact in float: multiples of 1/2)."""
    centre = torch.tensor([(s - 1) / 2.0 for s in shape], device=device, dtype=dtype)
    return identity_grid_vox(shape, device, dtype) - centre.view(1, 3, 1, 1, 1)


def affine_to_ddf(theta: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The displacement `(B, 3, D, H, W)` in voxels of the affine `theta` `(B, 3, 4)`.

    x' = A (x - c) + c + t, so u(x) = x' - x = (A - I)(x - c) + t. Written with (A - I) so the
    identity [I | 0] gives an exactly zero field.
    """
    theta = _check_theta(theta)
    shape = tuple(shape)
    if len(shape) != 3 or not all(isinstance(s, int) and s >= 1 for s in shape):
        raise ValueError(f"expected shape (D, H, W) of three positive integers, got {shape}")
    eye = torch.eye(3, device=theta.device, dtype=theta.dtype)
    a_minus_i = theta[:, :, :3] - eye
    xc = centred_grid_vox(shape, theta.device, theta.dtype)  # (1, 3, D, H, W)
    ddf = torch.einsum("bij,zjdhw->bidhw", a_minus_i, xc)
    return ddf + theta[:, :, 3].view(-1, 3, 1, 1, 1)


def compose_affine_ddf(theta: torch.Tensor, ddf_vox: torch.Tensor) -> torch.Tensor:
    """The total displacement of "dense field, then affine": one field, one resampling.

    The dense field u is predicted on the fixed grid and the affine maps its output into the
    moving image: total(x) = A (x + u(x) - c) + c + t - x = (A - I)(x - c) + A u(x) + t.
    Warping the moving image once with `total` replaces the study's two resamplings (and their
    double blur).
    """
    theta = _check_theta(theta)
    ddf_vox = check_ddf(ddf_vox)
    if theta.shape[0] != ddf_vox.shape[0]:
        raise ValueError(
            f"batch size mismatch: theta has {theta.shape[0]}, ddf has {ddf_vox.shape[0]}")
    affine_part = affine_to_ddf(theta.to(ddf_vox.dtype), tuple(ddf_vox.shape[2:]))
    return affine_part + torch.einsum("bij,bjdhw->bidhw", theta[:, :, :3].to(ddf_vox.dtype), ddf_vox)


def jacobian_det(ddf_vox: torch.Tensor) -> torch.Tensor:
    """det J per voxel, `(B, D, H, W)`, with J = I + grad(u), u in voxels.

    Derivatives: central differences inside, one-sided at the borders (as torch.gradient with
    edge_order=1). Every spatial size must be >= 2. Differentiable.
    """
    ddf_vox = check_ddf(ddf_vox)
    if min(ddf_vox.shape[2:]) < 2:
        raise ValueError(f"expected every spatial size of ddf >= 2, got {tuple(ddf_vox.shape[2:])}")
    grads = [_central_difference(ddf_vox, dim) for dim in (2, 3, 4)]  # [k][:, c] = du_c/dx_k
    # J[c][k] = delta_ck + du_c/dx_k; off-diagonal entries are views, no copies
    j = [[grads[k][:, c] + 1.0 if c == k else grads[k][:, c] for k in range(3)] for c in range(3)]
    return (j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
            - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
            + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0]))


def _central_difference(u: torch.Tensor, dim: int) -> torch.Tensor:
    """du/dx along `dim`: (u[i+1] - u[i-1]) / 2 inside, one-sided differences at both ends
    (the same numbers as torch.gradient with edge_order=1, in fewer passes)."""
    n = u.shape[dim]
    first = u.narrow(dim, 1, 1) - u.narrow(dim, 0, 1)
    inner = (u.narrow(dim, 2, n - 2) - u.narrow(dim, 0, n - 2)) / 2
    last = u.narrow(dim, n - 1, 1) - u.narrow(dim, n - 2, 1)
    return torch.cat([first, inner, last], dim=dim)
