"""regcore.losses: similarity terms (closed forms, MONAI oracles) and compute_loss."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from regcore.config import (DEFAULT_REG_SCALE, REGULARIZERS, STUDY_REG_WEIGHTS, Config,
                            replace_section)
from regcore.losses import (
    LossBreakdown,
    adaptive_factor,
    compute_loss,
    cross_entropy_prob,
    local_ncc_loss,
    mse_loss,
    soft_dice_loss,
)
from regcore.regularizers import magnitude, regularizer_terms
from regcore.spatial import affine_to_ddf
from tests.regcore.conftest import make_smooth_field

SHAPE = (12, 12, 12)


def _onehot(labels: torch.Tensor, n: int = 5) -> torch.Tensor:
    return F.one_hot(labels, n).permute(0, 4, 1, 2, 3).to(torch.float64)


@pytest.fixture
def labels():
    return torch.randint(0, 5, (2, *SHAPE), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def image():
    return torch.randn(2, 1, *SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


# --- soft Dice ---------------------------------------------------------------------------------
def test_dice_of_identical_maps_is_zero_and_disjoint_is_one(labels):
    t = _onehot(labels)
    assert soft_dice_loss(t, t).item() == pytest.approx(0.0, abs=1e-9)
    shifted = _onehot((labels + 1) % 5)  # every voxel gets a different label
    assert soft_dice_loss(shifted, t).item() == pytest.approx(1.0, abs=1e-6)


def test_dice_closed_form_two_boxes():
    # Label 1: a 4x4x4 box in target, the same box shifted by 2 voxels along W in pred:
    # overlap 4*4*2 = 32, sizes 64 + 64 -> Dice 64/128 = 0.5; the background (channel 0) is
    # excluded, so the loss is 1 - 0.5.
    t = torch.zeros(1, 8, 8, 8, dtype=torch.long)
    p = torch.zeros_like(t)
    t[0, 2:6, 2:6, 1:5] = 1
    p[0, 2:6, 2:6, 3:7] = 1
    loss = soft_dice_loss(_onehot(p, 2), _onehot(t, 2))
    assert loss.item() == pytest.approx(0.5, abs=1e-6)
    with_bg = soft_dice_loss(_onehot(p, 2), _onehot(t, 2), exclude_background=False)
    assert with_bg.item() < loss.item()  # background overlap inflates Dice


def test_dice_matches_monai(labels):
    # MONAI DiceLoss(include_background=False) with the same smoothing on numerator and
    # denominator computes 1 - mean_{b,c} (2 I + s) / (P + T + s): identical.
    monai_losses = pytest.importorskip("monai.losses")
    gen = torch.Generator().manual_seed(2)
    pred = torch.softmax(torch.randn(2, 5, *SHAPE, generator=gen, dtype=torch.float64), dim=1)
    target = _onehot(labels)
    theirs = monai_losses.DiceLoss(include_background=False, smooth_nr=1e-5, smooth_dr=1e-5)(pred, target)
    torch.testing.assert_close(soft_dice_loss(pred, target), theirs)


# --- cross-entropy on probabilities ------------------------------------------------------------
def test_ce_of_uniform_probabilities_is_log_c(labels):
    pred = torch.full((2, 5, *SHAPE), 0.2, dtype=torch.float64)
    assert cross_entropy_prob(pred, _onehot(labels)).item() == pytest.approx(math.log(5))


def test_ce_treats_inputs_as_probabilities_not_logits(labels):
    # Reference: negative log-likelihood of log(p). The study's bug, F.cross_entropy(p, t),
    # applies a second softmax to probabilities; for a perfect prediction it is far from 0.
    gen = torch.Generator().manual_seed(3)
    pred = torch.softmax(torch.randn(2, 5, *SHAPE, generator=gen, dtype=torch.float64), dim=1)
    reference = F.nll_loss(torch.log(pred), labels)
    torch.testing.assert_close(cross_entropy_prob(pred, _onehot(labels)), reference)
    perfect = _onehot(labels)
    assert cross_entropy_prob(perfect, perfect).item() == pytest.approx(0.0, abs=1e-12)
    assert F.cross_entropy(perfect, labels).item() > 0.9  # the study's definition


def test_ce_is_finite_on_zero_probabilities(labels):
    pred = _onehot((labels + 1) % 5)  # zero probability on every true label
    value = cross_entropy_prob(pred, _onehot(labels))
    assert torch.isfinite(value) and value.item() == pytest.approx(-math.log(1e-6))


# --- MSE ---------------------------------------------------------------------------------------
def test_mse_closed_form(image):
    assert mse_loss(image + 0.5, image).item() == pytest.approx(0.25)


# --- local NCC ---------------------------------------------------------------------------------
def test_local_ncc_matches_monai(image):
    # MONAI's LocalNormalizedCrossCorrelationLoss(kernel_size=9) computes box sums with zero
    # padding and kernel volume 9^3, the same cross/variance formulas (floored at 1e-5) and the
    # mean of -ncc^2: identical up to float rounding.
    monai_losses = pytest.importorskip("monai.losses")
    gen = torch.Generator().manual_seed(4)
    other = 0.6 * image + 0.4 * torch.randn(image.shape, generator=gen, dtype=torch.float64)
    theirs = monai_losses.LocalNormalizedCrossCorrelationLoss(kernel_size=9)(other, image)
    torch.testing.assert_close(local_ncc_loss(other, image, window=9), theirs)


def test_local_ncc_is_minus_one_for_intensity_scaling(image):
    # ncc is invariant to a x + b inside the volume, but the zero padding of the box sums (the
    # MONAI/VoxelMorph convention) is not shifted by b, so only a pure scaling gives exactly -1
    # in every window, border windows included.
    assert local_ncc_loss(3.0 * image, image).item() == pytest.approx(-1.0, abs=1e-6)
    assert local_ncc_loss(-0.5 * image, image).item() == pytest.approx(-1.0, abs=1e-6)


def test_local_ncc_is_local_not_global():
    # target = pred x (+1 in one half of W, -1 in the other): the squared local NCC is 1 in
    # every window inside one half, while the global correlation is about 0. A global fallback
    # would give ~0; the local loss is close to -1.
    gen = torch.Generator().manual_seed(5)
    pred = torch.randn(1, 1, 16, 16, 32, generator=gen, dtype=torch.float64)
    sign = torch.ones_like(pred)
    sign[..., 16:] = -1
    target = pred * sign
    global_ncc = F.cosine_similarity((pred - pred.mean()).flatten(), (target - target.mean()).flatten(), dim=0)
    assert abs(global_ncc.item()) < 0.1
    assert local_ncc_loss(pred, target, window=5).item() < -0.7


# --- adaptive factor and compute_loss ----------------------------------------------------------
def test_adaptive_factor_schedule():
    assert adaptive_factor(0, 50) == pytest.approx(0.1)
    assert adaptive_factor(25, 50) == pytest.approx(0.05)
    assert adaptive_factor(49, 50) == pytest.approx(0.01)  # 0.1 * 1/50 = 0.002, floored


MM1 = (1.0, 1.0, 1.0)  # 1 mm voxels


def _cfg(variant: str, **loss_changes) -> Config:
    cfg = Config(variant=variant)
    return replace_section(cfg, "loss", **loss_changes) if loss_changes else cfg


def _output(labels, seed=6, affine=False):
    gen = torch.Generator().manual_seed(seed)
    warped = torch.softmax(torch.randn(2, 5, *SHAPE, generator=gen, dtype=torch.float64), dim=1)
    warped.requires_grad_(True)
    dense = make_smooth_field(SHAPE, amplitude_vox=3.0, seed=seed, batch=2).requires_grad_(True)
    total = dense
    if affine:
        theta = torch.tensor([[1.2, 0, 0, 2.0], [0, 0.9, 0.1, 0], [0, 0, 1.0, -1.0]],
                             dtype=torch.float64).expand(2, 3, 4)
        total = dense + affine_to_ddf(theta, SHAPE)
    return SimpleNamespace(warped=warped, dense_ddf_vox=dense, total_ddf_vox=total)


def test_compute_loss_without_regularization(labels):
    # baseline: total = 0.7 Dice + 0.3 CE; the regularizers are logged (detached), weighted 0.
    out = _output(labels)
    fixed = _onehot(labels)
    result = compute_loss(out, fixed, _cfg("baseline"), epoch=0, epochs=10, spacing_mm=MM1)
    assert isinstance(result, LossBreakdown)
    assert set(result.terms) == {"dice", "ce", *REGULARIZERS} == set(result.weighted)
    expected = 0.7 * soft_dice_loss(out.warped, fixed) + 0.3 * cross_entropy_prob(out.warped, fixed)
    torch.testing.assert_close(result.total, expected)
    assert result.factor == 0.0
    for name in REGULARIZERS:
        assert not result.terms[name].requires_grad
        # |u| < 25 mm everywhere at 1 mm voxels, so only the magnitude hinge is 0
        assert result.terms[name].item() > 0 or name == "magnitude"
        assert result.weighted[name].item() == 0
    result.total.backward()
    assert out.warped.grad.abs().sum() > 0
    assert out.dense_ddf_vox.grad is None


def test_compute_loss_with_regularization_uses_the_dense_field(labels):
    # regloss at epoch 0 of 10: factor 0.1; each regularizer weighted by 0.1 x reg_scale x its
    # study weight, computed on the dense (deformable) field, not on the total field that includes the affine.
    out = _output(labels, affine=True)
    fixed = _onehot(labels)
    cfg = _cfg("combined_enhanced")
    result = compute_loss(out, fixed, cfg, epoch=0, epochs=10, spacing_mm=MM1)
    assert result.factor == pytest.approx(0.1)
    reg = regularizer_terms(out.dense_ddf_vox, MM1, cfg.loss.max_displacement_mm)
    for name, weight in cfg.loss.reg_weights().items():
        torch.testing.assert_close(result.terms[name], reg[name])
        torch.testing.assert_close(result.weighted[name],
                                   0.1 * DEFAULT_REG_SCALE * weight * reg[name])
    on_total = regularizer_terms(out.total_ddf_vox, MM1)
    assert on_total["smooth"].item() != pytest.approx(result.terms["smooth"].item())
    torch.testing.assert_close(result.total, sum(result.weighted.values()))
    result.total.backward()
    assert out.dense_ddf_vox.grad.abs().sum() > 0


def test_compute_loss_magnitude_threshold_is_in_mm(labels):
    # the same field in voxels at 1 mm stays under 25 mm; at 8 mm voxels (up to ~9 voxels x 8)
    # it passes the threshold, and per batch item spacings are taken as given
    out, fixed = _output(labels), _onehot(labels)
    cfg = _cfg("regloss")
    at_1mm = compute_loss(out, fixed, cfg, epoch=0, epochs=10, spacing_mm=MM1)
    at_8mm = compute_loss(out, fixed, cfg, epoch=0, epochs=10, spacing_mm=(8.0, 8.0, 8.0))
    per_item = compute_loss(out, fixed, cfg, epoch=0, epochs=10,
                            spacing_mm=torch.tensor([[8.0] * 3, [8.0] * 3]))
    assert at_1mm.terms["magnitude"].item() == 0 and at_8mm.terms["magnitude"].item() > 0
    torch.testing.assert_close(per_item.terms["magnitude"], at_8mm.terms["magnitude"])
    expected = magnitude(out.dense_ddf_vox, (8.0, 8.0, 8.0), cfg.loss.max_displacement_mm)
    torch.testing.assert_close(at_8mm.terms["magnitude"], expected)


def test_compute_loss_factor_without_adaptive_schedule(labels):
    result = compute_loss(_output(labels), _onehot(labels), _cfg("regloss", adaptive=False),
                          epoch=5, epochs=10, spacing_mm=MM1)
    assert result.factor == 1.0
    torch.testing.assert_close(result.weighted["bending"],
                               DEFAULT_REG_SCALE * 0.005 * result.terms["bending"])


def test_reg_scale_multiplies_every_regularizer_and_one_gives_the_study_weights(labels):
    out, fixed = _output(labels), _onehot(labels)
    study = compute_loss(out, fixed, _cfg("regloss", reg_scale=1.0), epoch=0, epochs=10,
                         spacing_mm=MM1)
    scaled = compute_loss(out, fixed, _cfg("regloss", reg_scale=40.0), epoch=0, epochs=10,
                          spacing_mm=MM1)
    for name, weight in STUDY_REG_WEIGHTS.items():
        torch.testing.assert_close(study.weighted[name], 0.1 * weight * study.terms[name])
        torch.testing.assert_close(scaled.weighted[name], 40.0 * study.weighted[name])
    for name in ("dice", "ce"):  # the similarity is not scaled
        torch.testing.assert_close(scaled.weighted[name], study.weighted[name])
    off = compute_loss(out, fixed, _cfg("regloss", reg_scale=0.0), epoch=0, epochs=10,
                       spacing_mm=MM1)
    assert all(off.weighted[name].item() == 0 for name in REGULARIZERS)


def test_compute_loss_intensity(image):
    cfg = Config(variant="baseline").with_overrides({"data.modality": "intensity",
                                                      "loss.mse_weight": 0.5})
    warped = (image + 0.1).requires_grad_(True)
    out = SimpleNamespace(warped=warped, dense_ddf_vox=torch.zeros(2, 3, *SHAPE, dtype=torch.float64))
    result = compute_loss(out, image, cfg, epoch=0, epochs=1, spacing_mm=MM1)
    assert {"mse", "ncc"} <= set(result.terms) and "dice" not in result.terms
    expected = 0.5 * 0.01 + 1.0 * local_ncc_loss(warped, image, window=9)
    torch.testing.assert_close(result.total, expected)


@pytest.mark.parametrize("call, exc, match", [
    (lambda: soft_dice_loss(torch.zeros(1, 5, 4, 4, 4), torch.zeros(1, 4, 4, 4, 4)), ValueError,
     r"^shape mismatch: pred_prob has \(1, 5, 4, 4, 4\), target_onehot has \(1, 4, 4, 4, 4\)"),
    (lambda: soft_dice_loss(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 1, 4, 4, 4)), ValueError,
     r"^expected at least 2 channels with exclude_background=True, got 1"),
    (lambda: cross_entropy_prob(torch.zeros(5, 4, 4, 4), torch.zeros(5, 4, 4, 4)), ValueError,
     r"^expected pred_prob of shape \(B, C, D, H, W\), got \(5, 4, 4, 4\)"),
    (lambda: mse_loss(torch.zeros(1, 1, 4, 4, 4), [0.0]), TypeError,
     r"^expected target to be a torch.Tensor, got list"),
    (lambda: local_ncc_loss(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 1, 4, 4, 4), window=4),
     ValueError, r"^window == 4, must be an odd positive integer"),
    (lambda: adaptive_factor(11, 10), ValueError, r"^epoch == 11, must be an integer in \[0, 10\]"),
    (lambda: adaptive_factor(0, 0), ValueError, r"^epochs == 0, must be an integer >= 1"),
])
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# --- deep supervision of the passes and the coarse term ---------------------------------------
def _intensity_cfg(**loss_changes) -> Config:
    return Config(variant="baseline").with_overrides(
        {"data.modality": "intensity", **{f"loss.{k}": v for k, v in loss_changes.items()}})


def test_pass_weight_adds_the_mean_similarity_of_the_earlier_passes(image):
    gen = torch.Generator().manual_seed(3)
    earlier = tuple((image + 0.3 * torch.randn(image.shape, generator=gen, dtype=torch.float64)
                     ).requires_grad_(True) for _ in range(2))
    warped = (image + 0.1).requires_grad_(True)
    out = SimpleNamespace(warped=warped, dense_ddf_vox=torch.zeros(2, 3, *SHAPE, dtype=torch.float64),
                          pass_warped=earlier)
    plain = compute_loss(out, image, _intensity_cfg(), epoch=0, epochs=1, spacing_mm=MM1)
    assert "passes" not in plain.terms  # weight 0: the loss of the study
    result = compute_loss(out, image, _intensity_cfg(pass_weight=0.5), epoch=0, epochs=1,
                          spacing_mm=MM1)
    mean = sum(local_ncc_loss(w, image, window=9) for w in earlier) / 2
    torch.testing.assert_close(result.terms["passes"], mean)
    torch.testing.assert_close(result.total, plain.total + 0.5 * mean)
    result.total.backward()
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in earlier)
    # one pass (no earlier images) or an output without them: no term
    for single in (SimpleNamespace(warped=warped, dense_ddf_vox=out.dense_ddf_vox, pass_warped=()),
                   SimpleNamespace(warped=warped, dense_ddf_vox=out.dense_ddf_vox)):
        again = compute_loss(single, image, _intensity_cfg(pass_weight=0.5), epoch=0, epochs=1,
                             spacing_mm=MM1)
        assert "passes" not in again.terms


def test_coarse_weight_compares_the_images_at_half_resolution(image):
    warped = (image.flip(2) + 0.1).requires_grad_(True)
    out = SimpleNamespace(warped=warped, dense_ddf_vox=torch.zeros(2, 3, *SHAPE, dtype=torch.float64))
    cfg = _intensity_cfg(coarse_weight=2.0)
    assert cfg.loss.coarse_window() == 5
    result = compute_loss(out, image, cfg, epoch=0, epochs=1, spacing_mm=MM1)
    coarse = local_ncc_loss(F.avg_pool3d(warped, 2), F.avg_pool3d(image, 2), window=5)
    torch.testing.assert_close(result.terms["coarse"], coarse)
    torch.testing.assert_close(result.weighted["coarse"], 2.0 * coarse)
    assert -1.0 <= float(coarse.detach()) < 0.0
    # one-hot maps: the same soft Dice + CE on the block-averaged probabilities
    labels = torch.randint(0, 5, (2, *SHAPE), generator=torch.Generator().manual_seed(0))
    onehot_out = _output(labels)
    onehot = compute_loss(onehot_out, _onehot(labels), _cfg("baseline", coarse_weight=1.0),
                          epoch=0, epochs=1, spacing_mm=MM1)
    pooled_pred, pooled_fixed = F.avg_pool3d(onehot_out.warped, 2), F.avg_pool3d(_onehot(labels), 2)
    expected = (0.7 * soft_dice_loss(pooled_pred, pooled_fixed)
                + 0.3 * cross_entropy_prob(pooled_pred, pooled_fixed))
    torch.testing.assert_close(onehot.terms["coarse"], expected)


@pytest.mark.parametrize("window, coarse", [(3, 3), (5, 3), (7, 3), (9, 5), (11, 5), (13, 7)])
def test_coarse_window_halves_the_ncc_window_and_stays_odd(window, coarse):
    assert _intensity_cfg(ncc_window=window).loss.coarse_window() == coarse


@pytest.mark.parametrize("key", ["pass_weight", "coarse_weight"])
def test_negative_pass_and_coarse_weights_are_refused(key):
    with pytest.raises(ValueError, match=f"loss.{key}"):
        _intensity_cfg(**{key: -0.1})


def test_pass_term_is_a_zero_tensor_when_every_similarity_weight_is_zero(image):
    earlier = (image.clone().requires_grad_(True),)
    out = SimpleNamespace(warped=image.clone().requires_grad_(True), pass_warped=earlier,
                          dense_ddf_vox=torch.zeros(2, 3, *SHAPE, dtype=torch.float64))
    cfg = _intensity_cfg(pass_weight=1.0, coarse_weight=1.0, ncc_weight=0.0)
    result = compute_loss(out, image, cfg, epoch=0, epochs=1, spacing_mm=MM1)
    for term in ("passes", "coarse"):
        assert torch.is_tensor(result.terms[term]) and float(result.terms[term]) == 0.0
