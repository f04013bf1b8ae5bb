"""regcore.regularizers: closed forms, MONAI oracles, gradients, bad inputs."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from regcore.config import REGULARIZERS
from regcore.regularizers import (
    JACOBIAN_MARGIN,
    REGULARIZER_FNS,
    bending_energy,
    jacobian_penalty,
    magnitude,
    regularizer_terms,
    rigidity,
    smoothness,
)
from tests.regcore.conftest import linear_field, make_smooth_field

SHAPE = (10, 11, 12)
# MONAI 1.6 indexes with lists inside its losses; torch warns about it on every call.
pytestmark = pytest.mark.filterwarnings("ignore:Using a non-tuple sequence:UserWarning")


def _grid(shape=SHAPE):
    axes = [torch.arange(s, dtype=torch.float64) for s in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)  # (3, D, H, W)


def _monai(name):
    pytest.importorskip("monai")
    import monai.losses
    return getattr(monai.losses, name)


@pytest.fixture
def a_matrix():
    return 0.2 * torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_names_match_the_config():
    assert tuple(REGULARIZER_FNS) == REGULARIZERS
    terms = regularizer_terms(make_smooth_field(SHAPE, seed=1), (1.0, 1.0, 1.0))
    assert tuple(terms) == REGULARIZERS
    assert all(t.ndim == 0 for t in terms.values())


# --- smoothness --------------------------------------------------------------------------------
def test_smoothness_of_a_linear_field(a_matrix):
    # u = A x: every forward difference along axis k of channel c equals A_ck, so
    # smooth = sum_k mean_c A_ck^2 = sum_{c,k} A_ck^2 / 3.
    value = smoothness(linear_field(a_matrix, SHAPE))
    torch.testing.assert_close(value, (a_matrix ** 2).sum() / 3)


def test_smoothness_matches_monai_diffusion_on_linear_fields(a_matrix):
    # MONAI's DiffusionLoss uses central differences (sum over axes, mean over B, C, voxels);
    # on a linear field both stencils are exact, so the values are equal. On a general field
    # they differ (forward vs central differences), hence the linear test case.
    u = linear_field(a_matrix, SHAPE)
    torch.testing.assert_close(smoothness(u), _monai("DiffusionLoss")()(u))


def test_smoothness_of_a_translation_is_zero():
    u = torch.full((1, 3, *SHAPE), 4.0)
    assert smoothness(u) == 0


# --- magnitude ---------------------------------------------------------------------------------
def test_magnitude_hinge_closed_form():
    # |u| = 13 voxels in half of the volume (u = (5, 12, 0): 5-12-13) and 3 in the other half.
    # At 2 mm voxels that is 26 mm and 6 mm; threshold 20 mm: relu(26/20 - 1)^2 = 0.09 on half
    # the voxels, 0 elsewhere -> mean 0.045.
    u = torch.zeros(1, 3, 4, 4, 4, dtype=torch.float64)
    u[:, 0, :2], u[:, 1, :2] = 5.0, 12.0
    u[:, 2, 2:] = 3.0
    torch.testing.assert_close(magnitude(u, (2.0, 2.0, 2.0), 20.0),
                               torch.tensor(0.045, dtype=torch.float64))
    assert magnitude(u, (2.0, 2.0, 2.0), 26.0) == 0
    assert magnitude(u, (2.0, 2.0, 2.0)) == magnitude(u, (2.0, 2.0, 2.0), 25.0)  # the default


def test_magnitude_is_the_same_on_any_grid():
    # the same physical field on a grid twice as fine: twice the voxels, half the spacing
    u = torch.zeros(1, 3, 4, 4, 4, dtype=torch.float64)
    u[:, 1, :2] = 10.0  # 10 voxels x 3 mm = 30 mm -> relu(30/15 - 1)^2 = 1 on half the volume
    fine = 2 * torch.nn.functional.interpolate(u, scale_factor=2, mode="nearest")
    coarse_value = magnitude(u, (3.0, 3.0, 3.0), 15.0)
    torch.testing.assert_close(coarse_value, torch.tensor(0.5, dtype=torch.float64))
    torch.testing.assert_close(magnitude(fine, (1.5, 1.5, 1.5), 15.0), coarse_value)


def test_magnitude_scales_each_axis_by_its_spacing_and_batch_item():
    u = torch.zeros(2, 3, 4, 4, 4, dtype=torch.float64)
    u[:, 2] = 10.0  # along W only
    spacing = torch.tensor([[9.0, 9.0, 3.0], [1.0, 1.0, 6.0]], dtype=torch.float64)
    # item 0: 30 mm -> 1; item 1: 60 mm -> relu(4 - 1)^2 = 9; mean 5
    torch.testing.assert_close(magnitude(u, spacing, 15.0), torch.tensor(5.0, dtype=torch.float64))


def test_magnitude_gradient_is_finite_at_zero_displacement():
    u = torch.zeros(1, 3, 4, 4, 4, requires_grad=True)
    magnitude(u, (1.0, 1.0, 1.0), 1e-9).backward()
    assert torch.isfinite(u.grad).all()


# --- rigidity ----------------------------------------------------------------------------------
def test_rigidity_of_a_constant_field_is_zero():
    assert rigidity(torch.full((1, 3, *SHAPE), -2.5)) == 0


def test_rigidity_of_any_affine_field_is_zero_edges_included(a_matrix):
    # The 27-point mean of an affine function is its centre value; evaluated only where the
    # whole neighbourhood lies in the volume, nothing else enters (before: the replicated edge
    # broke the linearity and an affine field scored more than a non-affine one).
    u = linear_field(a_matrix, SHAPE) + torch.tensor([1.5, -2.0, 0.25],
                                                     dtype=torch.float64).reshape(1, 3, 1, 1, 1)
    assert rigidity(u).item() == pytest.approx(0.0, abs=1e-24)
    big = linear_field(torch.eye(3, dtype=torch.float64) * -3.0, (4, 3, 5))
    assert rigidity(big).item() == pytest.approx(0.0, abs=1e-24)


def test_rigidity_of_a_quadratic_field_closed_form():
    # u_D = x_D^2: the mean of (x-1)^2, x^2, (x+1)^2 is x^2 + 2/3, so u - mean = -2/3 on the
    # D channel and 0 on the other two: rigidity = (2/3)^2 / 3 = 4/27.
    x = _grid()
    u = torch.zeros(1, 3, *SHAPE, dtype=torch.float64)
    u[0, 0] = x[0] ** 2
    torch.testing.assert_close(rigidity(u), torch.tensor(4 / 27, dtype=torch.float64))


def test_rigidity_matches_an_explicit_neighbourhood_loop():
    # Independent slow oracle: for every voxel at least 1 from every side, the mean over its 27
    # neighbours, squared deviation, mean over channels and those voxels.
    u = make_smooth_field((5, 6, 7), amplitude_vox=1.0, seed=3, coarse=5).numpy()[0]
    d, h, w = u.shape[1:]
    total = 0.0
    for x, y, z in itertools.product(range(1, d - 1), range(1, h - 1), range(1, w - 1)):
        nb = [u[:, x + i, y + j, z + k] for i, j, k in itertools.product((-1, 0, 1), repeat=3)]
        total += ((u[:, x, y, z] - np.mean(nb, axis=0)) ** 2).sum()
    expected = total / (3 * (d - 2) * (h - 2) * (w - 2))
    assert rigidity(torch.from_numpy(u[None])).item() == pytest.approx(expected, rel=1e-10)


# --- Jacobian penalty --------------------------------------------------------------------------
def _scaled(factor_d, shape=SHAPE):
    """u_D = (factor_d - 1) x_D: J = diag(factor_d, 1, 1), det J = factor_d everywhere."""
    a = torch.zeros(3, 3, dtype=torch.float64)
    a[0, 0] = factor_d - 1.0
    return linear_field(a, shape)


def test_jacobian_penalty_is_zero_for_volume_preserving_fields():
    assert jacobian_penalty(torch.zeros(1, 3, *SHAPE)) == 0
    shear = torch.zeros(3, 3, dtype=torch.float64)
    shear[0, 1] = 0.4  # u_D = 0.4 x_H: J upper triangular with unit diagonal, det 1
    torch.testing.assert_close(jacobian_penalty(linear_field(shear, SHAPE)),
                               torch.tensor(0.0, dtype=torch.float64))


def test_jacobian_penalty_closed_form_and_symmetry():
    # det J = 2 and det J = 1/2: no fold, log^2 term (log 2)^2 for both (symmetric).
    expected = torch.tensor(math.log(2.0) ** 2, dtype=torch.float64)
    torch.testing.assert_close(jacobian_penalty(_scaled(2.0)), expected)
    torch.testing.assert_close(jacobian_penalty(_scaled(0.5)), expected)
    # det J = -1 (a reflection, folded everywhere): hinge (0.1 + 1)^2 plus the clamped log term.
    folded = (JACOBIAN_MARGIN + 1.0) ** 2 + math.log(JACOBIAN_MARGIN) ** 2
    torch.testing.assert_close(jacobian_penalty(_scaled(-1.0)),
                               torch.tensor(folded, dtype=torch.float64))


def test_jacobian_penalty_does_not_reward_expansion():
    # Pure expansion from the identity never lowers the penalty (the study's log term did).
    values = [jacobian_penalty(_scaled(f)).item() for f in (1.0, 1.1, 1.5, 2.0, 4.0)]
    assert values == sorted(values) and values[0] == 0 and values[-1] > 0


def test_jacobian_penalty_has_a_gradient_on_folds():
    # Folded everywhere (det J = -1): the hinge has slope 2 (margin - det) = 2.2 in det J, so the
    # gradient reaches u; the study's clamp to [1e-6, 10] made it exactly zero here.
    u = _scaled(-1.0).requires_grad_(True)
    jacobian_penalty(u).backward()
    assert u.grad.abs().sum() > 0
    # Gradient descent on the fold increases det J.
    with torch.no_grad():
        stepped = u - 0.01 * u.grad
    from regcore.spatial import jacobian_det
    assert jacobian_det(stepped).mean() > -1.0


# --- bending energy ----------------------------------------------------------------------------
def test_bending_energy_of_a_linear_field_is_zero(a_matrix):
    torch.testing.assert_close(bending_energy(linear_field(a_matrix, SHAPE)),
                               torch.tensor(0.0, dtype=torch.float64))


def test_bending_energy_of_a_quadratic_field():
    # u_c = x^T Q_c x: d2u_c/dx_i^2 = 2 Q_c[i, i] and d2u_c/dx_i dx_j = Q_c[i, j] + Q_c[j, i],
    # constant everywhere and exact for both stencils, so
    # bending = mean_c [ sum_i (2 Q_c[i,i])^2 + 2 sum_{i<j} (Q_c[i,j] + Q_c[j,i])^2 ].
    q = 0.05 * torch.randn(3, 3, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x = _grid()
    u = torch.einsum("cij,idhw,jdhw->cdhw", q, x, x).unsqueeze(0)
    sym = q + q.transpose(1, 2)
    pure = (sym.diagonal(dim1=1, dim2=2) ** 2).sum(1)
    mixed = sym[:, 0, 1] ** 2 + sym[:, 0, 2] ** 2 + sym[:, 1, 2] ** 2
    expected = (pure + 2 * mixed).mean()
    torch.testing.assert_close(bending_energy(u), expected)
    torch.testing.assert_close(_monai("BendingEnergyLoss")(normalize=False)(u), expected)


def test_bending_energy_matches_monai_on_any_field():
    # MONAI 1.6's BendingEnergyLoss(normalize=False) uses the same compact stencils on the same
    # interior voxels, mixed terms doubled, mean over B, C, voxels: identical on any field.
    u = make_smooth_field(SHAPE, amplitude_vox=2.0, seed=5, batch=2, coarse=6)
    torch.testing.assert_close(bending_energy(u), _monai("BendingEnergyLoss")(normalize=False)(u),
                               atol=1e-12, rtol=1e-10)


def test_bending_energy_includes_the_mixed_terms():
    # u_D = x_H x_W has no pure second derivative; only d2/dH dW = 1 is non-zero:
    # bending = mean_c 2 * 1^2 = 2 / 3.
    x = _grid()
    u = torch.zeros(1, 3, *SHAPE, dtype=torch.float64)
    u[0, 0] = x[1] * x[2]
    torch.testing.assert_close(bending_energy(u), torch.tensor(2 / 3, dtype=torch.float64))


# --- gradients ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", REGULARIZERS)
def test_every_regularizer_gradient_reaches_the_field(name):
    u = make_smooth_field((12, 12, 12), amplitude_vox=3.0, seed=6, coarse=5,
                          dtype=torch.float32).requires_grad_(True)
    fn = REGULARIZER_FNS[name]
    # threshold 1 mm at 1 mm voxels so the hinge is active
    value = fn(u, (1.0, 1.0, 1.0), 1.0) if name == "magnitude" else fn(u)
    assert value.ndim == 0 and value.item() > 0
    value.backward()
    assert torch.isfinite(u.grad).all()
    assert u.grad.abs().sum() > 0


def test_half_precision_is_computed_in_float32():
    u = make_smooth_field(SHAPE, seed=7, dtype=torch.float32)
    value = bending_energy(u.bfloat16())
    assert value.dtype == torch.float32


# --- bad inputs --------------------------------------------------------------------------------
DDF = torch.zeros(1, 3, 8, 8, 8)


@pytest.mark.parametrize("call, exc, match", [
    (lambda: smoothness(torch.zeros(1, 2, 8, 8, 8)), ValueError,
     r"^expected ddf of shape \(B, 3, D, H, W\), got \(1, 2, 8, 8, 8\)"),
    (lambda: rigidity(torch.zeros(3, 8, 8, 8)), ValueError,
     r"^expected ddf of shape \(B, 3, D, H, W\), got \(3, 8, 8, 8\)"),
    (lambda: magnitude(DDF, (1.0, 1.0, 1.0), -1.0), ValueError,
     r"^max_displacement_mm == -1.0, must be a finite number > 0"),
    (lambda: magnitude(DDF, (1.0, 1.0, 1.0), 0.0), ValueError, r"^max_displacement_mm == 0.0"),
    (lambda: magnitude(DDF, (1.0, 1.0, 1.0), float("nan")), ValueError,
     r"^max_displacement_mm == nan"),
    (lambda: magnitude(DDF, (1.0, 1.0, 1.0), "10"), ValueError, r"^max_displacement_mm == '10'"),
    (lambda: magnitude(DDF, (1.0, 1.0)), ValueError,
     r"^expected spacing_mm of shape \(3,\) or \(1, 3\), got \(1, 2\)"),
    (lambda: magnitude(DDF, (1.0, 0.0, 1.0)), ValueError,
     r"^spacing_mm == \[\[1.0, 0.0, 1.0\]\], must be positive finite numbers"),
    (lambda: rigidity(torch.zeros(1, 3, 8, 2, 8)), ValueError,
     r"^expected every spatial size of ddf >= 3, got \(8, 2, 8\)"),
    (lambda: bending_energy(torch.zeros(1, 3, 8, 2, 8)), ValueError,
     r"^expected every spatial size of ddf >= 3, got \(8, 2, 8\)"),
    (lambda: jacobian_penalty(DDF, margin=0.0), ValueError,
     r"^margin == 0.0, must be a number in \(0, 1\)"),
    (lambda: jacobian_penalty(DDF.numpy()), TypeError,
     r"^expected ddf to be a torch.Tensor, got ndarray"),
])
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
