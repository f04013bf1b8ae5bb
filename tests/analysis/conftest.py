"""MLflow stores in the layout of docs/ARCHITECTURE.md, written by the tests themselves.

A fresh sqlite store takes MLflow about 10 s to migrate, so one empty store is made per session
and copied for each test that needs its own.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from regcore.config import Config
from tests.analysis.constructed import make_per_pair

SHAPE = (16, 16, 16)


@dataclass
class Store:
    uri: str
    db: Path
    artifacts: Path


@pytest.fixture(scope="session")
def empty_db(tmp_path_factory) -> Path:
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()  # creates and migrates
    return db


def _copy_store(empty_db: Path, folder: Path) -> Store:
    folder.mkdir(parents=True, exist_ok=True)
    db = folder / "mlflow.db"
    shutil.copy(empty_db, db)
    return Store(uri=f"sqlite:///{db}", db=db, artifacts=folder / "artifacts")


@pytest.fixture
def store(empty_db, tmp_path) -> Store:
    return _copy_store(empty_db, tmp_path / "store")


def example_arrays() -> dict[str, np.ndarray]:
    """A 16^3 sphere pair with a smooth sinusoidal field and its Jacobian determinant."""
    z, y, x = np.meshgrid(*(np.arange(s, dtype=np.float32) for s in SHAPE), indexing="ij")
    r = np.sqrt((z - 7.5) ** 2 + (y - 7.5) ** 2 + (x - 7.5) ** 2)
    fixed_seg = (r < 5).astype(np.int64) + (r < 3).astype(np.int64)
    moving = ((r < 4).astype(np.int64) + (r < 2).astype(np.int64))
    ddf = np.stack([0.8 * np.sin(2 * np.pi * c / 16) for c in (z, y, x)]).astype(np.float32)
    grads = [np.gradient(ddf[k]) for k in range(3)]
    jac = np.stack([[grads[k][i] + (k == i) for i in range(3)] for k in range(3)])
    jacdet = np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1))).astype(np.float32)
    return {"fixed": fixed_seg.astype(np.int64), "moving": moving, "warped": fixed_seg.copy(),
            "fixed_seg": fixed_seg, "warped_seg": fixed_seg.copy(), "ddf_vox": ddf,
            "jacdet": jacdet, "spacing_mm": np.array([1.5, 1.5, 1.5], dtype=np.float32)}


def _log_trial(client, exp_id: str, parent_id: str, table: pd.DataFrame, *, variant: str,
               seed: int, group: str, trial_id: str, status: str = "FINISHED",
               overrides: dict | None = None, run_name: str | None = None, epochs: int = 3,
               with_example: bool = False, timing: bool = True, tmp: Path) -> str:
    from mlflow.entities import Metric, Param

    config = Config(variant=variant, seed=seed).with_overrides(
        {"train.epochs": epochs, **(overrides or {})})
    tags = {"mlflow.parentRunId": parent_id, "regablate.role": "trial",
            "regablate.sweep_id": "sweep-1", "regablate.trial_id": trial_id,
            "regablate.variant": variant,
            "regablate.affine": str(config.affine).lower(),
            "regablate.regularize": str(config.regularize).lower(),
            "regablate.seed": str(seed), "regablate.group": group}
    run = client.create_run(exp_id, tags=tags, run_name=run_name or f"{variant}-s{seed}")
    rid = run.info.run_id
    params = [Param(k, str(v)) for k, v in config.to_flat().items()]
    metrics = []
    for epoch in range(1, epochs + 1):
        metrics += [Metric("epoch", epoch, 0, epoch),
                    Metric("train.loss_total", 1.0 / epoch, 0, epoch),
                    Metric("train.epoch_s", 2.0 + 0.5 * config.affine, 0, epoch),
                    Metric("val.dice_mean", 0.5 + 0.05 * epoch, 0, epoch)]
    if len(table):  # the last validation tracks the trial's test result (what a search sees)
        metrics += [Metric("val.dice_mean", float(table["dice_mean"].mean()), 0, epochs),
                    Metric("val.folding_pct", float(table["folding_pct"].mean()), 0, epochs)]
    if status == "FINISHED" and timing:
        # the timing step's figures: one per network; the affine stage adds a little, the
        # regularizers cost only in training (the same network at inference)
        rng = np.random.default_rng([seed, *variant.encode()])
        metrics += [Metric("timing.inference_s", 0.050 + 0.010 * config.affine
                           + rng.normal(0, 0.0005), 0, epochs),
                    Metric("timing.train_step_s", 0.20 + 0.03 * config.affine
                           + 0.01 * config.regularize + rng.normal(0, 0.001), 0, epochs)]
    if status == "FINISHED":
        for column in table.columns:
            if pd.api.types.is_numeric_dtype(table[column]) and column not in ("seed",):
                value = float(table[column].mean())
                if np.isfinite(value):
                    metrics.append(Metric(f"test.{column}", value, 0, epochs))
    client.log_batch(rid, metrics=metrics, params=params)
    if status == "FINISHED":
        path = tmp / rid / "per_pair.csv"
        path.parent.mkdir(parents=True)
        table.drop(columns=["variant", "affine", "regularize", "seed", "group", "run_id",
                            "trial_id", "pair_id"], errors="ignore").assign(
            device="cpu").to_csv(path, index=False)
        client.log_artifact(rid, str(path))
        if with_example:
            npz = tmp / rid / "example.npz"
            np.savez(npz, **example_arrays())
            client.log_artifact(rid, str(npz))
    client.set_terminated(rid, status)
    return rid


def _log_reference(client, exp_id: str, parent_id: str, per_pair: pd.DataFrame, tmp: Path) -> None:
    """A reference run: identity 0.40 Dice / 9 mm, instance optimisation 0.82 / 3 mm, the truth
    1.0 / 0 mm on every test pair of the sweep."""
    pairs = per_pair.drop_duplicates("pair_id")[["moving", "fixed"]]
    values = {"identity": (0.40, 9.0), "instance_optimisation": (0.82, 3.0),
              "ground_truth": (1.0, 0.0)}
    table = pd.concat([pairs.assign(method=m, dice_mean=d, true_error_mm=e, method_s=4.0)
                       for m, (d, e) in values.items()], ignore_index=True)
    run = client.create_run(exp_id, run_name="reference", tags={
        "mlflow.parentRunId": parent_id, "regablate.role": "reference",
        "regablate.sweep_id": "sweep-1"})
    path = tmp / run.info.run_id / "reference.csv"
    path.parent.mkdir(parents=True)
    table[["method", "moving", "fixed", "dice_mean", "true_error_mm", "method_s"]].to_csv(
        path, index=False)
    client.log_artifact(run.info.run_id, str(path))
    client.set_terminated(run.info.run_id, "FINISHED")


def log_sweep(store: Store, *, experiment: str = "regablate", per_pair: pd.DataFrame | None = None,
              n_search: int = 4, resumed: bool = True, failed: bool = True,
              references: bool = True, timing: bool = True) -> str:
    """One sweep in the contract's layout; returns the parent run id.

    Ablation trials: every (variant, seed) of `per_pair`. With `resumed`, the trial
    baseline-s0 also has a stale RUNNING run under the same trial id (what Tuner.restore
    leaves). With `failed`, one extra ablation trial FAILED. `n_search` search trials of
    combined_enhanced vary the smoothing and bending weights.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store.uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(
        experiment, artifact_location=store.artifacts.as_uri())
    per_pair = make_per_pair(n_subjects=6, seeds=(0, 1)) if per_pair is None else per_pair
    parent = client.create_run(exp_id, run_name="sweep", tags={
        "regablate.role": "sweep", "regablate.preset": "smoke", "regablate.sweep_id": "sweep-1"})
    pid = parent.info.run_id
    tmp = Path(tempfile.mkdtemp(prefix="sweep-", dir=store.db.parent))
    if resumed:
        table = per_pair[(per_pair["variant"] == "baseline") & (per_pair["seed"] == 0)]
        _log_trial(client, exp_id, pid, table, variant="baseline", seed=0, group="ablation",
                   trial_id="trial-baseline-0", status="RUNNING", tmp=tmp)
    for (variant, seed), table in per_pair.groupby(["variant", "seed"], sort=False):
        _log_trial(client, exp_id, pid, table, variant=variant, seed=int(seed),
                   group="ablation", trial_id=f"trial-{variant}-{seed}", tmp=tmp,
                   with_example=(variant == "combined_enhanced" and seed == 0), timing=timing)
    if references:
        _log_reference(client, exp_id, pid, per_pair, tmp)
    if failed:
        _log_trial(client, exp_id, pid, per_pair.iloc[:0], variant="regloss", seed=9,
                   group="ablation", trial_id="trial-regloss-9", status="FAILED", tmp=tmp)
    rng = np.random.default_rng(0)
    template = per_pair[(per_pair["variant"] == "combined_enhanced") & (per_pair["seed"] == 0)]
    for n in range(n_search):
        smooth, bending = 10 ** rng.uniform(-3, 0), 10 ** rng.uniform(-3, 0)
        table = template.assign(dice_mean=template["dice_mean"] + 0.02 * np.log10(smooth),
                                folding_pct=template["folding_pct"] - 0.3 * np.log10(smooth))
        _log_trial(client, exp_id, pid, table, variant="combined_enhanced", seed=0,
                   group="search", trial_id=f"trial-search-{n}",
                   run_name=f"combined_enhanced-search-{n}",
                   overrides={"loss.smooth_weight": smooth, "loss.bending_weight": bending},
                   timing=False, tmp=tmp)
    client.set_terminated(pid, "FINISHED")
    shutil.rmtree(tmp)
    return pid


@pytest.fixture(scope="session")
def sweep_store(empty_db, tmp_path_factory) -> tuple[Store, str]:
    """A store holding one complete constructed sweep (shared, read-only, by the tests)."""
    store = _copy_store(empty_db, tmp_path_factory.mktemp("sweep_store"))
    return store, log_sweep(store)
