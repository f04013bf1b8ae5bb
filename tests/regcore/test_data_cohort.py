"""Reading both layouts, resampling geometry, the saved split, pairs, caching, PairDataset."""

from __future__ import annotations

import dataclasses
import json
import pickle
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch

from regcore.config import DataConfig
from regcore.data import PairDataset, Volume, load_cohort, resample_volume
from regcore.data.dataset import make_split

NATIVE = (20, 24, 28)
SPACING = (1.0, 1.5, 2.0)
AFFINE = np.array([[1.0, 0, 0, -10], [0, 1.5, 0, -18], [0, 0, 2.0, -28], [0, 0, 0, 1]])


def blob_labels(shape, shift=0) -> np.ndarray:
    """Nested ellipsoids: 0 outside, 1 cortex shell, 3 white matter, 2 and 4 small cores."""
    grid = np.indices(shape, dtype=np.float64)
    centre = (np.asarray(shape) - 1) / 2 + shift
    r = np.sqrt(sum(((grid[k] - centre[k]) / (shape[k] / 2)) ** 2 for k in range(3)))
    seg = np.zeros(shape, np.uint8)
    seg[r < 0.9] = 1
    seg[r < 0.7] = 3
    seg[(r < 0.4) & (grid[0] < centre[0])] = 2
    seg[(r < 0.4) & (grid[0] >= centre[0])] = 4
    return seg


def write_subject(root, name, *, seg=None, image=None, seg35=True, space="aligned"):
    folder = root / name
    folder.mkdir(parents=True)
    prefix = "aligned_" if space == "aligned" else ""
    seg = blob_labels(NATIVE) if seg is None else seg
    image = (seg * 50.0 + 10).astype(np.float32) if image is None else image
    nib.save(nib.Nifti1Image(image, AFFINE), str(folder / f"{prefix}norm.nii.gz"))
    nib.save(nib.Nifti1Image(seg, AFFINE), str(folder / f"{prefix}seg4.nii.gz"))
    if seg35:
        nib.save(nib.Nifti1Image((seg * 7).astype(np.int16), AFFINE),
                 str(folder / f"{prefix}seg35.nii.gz"))
    return folder


SUBJECTS = [f"OASIS_OAS1_{n:04d}_MR1" for n in (1, 2, 3, 4, 5, 6, 16)]


@pytest.fixture
def neurite(tmp_path):
    root = tmp_path / "oasis"
    for i, name in enumerate(SUBJECTS):
        write_subject(root, name, seg=blob_labels(NATIVE, shift=i % 3 - 1))
    return root


@pytest.fixture
def npy_list(tmp_path):
    lines = []
    for i, name in enumerate(SUBJECTS):
        folder = tmp_path / "study" / name
        folder.mkdir(parents=True)
        onehot = (np.arange(5).reshape(5, 1, 1, 1) == blob_labels(NATIVE, shift=i % 2)[None])
        np.save(folder / "seg4_onehot.npy", onehot.astype(np.float32))
        lines.append(f"{name}/seg4_onehot.npy" if i % 2 else str(folder / "seg4_onehot.npy"))
    path = tmp_path / "study" / "train_list.txt"
    path.write_text("# the study's list\n" + "\n".join(lines) + "\n\n")
    return path


def cfg(data_dir, **kw) -> DataConfig:
    base = dict(data_dir=str(data_dir), shape=(16, 16, 16), n_test=2, n_val=1)
    base.update(kw)
    return DataConfig(**base)


# -- resampling geometry ---------------------------------------------------------------------

def test_resampling_keeps_physical_extent_and_world_positions():
    seg = blob_labels(NATIVE)
    ddf = np.zeros((3, *NATIVE), np.float32)
    ddf[0] = 2.0  # 2 voxels of the native grid along D = 2 mm
    ddf[2] = -1.0  # -1 voxel along W = -2 mm
    vol = Volume("s", seg[None].astype(np.float32) / 4, seg.astype(np.int64), None,
                 np.asarray(SPACING), AFFINE, ddf)
    out = resample_volume(vol, (16, 16, 16))
    assert out.shape == (16, 16, 16) and out.image.shape == (1, 16, 16, 16)
    assert out.image.dtype == np.float32 and out.seg4.dtype == np.int64
    # spacing x shape (the extent in mm) is unchanged; the affine agrees with the spacing
    np.testing.assert_allclose(out.spacing_mm * 16, np.asarray(SPACING) * NATIVE)
    np.testing.assert_allclose(np.linalg.norm(out.affine[:3, :3], axis=0), out.spacing_mm)
    # the grid's outer corner (voxel edge -0.5) and its centre lie at the same world positions
    for old_vox, new_vox in (([-0.5] * 3, [-0.5] * 3),
                             ((np.asarray(NATIVE) - 1) / 2, [7.5] * 3)):
        np.testing.assert_allclose(AFFINE @ [*old_vox, 1], out.affine @ [*new_vox, 1])
    # labels nearest: only the original values; the displacement keeps its length in mm
    assert set(np.unique(out.seg4)) <= {0, 1, 2, 3, 4}
    np.testing.assert_allclose(out.true_ddf_vox[0] * out.spacing_mm[0], 2.0, rtol=1e-5)
    np.testing.assert_allclose(out.true_ddf_vox[2] * out.spacing_mm[2], -2.0, rtol=1e-5)
    assert resample_volume(vol, NATIVE) is vol


