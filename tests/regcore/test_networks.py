"""regcore.networks: backbones, affine head, the registration model and its fast paths."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from regcore import kernels
from regcore.config import ModelConfig
from regcore.networks import (
    FLOW_INIT_STD,
    AffineFitHead,
    AffineHead,
    Conv3d,
    RegistrationOutput,
    SeedUNet,
    VxmUNet,
    build_model,
    count_parameters,
    fit_affine,
)
from regcore.spatial import affine_to_ddf, jacobian_det, warp

# tiny widths: same structure as the defaults, a fraction of the cost
TINY = {
    "vxm": dict(enc_channels=(4, 8, 8, 8), dec_channels=(8, 8, 8, 8, 8, 4, 4)),
    "seed": dict(enc_channels=(4, 8, 16), dec_channels=(8, 4)),
}
SHAPE = (16, 16, 32)  # divisible by 2^4 (vxm) and 2^2 (tiny seed); one axis differs


def tiny_model(backbone: str, affine: bool, in_channels: int = 5, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(backbone=backbone, **TINY[backbone], **extra), in_channels,
                       affine=affine)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def pair():
    """One-hot-like moving and fixed images (B=2, C=5) on SHAPE, seeded."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (2, 4, 4, 8), generator=gen)
    fixed_labels = torch.roll(labels, 1, dims=1)
    def up(lab):
        onehot = F.one_hot(lab, 5).permute(0, 4, 1, 2, 3).float()
        return F.interpolate(onehot, size=SHAPE, mode="trilinear", align_corners=True)
    return up(labels), up(fixed_labels)


# ---------------------------------------------------------------------------------------------
# shapes and the output record
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backbone", ["vxm", "seed"])
@pytest.mark.parametrize("affine", [False, True])
def test_output_shapes(pair, backbone, affine):
    moving, fixed = pair
    model = tiny_model(backbone, affine)
    out = model(moving, fixed)
    assert isinstance(out, RegistrationOutput)
    assert out.theta.shape == (2, 3, 4)
    for name in ("dense_ddf_vox", "total_ddf_vox"):
        field = getattr(out, name)
        assert field.shape == (2, 3, *SHAPE) and field.dtype == torch.float32, name
        assert field.is_contiguous(), name
    assert out.warped.shape == moving.shape
    assert out.velocity_vox is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.warped = moving  # type: ignore[misc]


def test_intensity_input_one_channel():
    model = tiny_model("vxm", affine=True, in_channels=1)
    image = torch.rand(1, 1, *SHAPE)
    assert model(image, image).warped.shape == (1, 1, *SHAPE)


# ---------------------------------------------------------------------------------------------
# identity at initialisation
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backbone", ["vxm", "seed"])
def test_identity_at_init(pair, backbone):
    moving, fixed = pair
    out = tiny_model(backbone, affine=True)(moving, fixed)
    eye = torch.eye(3, 4).expand(2, 3, 4)
    assert torch.equal(out.theta.detach(), eye)  # exactly [I | 0]
    # flow head N(0, 1e-5): the field is tiny, so the warp is (almost) the identity
    assert out.dense_ddf_vox.abs().max() < 1e-2
    assert torch.allclose(out.total_ddf_vox, out.dense_ddf_vox, atol=1e-5)
    assert torch.allclose(out.warped, moving, atol=1e-2)


def test_theta_is_identity_without_affine_stage(pair):
    out = tiny_model("vxm", affine=False)(*pair)
    assert torch.equal(out.theta, torch.eye(3, 4).expand(2, 3, 4))
    assert torch.equal(out.total_ddf_vox, out.dense_ddf_vox)


def test_flow_head_init():
    model = build_model(ModelConfig(), 5, affine=False)
    weight, bias = model.flow.conv.weight, model.flow.conv.bias
    assert torch.equal(bias, torch.zeros(3))
    assert 0.5 * FLOW_INIT_STD < weight.std() < 2 * FLOW_INIT_STD


