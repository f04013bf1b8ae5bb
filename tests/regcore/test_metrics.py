"""regcore.metrics: closed forms, a brute-force surface-distance oracle, Learn2Reg's values,
evaluate_pair."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from regcore.metrics import (
    PER_PAIR_COLUMNS,
    SEG4_LABELS,
    _surface,
    dice_per_label,
    displacement_stats,
    evaluate_pair,
    folding_pct,
    global_ncc,
    hd95_mm,
    l2r_scores,
    labels_missing,
    mse,
    ndv_pct,
    plausibility,
    sdlogj,
    sdlogj_l2r,
)
from regcore.spatial import warp


def _box_seg(shape=(16, 16, 16), shift_w=0):
    """Label 1 in a 4^3 box, label 3 in a 3x6x2 box; optionally shifted along W."""
    seg = np.zeros(shape, dtype=np.int64)
    seg[4:8, 4:8, 4 + shift_w:8 + shift_w] = 1
    seg[9:12, 5:11, 8 + shift_w:10 + shift_w] = 3
    return seg


def _slab_fold(d=16):
    """u_D = f(x_D) with f[8] = 1.5, f[10] = -1.5, else 0 (central differences along D):
    du/dx_D at slice 7 = (f8 - f6)/2 = 0.75, slice 9 = (f10 - f8)/2 = -1.5, slice 11 = 0.75,
    0 elsewhere (slices 8 and 10 see f9 - f7 = 0 and f11 - f9 = 0; the one-sided borders see 0).
    det J = 1 + du/dx_D: 1.75, -0.5 (a fold), 1.75 on slices 7, 9, 11 and 1 on the others."""
    u = np.zeros((3, d, 8, 8))
    u[0, 8], u[0, 10] = 1.5, -1.5
    det_per_slice = np.ones(d)
    det_per_slice[[7, 11]] = 1.75
    det_per_slice[9] = -0.5
    return u, det_per_slice


# --- Dice --------------------------------------------------------------------------------------
def test_dice_of_a_shifted_box():
    # Label 1: a 4^3 box vs the same box shifted by 1 along W: overlap 4*4*3 = 48, sizes 64 + 64
    # -> 96/128 = 0.75. Label 3 (3x6x2 = 36 voxels) shifted by 1: overlap 18 -> 36/72 = 0.5.
    # Label 2 and 4 are absent from both -> NaN. The background is never scored.
    dice = dice_per_label(_box_seg(shift_w=1), _box_seg())
    assert set(dice) == set(SEG4_LABELS)
    assert dice[1] == pytest.approx(0.75) and dice[3] == pytest.approx(0.5)
    assert math.isnan(dice[2]) and math.isnan(dice[4])


def test_dice_after_warping_back_is_one():
    # moving = fixed shifted by +2 along W; out(x) = moving(x + u) with u_W = +2 undoes it.
    fixed, moving = _box_seg(), _box_seg(shift_w=2)
    ddf = torch.zeros(1, 3, 16, 16, 16)
    ddf[:, 2] = 2.0
    warped = warp(torch.from_numpy(moving)[None], ddf, mode="nearest")[0]
    dice = dice_per_label(warped, torch.from_numpy(fixed), labels=[1, 3])
    assert dice == {1: 1.0, 3: 1.0}


def test_dice_of_a_structure_that_vanished_or_appeared():
    seg = _box_seg()
    erased = np.where(seg == 3, 0, seg)
    # vanished from the warped map: no overlap, the worst Dice
    assert dice_per_label(erased, seg, labels=[3]) == {3: 0.0}
    # absent from the fixed map: no reference to overlap, NaN (as Learn2Reg), counted below
    assert math.isnan(dice_per_label(seg, erased, labels=[3])[3])
    assert labels_missing(erased, seg) == 1 and labels_missing(seg, erased) == 1
    assert labels_missing(seg, seg) == 0  # labels 2 and 4 are absent from both: not missing


# --- HD95 --------------------------------------------------------------------------------------
def _sphere(shape, centre_vox, radius_mm, spacing):
    axes = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    d2 = sum(((ax - c) * sp) ** 2 for ax, c, sp in zip(axes, centre_vox, spacing))
    return (d2 <= radius_mm ** 2).astype(np.int64)


@pytest.mark.parametrize("spacing, offset_vox", [((1.0, 1.0, 1.0), 3), ((1.0, 1.0, 2.0), 2)])
def test_hd95_of_offset_spheres(spacing, offset_vox):
    # Two spheres of radius r, centres d apart (d in mm). A surface point of A at angle theta
    # from the offset axis lies at |sqrt(r^2 + d^2 - 2 r d cos theta) - r| from B's surface;
    # cos theta is uniform on the sphere (Archimedes), so the 95th percentile of the distance
    # is at cos theta = -0.9: sqrt(r^2 + d^2 + 1.8 r d) - r, the same in both directions.
    # Voxelised surfaces agree with it within one voxel.
    r, shape = 8.0, (28, 28, 28)
    centre = np.array([13.5, 13.5, 10.0])
    a = _sphere(shape, centre, r, spacing)
    b = _sphere(shape, centre + [0, 0, offset_vox], r, spacing)
    d = offset_vox * spacing[2]
    expected = math.sqrt(r * r + d * d + 1.8 * r * d) - r
    assert hd95_mm(a, b, labels=[1], spacing_mm=spacing) == pytest.approx(expected, abs=max(spacing))
    assert hd95_mm(a, a, labels=[1], spacing_mm=spacing) == 0.0


def test_hd95_matches_a_distance_transform_oracle():
    # Oracle: scipy's exact Euclidean distance transform with sampling=spacing, taken at the
    # surface voxels, gives the distance of each surface voxel to the other surface in mm; the
    # k-d tree used by hd95_mm must give the same numbers.
    from scipy import ndimage

    spacing = np.array([1.2, 0.8, 1.5])
    a, b = _box_seg(shift_w=1), _box_seg()
    per_label = []
    for label in (1, 3):
        sa, sb = _surface(a == label), _surface(b == label)
        d_ab = ndimage.distance_transform_edt(~sb, sampling=spacing)[sa]
        d_ba = ndimage.distance_transform_edt(~sa, sampling=spacing)[sb]
        per_label.append(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)))
    assert hd95_mm(a, b, labels=[1, 3], spacing_mm=spacing) == pytest.approx(np.mean(per_label))
    # labels 2 and 4 are absent: skipped, so the default label set gives the same mean
    assert hd95_mm(a, b, spacing_mm=spacing) == pytest.approx(np.mean(per_label))


def test_hd95_of_a_structure_that_vanished_or_appeared_is_infinite():
    # label 3 erased from one map: infinitely far, and so is the mean over labels (before,
    # the label was skipped and the erased map scored better than a displaced one)
    seg = _box_seg()
    erased = np.where(seg == 3, 0, seg)
    assert hd95_mm(erased, seg) == math.inf and hd95_mm(seg, erased) == math.inf
    assert hd95_mm(erased, seg, labels=[1]) == 0.0


def test_surface_is_the_one_voxel_shell():
    # a 4^3 box: 64 voxels, 2^3 = 8 interior ones, so 56 surface voxels
    box = np.zeros((8, 8, 8), dtype=bool)
    box[2:6, 2:6, 2:6] = True
    assert _surface(box).sum() == 56
    # touching the volume edge: the edge counts as outside
    assert _surface(np.ones((3, 3, 3), dtype=bool)).sum() == 26


# --- folding, SDlogJ, plausibility -------------------------------------------------------------
def test_folding_pct_counts_a_known_fold():
    u, _ = _slab_fold(16)
    assert folding_pct(u) == pytest.approx(100.0 / 16)  # one slice of 16 folds
    assert folding_pct(torch.from_numpy(u)[None]) == pytest.approx(100.0 / 16)
    assert folding_pct(np.zeros((3, 8, 8, 8))) == 0.0


def test_sdlogj_closed_form():
    u, det_per_slice = _slab_fold(16)
    logs = np.log(np.clip(det_per_slice, 1e-9, None))  # the fold enters as log(1e-9)
    assert sdlogj(u) == pytest.approx(np.std(logs))
    # Learn2Reg crops 2 voxels from every side: slices 2..13 of 16 (the crop of H and W keeps
    # the per-slice values); without the crop the four border slices (det J = 1) would count
    assert sdlogj_l2r(u) == pytest.approx(np.std(np.log(det_per_slice[2:-2] + 3)), rel=1e-12)
    assert sdlogj_l2r(u) != pytest.approx(np.std(np.log(det_per_slice + 3)), rel=1e-3)
    # u = A x with constant det J: SDlogJ = 0
    x = np.stack(np.meshgrid(*[np.arange(8.0)] * 3, indexing="ij"))
    assert sdlogj(0.3 * x) == pytest.approx(0.0, abs=1e-12)


def test_ndv_finds_the_fold_central_differences_miss():
    # u_D = a (-1)^x_D on slices 2..5 of 8 (0 elsewhere), a = 0.75: the central differences
    # skip the voxel itself, so det J = 1 + {0, a/2, -a/2} > 0 everywhere (folding 0 %), but the
    # cubes between slices 2-3 and 4-5 are stretched along D by 1 + u(x+1) - u(x) = 1 - 2a =
    # -0.5: every tetrahedron of those cubes is inverted with half its volume, so NDV =
    # 100 x (2 cubes x 0.5) / 7 cubes along D.
    a = 0.75
    u = np.zeros((3, 8, 6, 6))
    u[0, 2:6] = a * np.array([1.0, -1.0, 1.0, -1.0]).reshape(4, 1, 1)
    assert folding_pct(u) == 0.0
    assert ndv_pct(u) == pytest.approx(100 * 2 * 0.5 / 7, rel=1e-12)


def test_ndv_closed_forms():
    x = np.stack(np.meshgrid(*[np.arange(6.0)] * 3, indexing="ij"))
    assert ndv_pct(np.zeros((3, 6, 6, 6))) == 0.0
    assert ndv_pct(0.3 * x) == 0.0  # affine, det(I + A) > 0: nothing folds
    mirror = np.zeros_like(x)
    mirror[0] = -2 * x[0]  # x_D -> -x_D: every tetrahedron inverted, at its full volume
    assert ndv_pct(mirror) == pytest.approx(100.0, rel=1e-12)
    assert ndv_pct(torch.from_numpy(mirror)[None]) == pytest.approx(100.0, rel=1e-12)


def test_plausibility_formula():
    # (1 - f) exp(-SDlogJ): 1 for the identity, 0 when every voxel folds.
    assert plausibility(np.zeros((3, 8, 8, 8))) == 1.0
    x = np.stack(np.meshgrid(*[np.arange(8.0)] * 3, indexing="ij"))
    reflection = np.zeros_like(x)
    reflection[0] = -2.0 * x[0]
    assert plausibility(reflection) == 0.0
    u, _ = _slab_fold(16)
    assert plausibility(u) == pytest.approx((1 - 1 / 16) * math.exp(-sdlogj(u)))
    assert 0.0 <= plausibility(u) <= 1.0


# --- displacement and similarity ---------------------------------------------------------------
def test_displacement_stats_in_voxels_and_mm():
    # u = (3, 4, 0) voxels everywhere: 5 voxels; with spacing (2, 1, 1) mm: (6, 4, 0) mm, sqrt(52).
    u = np.zeros((3, 4, 4, 4))
    u[0], u[1] = 3.0, 4.0
    stats = displacement_stats(u, (2.0, 1.0, 1.0))
    assert stats == pytest.approx({"disp_mean_vox": 5.0, "disp_max_vox": 5.0,
                                   "disp_mean_mm": math.sqrt(52), "disp_max_mm": math.sqrt(52)})


def test_global_ncc_and_mse():
    a = np.random.default_rng(0).normal(size=(2, 6, 6, 6))
    assert global_ncc(a, 2 * a + 1) == pytest.approx(1.0)
    assert global_ncc(a, -a) == pytest.approx(-1.0)
    assert math.isnan(global_ncc(a, np.ones_like(a)))
    assert mse(a, a + 0.5) == pytest.approx(0.25)


# --- Learn2Reg's definitions -------------------------------------------------------------------
# tests/fixtures/l2r: a copy of shared/fixtures/l2r (values computed by the Learn2Reg evaluation
# code on three 32^3 cases; its README gives the definitions). Case 2 has label 2 erased.
L2R_FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "l2r"
L2R_EXPECTED = json.loads((L2R_FIXTURES / "expected.json").read_text())


@pytest.mark.parametrize("case", sorted(L2R_EXPECTED))
def test_l2r_scores_match_learn2regs_values(case):
    expected = L2R_EXPECTED[case]
    arrays = np.load(L2R_FIXTURES / f"{case}.npz")
    labels = expected["labels"]
    got = l2r_scores(arrays["fixed_seg"], arrays["moving_seg"], arrays["warped_seg"],
                     np.moveaxis(arrays["disp_vox"], -1, 0), labels)  # (D, H, W, 3) -> (3, ...)
    for key in ("dice_mean", "hd95_mean_vox", "sdlogj"):
        assert got[key] == pytest.approx(expected[key], abs=1e-6, rel=0), key
    for key in ("dice_per_label", "hd95_per_label_vox"):
        values = [got[key][label] for label in labels]
        np.testing.assert_allclose(values, expected[key], atol=1e-6, rtol=0, err_msg=key)


def test_l2r_scores_labels_absent_from_fixed_or_moving_are_nan():
    seg = _box_seg()
    erased = np.where(seg == 3, 0, seg)
    u = np.zeros((3, 16, 16, 16))
    for fixed, moving in ((erased, seg), (seg, erased)):
        got = l2r_scores(fixed, moving, seg, u, [1, 3])
        assert math.isnan(got["dice_per_label"][3]) and math.isnan(got["hd95_per_label_vox"][3])
        assert got["dice_mean"] == 1.0 and got["hd95_mean_vox"] == 0.0


# --- evaluate_pair -----------------------------------------------------------------------------
@pytest.fixture
def pair():
    fixed_seg, moving_seg = _box_seg(), _box_seg(shift_w=2)
    ddf = np.zeros((3, 16, 16, 16))
    ddf[2] = 2.0  # moving(x + 2 e_W) = fixed(x)
    warped_seg = warp(torch.from_numpy(moving_seg)[None], torch.from_numpy(ddf)[None],
                      mode="nearest")[0].numpy()
    images = [s.astype(np.float32)[None] for s in (moving_seg, fixed_seg, warped_seg)]
    return dict(moving_image=images[0], fixed_image=images[1], warped_image=images[2],
                moving_seg=moving_seg, fixed_seg=fixed_seg, warped_seg=warped_seg, ddf_vox=ddf,
                spacing_mm=(1.0, 1.0, 1.5))


def test_evaluate_pair_columns_and_values(pair):
    row = evaluate_pair(**pair)
    assert tuple(row) == PER_PAIR_COLUMNS
    assert PER_PAIR_COLUMNS[:5] == ("dice_mean", "dice_cortex", "dice_subcortical",
                                    "dice_white_matter", "dice_csf")
    assert all(isinstance(v, float) for v in row.values())
    assert row["dice_mean"] == 1.0 and row["dice_cortex"] == 1.0
    assert math.isnan(row["dice_subcortical"])  # label 2 absent from both
    # before: label 1 overlap 4*4*2 = 32 of 64+64 -> 0.5; label 3 shifted by its full width -> 0
    assert row["dice_before_mean"] == pytest.approx(0.25)
    assert row["hd95_mm"] == 0.0 and row["labels_missing"] == 0.0
    assert row["folding_pct"] == 0.0 and row["sdlogj"] == 0.0 and row["plausibility"] == 1.0
    assert row["ndv_pct"] == 0.0
    assert row["l2r_dice_mean"] == 1.0 and row["l2r_hd95_vox"] == 0.0 and row["l2r_sdlogj"] == 0.0
    assert row["disp_mean_vox"] == 2.0 and row["disp_max_mm"] == 3.0  # 2 voxels x 1.5 mm
    assert row["mse_after"] == 0.0 and row["mse_improvement_pct"] == 100.0
    assert row["ncc_after"] == pytest.approx(1.0)
    expected_ncc_gain = 100 * (1.0 - row["ncc_before"]) / abs(row["ncc_before"])
    assert row["ncc_improvement_pct"] == pytest.approx(expected_ncc_gain)
    assert math.isnan(row["true_error_mm"]) and math.isnan(row["disp_mag_error_mm"])


def test_evaluate_pair_true_error_and_inference_time(pair):
    # truth differs by 1 voxel along W (1.5 mm) everywhere -> 1.5 mm over the brain voxels
    truth = pair["ddf_vox"].copy()
    truth[2] -= 1.0
    row = evaluate_pair(**pair, true_ddf_vox=truth, inference_s=0.25)
    assert row["true_error_mm"] == pytest.approx(1.5)
    # lengths over the brain: predicted 2 voxels x 1.5 mm = 3 mm, true 1 x 1.5 = 1.5 mm
    assert row["true_disp_mean_mm"] == pytest.approx(1.5)
    assert row["disp_mag_error_mm"] == pytest.approx(1.5)
    assert row["inference_s"] == 0.25 and tuple(row)[:-1] == PER_PAIR_COLUMNS
    assert evaluate_pair(**pair, true_ddf_vox=pair["ddf_vox"])["true_error_mm"] == 0.0


def test_evaluate_pair_accepts_torch(pair):
    as_torch = {k: torch.from_numpy(np.asarray(v)) if isinstance(v, np.ndarray) else v
                for k, v in pair.items()}
    assert evaluate_pair(**as_torch)["dice_mean"] == 1.0


# --- bad inputs --------------------------------------------------------------------------------
SEG = np.zeros((8, 8, 8), dtype=np.int64)


@pytest.mark.parametrize("call, exc, match", [
    (lambda: dice_per_label(SEG, np.zeros((8, 8, 9), np.int64)), ValueError,
     r"^shape mismatch: warped_seg has \(8, 8, 8\), fixed_seg has \(8, 8, 9\)"),
    (lambda: dice_per_label(SEG, SEG, labels=[0, 1]), ValueError,
     r"^labels == \[0, 1\], must not include the background 0"),
    (lambda: dice_per_label(SEG.astype(float), SEG), TypeError,
     r"^expected warped_seg with an integer dtype \(hard labels\), got float64"),
    (lambda: dice_per_label([[0]], SEG), TypeError,
     r"^expected warped_seg to be a numpy array or torch tensor, got list"),
    (lambda: hd95_mm(SEG, SEG, spacing_mm=(1.0, -1.0, 1.0)), ValueError,
     r"^spacing_mm == \[1.0, -1.0, 1.0\], must be three positive finite numbers"),
    (lambda: hd95_mm(SEG, SEG, spacing_mm=(1.0, 1.0)), ValueError, r"^spacing_mm == \[1.0, 1.0\]"),
    (lambda: folding_pct(np.zeros((2, 8, 8, 8))), ValueError,
     r"^expected ddf_vox of shape \(3, D, H, W\) or \(B, 3, D, H, W\), got \(2, 8, 8, 8\)"),
    (lambda: displacement_stats(np.zeros((3, 4, 4, 4)), (0.0, 1.0, 1.0)), ValueError,
     r"^spacing_mm == \[0.0, 1.0, 1.0\]"),
    (lambda: global_ncc(np.zeros(4), np.zeros(5)), ValueError,
     r"^shape mismatch: a has \(4,\), b has \(5,\)"),
])
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_evaluate_pair_scores_an_erased_structure_as_the_worst_case(pair):
    pair["warped_seg"] = np.where(pair["warped_seg"] == 3, 0, pair["warped_seg"])
    row = evaluate_pair(**pair)
    assert row["labels_missing"] == 1.0
    assert row["hd95_mm"] == math.inf and row["l2r_hd95_vox"] == math.inf
    assert row["dice_white_matter"] == 0.0 and row["dice_mean"] == 0.5


def test_evaluate_pair_rejects_a_field_of_the_wrong_size(pair):
    pair["ddf_vox"] = np.zeros((3, 8, 8, 8))
    with pytest.raises(ValueError, match=r"^expected ddf_vox of shape \(3, 16, 16, 16\) for one pair"):
        evaluate_pair(**pair)