# -- Neurite layout ------------------------------------------------------------------------------

def test_neurite_layout_loads_resampled_volumes(neurite, tmp_path):
    cohort = load_cohort(cfg(neurite, modality="intensity"))
    assert cohort.subject_ids == SUBJECTS and cohort.atlas_id == "OASIS_OAS1_0016_MR1"
    vol = cohort.load("OASIS_OAS1_0003_MR1")
    assert vol.image.shape == (1, 16, 16, 16) and vol.image.dtype == np.float32
    assert 0 <= vol.image.min() and vol.image.max() == pytest.approx(1.0)
    assert vol.seg4.shape == (16, 16, 16) and vol.seg4.dtype == np.int64
    assert set(np.unique(vol.seg4)) == {0, 1, 2, 3, 4}
    assert vol.seg35 is not None and vol.seg35.max() == 28
    np.testing.assert_allclose(vol.spacing_mm, np.asarray(SPACING) * NATIVE / 16)
    assert vol.true_ddf_vox is None
    ds = PairDataset(cohort, "test")
    item = ds[0]
    assert item["moving"].shape == (1, 16, 16, 16) and item["moving"].dtype == torch.float32
    assert item["moving_id"] == cohort.atlas_id and item["has_true_ddf"] is False
    assert "true_ddf_vox" not in item


def test_scanner_space_reads_the_scanner_files(tmp_path):
    root = tmp_path / "scanner"
    for name in ("OASIS_OAS1_0001_MR1", "OASIS_OAS1_0002_MR1", "OASIS_OAS1_0003_MR1",
                 "OASIS_OAS1_0004_MR1", "OASIS_OAS1_0016_MR1"):
        write_subject(root, name, space="scanner", seg35=False)
    cohort = load_cohort(cfg(root, space="scanner", n_test=1, n_val=1))
    assert cohort.load("OASIS_OAS1_0001_MR1").seg35 is None
    with pytest.raises(ValueError, match=r"^data.data_dir == .*no subject folders found"):
        load_cohort(cfg(root, space="aligned", n_test=1, n_val=1))


# -- the study's .npy list -------------------------------------------------------------------

def test_npy_list_layout(npy_list):
    with pytest.warns(UserWarning, match="assuming 1 mm isotropic spacing"):
        cohort = load_cohort(cfg(npy_list))
    assert cohort.subject_ids == SUBJECTS
    vol = cohort.load("OASIS_OAS1_0002_MR1")
    assert vol.image is None and vol.seg4.shape == (16, 16, 16)
    np.testing.assert_allclose(vol.spacing_mm, np.asarray(NATIVE) / 16)  # from 1 mm
    item = PairDataset(cohort, "train")[0]
    assert item["moving"].shape == (5, 16, 16, 16)
    # one-hot channels of the fixed image match its labels
    assert torch.equal(item["fixed"].argmax(0), item["fixed_seg"])
    assert (cohort.root.parent / "train_list_split_OAS1_0016_seed0_test2_val1.json").is_file()


def test_npy_list_rejects_intensity_modality(npy_list):
    with pytest.raises(ValueError, match=r"^data.modality == 'intensity', must be 'seg4_onehot'"):
        load_cohort(cfg(npy_list, modality="intensity"))


# -- split ---------------------------------------------------------------------------------------

def test_split_is_saved_and_reused(neurite):
    c = cfg(neurite)
    cohort = load_cohort(c)
    path = cohort.split_path
    assert path.parent == neurite and path.is_file()
    saved = json.loads(path.read_text())
    assert {s: saved[s] for s in ("train", "val", "test")} == cohort.split
    assert sorted(sum(cohort.split.values(), [])) == SUBJECTS
    assert len(cohort.split["test"]) == 2 and len(cohort.split["val"]) == 1
    # a saved split with matching parameters is reused as it is (edit it to prove it is read)
    swapped = dict(saved, test=saved["val"] + saved["test"][1:],
                   val=saved["test"][:1])
    path.write_text(json.dumps(swapped))
    assert load_cohort(c).split["test"] == swapped["test"]
    # an inconsistent one (another subject list) is replaced, with a warning
    path.write_text(json.dumps(dict(swapped, subjects=["x"])))
    with pytest.warns(UserWarning, match="saved split does not match"):
        assert load_cohort(c).split == cohort.split


