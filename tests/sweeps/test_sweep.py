"""The sweep end to end, with real Ray, real MLflow (sqlite in tmp_path) and real training.

Slow: every test starts Ray and trains tiny networks (CI runs them).
"""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path

import pytest

from regcore.config import REGULARIZERS, Config
from regcore.variants import VARIANTS

from .conftest import mlflow_client, sweep_runs

pytestmark = pytest.mark.slow

FLAT_KEYS = set(Config().to_flat())


def _by_name(children):
    return {r.info.run_name: r for r in children}


def _epoch_steps(client, run) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, "epoch"))


def test_smoke_sweep_end_to_end(sweep_env):
    """The smoke preset: 4 variants x 1 seed + 2 search trials, under one parent run."""
    started = time.perf_counter()
    proc = sweep_env.run("--preset", "smoke", "--sweep-id", "smoke-e2e")
    wall_s = time.perf_counter() - started
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(f"smoke sweep wall time {wall_s:.1f} s")

    parents, children = sweep_runs(sweep_env)
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["regablate.preset"] == "smoke"
    assert parent.data.tags["regablate.sweep_id"] == "smoke-e2e"
    assert len(children) == 4 + 2
    assert len({r.data.tags["regablate.trial_id"] for r in children}) == len(children)
    client = mlflow_client(sweep_env)

    ablation = [r for r in children if r.data.tags["regablate.group"] == "ablation"]
    search = [r for r in children if r.data.tags["regablate.group"] == "search"]
    assert sorted(r.info.run_name for r in ablation) == sorted(f"{v}-s0" for v in VARIANTS)
    assert len(search) == 2
    assert sorted(r.info.run_name.rsplit("-", 1)[1] for r in search) == ["1", "2"]
    for run in search:
        assert run.info.run_name.startswith(f"{run.data.tags['regablate.variant']}-search-")
        assert VARIANTS[run.data.tags["regablate.variant"]].regularize
        if run.data.tags.get("regablate.stopped_early") != "true":  # ran all epochs
            assert "test.dice_mean" in run.data.metrics
            assert "per_pair.csv" in {a.path for a in client.list_artifacts(run.info.run_id)}
    # the study's weights were evaluated (points_to_evaluate) for both regularizing variants
    assert sorted(r.data.tags["regablate.variant"] for r in search) == ["combined_enhanced",
                                                                       "regloss"]
    for run in search:
        assert run.data.params["loss.smooth_weight"] == "0.01"

    for run in children:
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        variant = VARIANTS[tags["regablate.variant"]]
        assert run.info.status == "FINISHED", (run.info.run_name, tags.get("regablate.error"))
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert tags["regablate.role"] == "trial"
        assert tags["regablate.sweep_id"] == "smoke-e2e"
        assert tags["regablate.affine"] == ("true" if variant.affine else "false")
        assert tags["regablate.regularize"] == ("true" if variant.regularize else "false")
        assert tags["regablate.seed"] == "0"
        assert tags["regablate.factor.affine"] == ("on" if variant.affine else "off")
        assert tags["regablate.factor.regularize"] == ("on" if variant.regularize else "off")
        assert "hunter" not in str(tags) and "password" not in str(params)
        # params: the flat config in force, every value a string: the factors and the learning
        # rate explicit, the weights 0 where the variant applies no regularizer
        assert set(params) == FLAT_KEYS
        assert params["variant"] == variant.name and params["seed"] == "0"
        assert params["data.shape"] == "[32, 32, 32]"
        assert params["train.num_threads"] == "1"
        assert float(params["train.lr"]) == variant.lr
        assert params["model.affine"] == str(variant.affine)
        assert params["loss.regularize"] == str(variant.regularize)
        if not variant.regularize:
            assert all(float(params[f"loss.{n}_weight"]) == 0.0 for n in REGULARIZERS)
        inputs = run.inputs.dataset_inputs
        assert len(inputs) == 1, run.info.run_name  # once per run, not per attempt
        assert inputs[0].dataset.name.startswith("embedded-mni152_32x32x32")
        assert len(inputs[0].dataset.digest) == 16
        if run in search:
            continue  # ASHA may stop a search trial after its first epoch
        assert _epoch_steps(client, run) == [1, 2]
        assert len(client.get_metric_history(run.info.run_id, "val.dice_mean")) == 2
        assert 0.0 <= metrics["test.dice_mean"] <= 1.0
        assert math.isfinite(metrics["test.folding_pct"])
        assert metrics["trial.train_s"] > 0
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"per_pair.csv", "example.npz", "checkpoint"} <= artifacts
        assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")] == \
            ["checkpoint/state.pt"]

    assert len({r.inputs.dataset_inputs[0].dataset.digest for r in children}) == 1
    assert [d.dataset.digest for d in parent.inputs.dataset_inputs] == \
        [children[0].inputs.dataset_inputs[0].dataset.digest]  # the parent row shows it too
    assert (f"MLflow UI: http://127.0.0.1:5000/#/experiments/{parent.info.experiment_id}"
            f"?workflowType=machine_learning") in proc.stdout
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    report_files = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.md", "report/report.html", "report/summary.csv"} <= report_files
    assert any(p.endswith(".png") for p in report_files), report_files

    # the live view, as plain lines (stdout is a pipe here); Ray's output in ray.log only
    ray_log = sweep_env.workdir / "ray_results" / "smoke-e2e" / "ray.log"
    assert proc.stdout.splitlines()[0].endswith(f"Ray's output: {ray_log}")
    progress = [line for line in proc.stdout.splitlines() if line.startswith("sweep ")
                and " done, " in line]
    assert progress[-1].startswith("sweep 6/6 done, 0 running, 0 failed | "), progress
    assert "best val.dice_mean 0." in progress[-1] and "ETA 0m00s" in progress[-1]
    assert "\r" not in proc.stdout and "\x1b[" not in proc.stdout
    for noise in ("== Status ==", "Checkpoint successfully created", "Trial name"):
        assert noise not in proc.stdout and noise not in proc.stderr, noise
    assert "== Status ==" in ray_log.read_text()

    # the reference rows: one child run tagged role=reference with reference.csv
    refs = client.search_runs([parent.info.experiment_id],
                              filter_string="tags.`regablate.role` = 'reference'")
    assert len(refs) == 1 and refs[0].info.status == "FINISHED"
    assert refs[0].data.tags["mlflow.parentRunId"] == parent.info.run_id
    import pandas as pd
    table = pd.read_csv(client.download_artifacts(refs[0].info.run_id, "reference.csv",
                                                  str(sweep_env.workdir)))
    assert set(table["method"]) == {"identity", "instance_optimisation", "ground_truth"}
    assert {"moving", "fixed", "dice_mean", "true_error_mm", "method_s"} <= set(table.columns)

    assert "ablation summary" in proc.stdout
    for name in VARIANTS:
        assert name in proc.stdout.split("ablation summary", 1)[1]
    assert "report: " in proc.stdout
    report = Path(proc.stdout.split("report: ", 1)[1].splitlines()[0])
    assert report.exists()
    assert (sweep_env.workdir / "reports" / "smoke-e2e").is_dir()


