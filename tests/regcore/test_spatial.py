"""regcore.spatial: warp, affine fields, composition, Jacobian determinant."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from regcore.spatial import (
    affine_to_ddf,
    compose_affine_ddf,
    identity_grid_vox,
    jacobian_det,
    warp,
)
from tests.regcore.conftest import linear_field, make_smooth_field

SHAPE = (12, 14, 16)  # distinct sizes so that an axis mix-up cannot pass


@pytest.fixture
def image():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, *SHAPE, generator=gen)


@pytest.fixture
def labels():
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, 5, (2, *SHAPE), generator=gen)


# ---------------------------------------------------------------------------------------------
# warp: exact cases
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("padding", ["border", "zeros"])
def test_zero_field_is_bitwise_identity(image, mode, padding):
    zero = torch.zeros(2, 3, *SHAPE)
    out = warp(image, zero, mode=mode, padding=padding)
    assert out.dtype == image.dtype
    assert torch.equal(out, image)


@pytest.mark.parametrize("shape", [(2, 1, *SHAPE), (2, *SHAPE)])
def test_zero_field_keeps_integer_labels(labels, shape):
    lab = labels.reshape(shape)
    out = warp(lab, torch.zeros(2, 3, *SHAPE), mode="nearest")
    assert out.dtype == torch.int64 and out.shape == lab.shape
    assert torch.equal(out, lab)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("shift", [2, -3])
def test_integer_shift_moves_voxels_exactly(image, axis, shift):
    # out(x) = image(x + s e_axis): channel k of the field moves spatial axis k.
    ddf = torch.zeros(2, 3, *SHAPE)
    ddf[:, axis] = shift
    n = SHAPE[axis]
    out_border = warp(image, ddf, padding="border")
    out_zeros = warp(image, ddf, padding="zeros")
    dim = 2 + axis
    inside = torch.arange(max(0, -shift), min(n, n - shift))
    assert torch.equal(out_border.index_select(dim, inside), image.index_select(dim, inside + shift))
    outside = torch.tensor([i for i in range(n) if i not in set(inside.tolist())])
    edge = torch.full_like(outside, n - 1 if shift > 0 else 0)
    assert torch.equal(out_border.index_select(dim, outside), image.index_select(dim, edge))
    assert torch.equal(out_zeros.index_select(dim, outside),
                       torch.zeros_like(out_zeros.index_select(dim, outside)))


def test_integer_shift_labels_nearest_exact(labels):
    ddf = torch.zeros(2, 3, *SHAPE)
    ddf[:, 2] = 1.0  # W axis
    out = warp(labels, ddf, mode="nearest")
    assert out.dtype == labels.dtype
    assert torch.equal(out[..., :-1], labels[..., 1:])


def test_integer_shift_under_autograd_is_close(image):
    # With a gradient requested, grid_sample does the work; its float round trip through
    # normalised coordinates is off by ~1e-7 voxel, so the result is exact to ~1e-6.
    ddf = torch.zeros(2, 3, *SHAPE)
    ddf[:, 1] = 2.0
    ddf.requires_grad_(True)
    out = warp(image, ddf)
    torch.testing.assert_close(out[:, :, :, :-2], image[:, :, :, 2:], atol=1e-5, rtol=0)
    out.sum().backward()
    assert ddf.grad is not None and ddf.grad.abs().sum() > 0


def test_linear_image_fractional_shift_is_exact_inside():
    # Trilinear interpolation reproduces a linear function f(x) = a.x + b exactly, so a constant
    # fractional shift s gives f(x + s) wherever x + s stays inside the volume.
    a = torch.tensor([0.5, -1.25, 2.0], dtype=torch.float64)
    grid = identity_grid_vox(SHAPE, dtype=torch.float64)
    img = (torch.einsum("k,bkdhw->bdhw", a, grid) + 3.0).unsqueeze(1)
    s = torch.tensor([0.3, -0.7, 1.6], dtype=torch.float64)
    ddf = s.view(1, 3, 1, 1, 1).expand(1, 3, *SHAPE).clone()
    out = warp(img, ddf)
    expected = img + float(a @ s)
    torch.testing.assert_close(out[:, :, 1:-1, 1:-1, 1:-2], expected[:, :, 1:-1, 1:-1, 1:-2],
                               atol=1e-10, rtol=0)


def test_nearest_half_voxel_shift_keeps_label_set(labels):
    ddf = torch.full((2, 3, *SHAPE), 0.4)
    out = warp(labels, ddf, mode="nearest")
    assert out.dtype == labels.dtype
    # 0.4 voxel rounds back to the same voxel
    assert torch.equal(out, labels)


def test_bilinear_on_integer_labels_is_refused(labels):
    with pytest.raises(ValueError, match=r"^mode == 'bilinear' for an integer label map"):
        warp(labels, torch.zeros(2, 3, *SHAPE), mode="bilinear")


def test_identity_grid_is_cached_per_shape_device_dtype():
    g1 = identity_grid_vox(SHAPE, "cpu", torch.float32)
    assert identity_grid_vox(SHAPE, "cpu", torch.float32) is g1
    assert identity_grid_vox(SHAPE, "cpu", torch.float64) is not g1
    assert g1.shape == (1, 3, *SHAPE) and g1[0, :, 2, 3, 4].tolist() == [2.0, 3.0, 4.0]


# ---------------------------------------------------------------------------------------------
# warp vs MONAI Warp (independent oracle)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_warp_matches_monai(image, mode):
    # monai.networks.blocks.Warp takes the same voxel displacement (channel k = spatial axis k),
    # align_corners=True, border padding: the same sampling positions, so the same result up
    # to float rounding of the normalised coordinates (~1e-6 in float32).
    pytest.importorskip("monai")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from monai.networks.blocks import Warp
    ddf = make_smooth_field(SHAPE, amplitude_vox=3.0, seed=3, batch=2, dtype=torch.float32)
    ddf.requires_grad_(True)  # force the grid_sample path for both
    ours = warp(image, ddf, mode=mode)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Using PyTorch native grid_sample"
        theirs = Warp(mode=mode, padding_mode="border")(image, ddf)
    if mode == "bilinear":
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    else:
        # nearest can flip where a position sits within float error of a half voxel
        assert (ours != theirs).float().mean() < 1e-3


# ---------------------------------------------------------------------------------------------
# affine fields and composition
# ---------------------------------------------------------------------------------------------
def _theta(a, t, batch=1):
    theta = torch.cat([torch.as_tensor(a, dtype=torch.float64),
                       torch.as_tensor(t, dtype=torch.float64).view(3, 1)], dim=1)
    return theta.unsqueeze(0).expand(batch, 3, 4).clone()


def test_identity_affine_is_exact_zero():
    ddf = affine_to_ddf(_theta(torch.eye(3), torch.zeros(3)), SHAPE)
    assert ddf.shape == (1, 3, *SHAPE)
    assert torch.equal(ddf, torch.zeros_like(ddf))


def test_translation_affine_is_constant_and_warps_exactly(image):
    t = torch.tensor([1.0, -2.0, 3.0])
    ddf = affine_to_ddf(_theta(torch.eye(3), t, batch=2).float(), SHAPE)
    torch.testing.assert_close(ddf, t.view(1, 3, 1, 1, 1).expand(2, 3, *SHAPE), atol=0, rtol=0)
    out = warp(image, ddf)
    # out[d, h, w] = image[d + 1, h - 2, w + 3]
    assert torch.equal(out[:, :, :-1, 2:, :-3], image[:, :, 1:, :-2, 3:])


def test_rotation_about_centre_fixes_the_centre():
    # x' = A (x - c) + c: the centre voxel c = (size - 1) / 2 (odd sizes) does not move, and a
    # 90 degree rotation in the (H, W) plane sends c + e_H to c + e_W.
    shape = (9, 11, 11)
    a = torch.tensor([[1.0, 0, 0], [0, 0, -1.0], [0, 1.0, 0]])
    ddf = affine_to_ddf(_theta(a, torch.zeros(3)), shape)
    c = (4, 5, 5)
    assert torch.allclose(ddf[0, :, c[0], c[1], c[2]], torch.zeros(3, dtype=torch.float64))
    # x = c + e_H -> A (e_H) + c = c + e_W, so u = e_W - e_H
    u = ddf[0, :, c[0], c[1] + 1, c[2]]
    torch.testing.assert_close(u, torch.tensor([0.0, -1.0, 1.0], dtype=torch.float64))


def test_compose_matches_the_formula():
    # total(x) = A (x + u(x) - c) + c + t - x, evaluated here independently in numpy.
    gen = torch.Generator().manual_seed(5)
    a = torch.eye(3, dtype=torch.float64) + 0.1 * torch.randn(3, 3, generator=gen, dtype=torch.float64)
    t = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    u = make_smooth_field(SHAPE, amplitude_vox=2.0, seed=6)
    total = compose_affine_ddf(_theta(a, t), u)[0].numpy()
    x = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"))
    c = (np.array(SHAPE, dtype=float) - 1) / 2
    y = x + u[0].numpy() - c[:, None, None, None]
    expected = np.einsum("ij,jdhw->idhw", a.numpy(), y) + (c + t.numpy())[:, None, None, None] - x
    np.testing.assert_allclose(total, expected, atol=1e-12)


def test_compose_with_identity_affine_returns_the_field():
    u = make_smooth_field(SHAPE, seed=7, batch=2)
    assert torch.equal(compose_affine_ddf(_theta(torch.eye(3), torch.zeros(3), 2), u), u)


def test_composed_field_equals_two_resamplings_on_a_linear_image():
    # M(affine(x + u(x))) = (M o affine)(x + u(x)): warping once with the composed field equals
    # warping M by the affine and then by u. Trilinear interpolation is exact on a linear M
    # (and M o affine is linear), so the two agree inside the volume.
    a = torch.tensor([[1.05, 0.02, 0], [0, 0.97, 0.03], [0.01, 0, 1.0]], dtype=torch.float64)
    theta = _theta(a, torch.tensor([0.3, -0.2, 0.4]))
    grid = identity_grid_vox(SHAPE, dtype=torch.float64)
    moving = (torch.einsum("k,bkdhw->bdhw", torch.tensor([1.0, 2.0, -0.5], dtype=torch.float64),
                           grid)).unsqueeze(1)
    u = make_smooth_field(SHAPE, amplitude_vox=0.5, seed=8)
    once = warp(moving, compose_affine_ddf(theta, u))
    twice = warp(warp(moving, affine_to_ddf(theta, SHAPE)), u)
    inner = (slice(None), slice(None), slice(3, -3), slice(3, -3), slice(3, -3))
    torch.testing.assert_close(once[inner], twice[inner], atol=1e-9, rtol=0)


# ---------------------------------------------------------------------------------------------
# Jacobian determinant
# ---------------------------------------------------------------------------------------------
def test_linear_field_jacobian_is_det_of_i_plus_a():
    # u = A x => grad u = A everywhere; central and one-sided differences are both exact for a
    # linear function, so det J = det(I + A) at every voxel, borders included.
    gen = torch.Generator().manual_seed(9)
    a = 0.3 * torch.randn(3, 3, generator=gen, dtype=torch.float64)
    det = jacobian_det(linear_field(a, SHAPE))
    assert det.shape == (1, *SHAPE)
    expected = torch.linalg.det(torch.eye(3, dtype=torch.float64) + a)
    torch.testing.assert_close(det, expected.expand_as(det), atol=1e-12, rtol=0)


def test_jacobian_of_a_reflection_is_negative():
    # u_H = -2 x_H reflects the H axis: J = diag(1, -1, 1), det J = -1 (a fold everywhere).
    a = torch.zeros(3, 3, dtype=torch.float64)
    a[1, 1] = -2.0
    det = jacobian_det(linear_field(a, SHAPE))
    torch.testing.assert_close(det, torch.full_like(det, -1.0))


def test_jacobian_axis_convention():
    # u_D = x_D (channel 0 stretches axis 0 by 2): J = diag(2, 1, 1), det 2. Pairing channel k
    # with the wrong axis (e.g. the grid_sample order W, H, D) would give J = I + A P with P the
    # axis reversal, i.e. det 1: this case tells the two apart.
    a = torch.zeros(3, 3, dtype=torch.float64)
    a[0, 0] = 1.0
    det = jacobian_det(linear_field(a, SHAPE))
    torch.testing.assert_close(det, torch.full_like(det, 2.0))


def test_jacobian_matches_torch_gradient_stencil():
    # Oracle: the determinant of I + torch.gradient(u) (central inside, one-sided at borders),
    # assembled as a batch of 3x3 matrices and passed to torch.linalg.det.
    u = make_smooth_field(SHAPE, amplitude_vox=2.0, seed=11, batch=2)
    grads = torch.stack(torch.gradient(u, dim=(2, 3, 4)), dim=2)  # (B, c, k, D, H, W)
    jac = grads.permute(0, 3, 4, 5, 1, 2) + torch.eye(3, dtype=u.dtype)
    torch.testing.assert_close(jacobian_det(u), torch.linalg.det(jac), atol=1e-12, rtol=1e-12)


def test_jacobian_is_differentiable():
    u = make_smooth_field(SHAPE, seed=10).requires_grad_(True)
    jacobian_det(u).sum().backward()
    assert u.grad is not None and torch.isfinite(u.grad).all()


# ---------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------
IMG = torch.zeros(1, 1, 8, 8, 8)
DDF = torch.zeros(1, 3, 8, 8, 8)


@pytest.mark.parametrize("call, exc, match", [
    (lambda: warp(IMG, torch.zeros(1, 2, 8, 8, 8)), ValueError,
     r"^expected ddf of shape \(B, 3, D, H, W\), got \(1, 2, 8, 8, 8\)"),
    (lambda: warp(IMG, torch.zeros(3, 8, 8, 8)), ValueError,
     r"^expected ddf of shape \(B, 3, D, H, W\), got \(3, 8, 8, 8\)"),
    (lambda: warp(IMG, np.zeros((1, 3, 8, 8, 8))), TypeError,
     r"^expected ddf to be a torch.Tensor, got ndarray"),
    (lambda: warp(IMG, DDF.long()), TypeError, r"^expected ddf with a floating dtype"),
    (lambda: warp(torch.zeros(2, 1, 8, 8, 8), DDF), ValueError,
     r"^batch size mismatch: image has 2, ddf has 1"),
    (lambda: warp(torch.zeros(1, 1, 8, 8, 9), DDF), ValueError,
     r"^spatial shape mismatch: image has \(8, 8, 9\), ddf has \(8, 8, 8\)"),
    (lambda: warp(torch.zeros(8, 8, 8), DDF), ValueError,
     r"^expected image of shape \(B, C, D, H, W\), got \(8, 8, 8\)"),
    (lambda: warp(IMG, DDF, mode="bicubic"), ValueError,
     r"^mode == 'bicubic', must be one of bilinear, nearest"),
    (lambda: warp(IMG, DDF, padding="reflection"), ValueError,
     r"^padding == 'reflection', must be one of border, zeros"),
    (lambda: affine_to_ddf(torch.zeros(1, 4, 4), (8, 8, 8)), ValueError,
     r"^expected theta of shape \(B, 3, 4\), got \(1, 4, 4\)"),
    (lambda: affine_to_ddf(torch.zeros(1, 3, 4), (8, 8)), ValueError,
     r"^expected shape \(D, H, W\) of three positive integers, got \(8, 8\)"),
    (lambda: compose_affine_ddf(torch.zeros(2, 3, 4), DDF), ValueError,
     r"^batch size mismatch: theta has 2, ddf has 1"),
    (lambda: jacobian_det(torch.zeros(1, 3, 8, 8)), ValueError,
     r"^expected ddf of shape \(B, 3, D, H, W\), got \(1, 3, 8, 8\)"),
    (lambda: jacobian_det(torch.zeros(1, 3, 8, 1, 8)), ValueError,
     r"^expected every spatial size of ddf >= 2, got \(8, 1, 8\)"),
])
def test_bad_inputs_raise_with_the_value(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
