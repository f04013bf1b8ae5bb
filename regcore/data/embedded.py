"""The embedded cohort: synthetic OASIS-like subjects built offline from the MNI152 template.

Source: the MNI ICBM152 2009a symmetric T1 template and its GM / WM probability maps that
nilearn ships inside its wheel (`nilearn/datasets/data/mni_icbm152_*_tal_nlin_sym_09a_converted
.nii.gz`, 1 mm, skull-stripped). They are read with nibabel straight from the installed package
(nilearn itself is not imported, nothing is downloaded).

seg4 labels, derived at 1 mm inside the brain mask (filled T1 > 0):
- 4 CSF: tissue probability GM + WM < 0.5, or dark T1 (< 0.4 of its maximum): ventricles and
  sulcal CSF.
- 2 subcortical grey: non-CSF voxels more than 15 mm deep inside the brain mask, inside the
  central MNI box |x| <= 32, -35 <= y <= 25, -15 <= z <= 22 mm, that are grey (GM >= 0.35) or
  darker than white matter (T1 < 0.78): thalamus, caudate, putamen, pallidum.
- 1 cortex: the other voxels with GM >= WM (cortical and cerebellar grey).
- 3 white matter: the other voxels with WM > GM.
- 0 background outside the mask.

Grid: the brain's bounding box (plus a 6 mm margin) is widened to the target shape's aspect
ratio so the spacing is isotropic (`spacing_mm = extent / shape`), then sampled at the target
shape (T1 linear, labels nearest). This is the atlas grid; every subject shares it.

Subjects: the atlas `OAS1_0016` is the template itself (zero ground truth, mild intensity
variation of its own). Each other subject `OAS1_0001...` (0016 skipped) is the atlas warped by
`x -> A (x + w(x) - c) + c + t` (voxels, c the volume centre; the composition of
ARCHITECTURE.md): a random affine (rotations, scalings, translations within the configured
bounds) after a smooth diffeomorphic field `w` (Gaussian-smoothed random velocity integrated by
scaling and squaring). Its ground truth `true_ddf_vox.nii.gz` (D, H, W, 3) is
`u(x) = A (x + w(x) - c) + c + t - x`, so `subject(x) = atlas(x + u(x))`: the field a network
should predict for the pair moving = atlas, fixed = subject. Labels are warped nearest,
intensities linearly, then varied (smooth multiplicative bias field, gamma, Gaussian noise on the
brain). Deterministic given the seed.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from scipy import ndimage

from regcore import io as rio
from regcore.data.oasis import TRUE_DDF_FILE
from regcore.data.volume import resample_array

__all__ = ["EmbeddedParams", "build_embedded", "ensure_embedded", "embedded_name",
           "template_paths", "derive_seg4", "ATLAS_ID", "COHORT_FILE", "GENERATOR_VERSION"]

ATLAS_NUMBER = 16
ATLAS_ID = f"OASIS_OAS1_{ATLAS_NUMBER:04d}_MR1"
COHORT_FILE = "cohort.json"
#: part of a build's folder name: a change of the generated values bumps it (2: warps and
#: integration by regcore.spatial / regcore.integrate, float-rounding changes only)
GENERATOR_VERSION = 2
_TEMPLATE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"


@dataclass(frozen=True)
class EmbeddedParams:
    """The generator's knobs (strength of the misalignment and of the intensity variation)."""

    max_rotation_deg: float = 8.0  # per axis, uniform in [-max, max]
    max_translation_mm: float = 6.0  # per axis
    max_scaling: float = 0.06  # per axis scale in [1 - max, 1 + max]
    velocity_sigma_mm: float = 14.0  # Gaussian smoothing of the velocity noise
    max_velocity_mm: float = 5.0  # peak |velocity| before integration
    int_steps: int = 7  # scaling and squaring
    bias_strength: float = 0.15  # bias field exp(b), |b| <= strength
    max_gamma_log: float = 0.15  # gamma = exp(g), |g| <= max
    noise_std: float = 0.015  # Gaussian noise on the brain, intensity units in [0, 1]

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 \
                    or not math.isfinite(value):
                raise ValueError(f"embedded.{f.name} == {value!r}, must be a number >= 0")
        if self.max_scaling >= 0.5:
            raise ValueError(f"embedded.max_scaling == {self.max_scaling!r}, must be < 0.5")


