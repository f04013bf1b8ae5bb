"""One subject's volumes on one grid, and resampling that keeps the physical extent.

Grid convention: voxel j of an axis covers [j, j + 1) in voxel-edge units, so a volume of `n`
voxels of spacing `s` mm spans `n * s` mm. Resampling `n_old -> n_new` keeps that extent: the new
spacing is `s * n_old / n_new`, new voxel centre j sits at old voxel coordinate
`(j + 0.5) * n_old / n_new - 0.5`, and the NIfTI affine is updated to match, so outputs written
with it lie exactly on the original scanner/world positions.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

__all__ = ["Volume", "resample_volume", "resample_array", "resampled_affine", "spacing_from_affine",
           "normalise_intensity", "one_hot"]

N_SEG4_LABELS = 5  # 0 background, 1 cortex, 2 subcortical grey, 3 white matter, 4 CSF


@dataclass(frozen=True)
class Volume:
    """One subject on one grid.

    image:        (1, D, H, W) float32 intensities in [0, 1], or None when the source has no
                  intensities (the study's seg4_onehot .npy lists).
    seg4:         (D, H, W) int64 labels 0..4.
    seg35:        (D, H, W) int64 labels, or None when absent.
    spacing_mm:   (3,) float64 voxel size in mm along D, H, W.
    affine:       (4, 4) float64 voxel -> world (mm) of this grid (NIfTI convention).
    true_ddf_vox: (3, D, H, W) float32, the embedded cohort's ground truth with
                  `subject(x) = atlas(x + u(x))` (u in voxels of this grid), else None.
    """

    subject_id: str
    image: np.ndarray | None
    seg4: np.ndarray
    seg35: np.ndarray | None
    spacing_mm: np.ndarray
    affine: np.ndarray
    true_ddf_vox: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.seg4.shape)


def spacing_from_affine(affine: np.ndarray) -> np.ndarray:
    """(3,) voxel sizes in mm: the lengths of the affine's first three columns."""
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))


def _scales(old_shape, new_shape) -> np.ndarray:
    return np.asarray(old_shape, dtype=np.float64) / np.asarray(new_shape, dtype=np.float64)


def resampled_affine(affine: np.ndarray, old_shape, new_shape) -> np.ndarray:
    """The affine of the resampled grid: new index j -> old index (j + 0.5) s - 0.5 -> world."""
    s = _scales(old_shape, new_shape)
    new_to_old = np.eye(4)
    new_to_old[:3, :3] = np.diag(s)
    new_to_old[:3, 3] = (s - 1.0) / 2.0
    return np.asarray(affine, dtype=np.float64) @ new_to_old


def resample_array(array: np.ndarray, new_shape, *, order: int) -> np.ndarray:
    """Resample a (D, H, W) array to `new_shape` with the extent-preserving convention.

    order 0: nearest neighbour (labels); order 1: linear (intensities, fields).
    """
    old_shape = array.shape
    new_shape = tuple(int(n) for n in new_shape)
    if tuple(old_shape) == new_shape:
        return array
    s = _scales(old_shape, new_shape)
    source = array if order == 0 else array.astype(np.float32, copy=False)
    return ndimage.affine_transform(source, s, offset=(s - 1.0) / 2.0, output_shape=new_shape,
                                    order=order, mode="nearest", prefilter=False)


def resample_volume(volume: Volume, new_shape) -> Volume:
    """The volume on a grid of `new_shape` covering the same physical extent.

    Labels nearest, intensities linear; a ground-truth displacement is resampled linearly and
    rescaled to voxels of the new grid (u_new = u_old * n_new / n_old per axis).
    """
    new_shape = tuple(int(n) for n in new_shape)
    if volume.shape == new_shape:
        return volume
    old_shape = volume.shape
    s = _scales(old_shape, new_shape)
    image = None
    if volume.image is not None:
        image = resample_array(volume.image[0], new_shape, order=1)[None].astype(np.float32)
    seg35 = None if volume.seg35 is None else resample_array(volume.seg35, new_shape, order=0)
    ddf = None
    if volume.true_ddf_vox is not None:
        ddf = np.stack([resample_array(volume.true_ddf_vox[k], new_shape, order=1) / s[k]
                        for k in range(3)]).astype(np.float32)
    affine = resampled_affine(volume.affine, old_shape, new_shape)
    return replace(volume, image=image, seg4=resample_array(volume.seg4, new_shape, order=0),
                   seg35=seg35, affine=affine, spacing_mm=np.asarray(volume.spacing_mm) * s,
                   true_ddf_vox=ddf)


def normalise_intensity(image: np.ndarray, percentile: float = 99.5) -> np.ndarray:
    """Scale to [0, 1] robustly: min 0 (or the minimum if negative) and the `percentile` of the
    non-zero voxels mapped to 1, clipped. float32."""
    image = image.astype(np.float32, copy=False)
    low = min(float(image.min()), 0.0)
    foreground = image[image > low]
    if foreground.size == 0:
        return np.zeros_like(image, dtype=np.float32)
    high = float(np.percentile(foreground, percentile))
    if high <= low:
        high = float(foreground.max())
    return np.clip((image - low) / (high - low), 0.0, 1.0).astype(np.float32)


def one_hot(seg: np.ndarray, n_labels: int = N_SEG4_LABELS) -> np.ndarray:
    """(D, H, W) integer labels -> (n_labels, D, H, W) float32 one-hot."""
    return (np.arange(n_labels).reshape(-1, 1, 1, 1) == seg[None]).astype(np.float32)
