"""Reading OASIS subjects from disk, in the two layouts the project accepts.

1. The Neurite OASIS v1.0 layout (also what the embedded cohort writes): `data_dir` is a folder
   holding one folder per subject, `OASIS_OAS1_XXXX_MR1/`, with
   `aligned_norm.nii.gz`, `aligned_seg4.nii.gz`, `aligned_seg35.nii.gz` (affinely aligned,
   160x192x224) and the scanner-space `norm.nii.gz`, `seg4.nii.gz`, `seg35.nii.gz`
   (`data.space` picks which). seg35 is optional; the embedded cohort adds `true_ddf_vox.nii.gz`.
   The subject id is the folder name.
2. The original study's list: `data_dir` is a text FILE, one path per line (relative paths are
   relative to the list's folder; blank lines and `#` comments ignored) to a `seg4_onehot.npy`
   array (5, D, H, W). The subject id is the parent folder name. These arrays carry no
   intensities and no geometry: the modality must be `seg4_onehot`, and a 1 mm isotropic
   spacing with an identity affine is ASSUMED (a warning says so).

Every reading error is one line naming the file and the problem (ValueError /
FileNotFoundError).
"""

from __future__ import annotations

import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from regcore.data.volume import N_SEG4_LABELS, Volume, normalise_intensity, resample_volume, \
    spacing_from_affine

__all__ = ["SubjectFiles", "discover_subjects", "read_subject", "check_subject",
           "SPACE_FILES", "TRUE_DDF_FILE"]

#: role -> file name, per `data.space`.
SPACE_FILES: dict[str, dict[str, str]] = {
    "aligned": {"image": "aligned_norm.nii.gz", "seg4": "aligned_seg4.nii.gz",
                "seg35": "aligned_seg35.nii.gz"},
    "scanner": {"image": "norm.nii.gz", "seg4": "seg4.nii.gz", "seg35": "seg35.nii.gz"},
}
TRUE_DDF_FILE = "true_ddf_vox.nii.gz"
ONEHOT_SPACING_MM = (1.0, 1.0, 1.0)


@dataclass(frozen=True)
class SubjectFiles:
    """Where one subject's files are. `onehot` is set for the study's .npy list format."""

    subject_id: str
    seg4: Path | None = None
    image: Path | None = None
    seg35: Path | None = None
    true_ddf: Path | None = None
    onehot: Path | None = None

    def paths(self) -> list[Path]:
        return [p for p in (self.onehot, self.image, self.seg4, self.seg35, self.true_ddf)
                if p is not None and p.exists()]


def discover_subjects(data_dir: str | Path, space: str, modality: str) -> list[SubjectFiles]:
    """The subjects of `data_dir` (a folder of subject folders, or a .npy list file), sorted.

    Raises FileNotFoundError when `data_dir` or a required file is missing, ValueError when no
    subject is found or the layout cannot serve `modality`.
    """
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data.data_dir == {str(data_dir)!r}: no such file or directory")
    if root.is_file():
        return _discover_list(root, modality)
    return _discover_folders(root, space)


def _discover_folders(root: Path, space: str) -> list[SubjectFiles]:
    names = SPACE_FILES[space]
    subjects = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        present = {role: folder / name for role, name in names.items() if (folder / name).exists()}
        if not present:
            continue  # not a subject folder
        if "seg4" not in present:
            raise FileNotFoundError(
                f"{folder / names['seg4']}: missing, expected the {space}-space seg4 label map of "
                f"subject {folder.name}")
        ddf = folder / TRUE_DDF_FILE
        # image: the expected path, present or not (only the intensity modality needs it)
        subjects.append(SubjectFiles(folder.name, seg4=present["seg4"],
                                     image=folder / names["image"],
                                     seg35=present.get("seg35"),
                                     true_ddf=ddf if ddf.exists() else None))
    if not subjects:
        raise ValueError(
            f"data.data_dir == {str(root)!r}: no subject folders found, expected folders such as "
            f"OASIS_OAS1_0001_MR1/ holding {names['seg4']}")
    return subjects


def _discover_list(list_file: Path, modality: str) -> list[SubjectFiles]:
    if modality != "seg4_onehot":
        raise ValueError(
            f"data.modality == {modality!r}, must be 'seg4_onehot' for the .npy list "
            f"{list_file} (its seg4_onehot arrays carry no intensities)")
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{list_file}: unreadable list of .npy paths ({error})") from None
    subjects: list[SubjectFiles] = []
    seen: dict[str, Path] = {}
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path = Path(line).expanduser()
        if not path.is_absolute():
            path = list_file.parent / path
        if not path.exists():
            raise FileNotFoundError(f"{path}: missing, listed in {list_file}")
        subject_id = path.parent.name
        if subject_id in seen:
            raise ValueError(f"{path}: subject id {subject_id!r} (its folder name) is listed twice "
                             f"in {list_file}, also as {seen[subject_id]}")
        seen[subject_id] = path
        subjects.append(SubjectFiles(subject_id, onehot=path))
    if not subjects:
        raise ValueError(f"data.data_dir == {str(list_file)!r}: the list names no .npy file, "
                         "expected one path to a seg4_onehot.npy per line")
    warnings.warn(f"{list_file}: .npy arrays carry no geometry; assuming 1 mm isotropic spacing "
                  "and an identity affine", stacklevel=3)
    return sorted(subjects, key=lambda s: s.subject_id)


# -- readers: each failure one line naming the file ---------------------------------------------

