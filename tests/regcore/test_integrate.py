"""regcore.integrate: scaling and squaring."""

from __future__ import annotations

import warnings

import pytest
import torch

from regcore.integrate import integrate_velocity
from regcore.spatial import jacobian_det
from tests.regcore.conftest import make_smooth_field

SHAPE = (12, 14, 16)


def test_zero_velocity_gives_zero_field():
    v = torch.zeros(1, 3, *SHAPE)
    assert torch.equal(integrate_velocity(v), v)


def test_constant_velocity_is_a_translation():
    # A constant v is a translation; exp(v) = v. Each squaring: u + u(x + u) = 2u exactly for a
    # constant field (border padding keeps it constant outside), so u_7 = 2^7 * v / 2^7 = v.
    v = torch.tensor([1.5, -0.75, 2.25]).view(1, 3, 1, 1, 1).expand(2, 3, *SHAPE).clone()
    torch.testing.assert_close(integrate_velocity(v, steps=7), v, atol=1e-6, rtol=0)


def test_zero_steps_returns_the_velocity():
    v = make_smooth_field(SHAPE, seed=1)
    assert torch.equal(integrate_velocity(v, steps=0), v)


def test_matches_monai_dvf2ddf():
    # monai.networks.blocks.DVF2DDF(num_steps=7) is the same algorithm: v / 2^7, then 7 times
    # u <- u + Warp(u, u), with voxel displacements and align_corners=True. With the same
    # padding ("border") the results agree to float rounding of the normalised coordinates.
    pytest.importorskip("monai")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from monai.networks.blocks import DVF2DDF
        v = make_smooth_field(SHAPE, amplitude_vox=4.0, seed=2, batch=2, dtype=torch.float32)
        theirs = DVF2DDF(num_steps=7, padding_mode="border")(v)
    ours = integrate_velocity(v, steps=7, padding="border")
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs_zeros = DVF2DDF(num_steps=7, padding_mode="zeros")(v)
    torch.testing.assert_close(integrate_velocity(v, steps=7, padding="zeros"), theirs_zeros,
                               atol=1e-4, rtol=1e-4)


def test_integration_unfolds_a_folding_velocity():
    # A large smooth velocity whose own Jacobian folds somewhere: its exponential is a
    # diffeomorphism, so (up to discretisation) det J > 0 everywhere after integration.
    v = make_smooth_field((16, 16, 16), amplitude_vox=4.0, seed=3, coarse=4)
    assert (jacobian_det(v) <= 0).float().mean() > 0.1  # about 20 % of v's voxels fold
    u = integrate_velocity(v, steps=7)
    assert (jacobian_det(u) <= 0).sum() == 0


def test_gradient_reaches_the_velocity():
    v = make_smooth_field(SHAPE, seed=4).requires_grad_(True)
    integrate_velocity(v).pow(2).sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0


@pytest.mark.parametrize("call, exc, match", [
    (lambda: integrate_velocity(torch.zeros(1, 2, 8, 8, 8)), ValueError,
     r"^expected velocity_vox of shape \(B, 3, D, H, W\), got \(1, 2, 8, 8, 8\)"),
    (lambda: integrate_velocity(torch.zeros(1, 3, 8, 8, 8), steps=-1), ValueError,
     r"^steps == -1, must be an integer >= 0"),
    (lambda: integrate_velocity(torch.zeros(1, 3, 8, 8, 8), steps=2.5), ValueError,
     r"^steps == 2.5, must be an integer >= 0"),
    (lambda: integrate_velocity(torch.zeros(1, 3, 8, 8, 8), padding="wrap"), ValueError,
     r"^padding == 'wrap', must be one of border, zeros"),
])
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