# -- the template and its labels -----------------------------------------------------------------

def template_paths() -> dict[str, Path]:
    """The T1 / GM / WM template files inside the installed nilearn package (not imported)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("nilearn is not installed: the embedded cohort needs the MNI152 "
                                "template files of its wheel (pip install nilearn)")
    data = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    paths = {name: data / _TEMPLATE.format(name) for name in ("t1", "gm", "wm")}
    for path in paths.values():
        if not path.exists():
            raise FileNotFoundError(f"{path}: missing from the installed nilearn package")
    return paths


def derive_seg4(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """seg4 labels (uint8) from the template (intensities and probabilities in [0, 1]); the rules
    are in the module docstring. `affine` (axis-aligned) gives MNI mm for the central box."""
    mask = ndimage.binary_fill_holes(t1 > 0)
    # Depth below the brain surface, on a 2 mm grid (the 15 mm threshold needs no more).
    spacing = np.abs(np.diag(affine)[:3])
    coarse = ndimage.distance_transform_edt(mask[::2, ::2, ::2], sampling=2 * spacing)
    depth_mm = resample_array(coarse.astype(np.float32), mask.shape, order=1)
    xyz = [affine[k, k] * np.arange(mask.shape[k]) + affine[k, 3] for k in range(3)]
    x, y, z = np.ix_(*xyz)
    box = (np.abs(x) <= 32) & (y >= -35) & (y <= 25) & (z >= -15) & (z <= 22)
    csf = mask & ((gm + wm < 0.5) | (t1 < 0.4))
    tissue = mask & ~csf
    subcortical = tissue & box & (depth_mm > 15) & ((gm >= 0.35) | (t1 < 0.78))
    seg = np.zeros(mask.shape, dtype=np.uint8)
    seg[tissue & (gm >= wm)] = 1
    seg[tissue & (wm > gm)] = 3
    seg[subcortical] = 2
    seg[csf] = 4
    return seg


@functools.lru_cache(maxsize=1)
def _template_labels():
    """(t1, seg4, affine) of the template cropped to the brain (6 voxel margin), 1 mm; cached
    per process (read-only arrays)."""
    import nibabel as nib

    paths = template_paths()
    images = {k: nib.load(str(p)) for k, p in paths.items()}
    affine = np.asarray(images["t1"].affine, dtype=np.float64)
    if not np.allclose(affine[:3, :3], np.diag(np.diag(affine[:3, :3]))):
        raise ValueError(f"{paths['t1']}: expected an axis-aligned affine, got {affine.tolist()}")
    t1 = images["t1"].get_fdata(dtype=np.float32)
    margin_vox = 6
    nz = np.nonzero(t1 > 0)
    lo = np.maximum([a.min() - margin_vox for a in nz], 0)
    hi = np.minimum([a.max() + 1 + margin_vox for a in nz], t1.shape)
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    t1 = t1[crop] / max(float(t1.max()), 1e-6)
    gm = images["gm"].get_fdata(dtype=np.float32)[crop] / 255.0
    wm = images["wm"].get_fdata(dtype=np.float32)[crop] / 255.0
    affine_crop = affine.copy()
    affine_crop[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]
    seg = derive_seg4(t1, gm, wm, affine_crop)
    for array in (t1, seg, affine_crop):
        array.setflags(write=False)
    return t1, seg, affine_crop


def _atlas_on_grid(shape: tuple[int, int, int]):
    """(t1 (D,H,W) float32 in [0, 1], seg4 (D,H,W) uint8, affine (4,4)) of the atlas grid."""
    t1, seg, affine_crop = _template_labels()
    # Widen the box to the target aspect ratio: isotropic spacing s (in crop voxels).
    extent = np.asarray(t1.shape, dtype=np.float64)
    target = np.asarray(shape, dtype=np.float64)
    s = float(np.max(extent / target))
    start = (extent - s * target) / 2.0  # edge of the new box, crop voxel-edge units (<= 0)
    offset = start + (s - 1.0) / 2.0  # new centre j -> crop index j s + offset
    t1_grid = ndimage.affine_transform(t1, np.full(3, s), offset=offset, output_shape=shape,
                                       order=1, mode="constant", cval=0.0, prefilter=False)
    seg_grid = ndimage.affine_transform(seg, np.full(3, s), offset=offset, output_shape=shape,
                                        order=0, mode="constant", cval=0, prefilter=False)
    to_crop = np.eye(4)
    to_crop[:3, :3] = np.diag(np.full(3, s))
    to_crop[:3, 3] = offset
    t1_grid = np.clip(t1_grid, 0, 1).astype(np.float32)
    return t1_grid, seg_grid.astype(np.uint8), affine_crop @ to_crop


# -- deformations (torch, voxel units; regcore.spatial warps) ----------------------------------

def _warp(volume, ddf_vox, mode: str):
    """volume (C, D, H, W), ddf_vox (3, D, H, W) torch -> volume(x + u(x)), border padding."""
    from regcore.spatial import warp

    return warp(volume[None].float(), ddf_vox[None], mode=mode)[0]


def _upsample(field: np.ndarray, shape) -> np.ndarray:
    """(C, d, h, w) -> (C, *shape) linear, extent-preserving (the convention of
    `volume.resample_array`: torch's align_corners=False, clamped at the border)."""
    import torch
    import torch.nn.functional as F

    out = F.interpolate(torch.from_numpy(np.ascontiguousarray(field, np.float32))[None],
                        size=tuple(shape), mode="trilinear", align_corners=False)
    return out[0].numpy()


def _smooth_noise(rng: np.random.Generator, shape, channels: int, sigma_vox: float) -> np.ndarray:
    """(channels, *shape) smooth noise, peak |value| 1: Gaussian noise on a 4x coarser grid,
    smoothed there, then upsampled linearly."""
    coarse = tuple(max(4, int(math.ceil(n / 4))) for n in shape)
    noise = np.stack([ndimage.gaussian_filter(rng.standard_normal(coarse), max(sigma_vox / 4, 0.5),
                                              mode="reflect") for _ in range(channels)])
    field = _upsample(noise, shape)
    return field / max(float(np.abs(field).max()), 1e-8)


def _random_affine(rng: np.random.Generator, p: EmbeddedParams, spacing_mm: float):
    """(A (3, 3), t (3,) voxels) within the bounds of `p`."""
    angles = np.deg2rad(rng.uniform(-p.max_rotation_deg, p.max_rotation_deg, 3))
    rotation = np.eye(3)
    for axis, angle in enumerate(angles):
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i] = r[j, j] = math.cos(angle)
        r[i, j], r[j, i] = -math.sin(angle), math.sin(angle)
        rotation = r @ rotation
    scale = rng.uniform(1 - p.max_scaling, 1 + p.max_scaling, 3)
    t = rng.uniform(-p.max_translation_mm, p.max_translation_mm, 3) / spacing_mm
    return rotation @ np.diag(scale), t, {"rotation_deg": np.rad2deg(angles).tolist(),
                                          "scale": scale.tolist(),
                                          "translation_mm": (t * spacing_mm).tolist()}