def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _read_nifti(path: Path):
    import nibabel as nib

    if not path.exists():
        raise FileNotFoundError(f"{path}: missing")
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except (OSError, EOFError, zlib.error, ValueError, nib.filebasedimages.ImageFileError,
            nib.spatialimages.HeaderDataError) as error:
        raise ValueError(f"{path}: unreadable NIfTI file ({_one_line(error)})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    return data, np.asarray(img.affine, dtype=np.float64)


def _read_npy(path: Path) -> np.ndarray:
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, EOFError, ValueError) as error:
        raise ValueError(f"{path}: unreadable .npy array ({_one_line(error)})") from None


def _labels(path: Path, data: np.ndarray, max_label: int | None) -> np.ndarray:
    if data.ndim != 3:
        raise ValueError(f"{path}: label map of shape {tuple(data.shape)}, expected 3-D (D, H, W)")
    if not np.issubdtype(data.dtype, np.integer):
        if not np.all(np.isfinite(data)):
            raise ValueError(f"{path}: label map holds NaN or inf, expected integers")
        if not np.all(data == np.round(data)):
            raise ValueError(f"{path}: label map holds non-integer values, expected integers")
    low, high = data.min(), data.max()
    if low < 0 or (max_label is not None and high > max_label):
        expected = f"0..{max_label}" if max_label is not None else ">= 0"
        raise ValueError(f"{path}: label values span {low:g}..{high:g}, "
                         f"expected integers {expected}")
    return data.astype(np.int64)


def _intensity(path: Path, data: np.ndarray) -> np.ndarray:
    if data.ndim != 3:
        raise ValueError(f"{path}: image of shape {tuple(data.shape)}, expected 3-D (D, H, W)")
    data = data.astype(np.float32)
    bad = int((~np.isfinite(data)).sum())
    if bad:
        raise ValueError(f"{path}: {bad} NaN or inf intensities, expected finite values")
    return data


def _onehot_labels(path: Path, data: np.ndarray) -> np.ndarray:
    if data.ndim != 4 or data.shape[0] != N_SEG4_LABELS:
        raise ValueError(f"{path}: array of shape {tuple(data.shape)}, expected a seg4 one-hot "
                         f"({N_SEG4_LABELS}, D, H, W)")
    if not np.issubdtype(data.dtype, np.number) or np.issubdtype(data.dtype, np.complexfloating):
        raise ValueError(f"{path}: array of dtype {data.dtype}, expected numbers")
    if not np.all(np.isfinite(data)):
        raise ValueError(f"{path}: one-hot array holds NaN or inf")
    if data.min() < 0 or data.max() > 1:
        raise ValueError(f"{path}: one-hot values span {data.min():g}..{data.max():g}, "
                         "expected 0..1")
    return np.argmax(data, axis=0).astype(np.int64)


def _same_shape(path: Path, shape, ref_path: Path, ref_shape, subject_id: str) -> None:
    if tuple(shape) != tuple(ref_shape):
        raise ValueError(f"{path}: shape {tuple(shape)} differs from {tuple(ref_shape)} of "
                         f"{ref_path.name}, subject {subject_id}")


def read_subject(files: SubjectFiles, *, want_image: bool) -> Volume:
    """Read one subject at its native resolution, validating every file it reads."""
    if files.onehot is not None:
        seg4 = _onehot_labels(files.onehot, _read_npy(files.onehot))
        affine = np.diag([*ONEHOT_SPACING_MM, 1.0])
        return Volume(files.subject_id, None, seg4, None, np.asarray(ONEHOT_SPACING_MM), affine)
    seg_data, affine = _read_nifti(files.seg4)
    seg4 = _labels(files.seg4, seg_data, N_SEG4_LABELS - 1)
    image = None
    if want_image:
        data, _ = _read_nifti(files.image)
        _same_shape(files.image, data.shape, files.seg4, seg4.shape, files.subject_id)
        image = normalise_intensity(_intensity(files.image, data))[None]
    seg35 = None
    if files.seg35 is not None:
        data, _ = _read_nifti(files.seg35)
        _same_shape(files.seg35, data.shape, files.seg4, seg4.shape, files.subject_id)
        seg35 = _labels(files.seg35, data, None)
    ddf = None
    if files.true_ddf is not None:
        data, _ = _read_nifti(files.true_ddf)
        ddf = np.moveaxis(np.asarray(data, dtype=np.float32), -1, 0)  # stored (D, H, W, 3)
        if ddf.shape != (3, *seg4.shape):
            raise ValueError(f"{files.true_ddf}: shape {tuple(data.shape)}, expected "
                             f"{(*seg4.shape, 3)} like {files.seg4.name}")
        if not np.all(np.isfinite(ddf)):
            raise ValueError(f"{files.true_ddf}: displacement holds NaN or inf")
    return Volume(files.subject_id, image, seg4, seg35, spacing_from_affine(affine), affine, ddf)


def load_subject(files: SubjectFiles, shape, *, want_image: bool) -> Volume:
    """Read one subject and resample it to `shape` (spacing and affine follow)."""
    return resample_volume(read_subject(files, want_image=want_image), shape)


def check_subject(files: SubjectFiles, modality: str) -> tuple[int, ...]:
    """Read and validate every file of one subject: the intensity image when present (required
    by the `intensity` modality), labels, seg35 and the ground-truth field when present.

    Returns the subject's native shape. Raises ValueError / FileNotFoundError naming the file.
    """
    want_image = files.image is not None and (modality == "intensity" or files.image.exists())
    return read_subject(files, want_image=want_image).shape
