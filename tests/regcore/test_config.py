"""The validated configuration, the variant registry, the CLI wrapper and atomic writes."""

import os
import subprocess
import sys

import pytest

from regcore.config import (DEFAULT_REG_SCALE, REGULARIZERS, STUDY_REG_WEIGHTS, Config, parse_value,
                            replace_section)
from regcore.io import atomic_dir, atomic_open, atomic_write_text
from regcore.variants import VARIANTS, get_variant, variant_for


def test_variants_form_the_2x2_design_at_one_learning_rate():
    cells = {(v.affine, v.regularize) for v in VARIANTS.values()}
    assert cells == {(False, False), (False, True), (True, False), (True, True)}
    # one rate for every cell: the factors are the only thing the cells change
    assert {v.lr for v in VARIANTS.values()} == {1e-3}
    assert variant_for(True, True).name == "combined_enhanced"


def test_unknown_variant_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown variant 'unet', expected one of baseline, regloss"):
        Config(variant="unet")


def test_flat_round_trip_and_study_defaults():
    config = Config(variant="regloss", seed=3)
    flat = config.to_flat()
    assert flat["loss.jacobian_weight"] == STUDY_REG_WEIGHTS["jacobian"] == 0.1
    assert flat["loss.reg_scale"] == DEFAULT_REG_SCALE == 300.0
    assert flat["data.shape"] == [64, 64, 64]
    assert Config.from_flat(flat) == config
    assert config.lr == 1e-3 and config.regularize and not config.affine
    assert set(config.loss.reg_weights()) == set(REGULARIZERS)


def test_overrides_are_validated_and_coerced():
    config = Config().with_overrides({"train.epochs": 2, "loss.smooth_weight": 1, "data.shape": [32, 32, 32]})
    assert config.train.epochs == 2
    assert config.loss.smooth_weight == 1.0 and isinstance(config.loss.smooth_weight, float)
    assert config.data.shape == (32, 32, 32)
    assert replace_section(config, "train", epochs=5).train.epochs == 5


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("loss.smooth_weight", -1.0, r"loss.smooth_weight == -1.0, must be >= 0"),
        ("loss.jacobian_weight", float("nan"), r"loss.jacobian_weight == nan, must be finite"),
        ("loss.reg_scale", -300.0, r"loss.reg_scale == -300.0, must be >= 0"),
        ("train.epochs", 0, r"train.epochs == 0, must be >= 1"),
        ("train.epochs", 2.5, r"train.epochs == 2.5, must be an integer"),
        ("train.lr", 0.0, r"train.lr == 0.0, must be > 0"),
        ("train.device", "tpu", r"train.device == 'tpu', must be one of auto, cpu, cuda"),
        ("data.shape", [64, 64], r"data.shape == \(64, 64\), must be three integers"),
        ("data.modality", "ct", r"data.modality == 'ct', must be one of seg4_onehot, intensity"),
        ("model.backbone", "resnet", r"model.backbone == 'resnet', must be one of vxm, seed"),
        ("model.affine_head", "mlp", r"model.affine_head == .mlp., must be one of cnn, fit"),
        ("model.enc_channels", [16, -2], r"model.enc_channels == \(16, -2\), must be a list"),
        ("loss.ncc_window", 8, r"loss.ncc_window == 8, must be odd"),
        ("loss.adaptive", "yes", r"loss.adaptive == 'yes', must be true or false"),
        ("seed", -1, r"seed == -1, must be >= 0"),
        ("train.epoch", 3, r"unknown config key 'train.epoch', expected one of train.augment_flip"),
        ("optimizer", "sgd", r"unknown config key 'optimizer'"),
        ("loss.max_displacement_mm", 0.0, r"loss.max_displacement_mm == 0.0, must be > 0"),
        ("loss.max_displacement_vox", 10.0,
         r"^config key 'loss.max_displacement_vox' was retired: use loss.max_displacement_mm"),
    ],
)
def test_bad_values_name_the_key_the_value_and_what_was_expected(key, value, message):
    with pytest.raises(ValueError, match=message):
        Config().with_overrides({key: value})


@pytest.mark.parametrize(
    "text, value",
    [("3", 3), ("0.5", 0.5), ("true", True), ("None", None), ("[1, 2]", [1, 2]), ("16,32", [16, 32]), ("vxm", "vxm")],
)
def test_parse_value(text, value):
    assert parse_value(text) == value


def test_atomic_writes_leave_the_old_file_when_interrupted(tmp_path):
    target = tmp_path / "table.csv"
    atomic_write_text(target, "old\n")
    with pytest.raises(RuntimeError):
        with atomic_open(target, "w") as handle:
            handle.write("half a ta")
            raise RuntimeError("killed")
    assert target.read_text() == "old\n"
    assert sorted(os.listdir(tmp_path)) == ["table.csv"]  # no temporary left behind


def test_atomic_dir_replaces_the_whole_directory(tmp_path):
    target = tmp_path / "report"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "b.txt").write_text("2")
            raise RuntimeError("killed")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]
    assert sorted(os.listdir(tmp_path)) == ["report"]


def test_run_cli_turns_caller_errors_into_one_line_and_exit_2():
    code = (
        "from regcore.cli import run_cli\n"
        "def main(argv):\n"
        "    raise ValueError('smooth_weight == -1.0, must be >= 0')\n"
        "run_cli(main, prog='demo')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr == "demo: error: smooth_weight == -1.0, must be >= 0\n"


def test_a_variant_of_another_study_names_its_factors_and_in_force_writes_them_out():
    with pytest.raises(ValueError, match="unknown variant 'affine-diffeomorphic'"):
        Config(variant="affine-diffeomorphic")
    cell = Config.from_flat({"variant": "affine-diffeomorphic", "model.affine": True,
                             "loss.regularize": False, "model.diffeomorphic": True})
    assert cell.affine and not cell.regularize and cell.lr == pytest.approx(1e-3)
    shown = cell.in_force().to_flat()
    assert shown["model.affine"] is True and shown["loss.regularize"] is False
    assert all(shown[f"loss.{name}_weight"] == 0.0 for name in REGULARIZERS)  # none applied
    regloss = Config(variant="regloss").in_force().to_flat()
    assert regloss["loss.smooth_weight"] == STUDY_REG_WEIGHTS["smooth"]
    assert regloss["train.lr"] == pytest.approx(1e-3) and regloss["loss.regularize"] is True
    with pytest.raises(ValueError, match="variant == 'bad name!'"):
        Config.from_flat({"variant": "bad name!", "model.affine": True,
                          "loss.regularize": True})


def test_a_checkpoint_written_before_a_key_was_retired_still_loads():
    from regcore.checkpoint import config_from_state

    flat = {**Config(variant="regloss").to_flat(), "loss.max_displacement_vox": 10.0}
    assert config_from_state({"config": flat}) == Config(variant="regloss")