def test_split_saved_in_split_dir_when_given(neurite, tmp_path):
    cohort = load_cohort(cfg(neurite), split_dir=tmp_path / "out")
    assert cohort.split_path.parent == tmp_path / "out"


@pytest.mark.parametrize("seed", range(6))
def test_atlas_never_in_test_or_val(seed):
    ids = [f"OAS1_{i:04d}" for i in range(1, 12)]
    split = make_split(ids, "OAS1_0003", n_test=5, n_val=4, seed=seed)
    assert "OAS1_0003" in split["train"]
    assert "OAS1_0003" not in split["test"] + split["val"]
    assert len(split["train"]) == 2  # one subject plus the atlas
    assert make_split(ids, "OAS1_0003", 5, 4, seed) == split  # deterministic


def test_split_without_training_subject_is_an_error(neurite):
    with pytest.raises(ValueError, match=r"^data.n_test \+ data.n_val == 4 \+ 2 leave no "
                                         r"training subject"):
        load_cohort(cfg(neurite, n_test=4, n_val=2))


# -- pairs, cache ----------------------------------------------------------------------------

def test_atlas_pairs(neurite):
    cohort = load_cohort(cfg(neurite))
    for split in ("train", "val", "test"):
        pairs = cohort.pairs(split)
        assert all(m == cohort.atlas_id and f in cohort.split[split] for m, f in pairs)
    assert len(cohort.pairs("train")) == len(cohort.split["train"]) - 1
    with pytest.raises(ValueError, match=r"^split == 'dev', must be one of"):
        cohort.pairs("dev")


def test_subject_pairs_stay_within_their_split(neurite):
    cohort = load_cohort(cfg(neurite, pairing="subject", n_val=0))
    for split in ("train", "test"):
        pairs = cohort.pairs(split)
        assert len(pairs) == len(cohort.split[split])
        for moving, fixed in pairs:
            assert moving != fixed and {moving, fixed} <= set(cohort.split[split])
        assert cohort.pairs(split) == pairs  # seeded
    with pytest.raises(ValueError,
                       match=r"^data.n_val == 1, must be 0 or >= 2 with data.pairing"):
        load_cohort(cfg(neurite, pairing="subject", n_val=1))
    with pytest.raises(ValueError, match=r"^data.n_test \+ data.n_val == 4 \+ 2 leave one "
                                         r"training subject of 7"):
        load_cohort(cfg(neurite, pairing="subject", atlas="none", n_test=4, n_val=2))


def test_cache_is_bounded_and_keeps_the_atlas(neurite):
    cohort = load_cohort(cfg(neurite), cache_size=2)
    atlas = cohort.load(cohort.atlas_id)
    for sid in SUBJECTS[:5]:
        cohort.load(sid)
    assert list(cohort._cache) == SUBJECTS[3:5]
    assert cohort.load(cohort.atlas_id) is atlas
    assert cohort.load(SUBJECTS[4]) is cohort.load(SUBJECTS[4])
    with pytest.raises(ValueError, match=r"^subject_id == 'nobody': not in the cohort"):
        cohort.load("nobody")


def test_pair_dataset_batches(neurite):
    cohort = load_cohort(cfg(neurite))
    ds = PairDataset(cohort, "train")
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch["moving"].shape == (2, 5, 16, 16, 16)
    assert batch["fixed_seg"].shape == (2, 16, 16, 16) and batch["fixed_seg"].dtype == torch.int64
    assert batch["spacing_mm"].shape == (2, 3) and batch["fixed_affine"].shape == (2, 4, 4)
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_embedded_cohort_through_load_cohort(tmp_path):
    c = DataConfig(embedded_dir=str(tmp_path), embedded_subjects=5, shape=(16, 16, 16),
                   n_test=2, n_val=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cohort = load_cohort(c)
    assert cohort.atlas_id == cohort.gt_atlas_id == "OASIS_OAS1_0016_MR1"
    item = PairDataset(cohort, "test")[0]
    assert item["has_true_ddf"] is True and item["true_ddf_vox"].shape == (3, 16, 16, 16)
    assert item["spacing_mm"][0] == item["spacing_mm"][1] == item["spacing_mm"][2]  # isotropic
    # subject-to-subject pairs of the same (reused) build have no known ground truth
    pairs = load_cohort(dataclasses.replace(c, pairing="subject", n_val=0))
    assert pairs.root == cohort.root
    item = PairDataset(pairs, "test")[0]
    assert item["has_true_ddf"] is False and "true_ddf_vox" not in item


def test_cohort_pickles_without_its_cache(neurite):
    """DataLoader workers receive the cohort by pickle: no cached arrays travel, loading works."""
    cohort = load_cohort(cfg(neurite))
    volume = cohort.load(SUBJECTS[0])
    clone = pickle.loads(pickle.dumps(cohort))
    assert clone._cache == {} and clone._pinned == {}
    np.testing.assert_array_equal(clone.load(SUBJECTS[0]).seg4, volume.seg4)
