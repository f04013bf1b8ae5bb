"""Registration metrics: overlap, surface distance, field regularity, similarity, one pair's row.

Inputs may be numpy arrays or torch tensors (converted to numpy / float64 here); nothing here
depends on training. Conventions: label maps `(D, H, W)` (or `(1, D, H, W)`) integers with 0 the
background; displacement fields `(3, D, H, W)` or `(B, 3, D, H, W)` in voxels, channel k moving
spatial axis k; `spacing_mm` the voxel size along (D, H, W) in mm.

Definitions follow the field (VoxelMorph, Learn2Reg): Dice on hard labels with the moving
segmentation warped by nearest neighbour and the background excluded; HD95 in mm; folding as
100 x the fraction of det J <= 0 (J = I + grad u, central differences); NDV the share of volume
whose finite-difference simplices fold; SDlogJ the standard deviation of log det J.
`l2r_scores` gives Dice, HD95 and SDlogJ under Learn2Reg's own definitions (voxels).

A structure that vanishes or appears scores as the worst case, never the best: Dice is NaN
for a label absent from the fixed map (0 for one absent from the warped map), HD95 is infinite
for a label present in one map only, and `labels_missing` counts such labels. docs/METRICS.md
gives every definition beside Learn2Reg's.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from scipy import ndimage
from scipy.spatial import cKDTree

from regcore.spatial import jacobian_det
from regcore.surfaces import robust_hausdorff_vox

__all__ = [
    "SEG4_LABELS",
    "PER_PAIR_COLUMNS",
    "dice_per_label",
    "hd95_mm",
    "labels_missing",
    "jacobian_det_np",
    "folding_pct",
    "ndv_pct",
    "sdlogj",
    "sdlogj_l2r",
    "l2r_scores",
    "displacement_stats",
    "global_ncc",
    "mse",
    "plausibility",
    "evaluate_pair",
]

#: seg4 label value -> name (0 is the background). The names make the `dice_<name>` columns.
SEG4_LABELS: dict[int, str] = {1: "cortex", 2: "subcortical", 3: "white_matter", 4: "csf"}

#: The columns `evaluate_pair` returns, in order (`inference_s` only when it is given).
PER_PAIR_COLUMNS: tuple[str, ...] = (
    "dice_mean", *(f"dice_{name}" for name in SEG4_LABELS.values()), "dice_before_mean",
    "hd95_mm", "labels_missing", "folding_pct", "ndv_pct", "sdlogj", "disp_mean_vox",
    "disp_max_vox", "disp_mean_mm", "disp_max_mm", "mse_before", "mse_after",
    "mse_improvement_pct", "ncc_before", "ncc_after", "ncc_improvement_pct", "plausibility",
    "true_error_mm", "true_disp_mean_mm", "disp_mag_error_mm", "l2r_dice_mean", "l2r_hd95_vox",
    "l2r_sdlogj",
)


# --- input handling ----------------------------------------------------------------------------
def _np(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return x
    raise TypeError(f"expected {name} to be a numpy array or torch tensor, got {type(x).__name__}")


def _labels3d(seg: Any, name: str) -> np.ndarray:
    arr = _np(seg, name)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3:
        raise ValueError(f"expected {name} of shape (D, H, W) or (1, D, H, W), got {arr.shape}")
    if arr.dtype.kind not in "iub":
        raise TypeError(f"expected {name} with an integer dtype (hard labels), got {arr.dtype}")
    return arr


def _seg_pair(a: Any, b: Any, names: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    a3, b3 = _labels3d(a, names[0]), _labels3d(b, names[1])
    if a3.shape != b3.shape:
        raise ValueError(f"shape mismatch: {names[0]} has {a3.shape}, {names[1]} has {b3.shape}")
    return a3, b3


def _label_list(labels: Mapping[int, str] | Sequence[int] | None) -> list[int]:
    values = list(SEG4_LABELS) if labels is None else list(labels)
    if not values:
        raise ValueError("labels == [], expected at least one foreground label")
    if any(int(v) == 0 for v in values):
        raise ValueError(f"labels == {values}, must not include the background 0")
    return [int(v) for v in values]


def _spacing(spacing_mm: Any) -> np.ndarray:
    arr = np.asarray(_np(spacing_mm, "spacing_mm") if isinstance(spacing_mm, torch.Tensor)
                     else spacing_mm, dtype=np.float64).reshape(-1)
    if arr.shape != (3,) or not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError(f"spacing_mm == {np.asarray(spacing_mm).tolist()}, must be three "
                         "positive finite numbers (mm along D, H, W)")
    return arr


def _ddf(ddf_vox: Any, name: str = "ddf_vox") -> np.ndarray:
    """(B, 3, D, H, W) float64 from (3, D, H, W) or (B, 3, D, H, W)."""
    arr = np.asarray(_np(ddf_vox, name), dtype=np.float64)
    if arr.ndim == 4:
        arr = arr[None]
    if arr.ndim != 5 or arr.shape[1] != 3:
        raise ValueError(f"expected {name} of shape (3, D, H, W) or (B, 3, D, H, W), "
                         f"got {tuple(np.shape(ddf_vox))}")
    return arr


# --- overlap and surface distance -------------------------------------------------------------
def dice_per_label(warped_seg: Any, fixed_seg: Any,
                   labels: Mapping[int, str] | Sequence[int] | None = None) -> dict[int, float]:
    """Hard Dice per foreground label: 2 |A ∩ B| / (|A| + |B|).

    `labels` defaults to the seg4 labels 1..4; the background 0 is never scored (it would
    inflate Dice). A label absent from the fixed map has no reference to overlap: NaN (as in
    Learn2Reg; average with `np.nanmean`, and count it with `labels_missing` when the warped
    map has it); present in the fixed map but absent from the warped one: 0.
    """
    a, b = _seg_pair(warped_seg, fixed_seg, ("warped_seg", "fixed_seg"))
    result = {}
    for label in _label_list(labels):
        in_a, in_b = a == label, b == label
        size_b = int(in_b.sum())
        result[label] = (2.0 * int((in_a & in_b).sum()) / (int(in_a.sum()) + size_b)
                         if size_b else float("nan"))
    return result


def _surface(mask: np.ndarray) -> np.ndarray:
    # voxels of the mask with at least one 6-neighbour outside it (the volume edge counts as
    # outside, so a label touching the border has a surface there)
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def _surface_points_mm(mask: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    return np.argwhere(_surface(mask)) * spacing  # (N, 3) positions in mm


def _directed_distances_mm(from_points_mm: np.ndarray, to_points_mm: np.ndarray) -> np.ndarray:
    # exact Euclidean nearest-neighbour distances; a k-d tree over the surface voxels is much
    # faster than a distance transform of the whole volume (the same numbers: see the tests)
    return cKDTree(to_points_mm).query(from_points_mm, k=1)[0]


def hd95_mm(warped_seg: Any, fixed_seg: Any,
            labels: Mapping[int, str] | Sequence[int] | None = None,
            spacing_mm: Any = (1.0, 1.0, 1.0), percentile: float = 95.0) -> float:
    """95th-percentile symmetric Hausdorff distance in mm, averaged over labels.

    Per label: surfaces by erosion (6-connectivity), Euclidean distances in mm from each surface
    voxel of one map to the nearest surface voxel of the other (exact nearest neighbours with
    voxel positions scaled by `spacing_mm`; equal to `distance_transform_edt(...,
    sampling=spacing_mm)` at the surface voxels), the 95th percentile of each direction, and
    the larger of the two (as
    MONAI's `compute_hausdorff_distance(percentile=95)` and the `surface_distance` package do).
    A label absent from both maps is skipped; a label present in one map only (it vanished
    from the warped map, or appeared in it) is infinitely far: that label and the mean are
    +inf (the worst case, as Learn2Reg scores it; `labels_missing` counts them). NaN when no
    label is present in either map.
    """
    a, b = _seg_pair(warped_seg, fixed_seg, ("warped_seg", "fixed_seg"))
    spacing = _spacing(spacing_mm)
    if not 0 <= percentile <= 100:
        raise ValueError(f"percentile == {percentile!r}, must be in [0, 100]")
    values = []
    for label in _label_list(labels):
        in_a, in_b = a == label, b == label
        if not in_a.any() and not in_b.any():
            continue
        if not in_a.any() or not in_b.any():
            values.append(float("inf"))
            continue
        points_a, points_b = _surface_points_mm(in_a, spacing), _surface_points_mm(in_b, spacing)
        d_ab = _directed_distances_mm(points_a, points_b)
        d_ba = _directed_distances_mm(points_b, points_a)
        values.append(max(np.percentile(d_ab, percentile), np.percentile(d_ba, percentile)))
    return float(np.mean(values)) if values else float("nan")


def labels_missing(warped_seg: Any, fixed_seg: Any,
                   labels: Mapping[int, str] | Sequence[int] | None = None) -> int:
    """How many labels are present in exactly one of the two maps (vanished or appeared)."""
    a, b = _seg_pair(warped_seg, fixed_seg, ("warped_seg", "fixed_seg"))
    return sum(int((a == label).any() != (b == label).any()) for label in _label_list(labels))


# --- field regularity --------------------------------------------------------------------------
def jacobian_det_np(ddf_vox: Any) -> np.ndarray:
    """det(I + grad u) per voxel, `(B, D, H, W)` float64 (see `regcore.spatial.jacobian_det`)."""
    return jacobian_det(torch.from_numpy(_ddf(ddf_vox))).numpy()


def folding_pct(ddf_vox: Any) -> float:
    """100 x the fraction of voxels with det J <= 0 (over all voxels of all batch items)."""
    return float(100.0 * np.mean(jacobian_det_np(ddf_vox) <= 0))


def _sdlogj(det: np.ndarray) -> float:
    return float(np.std(np.log(np.clip(det, 1e-9, None))))


def sdlogj(ddf_vox: Any) -> float:
    """Standard deviation over voxels of log(det J), det J clipped to >= 1e-9 first.

    Folded voxels (det J <= 0) enter as log(1e-9) = -20.7, so a few folds raise SDlogJ sharply.
    """
    return _sdlogj(jacobian_det_np(ddf_vox))


#: voxels cropped from every side of the volume by Learn2Reg's SDlogJ
L2R_CROP_VOX = 2


def sdlogj_l2r(ddf_vox: Any) -> float:
    """The Learn2Reg evaluation script's SDlogJ: std of log(clip(det J + 3, 1e-9, 1e9)) over
    the voxels at least 2 from every side (the script's crop).

    det J from central differences; inside the crop these are the script's own (it pads with
    zeros, which only touches the cropped border). Adding 3 (a documented quirk, MDL-UzL/L2R
    issue 7) compresses the values: numbers from this variant are not comparable with `sdlogj`.
    Every spatial size must be >= 5.
    """
    ddf = _ddf(ddf_vox)
    if min(ddf.shape[2:]) <= 2 * L2R_CROP_VOX:
        raise ValueError(f"expected every spatial size of ddf_vox >= {2 * L2R_CROP_VOX + 1} "
                         f"for the crop, got {tuple(ddf.shape[2:])}")
    c = slice(L2R_CROP_VOX, -L2R_CROP_VOX)
    det = jacobian_det_np(ddf)[:, c, c, c]
    return float(np.std(np.log(np.clip(det + 3, 1e-9, 1e9))))


#: corner v of a grid cube at bits (v >> 2 & 1, v >> 1 & 1, v & 1) along (D, H, W)
_CORNER_OFFSETS = np.array([[(v >> 2) & 1, (v >> 1) & 1, v & 1] for v in range(8)],
                           np.float64).reshape(8, 1, 3)


def _cube_edge(u: np.ndarray, to: int, start: int) -> np.ndarray:
    """phi(corner `to`) - phi(corner `start`) for every grid cube, phi = x + u, `(B, 3, ...)`."""
    def corner(v: int) -> np.ndarray:
        a, b, c = (v >> 2) & 1, (v >> 1) & 1, v & 1
        d, h, w = u.shape[2:]
        return u[:, :, a:d - 1 + a, b:h - 1 + b, c:w - 1 + c]

    offset = _CORNER_OFFSETS[to] - _CORNER_OFFSETS[start]
    return corner(to) - corner(start) + offset.reshape(1, 3, 1, 1, 1)


def _det3(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """det[a, b, c] of vectors along axis 1 (written out: np.cross is several times slower)."""
    return (a[:, 0] * (b[:, 1] * c[:, 2] - b[:, 2] * c[:, 1])
            - a[:, 1] * (b[:, 0] * c[:, 2] - b[:, 2] * c[:, 0])
            + a[:, 2] * (b[:, 0] * c[:, 1] - b[:, 1] * c[:, 0]))


def ndv_pct(ddf_vox: Any) -> float:
    """Non-diffeomorphic volume (Liu et al. 2024, "digital diffeomorphism"): 100 x the share
    of the volume covered by folded (negatively oriented) tetrahedra of the deformed grid.

    Each cube of 8 neighbouring voxel centres is split into 5 tetrahedra (4 at corners, 1 in
    the centre) in both of its two ways; each tetrahedron's signed volume under x + u(x) is
    det(edges) / 6 (positive for the identity); the folded volume of the cube is the mean over
    the two splits of the sum of the negative volumes. Over the (D-1)(H-1)(W-1) cubes of all
    batch items. Catches folds that central-difference det J misses (their stencil skips the
    voxel itself: an alternating field +a, -a, +a... has central det J = 1 everywhere).
    """
    u = _ddf(ddf_vox)
    if min(u.shape[2:]) < 2:
        raise ValueError(f"expected every spatial size of ddf_vox >= 2, got {tuple(u.shape[2:])}")
    negative = np.zeros((u.shape[0],) + tuple(s - 1 for s in u.shape[2:]))
    for v in range(8):  # the corner tetrahedron at v: edges to its 3 cube neighbours
        edges = [_cube_edge(u, v ^ bit, v) for bit in (4, 2, 1)]
        sign = (-1.0) ** bin(v).count("1")  # the identity's det of these edges
        negative += np.maximum(-sign * _det3(*edges), 0.0) / 6
    for w0, w1, w2, w3 in ((1, 2, 4, 7), (0, 3, 5, 6)):  # the two central tetrahedra
        edges = [_cube_edge(u, w, w0) for w in (w1, w2, w3)]
        sign = float(np.sign(_det3(*[_CORNER_OFFSETS[w] - _CORNER_OFFSETS[w0]
                                     for w in (w1, w2, w3)]))[0])
        negative += np.maximum(-sign * _det3(*edges), 0.0) / 6
    return float(100.0 * np.mean(negative / 2))  # mean of the two splits, per unit cube


def l2r_scores(fixed_seg: Any, moving_seg: Any, warped_seg: Any, disp_vox: Any,
               labels: Mapping[int, str] | Sequence[int] | None = None) -> dict[str, Any]:
    """Dice, HD95 and SDlogJ as the Learn2Reg evaluation code defines them (in voxels).

    Args:
        fixed_seg, moving_seg, warped_seg: `(D, H, W)` integer labels, `warped_seg` the moving
            labels warped with nearest neighbour.
        disp_vox: `(3, D, H, W)` displacement in voxels, channel k along axis k.
        labels: the foreground labels to score; default the seg4 labels 1..4.

    Returns a dict: `dice_mean`, `dice_per_label` (label -> value), `hd95_mean_vox`,
    `hd95_per_label_vox` and `sdlogj` (`sdlogj_l2r`). Per label, both Dice and HD95 are NaN
    when the label is absent from the fixed or the moving map; HD95 is the area-weighted
    95th-percentile surface distance of `regcore.surfaces` (infinite when the label vanished
    from the warped map). The means are `nanmean` over labels, so an infinite HD95 makes the
    mean infinite.
    """
    fixed, warped = _seg_pair(fixed_seg, warped_seg, ("fixed_seg", "warped_seg"))
    moving = _labels3d(moving_seg, "moving_seg")
    if moving.shape != fixed.shape:
        raise ValueError(f"shape mismatch: fixed_seg has {fixed.shape}, moving_seg has "
                         f"{moving.shape}")
    disp = _ddf(disp_vox, "disp_vox")
    if disp.shape != (1, 3, *fixed.shape):
        raise ValueError(f"expected disp_vox of shape (3, {', '.join(map(str, fixed.shape))}), "
                         f"got {tuple(np.shape(disp_vox))}")
    dice, hd95 = {}, {}
    for label in _label_list(labels):
        in_f, in_w = fixed == label, warped == label
        if not in_f.any() or not (moving == label).any():
            dice[label] = hd95[label] = float("nan")
            continue
        dice[label] = 2.0 * int((in_f & in_w).sum()) / (int(in_f.sum()) + int(in_w.sum()))
        hd95[label] = robust_hausdorff_vox(in_f, in_w, 95.0)
    return {"dice_mean": _nanmean(dice.values()), "dice_per_label": dice,
            "hd95_mean_vox": _nanmean(hd95.values()), "hd95_per_label_vox": hd95,
            "sdlogj": sdlogj_l2r(disp)}


def displacement_stats(ddf_vox: Any, spacing_mm: Any = (1.0, 1.0, 1.0)) -> dict[str, float]:
    """Mean and max displacement length over voxels, in voxels and in mm.

    mm: each channel k is scaled by the spacing of axis k before the Euclidean norm.
    Keys: disp_mean_vox, disp_max_vox, disp_mean_mm, disp_max_mm.
    """
    u = _ddf(ddf_vox)
    spacing = _spacing(spacing_mm)
    norm_vox = np.sqrt((u ** 2).sum(axis=1))
    norm_mm = np.sqrt(((u * spacing.reshape(1, 3, 1, 1, 1)) ** 2).sum(axis=1))
    return {
        "disp_mean_vox": float(norm_vox.mean()),
        "disp_max_vox": float(norm_vox.max()),
        "disp_mean_mm": float(norm_mm.mean()),
        "disp_max_mm": float(norm_mm.max()),
    }


def _plausibility(folding_fraction: float, sdlogj_value: float) -> float:
    return float((1.0 - folding_fraction) * math.exp(-sdlogj_value))


def plausibility(ddf_vox: Any) -> float:
    """An explicit "anatomical plausibility" score in [0, 1] (the study reported one, undefined).

        plausibility = (1 - f) * exp(-SDlogJ)

    with f = fraction of voxels with det J <= 0 (folding_pct / 100) and SDlogJ as in `sdlogj`.
    1 for the identity or any rigid/volume-preserving fold-free field; it decreases with folds
    and with the spread of local volume change (SDlogJ 0.1 -> 0.905; 0.5 -> 0.607). It measures
    the regularity of the transform, not anatomical correctness.
    """
    det = jacobian_det_np(ddf_vox)
    return _plausibility(float(np.mean(det <= 0)), _sdlogj(det))


# --- similarity --------------------------------------------------------------------------------
def _pair(a: Any, b: Any, names: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(_np(a, names[0]), dtype=np.float64)
    y = np.asarray(_np(b, names[1]), dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"shape mismatch: {names[0]} has {x.shape}, {names[1]} has {y.shape}")
    return x, y


def global_ncc(a: Any, b: Any) -> float:
    """Pearson correlation of all voxels of `a` and `b` (NaN if either is constant)."""
    x, y = _pair(a, b, ("a", "b"))
    x, y = x.ravel() - x.mean(), y.ravel() - y.mean()
    denom = math.sqrt(float(x @ x) * float(y @ y))
    return float(x @ y) / denom if denom > 0 else float("nan")


def mse(a: Any, b: Any) -> float:
    """Mean squared difference over all voxels."""
    x, y = _pair(a, b, ("a", "b"))
    diff = (x - y).ravel()
    return float(diff @ diff) / diff.size if diff.size else float("nan")


# --- one pair ----------------------------------------------------------------------------------
def _truth_columns(ddf: np.ndarray, true_ddf_vox: Any, mask: np.ndarray,
                   spacing: np.ndarray) -> dict[str, float]:
    """Over `mask`, in mm: the mean error against the true field, the true field's mean length
    and the mean absolute difference of the two fields' lengths."""
    truth = _ddf(true_ddf_vox, "true_ddf_vox")
    if truth.shape != ddf.shape:
        raise ValueError(f"shape mismatch: true_ddf_vox has {truth.shape}, ddf_vox has {ddf.shape}")
    if not mask.any():
        return dict.fromkeys(("true_error_mm", "true_disp_mean_mm", "disp_mag_error_mm"),
                             float("nan"))
    scale = spacing.reshape(1, 3, 1, 1, 1)

    def length_mm(u: np.ndarray) -> np.ndarray:
        return np.sqrt(((u * scale) ** 2).sum(axis=1))[0][mask]

    true_length = length_mm(truth)
    return {"true_error_mm": float(length_mm(ddf - truth).mean()),
            "true_disp_mean_mm": float(true_length.mean()),
            "disp_mag_error_mm": float(np.abs(length_mm(ddf) - true_length).mean())}


def evaluate_pair(*, moving_image: Any, fixed_image: Any, warped_image: Any, moving_seg: Any,
                  fixed_seg: Any, warped_seg: Any, ddf_vox: Any, spacing_mm: Any,
                  true_ddf_vox: Any = None, brain_mask: Any = None,
                  labels: Mapping[int, str] | None = None,
                  inference_s: float | None = None) -> dict[str, float]:
    """The per-pair row of docs/ARCHITECTURE.md (keys `PER_PAIR_COLUMNS`, plus `inference_s`
    when given).

    Args:
        moving_image, fixed_image, warped_image: same shape (e.g. `(C, D, H, W)`), the moving
            image before and after warping by `ddf_vox` (for MSE and global NCC).
        moving_seg, fixed_seg, warped_seg: `(D, H, W)` integer labels, `warped_seg` the moving
            labels warped with nearest neighbour.
        ddf_vox: `(3, D, H, W)` (or `(1, 3, D, H, W)`) total displacement in voxels.
        spacing_mm: voxel size (D, H, W) in mm.
        true_ddf_vox: the ground-truth displacement, or None (then `true_error_mm`,
            `true_disp_mean_mm` and `disp_mag_error_mm` are NaN).
        brain_mask: `(D, H, W)` bool region for those three; default `fixed_seg > 0`.
        labels: label value -> name for the `dice_<name>` columns; default `SEG4_LABELS`.

    Relative improvements: MSE (lower is better) 100 (before - after) / before; NCC (higher is
    better) 100 (after - before) / |before|; NaN when the denominator is 0. Displacement
    statistics are over the whole volume. `labels_missing` counts the labels present in only
    one of the fixed and warped maps (their HD95 is infinite, so `hd95_mm` is too). The
    `l2r_` columns are `l2r_scores` (Learn2Reg's definitions, HD95 in voxels).
    """
    labels = SEG4_LABELS if labels is None else dict(labels)
    spacing = _spacing(spacing_mm)
    fixed3 = _labels3d(fixed_seg, "fixed_seg")
    dice = dice_per_label(warped_seg, fixed3, labels)
    dice_before = dice_per_label(moving_seg, fixed3, labels)
    row: dict[str, float] = {"dice_mean": _nanmean(dice.values())}
    row.update({f"dice_{name}": dice[label] for label, name in labels.items()})
    row["dice_before_mean"] = _nanmean(dice_before.values())
    row["hd95_mm"] = hd95_mm(warped_seg, fixed3, labels, spacing)
    row["labels_missing"] = float(labels_missing(warped_seg, fixed3, labels))

    ddf = _ddf(ddf_vox)
    if ddf.shape[0] != 1 or ddf.shape[2:] != fixed3.shape:
        raise ValueError(f"expected ddf_vox of shape (3, {', '.join(map(str, fixed3.shape))}) "
                         f"for one pair, got {tuple(np.shape(ddf_vox))}")
    det = jacobian_det(torch.from_numpy(ddf)).numpy()
    folding_fraction = float(np.mean(det <= 0))
    row["folding_pct"] = 100.0 * folding_fraction
    row["ndv_pct"] = ndv_pct(ddf)
    row["sdlogj"] = _sdlogj(det)
    row.update(displacement_stats(ddf, spacing))

    mse_before, mse_after = mse(moving_image, fixed_image), mse(warped_image, fixed_image)
    ncc_before, ncc_after = global_ncc(moving_image, fixed_image), global_ncc(warped_image, fixed_image)
    row["mse_before"], row["mse_after"] = mse_before, mse_after
    row["mse_improvement_pct"] = (100.0 * (mse_before - mse_after) / mse_before
                                  if mse_before > 0 else float("nan"))
    row["ncc_before"], row["ncc_after"] = ncc_before, ncc_after
    row["ncc_improvement_pct"] = (100.0 * (ncc_after - ncc_before) / abs(ncc_before)
                                  if ncc_before != 0 and math.isfinite(ncc_before)
                                  else float("nan"))
    row["plausibility"] = _plausibility(folding_fraction, row["sdlogj"])

    if true_ddf_vox is None:
        row.update(dict.fromkeys(("true_error_mm", "true_disp_mean_mm", "disp_mag_error_mm"),
                                 float("nan")))
    else:
        mask = fixed3 > 0 if brain_mask is None else np.asarray(_np(brain_mask, "brain_mask"), bool)
        if mask.shape != fixed3.shape:
            raise ValueError(f"shape mismatch: brain_mask has {mask.shape}, fixed_seg has "
                             f"{fixed3.shape}")
        row.update(_truth_columns(ddf, true_ddf_vox, mask, spacing))
    l2r = l2r_scores(fixed3, moving_seg, warped_seg, ddf[0], list(labels))
    row["l2r_dice_mean"] = l2r["dice_mean"]
    row["l2r_hd95_vox"] = l2r["hd95_mean_vox"]
    row["l2r_sdlogj"] = l2r["sdlogj"]
    if inference_s is not None:
        row["inference_s"] = float(inference_s)
    return row


def _nanmean(values) -> float:
    arr = np.asarray(list(values), dtype=np.float64)
    return float(np.nanmean(arr)) if np.any(~np.isnan(arr)) else float("nan")