def test_three_factor_study_sweep(sweep_env):
    """`--study` with the shipped 3-factor study: one FINISHED run per cell x seed with its
    factor tags, the study as the parent's artifact, and a report with every effect."""
    import pandas as pd

    from regcore.study import read_study
    from sweeps.study_files import STUDIES_DIR

    name = "affine_x_regularizers_x_diffeomorphic"
    study = read_study(STUDIES_DIR / f"{name}.yaml")
    proc = sweep_env.run("--preset", "smoke", "--study", name, "--sweep-id", "three",
                         "--search-trials", "0", "--no-timing", "--epochs", "1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    parents, children = sweep_runs(sweep_env)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    client = mlflow_client(sweep_env)
    assert "study.json" in {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert sorted(r.info.run_name for r in children) == sorted(f"{c.name}-s0"
                                                               for c in study.cells)
    for run in children:
        assert run.info.status == "FINISHED"
        cell = run.data.tags["regablate.variant"]
        levels = study.level_names(cell)
        assert {f: run.data.tags[f"regablate.factor.{f}"] for f in levels} == levels
        assert run.data.params["model.diffeomorphic"] == str(levels["diffeomorphic"] == "on")
    report = Path(proc.stdout.split("report: ", 1)[1].splitlines()[0])
    effects = pd.read_csv(report.parent / "effects.csv")
    primary = effects[effects["metric"] == "dice_mean"]
    assert sorted(primary["effect"]) == sorted([
        "affine", "regularize", "diffeomorphic", "affine:regularize", "affine:diffeomorphic",
        "regularize:diffeomorphic", "affine:regularize:diffeomorphic"])


def test_failures_retried_nan_reported_others_unaffected(sweep_env):
    """max_failures 1: a crash at epoch 2 is retried from the epoch-1 checkpoint and completes;
    a crash at epoch 1 (no checkpoint yet) fails again and ends FAILED; a NaN loss fails with a
    message naming the epoch and the term; the untouched variant finishes; the sweep reports."""
    proc = sweep_env.run(
        "--preset", "smoke", "--sweep-id", "failures", "--search-trials", "0",
        "--max-failures", "1", "--epochs", "2",
        "--set", "baseline:train.fail_at_epoch=2",
        "--set", "combined_basic:train.fail_at_epoch=1",
        "--set", "regloss:train.nan_at_epoch=1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    parents, children = sweep_runs(sweep_env)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    runs = _by_name(children)
    assert sorted(runs) == sorted(f"{v}-s0" for v in VARIANTS)
    client = mlflow_client(sweep_env)

    retried = runs["baseline-s0"]
    assert retried.info.status == "FINISHED"
    assert retried.data.tags["regablate.attempts"] == "2"
    assert retried.data.tags["regablate.resumed_from_epoch"] == "1"
    assert "fail_at_epoch == 2" in retried.data.tags["regablate.recovered_error"]
    assert _epoch_steps(client, retried) == [1, 2]  # epoch 1 trained once: resumed, not redone
    assert "test.dice_mean" in retried.data.metrics

    past_limit = runs["combined_basic-s0"]
    assert past_limit.info.status == "FAILED"
    assert past_limit.data.tags["regablate.attempts"] == "2"
    assert "fail_at_epoch == 1" in past_limit.data.tags["regablate.error"]

    nan = runs["regloss-s0"]
    assert nan.info.status == "FAILED"
    message = nan.data.tags["regablate.error"]
    assert "DivergenceError" in message and "epoch 1" in message
    assert any(term in message for term in ("dice", "ce", "mse", "ncc")), message

    fine = runs["combined_enhanced-s0"]
    assert fine.info.status == "FINISHED" and "regablate.error" not in fine.data.tags
    assert "test.dice_mean" in fine.data.metrics
    assert "2 FAILED" in proc.stdout
    assert "report: " in proc.stdout


def _wait_for(predicate, timeout_s: float, what: str, proc=None):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the sweep exited ({proc.returncode}) while waiting for {what}")
        try:
            value = predicate()
        except Exception:  # the store may be mid-creation
            value = None
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_resume_after_driver_killed(sweep_env):
    """SIGKILL the driver once one trial finished and another is mid-training; --resume
    finishes the sweep: nothing re-run from scratch, one MLflow run per trial, none RUNNING."""
    common = ("--preset", "smoke", "--sweep-id", "killed", "--search-trials", "0",
              "--variants", "baseline,regloss,combined_basic", "--epochs", "6",
              "--max-concurrent", "1", "--no-report")
    proc = sweep_env.popen(*common, log=sweep_env.workdir / "first.log")
    try:
        client = mlflow_client(sweep_env)

        def one_done_one_mid():
            _, children = sweep_runs(sweep_env)
            done = [r for r in children if r.info.status == "FINISHED"]
            mid = [r for r in children if r.info.status == "RUNNING"
                   and r.data.metrics.get("epoch", 0) >= 3]
            return (done, mid) if done and mid else None

        done, mid = _wait_for(one_done_one_mid, 400, "a finished and a running trial", proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    sweep_env.cleanup()  # the killed driver's Ray processes (by pid), as an operator would
    sweep_env.ray_tmp.mkdir(exist_ok=True)
    finished_before = {r.info.run_id: r.info.run_name for r in done}
    mid_epoch = int(mid[0].data.metrics["epoch"])

    resumed = sweep_env.run("--resume", "--no-report")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

    parents, children = sweep_runs(sweep_env)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(r.info.run_name for r in children) == \
        ["baseline-s0", "combined_basic-s0", "regloss-s0"]  # exactly one run per trial
    assert all(r.info.status == "FINISHED" for r in children), \
        [(r.info.run_name, r.info.status) for r in children]
    for run in children:
        steps = _epoch_steps(client, run)
        assert steps.count(1) == 1, (run.info.run_name, steps)  # never restarted from scratch
        assert set(steps) == {1, 2, 3, 4, 5, 6}
        assert "test.dice_mean" in run.data.metrics
    for run_id, name in finished_before.items():
        run = client.get_run(run_id)
        assert run.data.tags["regablate.attempts"] == "1", name  # not trained again
    interrupted = client.get_run(mid[0].info.run_id)
    assert int(interrupted.data.tags["regablate.resumed_from_epoch"]) >= 1
    assert int(interrupted.data.tags["regablate.resumed_from_epoch"]) <= mid_epoch