def _true_ddf(rng, p: EmbeddedParams, shape, spacing_mm: float):
    """u(x) = A (x + w(x) - c) + c + t - x, (3, D, H, W) float32 voxels, and the affine record.

    The velocity is smooth (sigma >= several voxels), so it is integrated on a grid twice as
    coarse and the result upsampled linearly (values rescaled to voxels of the full grid).
    """
    import torch

    from regcore.integrate import integrate_velocity
    from regcore.spatial import identity_grid_vox

    half = tuple(max(8, n // 2) for n in shape)
    factor = np.asarray(shape, dtype=np.float64) / np.asarray(half)
    velocity = _smooth_noise(rng, half, 3, p.velocity_sigma_mm / spacing_mm / factor.mean())
    velocity *= rng.uniform(0.5, 1.0) * p.max_velocity_mm / spacing_mm
    velocity /= factor.reshape(3, 1, 1, 1)  # voxels of the coarse grid
    w_half = integrate_velocity(torch.from_numpy(velocity.astype(np.float32))[None],
                                p.int_steps)[0].numpy()
    w = torch.from_numpy(_upsample(w_half, shape) * factor.reshape(3, 1, 1, 1).astype(np.float32))
    a, t, record = _random_affine(rng, p, spacing_mm)
    centre = (torch.tensor(shape, dtype=torch.float32) - 1) / 2
    x = identity_grid_vox(shape)[0]
    y = (x + w - centre.view(3, 1, 1, 1)).reshape(3, -1)
    mapped = torch.from_numpy(a.astype(np.float32)) @ y
    shift = centre + torch.from_numpy(t.astype(np.float32))
    mapped = mapped.reshape(3, *shape) + shift.view(3, 1, 1, 1)
    return (mapped - x), record


def _vary_intensity(rng, image: np.ndarray, brain: np.ndarray, shape, spacing_mm: float, *,
                    bias: float, gamma_log: float, noise: float) -> np.ndarray:
    field = _smooth_noise(rng, shape, 1, 40.0 / spacing_mm)[0]
    out = image * np.exp(bias * field)
    out = np.clip(out, 0, None) ** math.exp(rng.uniform(-gamma_log, gamma_log))
    out = out + brain * rng.normal(0.0, noise, shape)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


# -- building ----------------------------------------------------------------------------------

def _subject_numbers(n_subjects: int) -> list[int]:
    numbers, k = [], 1
    while len(numbers) < n_subjects:
        if k != ATLAS_NUMBER:
            numbers.append(k)
        k += 1
    return numbers


def _save_nifti(path: Path, data: np.ndarray, affine: np.ndarray, dtype=None) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    if dtype is not None:  # nibabel stores floats as scaled integers (scl_slope / scl_inter)
        img.set_data_dtype(dtype)
    img.header.set_xyzt_units("mm")
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    nib.save(img, str(path))


def _write_subject(folder: Path, image, seg, ddf, affine) -> None:
    folder.mkdir()
    _save_nifti(folder / "aligned_norm.nii.gz", image, affine)
    _save_nifti(folder / "aligned_seg4.nii.gz", seg.astype(np.uint8), affine)
    # int16 with a slope: about 1e-3 voxel resolution for |u| <= 30 voxels, a third of the disk
    _save_nifti(folder / TRUE_DDF_FILE, np.ascontiguousarray(np.moveaxis(ddf, 0, -1)), affine,
                np.int16)
    # The generated grid is also the "scanner" space: link the scanner-space names.
    for src, dst in (("aligned_norm.nii.gz", "norm.nii.gz"),
                     ("aligned_seg4.nii.gz", "seg4.nii.gz")):
        try:
            os.link(folder / src, folder / dst)
        except OSError:
            shutil.copyfile(folder / src, folder / dst)


def _generate_into(folder: Path, n_subjects: int, shape, seed: int, params: EmbeddedParams) -> dict:
    import torch

    # One intra-op thread: the tensors are small, and on a shared 2-core machine torch's thread
    # pool spent 3x the CPU time (and 2.4x the wall time) of a single thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _generate(folder, n_subjects, shape, seed, params)
    finally:
        torch.set_num_threads(threads)


def _generate(folder: Path, n_subjects: int, shape, seed: int, params: EmbeddedParams) -> dict:
    import torch

    start = time.perf_counter()
    t1, seg, affine = _atlas_on_grid(shape)
    spacing_mm = float(np.sqrt((affine[:3, :3] ** 2).sum(axis=0))[0])
    brain = (seg > 0).astype(np.float32)
    rng = np.random.default_rng([seed, 0])
    atlas_image = _vary_intensity(rng, t1, brain, shape, spacing_mm, bias=params.bias_strength / 3,
                                  gamma_log=0.0, noise=params.noise_std / 2)
    _write_subject(folder / ATLAS_ID, atlas_image, seg, np.zeros((3, *shape), np.float32), affine)
    t1_t = torch.from_numpy(t1)[None]
    seg_t = torch.from_numpy(seg.astype(np.float32))[None]
    records = {}
    for number in _subject_numbers(n_subjects):
        rng = np.random.default_rng([seed, number])
        ddf, record = _true_ddf(rng, params, shape, spacing_mm)
        image = _warp(t1_t, ddf, "bilinear")[0].numpy()
        labels = _warp(seg_t, ddf, "nearest")[0].numpy().round().astype(np.uint8)
        image = _vary_intensity(rng, image, (labels > 0).astype(np.float32), shape, spacing_mm,
                                bias=params.bias_strength, gamma_log=params.max_gamma_log,
                                noise=params.noise_std)
        subject_id = f"OASIS_OAS1_{number:04d}_MR1"
        _write_subject(folder / subject_id, image, labels, ddf.numpy().astype(np.float32), affine)
        records[subject_id] = record
    info = {
        "generator": "regcore.data.embedded", "generator_version": GENERATOR_VERSION,
        "source": [p.name for p in template_paths().values()],
        "seed": seed, "shape": list(shape), "n_subjects": n_subjects,
        "atlas": ATLAS_ID, "spacing_mm": [spacing_mm] * 3, "affine": affine.tolist(),
        "params": asdict(params), "affines": records,
        "ddf_convention": "subject(x) = atlas(x + u(x)), u in voxels (D, H, W, 3) of this grid",
        "build_s": round(time.perf_counter() - start, 3),
    }
    rio.atomic_write_text(folder / COHORT_FILE, json.dumps(info, indent=1))
    return info


def _is_built(folder: Path) -> bool:
    return (folder / COHORT_FILE).is_file()


def build_embedded(out: str | Path, n_subjects: int = 24, shape=(64, 64, 64), seed: int = 0,
                   params: EmbeddedParams | None = None) -> Path:
    """Build the cohort into `out` (must not exist or be empty), atomically: everything is
    written in a temporary folder beside it, then renamed; a killed build leaves no `out`."""
    shape = _check_shape(shape)
    if isinstance(n_subjects, bool) or not isinstance(n_subjects, int) or n_subjects < 1:
        raise ValueError(f"subjects == {n_subjects!r}, must be an integer >= 1")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed == {seed!r}, must be an integer >= 0")
    params = params or EmbeddedParams()
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"out == {str(out)!r}: exists and is not an empty folder, expected a new "
                         "folder for the cohort")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        _generate_into(tmp, n_subjects, shape, seed, params)
        if out.exists():
            out.rmdir()  # empty (checked above); a race loser fails here and cleans up
        os.chmod(tmp, 0o755)  # mkdtemp made it private
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_shape(shape) -> tuple[int, int, int]:
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,) * 3
    shape = tuple(shape) if isinstance(shape, (list, tuple)) else shape
    if not (isinstance(shape, tuple) and len(shape) == 3 and all(
            isinstance(s, int) and not isinstance(s, bool) and 16 <= s <= 256 for s in shape)):
        raise ValueError(f"shape == {shape!r}, must be three integers between 16 and 256")
    return shape


