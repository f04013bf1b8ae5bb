"""Instance optimisation, the reference rows, refinement at test time, the flow grid, the
learning-rate schedule and the training augmentation."""

from __future__ import annotations

import math

import pytest
import torch

from regcore.config import Config
from regcore.instance import optimise_pair
from regcore.networks import build_model, upsample_field
from regcore.reference import reference_table
from regcore.spatial import warp

# 16^3 embedded cohort with intensities: 1 atlas, 2 training, 1 validation, 2 test subjects.
TINY = {
    "variant": "baseline",
    "data.embedded_subjects": 6,
    "data.shape": [16, 16, 16],
    "data.modality": "intensity",
    "data.n_test": 2,
    "data.n_val": 1,
    "model.enc_channels": [4, 8, 8, 8],
    "model.dec_channels": [8, 8, 8, 8, 8, 4, 4],
    "loss.ncc_window": 5,
    "train.epochs": 2,
    "train.steps_per_epoch": 2,
    "train.num_threads": 1,
    "train.eval_repeats": 1,
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("embedded"))

    def make(**overrides) -> Config:
        return Config.from_flat({**TINY, "data.embedded_dir": directory, **overrides})
    return make


@pytest.fixture(scope="module")
def references(tiny):
    torch.set_num_threads(1)
    return reference_table(tiny(), io_steps=60)


def test_instance_optimisation_beats_identity_and_truth_is_perfect(references):
    means = references.groupby("method")[["dice_mean", "true_error_mm", "method_s"]].mean()
    assert set(means.index) == {"identity", "instance_optimisation", "ground_truth"}
    ident, io, truth = (means.loc[m] for m in ("identity", "instance_optimisation",
                                               "ground_truth"))
    assert io["dice_mean"] > ident["dice_mean"] + 0.05
    assert io["true_error_mm"] < 0.8 * ident["true_error_mm"]
    assert truth["dice_mean"] > 0.99 and truth["true_error_mm"] < 1e-4
    assert io["method_s"] > 0 and ident["method_s"] == 0


def test_reference_rows_have_the_per_pair_columns(references, tiny, tmp_path):
    from regcore.evaluate import PairData, evaluate_test

    config = tiny()
    data = PairData.from_config(config, torch.device("cpu"))
    model = build_model(config.model, 1, affine=False)
    table = evaluate_test(model, data, config, torch.device("cpu"), tmp_path).table
    assert list(references.columns) == ["method", *[c for c in table.columns
                                                    if c != "inference_s"], "method_s"]
    assert len(references) == 3 * len(data.test_pairs)


def test_refinement_starts_from_the_network_and_keeps_its_affine(tiny):
    config = tiny(**{"variant": "combined_basic"})
    moving = torch.rand(1, 1, 16, 16, 16)
    theta = torch.tensor([[[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]])
    # a pure shift of one voxel along axis 0, then 0 steps: the starting field itself
    zero = torch.zeros(1, 3, 16, 16, 16)
    result = optimise_pair(moving, moving, config, steps=0, init=zero, theta=theta)
    assert torch.allclose(result.total_ddf_vox[:, 0], torch.ones(1, 16, 16, 16))
    fixed = warp(moving, result.total_ddf_vox)
    refined = optimise_pair(moving, fixed, config, steps=20, init=zero, theta=theta)
    # the affine already explains the pair: refinement stays near the network's field
    assert refined.dense_ddf_vox.abs().max() < 0.5


def test_diffeomorphic_optimises_a_velocity(tiny):
    config = tiny(**{"model.diffeomorphic": True})
    moving, fixed = torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16)
    result = optimise_pair(moving, fixed, config, steps=3, levels=2)
    assert result.velocity_vox is not None and result.velocity_vox.shape == (1, 3, 16, 16, 16)


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": -1}, "steps == -1"),
    ({"lr": 0.0}, "lr == 0.0"),
    ({"levels": 5}, "levels == 5"),
    ({"smooth_weight": -1.0}, "smooth_weight == -1.0"),
])
def test_bad_arguments(tiny, kwargs, message):
    x = torch.rand(1, 1, 16, 16, 16)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        optimise_pair(x, x, tiny(), **kwargs)


def test_refine_steps_at_test_time_improve_an_untrained_network(tiny, tmp_path):
    from regcore.evaluate import PairData, evaluate_test

    torch.manual_seed(0)
    plain, refined = tiny(), tiny(**{"model.refine_steps": 40})
    data = PairData.from_config(plain, torch.device("cpu"))
    model = build_model(plain.model, 1, affine=False)
    before = evaluate_test(model, data, plain, torch.device("cpu"), tmp_path / "a").means
    after = evaluate_test(model, data, refined, torch.device("cpu"), tmp_path / "b").means
    assert after["true_error_mm"] < before["true_error_mm"]
    assert after["inference_s"] > before["inference_s"]


