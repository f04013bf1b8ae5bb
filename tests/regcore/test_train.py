"""train(): reports, determinism, resume equivalence, divergence, test hooks and the command."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from regcore.checkpoint import latest_valid_checkpoint, list_checkpoints, load_checkpoint
from regcore.config import Config
from regcore.train import (DIVERGED_SIDES, OUTSIDE_SHARE, DivergenceError, check_displacement,
                           main, train)

# 16^3 embedded cohort: 1 atlas, 2 training, 1 validation, 2 test subjects; a tiny U-Net.
TINY = {
    "data.embedded_subjects": 6,
    "data.shape": [16, 16, 16],
    "data.n_test": 2,
    "data.n_val": 1,
    "model.enc_channels": [4, 8, 8, 8],
    "model.dec_channels": [8, 8, 8, 8, 8, 4, 4],
    "train.epochs": 3,
    "train.steps_per_epoch": 2,
    "train.checkpoint_every": 1,
    "train.num_threads": 1,
    "train.eval_repeats": 1,
}


@pytest.fixture(scope="module")
def embedded_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("embedded"))


@pytest.fixture
def tiny(embedded_dir):
    def make(**overrides) -> Config:
        flat = {"variant": "combined_enhanced", "seed": 5, "data.embedded_dir": embedded_dir, **TINY}
        flat.update({k.replace("__", "."): v for k, v in overrides.items()})
        return Config.from_flat(flat)
    return make


class Recorder:
    def __init__(self):
        self.calls: list[tuple[dict, str | None]] = []

    def __call__(self, metrics, checkpoint_dir):
        self.calls.append((dict(metrics), checkpoint_dir))


def _weights(directory):
    return load_checkpoint(directory)["model"]


def test_importing_train_imports_neither_ray_nor_mlflow():
    code = ("import sys, regcore.train, regcore.evaluate, regcore.register; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow')); "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, embedded_dir):
    flat = {"variant": "combined_enhanced", "seed": 5, "data.embedded_dir": embedded_dir, **TINY}
    config = Config.from_flat(flat)
    recorder = Recorder()
    out = tmp_path_factory.mktemp("full")
    result = train(config, recorder, out_dir=out)
    return config, recorder, result, out


def test_reports_every_epoch_with_the_contract_names(full_run):
    config, recorder, result, out = full_run
    assert [int(m["epoch"]) for m, _ in recorder.calls] == [1, 2, 3]
    for metrics, checkpoint_dir in recorder.calls:
        assert checkpoint_dir is not None  # checkpoint_every == 1
        for key in ("train.loss_total", "train.reg_factor", "train.lr", "train.epoch_s",
                    "val.dice_mean", "val.folding_pct", "train.loss_dice", "train.share_dice",
                    "train.loss_smooth", "train.share_jacobian"):
            assert key in metrics and np.isfinite(metrics[key]), key
        assert metrics["train.lr"] == pytest.approx(1e-3)  # the registry's one rate
        shares = sum(v for k, v in metrics.items() if k.startswith("train.share_"))
        assert shares == pytest.approx(1.0, rel=1e-4)
    # the adaptive factor of the study, max(0.01, 0.1 (1 - e/E)) at e = 0, 1, 2 of E = 3
    assert [m["train.reg_factor"] for m, _ in recorder.calls] == pytest.approx([0.1, 0.1 * 2 / 3, 0.1 / 3])
    last = recorder.calls[-1][0]
    assert last["test.dice_mean"] == pytest.approx(result.per_pair["dice_mean"].mean())
    assert "test.dice_before_mean" in last and "test.inference_s" in last
    assert result.metrics == last
    assert result.checkpoint_dir.name == "epoch_0003"
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["epoch_0002", "epoch_0003"]


def test_shares_stay_in_unit_interval_when_ncc_is_negative(tiny, tmp_path):
    # local NCC is a negative loss, so weighted / total would leave [0, 1]; shares are
    # |weighted term| / sum |weighted terms|
    config = tiny(data__modality="intensity", train__epochs=1, train__checkpoint_every=1)
    recorder = Recorder()
    train(config, recorder, out_dir=tmp_path)
    metrics = recorder.calls[-1][0]
    assert metrics["train.loss_ncc"] < 0
    shares = {k: v for k, v in metrics.items() if k.startswith("train.share_")}
    assert all(0.0 <= v <= 1.0 for v in shares.values()), shares
    assert sum(shares.values()) == pytest.approx(1.0, rel=1e-6)
    assert shares["train.share_smooth"] > 0  # the regularizer is in the loss


def test_pass_and_coarse_terms_are_trained_and_logged(tiny, tmp_path):
    config = tiny(data__modality="intensity", model__passes=2, loss__pass_weight=1.0,
                  loss__coarse_weight=1.0, train__epochs=1, train__checkpoint_every=1)
    recorder = Recorder()
    train(config, recorder, out_dir=tmp_path)
    metrics = recorder.calls[-1][0]
    for term in ("passes", "coarse"):
        assert metrics[f"train.loss_{term}"] < 0  # negative local NCC
        assert 0 < metrics[f"train.share_{term}"] < 1
    shares = sum(v for k, v in metrics.items() if k.startswith("train.share_"))
    assert shares == pytest.approx(1.0, rel=1e-6)


def test_per_pair_table_and_example(full_run):
    config, _, result, out = full_run
    table = pd.read_csv(out / "per_pair.csv")
    assert len(table) == 2  # data.n_test
    for column in ("moving", "fixed", "dice_mean", "dice_cortex", "dice_csf", "dice_before_mean",
                   "hd95_mm", "folding_pct", "sdlogj", "disp_max_mm", "mse_before", "mse_after",
                   "ncc_improvement_pct", "plausibility", "true_error_mm", "inference_s",
                   "device", "similarity_on"):
        assert column in table.columns, column
    assert (table["similarity_on"] == "intensity").all()  # the embedded cohort has intensities
    assert table["true_error_mm"].notna().all()  # and a ground-truth field
    assert (table["inference_s"] > 0).all()
    example = np.load(out / "example.npz")
    shape = tuple(config.data.shape)
    assert example["fixed"].shape == shape and example["warped_seg"].shape == shape
    assert example["ddf_vox"].shape == (3, *shape) and example["jacdet"].shape == shape
    assert example["spacing_mm"].shape == (3,)
    assert (out / "metrics.json").is_file()


def test_same_seed_same_result(full_run, tiny, tmp_path):
    config, recorder, result, out = full_run
    again = Recorder()
    train(config, again, out_dir=tmp_path)
    assert [m["train.loss_total"] for m, _ in again.calls] == [m["train.loss_total"] for m, _ in recorder.calls]
    for name, tensor in _weights(out / "checkpoints" / "epoch_0003").items():
        assert torch.equal(tensor, _weights(tmp_path / "checkpoints" / "epoch_0003")[name]), name


def test_interrupted_then_resumed_equals_uninterrupted(full_run, tiny, tmp_path):
    config, recorder, result, out = full_run
    crashing = config.with_overrides({"train.fail_at_epoch": 3})
    first = Recorder()
    with pytest.raises(RuntimeError, match="train.fail_at_epoch == 3"):
        train(crashing, first, out_dir=tmp_path)
    assert [int(m["epoch"]) for m, _ in first.calls] == [1, 2]
    directory, _ = latest_valid_checkpoint(tmp_path / "checkpoints")
    assert directory.name == "epoch_0002"
    second = Recorder()
    resumed = train(crashing, second, out_dir=tmp_path, resume_from=directory)  # hook is off now
    assert [int(m["epoch"]) for m, _ in second.calls] == [3]
    assert second.calls[0][0]["train.loss_total"] == pytest.approx(recorder.calls[2][0]["train.loss_total"], rel=1e-5)
    expected = _weights(out / "checkpoints" / "epoch_0003")
    for name, tensor in _weights(resumed.checkpoint_dir).items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-6)
    assert resumed.metrics["test.dice_mean"] == pytest.approx(result.metrics["test.dice_mean"], abs=1e-6)


def test_nan_loss_stops_with_epoch_step_and_component(tiny, tmp_path):
    config = tiny(train__nan_at_epoch=2, train__epochs=2, variant="baseline")
    recorder = Recorder()
    with pytest.raises(DivergenceError, match=r"non-finite at epoch 2, step 1: dice=nan"):
        train(config, recorder, out_dir=tmp_path)
    assert [int(m["epoch"]) for m, _ in recorder.calls] == [1]
    assert issubclass(DivergenceError, ValueError)


def test_displacement_guard_bounds_and_message():
    field = torch.zeros(1, 3, 16, 20, 12)
    field[0, 1, 3, 4, 5] = -DIVERGED_SIDES * 20  # exactly at the limit: still allowed
    check_displacement(field, 1, 1)
    field[0, 1, 3, 4, 5] = -DIVERGED_SIDES * 20 - 0.5
    with pytest.raises(DivergenceError, match=r"displacement diverged at epoch 4, step 7: "
                       r"max \|u_k\| == 40.5 voxels, more than 2 x the longest image side \(20 voxels\)"):
        check_displacement(field, 4, 7)
    field[0, 0, 0, 0, 0] = float("inf")
    with pytest.raises(DivergenceError, match="max \\|u_k\\| == inf voxels"):
        check_displacement(field, 1, 2)


def test_displacement_guard_stops_a_field_that_leaves_the_image():
    # a shift along the 20-voxel axis: 8 voxels send 8 / 20 = 40 % of the grid outside
    # (allowed), 11 voxels 55 % (a collapse: more than OUTSIDE_SHARE)
    field = torch.zeros(1, 3, 16, 20, 12)
    field[0, 1] = 8.0
    check_displacement(field, 1, 1)
    field[0, 1] = 11.0
    assert OUTSIDE_SHARE == 0.5
    with pytest.raises(DivergenceError, match=r"displacement diverged at epoch 3, step 2: the "
                       r"field samples 55 % of the fixed grid outside the moving image"):
        check_displacement(field, 3, 2)


def test_exploding_field_with_finite_loss_stops_training(tiny, tmp_path, monkeypatch):
    """A field pushed 1000 voxels away leaves every loss term finite (NCC is bounded): the
    displacement guard, not the non-finite check, must stop the run before any report."""
    import regcore.networks as networks

    build = networks.build_model

    def exploding(*args, **kwargs):
        model = build(*args, **kwargs)
        with torch.no_grad():
            model.flow.conv.bias.fill_(1000.0)
        return model

    monkeypatch.setattr(networks, "build_model", exploding)
    config = tiny(train__epochs=1, variant="baseline", data__modality="intensity")
    recorder = Recorder()
    with pytest.raises(DivergenceError, match=r"displacement diverged at epoch 1, step 1: "
                       r"max \|u_k\| == 1000 voxels"):
        train(config, recorder, out_dir=tmp_path)
    assert recorder.calls == []
    assert not (tmp_path / "metrics.json").exists()


def test_resume_from_other_backbone_or_corrupt_checkpoint(full_run, tiny, tmp_path):
    config, *_ , out = full_run
    directory = out / "checkpoints" / "epoch_0003"
    with pytest.raises(ValueError, match="trained with backbone 'vxm', but the config asks for backbone 'seed'"):
        train(config.with_overrides({"model.backbone": "seed"}), out_dir=tmp_path, resume_from=directory)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "state.pt").write_bytes((directory / "state.pt").read_bytes()[:1000])
    with pytest.raises(ValueError, match="broken/state.pt' is truncated or corrupt"):
        train(config, out_dir=tmp_path / "o", resume_from=broken)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv, message", [
    (["--variant", "nonsense"], "unknown variant 'nonsense'"),
    (["--epochs", "0"], "train.epochs == 0, must be >= 1"),
    (["--set", "train.lr=-1"], "train.lr == -1.0, must be > 0"),
    (["--set", "train.precision=amp"], "train.precision == 'amp' needs a CUDA device"),
    (["--set", "model.nonsense=3"], "unknown config key 'model.nonsense'"),
    (["--set", "noequals"], "--set 'noequals', expected key=value"),
    (["--data-dir", "/does/not/exist"], "--data-dir '/does/not/exist' is not a directory"),
    (["--config", "/does/not/exist.json"], "--config '/does/not/exist.json' does not exist"),
    (["--resume", "/does/not/exist"], "checkpoint '/does/not/exist' does not exist"),
    (["--epochs", "two"], "argument --epochs: invalid int value: 'two'"),
])
def test_command_bad_input_one_line_exit_2_nothing_written(argv, message, tmp_path, capsys):
    from regcore.cli import run_cli

    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        run_cli(main, ["--out-dir", str(out), "--no-progress", *argv], prog="regcore.train")
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_command_runs_and_writes_outputs(tiny, embedded_dir, tmp_path, capsys):
    """--config file + flags + --set; bf16 autocast on the CPU; a split without validation
    pairs reports no val.* metrics instead of failing."""
    import json

    from regcore.cli import run_cli

    out = tmp_path / "run"
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({**TINY, "variant": "baseline", "data.n_val": 0,
                                       "data.embedded_dir": embedded_dir,
                                       "train.precision": "bf16"}))
    argv = ["--config", str(config_file), "--variant", "regloss", "--epochs", "1", "--seed", "2",
            "--out-dir", str(out), "--no-progress", "--set", "train.steps_per_epoch=1"]
    with pytest.raises(SystemExit) as stop:
        run_cli(main, argv)
    assert stop.value.code == 0
    printed = capsys.readouterr().out
    assert "test.dice_mean" in printed
    for name in ("per_pair.csv", "example.npz", "metrics.json", "checkpoints/epoch_0001/state.pt"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["config"]["variant"] == "regloss" and saved["config"]["seed"] == 2
    assert saved["config"]["train.precision"] == "bf16"
    metrics = saved["metrics"]
    assert not any(key.startswith("val.") for key in metrics)
    assert np.isfinite(metrics["train.loss_total"]) and np.isfinite(metrics["test.dice_mean"])


def test_command_resume_from_other_backbone_exit_2(full_run, tmp_path, capsys):
    from regcore.cli import run_cli

    _, _, result, _ = full_run
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        run_cli(main, ["--resume", str(result.checkpoint_dir), "--set", "model.backbone=seed",
                       "--out-dir", str(out), "--no-progress"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "backbone 'vxm'" in err and "backbone 'seed'" in err
    assert not out.exists()


def test_fresh_run_removes_stale_checkpoints_of_an_earlier_run(tiny, tmp_path):
    stale = tmp_path / "checkpoints" / "epoch_0009"
    stale.mkdir(parents=True)
    (stale / "state.pt").write_bytes(b"from an earlier, longer run")
    config = tiny(train__epochs=1, train__steps_per_epoch=1, variant="baseline")
    with pytest.warns(UserWarning, match="removing the stale checkpoint"):
        result = train(config, out_dir=tmp_path)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["epoch_0001"]
    assert latest_valid_checkpoint(tmp_path / "checkpoints")[0] == result.checkpoint_dir