def embedded_name(n_subjects: int, shape, seed: int, params: EmbeddedParams | None = None) -> str:
    """The sub-folder name that identifies a build: shape, subjects, seed, generator version
    (and a digest of non-default parameters)."""
    shape = _check_shape(shape)
    name = f"mni152_{'x'.join(map(str, shape))}_n{n_subjects}_seed{seed}_v{GENERATOR_VERSION}"
    if params is not None and params != EmbeddedParams():
        import hashlib

        digest = hashlib.sha1(json.dumps(asdict(params), sort_keys=True).encode()).hexdigest()[:8]
        name += f"_p{digest}"
    return name


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive advisory lock (fcntl); a no-op where fcntl is missing (the atomic rename
    still guarantees that a half-built cohort is never seen)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def ensure_embedded(data_cfg, *, seed: int = 0, params: EmbeddedParams | None = None) -> Path:
    """The embedded cohort for `data_cfg` (shape, `embedded_subjects` subjects besides the atlas)
    under `data_cfg.embedded_dir`, built on first use and reused after.

    Safe when several processes call it at once: one builds under a file lock while the others
    wait and then reuse its result; the build is renamed into place whole.
    """
    root = Path(data_cfg.embedded_dir).expanduser()
    folder = root / embedded_name(data_cfg.embedded_subjects, data_cfg.shape, seed, params)
    if _is_built(folder):
        return folder
    with _file_lock(root / f".{folder.name}.lock"):
        if _is_built(folder):
            return folder
        if folder.exists():  # a foreign or damaged folder without cohort.json: never trusted
            shutil.rmtree(folder)
        try:
            build_embedded(folder, data_cfg.embedded_subjects, data_cfg.shape, seed, params)
        except OSError:
            if not _is_built(folder):  # lost a lock-free race only if the winner finished
                raise
    return folder