def test_affine_translation_scaled_to_voxels():
    # t_vox[k] = t_raw[k] * (size[k] - 1) / 2: a raw output of 1 is half the extent of axis k
    head = AffineHead(10)
    with torch.no_grad():
        head.fc2.bias[9:] = torch.tensor([1.0, -0.5, 0.25])
    theta = head(torch.rand(1, 10, *SHAPE))
    expected = torch.tensor([1.0 * 15 / 2, -0.5 * 15 / 2, 0.25 * 31 / 2])
    assert torch.allclose(theta[0, :, 3], expected)
    assert torch.equal(theta[0, :, :3], torch.eye(3))


def test_affine_stage_resamples_once(pair):
    # with a pure translation in theta and a zero dense field, warped == warp(moving, total):
    # one resampling of the original moving image with the composed field
    moving, fixed = pair
    model = tiny_model("vxm", affine=True)
    with torch.no_grad():
        model.affine_head.fc2.bias[9] = 2.0 / 7.5  # 2 voxels along D
        model.flow.conv.weight.zero_()
    out = model(moving, fixed)
    assert torch.allclose(out.theta[:, 0, 3], torch.tensor([2.0, 2.0]))
    assert torch.allclose(out.total_ddf_vox[:, 0], torch.full((2, *SHAPE), 2.0))
    assert torch.allclose(out.warped, warp(moving, out.total_ddf_vox), atol=1e-6)


THETA = torch.tensor([[[1.03, 0.06, -0.02, 1.5], [-0.05, 0.97, 0.01, -2.0],
                       [0.02, -0.03, 1.02, 0.75]]])


def test_fit_affine_recovers_an_affine_from_its_field():
    shape = (16, 20, 24)
    ddf = affine_to_ddf(THETA, shape)
    ones = torch.ones(1, 1, *shape)
    assert torch.allclose(fit_affine(ddf, ones, ridge=0.0), THETA, atol=1e-4)
    # the weights pick the voxels the fit listens to: a different affine in the half the
    # weights ignore does not move the fit
    other = affine_to_ddf(torch.eye(3, 4)[None] * 1.1, shape)
    mixed = torch.where(torch.arange(shape[0]).view(1, 1, -1, 1, 1) < 8, ddf, other)
    half = (torch.arange(shape[0]) < 8).float().view(1, 1, -1, 1, 1).expand_as(ones)
    assert torch.allclose(fit_affine(mixed, half, ridge=0.0), THETA, atol=1e-4)
    assert not torch.allclose(fit_affine(mixed, ones, ridge=0.0), THETA, atol=1e-2)


def test_fit_affine_is_the_identity_for_a_zero_field_or_weight():
    shape = (8, 8, 8)
    eye = torch.eye(3, 4).expand(2, 3, 4)
    assert torch.allclose(fit_affine(torch.zeros(2, 3, *shape), torch.ones(2, 1, *shape)), eye,
                          atol=1e-6)
    field = affine_to_ddf(THETA.expand(2, 3, 4), shape)
    assert torch.allclose(fit_affine(field, torch.zeros(2, 1, *shape)), eye, atol=1e-6)


def test_fit_head_starts_at_the_identity_and_learns(pair):
    moving, fixed = pair
    model = tiny_model("vxm", affine=True, affine_head="fit")
    assert isinstance(model.affine_head, AffineFitHead)
    out = model(moving, fixed)
    assert torch.allclose(out.theta, torch.eye(3, 4).expand(2, 3, 4), atol=1e-6)
    F.mse_loss(out.warped, fixed).backward()
    assert model.affine_head.out.weight.grad.abs().sum() > 0
    torch.optim.Adam(model.parameters(), lr=1e-3).step()
    assert not torch.allclose(model(moving, fixed).theta, torch.eye(3, 4).expand(2, 3, 4),
                              atol=1e-5)


# ---------------------------------------------------------------------------------------------
# parameter counts (no forward pass)
# ---------------------------------------------------------------------------------------------
def _conv(cin: int, cout: int, k: int = 3) -> int:
    return cin * cout * k ** 3 + cout