@pytest.mark.parametrize("levels", [1, 2])
def test_coarse_flow_grid(levels):
    config = Config.from_flat({"data.modality": "intensity", "model.flow_levels": levels,
                               "model.enc_channels": [4, 8, 8, 8],
                               "model.dec_channels": [8, 8, 8, 8, 8, 4, 4]})
    model = build_model(config.model, 1, affine=False)
    x = torch.rand(1, 1, 16, 16, 16)
    assert model(x, x).total_ddf_vox.shape == (1, 3, 16, 16, 16)
    # a constant coarse field of 1 voxel spans the same extent: (16 - 1) / (m - 1) voxels
    m = 16 // 2 ** levels
    field = upsample_field(torch.ones(1, 3, m, m, m), (16, 16, 16))
    assert torch.allclose(field, torch.full_like(field, 15 / (m - 1)))


def test_cosine_schedule_with_warm_up():
    from regcore.train import learning_rate

    config = Config.from_flat({"train.lr": 1e-3, "train.lr_schedule": "cosine",
                               "train.warmup_steps": 10, "train.lr_final_frac": 0.1})
    rates = [learning_rate(config, step, 100) for step in range(100)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)
    assert max(rates) == pytest.approx(1e-3) and rates[-1] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:]))
    constant = Config.from_flat({"train.lr": 1e-3})
    assert {learning_rate(constant, s, 100) for s in range(100)} == {1e-3}
    # half way through the decay (step 10 + 45 of 90 intervals): the mean of lr and the floor
    assert math.isclose(learning_rate(config, 55, 101), 1e-4 + 0.9e-3 * 0.5)


def test_augmented_batches_are_seeded_and_flip_axis_0(tiny):
    from regcore.evaluate import PairData
    from regcore.train import training_batch

    config = tiny(**{"train.augment_pairs": 1.0, "train.augment_flip": True})
    data = PairData.from_config(config, torch.device("cpu"))
    first = training_batch(data, [0, 1], config, torch.Generator().manual_seed(3))
    again = training_batch(data, [0, 1], config, torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    flip_only = tiny(**{"train.augment_flip": True})
    seen = set()
    for seed in range(8):
        moving, _ = training_batch(data, [0], flip_only, torch.Generator().manual_seed(seed))
        plain, _ = data.batch("train", [0])
        seen.add("same" if torch.equal(moving, plain) else
                 "flipped" if torch.equal(moving, plain.flip(2)) else "other")
    assert seen == {"same", "flipped"}


def test_demons_force_points_along_the_shift():
    from regcore.networks import demons_force

    # m(x) = x along axis 0 (a ramp), f = m + 0.5: fixed(x) = moving(x + 0.5), so the force
    # u_0 = (f - m) m' / (m'^2 + (f - m)^2 + eps) = 0.5 / 1.25 = 0.4 voxel towards +axis 0
    ramp = torch.arange(8.0).view(1, 1, 8, 1, 1).expand(1, 1, 8, 8, 8).contiguous()
    force = demons_force(ramp, ramp + 0.5)
    assert force.shape == (1, 3, 8, 8, 8)
    assert torch.allclose(force[:, 0], torch.full((1, 8, 8, 8), 0.5 / (1.25 + 1e-3)))
    assert torch.all(force[:, 1:] == 0)


@pytest.mark.parametrize("pair_input, passes", [("demons3", 2), ("images", 3)])
def test_cascade_and_demons_input_start_at_the_identity(pair_input, passes):
    config = Config.from_flat({"data.modality": "intensity", "model.pair_input": pair_input,
                               "model.passes": passes, "model.flow_levels": 1,
                               "model.enc_channels": [4, 8, 8, 8],
                               "model.dec_channels": [8, 8, 8, 8, 8, 4, 4]})
    model = build_model(config.model, 1, affine=True)
    torch.nn.init.zeros_(model.flow.conv.weight)
    x = torch.rand(1, 1, 16, 16, 16)
    output = model(x, torch.rand(1, 1, 16, 16, 16))
    assert torch.allclose(output.total_ddf_vox, torch.zeros_like(output.total_ddf_vox))
    diffeo = build_model(Config.from_flat({"model.passes": 2, "model.diffeomorphic": True,
                                           "model.enc_channels": [4, 8, 8, 8],
                                           "model.dec_channels": [8, 8, 8, 8, 8, 4, 4]}).model,
                         1, affine=False)
    assert diffeo(x, x).velocity_vox.shape == (1, 3, 16, 16, 16)


def test_max_flow_bounds_every_pass():
    # 3 passes, each flow bounded by B = 2 voxels of the 8^3 flow grid = 2 x 15/7 voxels of
    # 16^3: the composed field stays within 3 x that however large the raw flow
    config = Config.from_flat({"data.modality": "intensity", "model.passes": 3,
                               "model.flow_levels": 1, "model.max_flow_vox": 2.0,
                               "model.enc_channels": [4, 8, 8, 8],
                               "model.dec_channels": [8, 8, 8, 8, 8, 4, 4]})
    model = build_model(config.model, 1, affine=False)
    torch.nn.init.normal_(model.flow.conv.weight, 0.0, 50.0)
    with torch.no_grad():
        field = model(torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16)).total_ddf_vox
    bound = 3 * 2.0 * 15 / 7
    assert float(field.abs().max()) <= bound + 1e-4
