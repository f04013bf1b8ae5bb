"""check_data: every bad input is one error naming the file and the problem; the CLI's exit 2."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from regcore.cli import run_cli
from regcore.config import DataConfig
from regcore.data import check_data
from regcore.data.__main__ import main as data_main
from tests.regcore.test_data_cohort import AFFINE, NATIVE, SUBJECTS, blob_labels, write_subject

ROOT = Path(__file__).resolve().parents[2]


def make_neurite(root: Path) -> Path:
    for name in SUBJECTS:
        write_subject(root, name)
    return root


def cfg(data_dir, **kw) -> DataConfig:
    return DataConfig(**{"data_dir": str(data_dir), "shape": (16, 16, 16), "n_test": 2,
                         "n_val": 1, **kw})


SUBJ = "OASIS_OAS1_0003_MR1"


def _seg(root):
    return root / SUBJ / "aligned_seg4.nii.gz"


def _norm(root):
    return root / SUBJ / "aligned_norm.nii.gz"


def case_missing_dir(root):
    return root / "nope", FileNotFoundError, f"data.data_dir == '{root / 'nope'}': no such file"


def case_no_subjects(root):
    for name in SUBJECTS:  # folders without any OASIS file
        for f in (root / name).iterdir():
            f.unlink()
    return root, ValueError, f"data.data_dir == '{root}': no subject folders found"


def case_missing_seg(root):
    _seg(root).unlink()
    return root, FileNotFoundError, f"{_seg(root)}: missing"


def case_garbage_nifti(root):
    _seg(root).write_bytes(b"this is not a nifti file at all" * 10)
    return root, ValueError, f"{_seg(root)}: unreadable NIfTI file"


def case_truncated_nifti(root):
    data = _seg(root).read_bytes()
    _seg(root).write_bytes(data[: len(data) // 2])
    return root, ValueError, f"{_seg(root)}: unreadable NIfTI file"


def case_labels_out_of_range(root):
    seg = blob_labels(NATIVE)
    seg[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(seg, AFFINE), str(_seg(root)))
    return root, ValueError, f"{_seg(root)}: label values span 0..7, expected integers 0..4"


def case_negative_labels(root):
    seg = blob_labels(NATIVE).astype(np.int16)
    seg[0, 0, 0] = -1
    nib.save(nib.Nifti1Image(seg, AFFINE), str(_seg(root)))
    return root, ValueError, f"{_seg(root)}: label values span -1..4"


def case_non_integer_labels(root):
    seg = blob_labels(NATIVE).astype(np.float32)
    seg[1, 1, 1] = 1.5
    nib.save(nib.Nifti1Image(seg, AFFINE), str(_seg(root)))
    return root, ValueError, f"{_seg(root)}: label map holds non-integer values"


def case_nan_intensity(root):
    image = np.ones(NATIVE, np.float32)
    image[2, 3, 4] = np.nan
    nib.save(nib.Nifti1Image(image, AFFINE), str(_norm(root)))
    return root, ValueError, f"{_norm(root)}: 1 NaN or inf intensities"


def case_shapes_disagree(root):
    nib.save(nib.Nifti1Image(np.ones((20, 24, 27), np.float32), AFFINE), str(_norm(root)))
    return root, ValueError, f"{_norm(root)}: shape (20, 24, 27) differs from (20, 24, 28)"


def case_bad_seg35(root):
    path = root / SUBJ / "aligned_seg35.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((20, 24, 27), np.int16), AFFINE), str(path))
    return root, ValueError, f"{path}: shape (20, 24, 27) differs"


def case_atlas_missing(root):
    os.rename(root / "OASIS_OAS1_0016_MR1", root / "OASIS_OAS1_0099_MR1")
    return root, ValueError, "data.atlas == 'OAS1_0016': not found among the 7 subjects"


def case_npy_garbage(root):
    path = root / "s1" / "seg4_onehot.npy"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x93NUMPY garbage")
    (root / "list.txt").write_text(_npy_lines(root, path))
    return root / "list.txt", ValueError, f"{path}: unreadable .npy array"


def case_npy_pickled(root):
    path = root / "s1" / "seg4_onehot.npy"
    path.parent.mkdir(parents=True)
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (root / "list.txt").write_text(_npy_lines(root, path))
    return root / "list.txt", ValueError, f"{path}: unreadable .npy array"


def case_npy_wrong_channels(root):
    path = root / "s1" / "seg4_onehot.npy"
    path.parent.mkdir(parents=True)
    np.save(path, np.zeros((4, 8, 8, 8), np.float32))
    (root / "list.txt").write_text(_npy_lines(root, path))
    return root / "list.txt", ValueError, f"{path}: array of shape (4, 8, 8, 8), expected"


def case_npy_listed_missing(root):
    (root / "list.txt").write_text("gone/seg4_onehot.npy\n")
    return (root / "list.txt", FileNotFoundError,
            f"{root / 'gone' / 'seg4_onehot.npy'}: missing, listed in")


def case_npy_empty_list(root):
    (root / "list.txt").write_text("# nothing\n")
    return root / "list.txt", ValueError, f"data.data_dir == '{root / 'list.txt'}': the list"


def _npy_lines(root, bad):
    """A list of 6 good subjects (atlas included) and the bad file."""
    lines = [str(bad)]
    for name in SUBJECTS[1:]:
        path = root / name / "seg4_onehot.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, (np.arange(5).reshape(5, 1, 1, 1) == blob_labels((8, 8, 8))[None])
                .astype(np.uint8))
        lines.append(str(path))
    return "\n".join(lines)


CASES = [case_missing_dir, case_no_subjects, case_missing_seg, case_garbage_nifti,
         case_truncated_nifti, case_labels_out_of_range, case_negative_labels,
         case_non_integer_labels, case_nan_intensity, case_shapes_disagree, case_bad_seg35,
         case_atlas_missing, case_npy_garbage, case_npy_pickled, case_npy_wrong_channels,
         case_npy_listed_missing, case_npy_empty_list]


@pytest.mark.filterwarnings("ignore:.*assuming 1 mm isotropic spacing")
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__[5:])
def test_check_data_rejects(case, tmp_path):
    root = make_neurite(tmp_path / "data") if not case.__name__.startswith("case_npy") \
        else tmp_path / "data"
    root.mkdir(exist_ok=True)
    data_dir, error, start = case(root)
    with pytest.raises(error) as info:
        check_data(cfg(data_dir))
    message = str(info.value)
    assert message.startswith(start), message
    assert "\n" not in message


def test_check_data_passes_a_good_cohort(tmp_path):
    root = make_neurite(tmp_path / "data")
    summary = check_data(cfg(root, modality="intensity"))
    assert summary["subjects"] == 7 and summary["split"] == {"train": 4, "val": 1, "test": 2}
    assert summary["native_shapes"] == {"20x24x28": 7}
    assert summary["atlas"] == "OASIS_OAS1_0016_MR1"


def test_intensity_modality_needs_the_image(tmp_path):
    root = make_neurite(tmp_path / "data")
    _norm(root).unlink()
    check_data(cfg(root))  # seg4_onehot does not need intensities
    with pytest.raises(FileNotFoundError, match=f"^{_norm(root)}: missing"):
        check_data(cfg(root, modality="intensity"))


# -- the command ---------------------------------------------------------------------------------

def _run(argv, capsys):
    with pytest.raises(SystemExit) as info:
        run_cli(data_main, argv, prog="python -m regcore.data")
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


def test_cli_check_ok(tmp_path, capsys):
    root = make_neurite(tmp_path / "data")
    code, out, err = _run(["check", "--data-dir", str(root), "--n-test", "2", "--n-val", "1",
                           "--shape", "16"], capsys)
    assert code == 0 and json.loads(out)["subjects"] == 7


@pytest.mark.parametrize("argv, start", [
    (["check", "--data-dir", "/nonexistent/oasis"],
     "python -m regcore.data: error: data.data_dir == '/nonexistent/oasis': no such file"),
    (["check", "--data-dir", "DATA", "--shape", "8"],
     "python -m regcore.data: error: data.shape == (8, 8, 8), must be"),
    (["build", "--shape", "64"], "python -m regcore.data: error: the following arguments"),
    (["build", "--out", "OUT", "--shape", "abc"],
     "python -m regcore.data: error: argument --shape: --shape == 'abc', expected N or D,H,W"),
    (["build", "--out", "OUT", "--shape", "6"],
     "python -m regcore.data: error: shape == (6, 6, 6), must be three integers"),
])
def test_cli_bad_input_is_one_line_exit_2(argv, start, tmp_path, capsys):
    root = make_neurite(tmp_path / "data")
    argv = [str(root) if a == "DATA" else str(tmp_path / "out") if a == "OUT" else a
            for a in argv]
    code, out, err = _run(argv, capsys)
    assert code == 2 and out == ""
    assert err.startswith(start) and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_cli_labels_out_of_range_subprocess(tmp_path):
    root = make_neurite(tmp_path / "data")
    case_labels_out_of_range(root)
    proc = subprocess.run([sys.executable, "-m", "regcore.data", "check", "--data-dir", str(root),
                           "--n-test", "2", "--n-val", "1", "--shape", "16"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith(f"python -m regcore.data: error: {_seg(root)}: label values")
    assert proc.stderr.count("\n") == 1