def test_seed_parameter_count_at_default_widths():
    # encoder 32-64-128-256 + 512 bottleneck, two 3^3 convs and an affine InstanceNorm (2 C
    # parameters) per block, 2^3 transposed convs up, decoder mirrored, 3^3 flow head; input 10
    # channels (one-hot seg4 moving + fixed). The study reports about 22.6 M.
    def block(cin, cout):
        return _conv(cin, cout) + _conv(cout, cout) + 2 * 2 * cout
    enc = [32, 64, 128, 256]
    expected, prev = 0, 10
    for width in enc:
        expected += block(prev, width)
        prev = width
    expected += block(256, 512)
    prev = 512
    for width in reversed(enc):
        expected += _conv(prev, width, 2) + block(2 * width, width)
        prev = width
    expected += _conv(32, 3)
    model = build_model(ModelConfig(backbone="seed"), 5, affine=False)
    assert count_parameters(model) == expected
    assert 22.5e6 < expected < 22.7e6


def test_vxm_parameter_count_at_default_widths():
    # encoder convs 10-16-32-32-32, decoder 32 at each level (input prev + skip), 32-16-16 at
    # full resolution after the last concat (32 + 16 channels), flow head 16 -> 3
    expected = (_conv(10, 16) + _conv(16, 32) + _conv(32, 32) + _conv(32, 32)
                + _conv(32, 32) + _conv(64, 32) + _conv(64, 32) + _conv(64, 32)
                + _conv(48, 32) + _conv(32, 16) + _conv(16, 16) + _conv(16, 3))
    model = build_model(ModelConfig(), 5, affine=False)
    assert count_parameters(model) == expected


# ---------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backbone", ["vxm", "seed"])
def test_gradients_reach_affine_head_and_unet(pair, backbone):
    moving, fixed = pair
    model = tiny_model(backbone, affine=True)
    out = model(moving, fixed)
    F.mse_loss(out.warped, fixed).backward()
    # the affine head's last layer (zero weights at init: its input features carry the gradient)
    assert model.affine_head.fc2.weight.grad.abs().sum() > 0
    assert model.affine_head.fc2.bias.grad.abs().sum() > 0
    first_conv = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv3d))
    assert first_conv.weight.grad.abs().sum() > 0
    assert model.flow.conv.weight.grad.abs().sum() > 0
    # one optimiser step moves theta away from the identity
    torch.optim.Adam(model.parameters(), lr=1e-3).step()
    theta = model(moving, fixed).theta.detach()
    assert not torch.equal(theta, torch.eye(3, 4).expand(2, 3, 4))


# ---------------------------------------------------------------------------------------------
# diffeomorphic mode
# ---------------------------------------------------------------------------------------------
def test_diffeomorphic_mode_integrates_without_folding(pair):
    # Scale the flow head so the raw (unsmoothed, random-feature) velocity has an std of 0.75
    # voxels: used directly as a displacement it folds (~10 % of voxels); integrated by scaling
    # and squaring it must not fold anywhere.
    moving, fixed = pair
    model = tiny_model("vxm", affine=False, diffeomorphic=True, int_steps=7)
    with torch.no_grad():
        v = model(moving, fixed).velocity_vox
        model.flow.conv.weight.mul_(0.75 / v.std())
        out = model(moving, fixed)
    velocity = out.velocity_vox
    assert velocity is not None and velocity.shape == (2, 3, *SHAPE)
    assert 0.5 < velocity.std() < 1.0
    assert (jacobian_det(velocity) <= 0).float().mean() > 0.05  # the raw field folds
    assert (jacobian_det(out.dense_ddf_vox) <= 0).sum() == 0
    assert not torch.equal(out.dense_ddf_vox, velocity)


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------
BAD_INPUTS = [
    ((1, 4, *SHAPE), (1, 5, *SHAPE), ValueError, "expected moving of shape (B, 5, D, H, W), got (1, 4,"),
    ((1, 5, *SHAPE), (1, 5, 16, 16), ValueError, "expected fixed of shape (B, 5, D, H, W), got (1, 5, 16, 16)"),
    ((5, *SHAPE), (5, *SHAPE), ValueError, "expected moving of shape (B, 5, D, H, W), got (5,"),
    ((1, 5, *SHAPE), (2, 5, *SHAPE), ValueError, "moving and fixed must have the same shape"),
    ((1, 5, 16, 16, 24), (1, 5, 16, 16, 24), ValueError, "spatial sizes (16, 16, 24) must be divisible by 16"),
]


