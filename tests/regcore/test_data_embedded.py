"""The embedded cohort: labels, ground-truth convention, invertibility, bounds, determinism,
atomic and concurrent builds, no network."""

from __future__ import annotations

import json
import socket
import threading

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from regcore.config import DataConfig
from regcore.data import embedded
from regcore.data.embedded import ATLAS_ID, EmbeddedParams, build_embedded, ensure_embedded

SHAPE = (32, 32, 32)


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory):
    """A 4-subject 32^3 cohort, built with every socket connection refused (offline)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the embedded cohort touched the network")

    out = tmp_path_factory.mktemp("embedded") / "cohort"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "create_connection", refuse)
        build_embedded(out, n_subjects=4, shape=SHAPE, seed=3)
    return out


def _load(folder, name):
    img = nib.load(str(folder / name))
    return np.asarray(img.dataobj), img


def _subjects(cohort_dir):
    return sorted(p for p in cohort_dir.iterdir() if p.is_dir() and p.name != ATLAS_ID)


def test_layout_ids_and_geometry(cohort_dir):
    info = json.loads((cohort_dir / "cohort.json").read_text())
    names = sorted(p.name for p in cohort_dir.iterdir() if p.is_dir())
    # 4 subjects besides the atlas, numbered from 1 with 16 skipped
    assert names == ["OASIS_OAS1_0001_MR1", "OASIS_OAS1_0002_MR1", "OASIS_OAS1_0003_MR1",
                     "OASIS_OAS1_0004_MR1", ATLAS_ID]
    assert info["seed"] == 3 and info["shape"] == list(SHAPE) and info["atlas"] == ATLAS_ID
    for name in names:
        folder = cohort_dir / name
        for file in ("aligned_norm.nii.gz", "aligned_seg4.nii.gz", "true_ddf_vox.nii.gz",
                     "norm.nii.gz", "seg4.nii.gz"):
            assert (folder / file).is_file(), file
        seg, img = _load(folder, "aligned_seg4.nii.gz")
        assert seg.shape == SHAPE
        zooms = np.asarray(img.header.get_zooms()[:3])
        np.testing.assert_allclose(zooms, info["spacing_mm"], rtol=1e-5)
        np.testing.assert_allclose(img.affine, info["affine"], atol=1e-4)
        # the grid covers the whole brain: about 150-200 mm across
        assert 150 < zooms[0] * SHAPE[0] < 220
        image = np.asarray(_load(folder, "aligned_norm.nii.gz")[0])
        assert image.dtype == np.float32 and 0 <= image.min() and image.max() <= 1
        assert image[seg == 0].mean() < 0.05 < image[seg == 3].mean()


def test_all_five_labels_present_in_plausible_proportions(cohort_dir):
    for folder in [cohort_dir / ATLAS_ID, *_subjects(cohort_dir)]:
        seg = _load(folder, "aligned_seg4.nii.gz")[0]
        counts = np.bincount(seg.ravel(), minlength=5)
        assert counts.size == 5 and np.all(counts > 0), counts
        brain = counts[1:].sum()
        assert counts[1] / brain > 0.3  # cortex the largest tissue class
        assert 0.005 < counts[2] / brain < 0.15  # subcortical grey: small, present
        assert counts[3] / brain > 0.2


def test_atlas_has_zero_ground_truth(cohort_dir):
    ddf = _load(cohort_dir / ATLAS_ID, "true_ddf_vox.nii.gz")[0]
    assert ddf.shape == (*SHAPE, 3)
    assert np.abs(ddf).max() == 0


def _jacobian_det(ddf_dhw3: np.ndarray) -> np.ndarray:
    """det(I + grad u) with central differences (u in voxels, (D, H, W, 3))."""
    grads = np.stack([np.stack(np.gradient(ddf_dhw3[..., c]), axis=-1) for c in range(3)],
                     axis=-2)  # (..., c, k) = d u_c / d x_k
    return np.linalg.det(grads + np.eye(3))


def test_true_fields_are_invertible_and_nontrivial(cohort_dir):
    for folder in _subjects(cohort_dir):
        ddf = _load(folder, "true_ddf_vox.nii.gz")[1].get_fdata(dtype=np.float32)
        jac = _jacobian_det(ddf)
        assert jac.min() > 0, (folder.name, jac.min())  # no folding anywhere
        assert np.abs(ddf).max() > 0.5  # a real misalignment, not the identity


def test_affine_parameters_within_bounds(cohort_dir):
    info = json.loads((cohort_dir / "cohort.json").read_text())
    p = EmbeddedParams(**info["params"])
    assert set(info["affines"]) == {f.name for f in _subjects(cohort_dir)}
    for record in info["affines"].values():
        assert np.all(np.abs(record["rotation_deg"]) <= p.max_rotation_deg)
        assert np.all(np.abs(np.asarray(record["scale"]) - 1) <= p.max_scaling)
        assert np.all(np.abs(record["translation_mm"]) <= p.max_translation_mm + 1e-9)


def _dice(a, b, label):
    return 2 * np.sum((a == label) & (b == label)) / (np.sum(a == label) + np.sum(b == label))


def test_warping_atlas_with_true_field_reproduces_subject(cohort_dir):
    """The convention: subject(x) = atlas(x + u(x)). Checked with an independent warp
    (scipy map_coordinates, nearest) - a sign or axis-order error would drop Dice far below."""
    atlas = _load(cohort_dir / ATLAS_ID, "aligned_seg4.nii.gz")[0]
    grid = np.indices(SHAPE, dtype=np.float32)
    for folder in _subjects(cohort_dir):
        subject = _load(folder, "aligned_seg4.nii.gz")[0]
        ddf = np.moveaxis(_load(folder, "true_ddf_vox.nii.gz")[1].get_fdata(dtype=np.float32),
                          -1, 0)
        warped = ndimage.map_coordinates(atlas, grid + ddf, order=0, mode="nearest")
        for label in range(1, 5):
            assert _dice(warped, subject, label) > 0.9, (folder.name, label)
        # and the subject does differ from the atlas (the test could fail)
        assert np.mean([_dice(atlas, subject, k) for k in range(1, 5)]) < 0.9


def test_determinism_by_seed(tmp_path):
    a = build_embedded(tmp_path / "a", n_subjects=1, shape=(24, 24, 24), seed=5)
    b = build_embedded(tmp_path / "b", n_subjects=1, shape=(24, 24, 24), seed=5)
    c = build_embedded(tmp_path / "c", n_subjects=1, shape=(24, 24, 24), seed=6)
    name = "OASIS_OAS1_0001_MR1"
    for file in ("aligned_norm.nii.gz", "aligned_seg4.nii.gz", "true_ddf_vox.nii.gz"):
        np.testing.assert_array_equal(_load(a / name, file)[0], _load(b / name, file)[0])
    assert not np.array_equal(_load(a / name, "true_ddf_vox.nii.gz")[0],
                              _load(c / name, "true_ddf_vox.nii.gz")[0])


def test_killed_build_leaves_nothing_trusted(tmp_path, monkeypatch):
    calls = []
    real = embedded._write_subject

    def dies_on_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # a kill in the middle of the build
        real(*args)

    cfg = DataConfig(embedded_dir=str(tmp_path), embedded_subjects=4, shape=(16, 16, 16))
    monkeypatch.setattr(embedded, "_write_subject", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        ensure_embedded(cfg)
    assert [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.setattr(embedded, "_write_subject", real)
    folder = ensure_embedded(cfg)
    assert (folder / "cohort.json").is_file() and len(list(folder.glob("OASIS_*"))) == 5


def test_ensure_embedded_builds_once_and_is_safe_concurrently(tmp_path, monkeypatch):
    cfg = DataConfig(embedded_dir=str(tmp_path), embedded_subjects=4, shape=(16, 16, 16))
    builds = []
    real = embedded._generate_into
    monkeypatch.setattr(embedded, "_generate_into",
                        lambda *a, **k: builds.append(1) or real(*a, **k))
    results = []
    threads = [threading.Thread(target=lambda: results.append(ensure_embedded(cfg)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and len(set(results)) == 1
    assert len(builds) == 1  # the others waited on the lock and reused the winner's build
    folder = results[0]
    assert folder.name == "mni152_16x16x16_n4_seed0_v2"
    stamp = (folder / "cohort.json").stat().st_mtime_ns
    assert ensure_embedded(cfg) == folder and len(builds) == 1
    assert (folder / "cohort.json").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize("kwargs, error, start", [
    ({"shape": (8, 8, 8)}, ValueError, "shape == (8, 8, 8), must be"),
    ({"n_subjects": 0}, ValueError, "subjects == 0, must be"),
    ({"seed": -1}, ValueError, "seed == -1, must be"),
])
def test_build_rejects_bad_arguments(tmp_path, kwargs, error, start):
    with pytest.raises(error) as info:
        build_embedded(tmp_path / "out", **kwargs)
    assert str(info.value).startswith(start)
    assert not (tmp_path / "out").exists()


def test_build_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="^out == .*exists and is not an empty folder"):
        build_embedded(tmp_path / "out", n_subjects=1, shape=16)
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"


def test_params_are_validated():
    with pytest.raises(ValueError, match=r"^embedded.max_rotation_deg == -1.0, must be"):
        EmbeddedParams(max_rotation_deg=-1.0)


def test_ground_truth_through_pair_dataset_and_project_warp(cohort_dir):
    """End to end: the PairDataset's true_ddf_vox, applied by the project's own warp
    (regcore.spatial, the network's convention) to the moving atlas, gives the fixed labels."""
    import torch

    from regcore.data import PairDataset, load_cohort
    from regcore.spatial import jacobian_det, warp

    cohort = load_cohort(DataConfig(data_dir=str(cohort_dir), shape=SHAPE, n_test=1, n_val=1))
    for item in PairDataset(cohort, "train"):
        assert item["has_true_ddf"] and item["moving_id"] == ATLAS_ID
        ddf = item["true_ddf_vox"][None]
        warped = warp(item["moving"][None], ddf, mode="nearest")[0].argmax(0)
        before = [_dice(item["moving_seg"].numpy(), item["fixed_seg"].numpy(), k) for k in
                  range(1, 5)]
        after = [_dice(warped.numpy(), item["fixed_seg"].numpy(), k) for k in range(1, 5)]
        assert min(after) > 0.9 and np.mean(before) < 0.9, (before, after)
        assert float(jacobian_det(ddf).min()) > 0
        assert torch.equal(item["fixed"].argmax(0), item["fixed_seg"])


def test_pure_affine_field_matches_the_contract_and_bounds(tmp_path):
    """With the dense part switched off, the stored field is exactly an affine of the
    ARCHITECTURE convention x' = A (x - c) + c + t: fit it (least squares), check it against
    regcore.spatial.affine_to_ddf and check that A and t lie within the generator's bounds."""
    import torch

    from regcore.spatial import affine_to_ddf

    params = EmbeddedParams(max_velocity_mm=0.0, max_rotation_deg=10.0, max_scaling=0.05,
                            max_translation_mm=8.0)
    shape = (16, 18, 20)
    out = build_embedded(tmp_path / "c", n_subjects=3, shape=shape, seed=1, params=params)
    info = json.loads((out / "cohort.json").read_text())
    spacing = info["spacing_mm"][0]
    centre = (np.asarray(shape) - 1) / 2
    x = np.indices(shape).reshape(3, -1).T - centre  # (N, 3) x - c
    design = np.hstack([x, np.ones((len(x), 1))])
    for folder in _subjects(out):
        u = _load(folder, "true_ddf_vox.nii.gz")[1].get_fdata(dtype=np.float64).reshape(-1, 3)
        coef, *_ = np.linalg.lstsq(design, x + u, rcond=None)  # x + u = A (x - c) + t
        a, t = coef[:3].T, coef[3]
        theta = torch.tensor(np.hstack([a, t[:, None]])[None], dtype=torch.float64)
        expected = affine_to_ddf(theta, shape)[0].permute(1, 2, 3, 0).reshape(-1, 3).numpy()
        assert np.abs(expected - u).max() < 2e-3  # int16 storage resolution
        scales = np.linalg.svd(a, compute_uv=False)  # A = R S: singular values are the scales
        assert np.all(np.abs(scales - 1) <= params.max_scaling + 1e-3)
        rotation = a @ np.linalg.inv(np.diag(info["affines"][folder.name]["scale"]))
        angle = np.degrees(np.arccos(np.clip((np.trace(rotation) - 1) / 2, -1, 1)))
        assert angle <= 3 * params.max_rotation_deg  # three axis rotations of at most 10 deg
        assert np.all(np.abs(t) * spacing <= params.max_translation_mm + 1e-3)
        assert angle > 0.5 or np.abs(t).max() > 0.1  # it did move