@pytest.mark.parametrize("moving_shape, fixed_shape, error, message", BAD_INPUTS)
def test_bad_shapes_raise_named_errors(moving_shape, fixed_shape, error, message):
    model = tiny_model("vxm", affine=False)
    with pytest.raises(error) as info:
        model(torch.zeros(moving_shape), torch.zeros(fixed_shape))
    assert str(info.value).startswith(message)


def test_bad_input_types():
    model = tiny_model("vxm", affine=False)
    with pytest.raises(TypeError, match="^expected moving to be a torch.Tensor, got ndarray"):
        model(torch.zeros(1, 5, *SHAPE).numpy(), torch.zeros(1, 5, *SHAPE))
    with pytest.raises(TypeError, match="^expected fixed with a floating dtype, got torch.int64"):
        model(torch.zeros(1, 5, *SHAPE), torch.zeros(1, 5, *SHAPE, dtype=torch.long))


def test_seed_divisibility_message():
    model = tiny_model("seed", affine=False)  # two poolings
    with pytest.raises(ValueError, match=r"^spatial sizes \(16, 16, 18\) must be divisible by 4 "
                                         r"\(2\^2"):
        model(torch.zeros(1, 5, 16, 16, 18), torch.zeros(1, 5, 16, 16, 18))


BAD_CONFIGS = [
    (dict(backbone="vxm", enc_channels=(4, 8, 8, 8), dec_channels=(8, 8, 8)), 5,
     ValueError, "model.dec_channels == (8, 8, 8), must have at least as many"),
    (dict(backbone="seed", enc_channels=(8,)), 5, ValueError, "model.enc_channels == (8,), must"),
    (dict(backbone="seed", enc_channels=(4, 8, 16), dec_channels=(8,)), 5, ValueError,
     "model.dec_channels == (8,), must have 2 entries"),
    (dict(), 0, ValueError, "in_channels == 0, must be a positive integer"),
]


@pytest.mark.parametrize("cfg, in_channels, error, message", BAD_CONFIGS)
def test_bad_configs_raise(cfg, in_channels, error, message):
    with pytest.raises(error) as info:
        build_model(ModelConfig(**cfg), in_channels, affine=False)
    assert str(info.value).startswith(message)


def test_build_model_argument_types():
    with pytest.raises(TypeError, match="^model_cfg is a dict, expected"):
        build_model({"backbone": "vxm"}, 5, affine=False)
    with pytest.raises(TypeError, match="^affine == 1, must be True or False"):
        build_model(ModelConfig(), 5, affine=1)


# ---------------------------------------------------------------------------------------------
# the speed paths (regcore.kernels) compute what the plain code computes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dec", [(8, 8, 8, 8, 8, 4, 4), (8, 8, 8, 8)])
def test_fused_upsample_conv_equals_plain_decoder(pair, dec):
    # same parameters, speed paths on (fused coarse 2^3 conv per parity, oneDNN) vs off
    # (upsample + concat + F.conv3d): equal outputs and equal gradients for every parameter
    # (decoder with and without full-resolution convs after the last upsampling)
    moving, fixed = (image[:1, :, :, :, :16] for image in pair)
    model = build_model(ModelConfig(enc_channels=(4, 8, 8, 8), dec_channels=dec), 5,
                        affine=True)
    results = []
    for fast in (True, False):
        with kernels.use(fast):
            out = model(moving, fixed)
            features = model.backbone(torch.cat([moving, fixed], dim=1))
            loss = (out.warped.square().sum() + 1e3 * out.dense_ddf_vox.sum()
                    + features.square().sum())
            grads = torch.autograd.grad(loss, list(model.parameters()))
        results.append((features.detach(), grads))
    (f_fused, g_fused), (f_plain, g_plain) = results
    assert torch.allclose(f_fused, f_plain, atol=1e-5, rtol=1e-5)
    for got, want in zip(g_fused, g_plain):  # float32 rounding of differently ordered sums
        assert (got - want).abs().max() <= 1e-4 * max(1.0, float(want.abs().max()))


def test_onednn_conv_matches_reference_conv():
    # Conv3d forces oneDNN on the CPU; compare with F.conv3d (native at this size) incl. grads
    torch.manual_seed(0)
    conv = Conv3d(4, 6, 3, padding=1, stride=2)
    x = torch.randn(1, 4, 8, 8, 8, requires_grad=True)
    out = conv(x)
    ref = F.conv3d(x, conv.weight, conv.bias, stride=2, padding=1)
    assert torch.allclose(out, ref, atol=1e-5)
    g = torch.autograd.grad(out.square().sum(), (x, conv.weight))
    g_ref = torch.autograd.grad(ref.square().sum(), (x, conv.weight))
    for got, want in zip(g, g_ref):
        assert torch.allclose(got, want, atol=1e-4)


def test_bf16_autocast_keeps_field_float32(pair):
    moving, fixed = pair
    model = tiny_model("vxm", affine=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(moving, fixed)
    assert out.dense_ddf_vox.dtype == torch.float32 and out.theta.dtype == torch.float32
    assert torch.allclose(out.warped.float(), moving, atol=1e-2)


@pytest.mark.parametrize("side", [1, 2, 3])
def test_tiny_conv_under_cpu_bf16_has_finite_gradients(side):
    """PyTorch's bf16 weight gradient of a channels-last 2^3 conv is intermittently non-finite
    (a few % of calls); Conv3d runs such tiny volumes in float32. 100 draws would catch a
    4 % failure rate with probability > 98 %."""
    conv = Conv3d(8, 8, 3, padding=1).to(memory_format=torch.channels_last_3d)
    for seed in range(100):
        torch.manual_seed(seed)
        x = torch.randn(1, 8, side, side, side).contiguous(memory_format=torch.channels_last_3d)
        conv.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = conv(x)
        out.float().square().sum().backward()
        assert torch.isfinite(conv.weight.grad).all(), seed
    ref = F.conv3d(x, conv.weight, conv.bias, padding=1)
    assert torch.allclose(out.float(), ref, atol=1e-5)


def test_register_runs_under_inference_mode(pair):
    out = tiny_model("seed", affine=True).register(*pair)
    assert out.warped.is_inference() and not out.warped.requires_grad


def test_backbones_are_the_named_classes():
    assert isinstance(tiny_model("vxm", False).backbone, VxmUNet)
    assert isinstance(tiny_model("seed", False).backbone, SeedUNet)


def test_pass_warped_holds_each_earlier_pass_image(pair):
    moving, fixed = pair
    one = tiny_model("vxm", affine=True, passes=1)
    three = tiny_model("vxm", affine=True, passes=3)
    three.load_state_dict(one.state_dict())  # shared weights: pass 1 of three is the one-pass model
    with torch.no_grad():
        torch.nn.init.normal_(one.flow.conv.weight, std=0.05)
        three.flow.conv.weight.copy_(one.flow.conv.weight)
        single, out = one(moving, fixed), three(moving, fixed)
    assert single.pass_warped == ()
    assert len(out.pass_warped) == 2
    assert all(w.shape == moving.shape for w in out.pass_warped)
    torch.testing.assert_close(out.pass_warped[0], single.warped)
    assert not torch.allclose(out.pass_warped[1], out.warped)
