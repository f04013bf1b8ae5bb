"""What the driver runs once the trials are done, before the report.

- `timing_step`: every finished ablation network timed under controlled conditions
  (`regcore.timing.time_network`): one network at a time, as a Ray task with the resources of a
  trial, so nothing else shares its device; the figures go to the trial's MLflow run as
  `timing.inference_s` and `timing.train_step_s`.
- `reference_step`: the reference rows of the sweep's test pairs (identity, per-pair
  instance optimisation, ground truth: `regcore.reference.reference_table`), logged as a child
  run tagged `regablate.role=reference` with `reference.csv`.

Both are informative: a failure is reported on one line and the sweep and its report go on.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from sweeps import tracking

__all__ = ["timing_step", "reference_step", "reference_of_plan", "TIMING_PROTOCOL"]

TIMING_PROTOCOL = ("after the trials, one network at a time alone on its device, warm-up "
                   "then the median of {repeats} repeats, {threads} CPU thread(s)")


def _ablation_runs(client, experiment_id: str, sweep_id: str) -> list:
    return [r for r in tracking.children_of(client, experiment_id, sweep_id)
            if r.info.status == "FINISHED"
            and r.data.tags.get(f"{tracking.TAG}group") == "ablation"]


def _time_remote(resources: dict[str, float]) -> Callable:
    """`time_network` as a Ray task asking for a trial's resources."""
    import ray

    from regcore.timing import time_network

    def run(checkpoint_bytes: bytes, repeats: int, threads: int) -> dict[str, float]:
        with tempfile.TemporaryDirectory(prefix="regablate-timing-") as tmp:
            path = Path(tmp) / "state.pt"
            path.write_bytes(checkpoint_bytes)
            return time_network(path, repeats=repeats, num_threads=threads)

    return ray.remote(num_cpus=resources.get("cpu", 1), num_gpus=resources.get("gpu", 0))(run)


def timing_step(tracking_uri: str, experiment_id: str, sweep_id: str,
                resources: dict[str, float], *, repeats: int = 5,
                log: Callable[[str], Any] = print) -> int:
    """Time every finished ablation network; returns how many were timed."""
    import os

    import ray

    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # one bar per download
    client = tracking.client_for(tracking_uri)
    runs = [r for r in _ablation_runs(client, experiment_id, sweep_id)
            if "timing.inference_s" not in r.data.metrics]
    if not runs:
        return 0
    threads = max(1, int(round(resources.get("cpu", 1))))
    remote = _time_remote(resources)
    started = time.perf_counter()
    log(f"timing {len(runs)} networks one at a time ({TIMING_PROTOCOL.format(repeats=repeats, threads=threads)})")
    done = 0
    for run in runs:
        with tempfile.TemporaryDirectory(prefix="regablate-ckpt-") as tmp:
            try:
                local = client.download_artifacts(run.info.run_id, "checkpoint/state.pt", tmp)
            except Exception as error:  # noqa: BLE001 - a run without a checkpoint is skipped
                log(f"timing: run {run.info.run_id} has no checkpoint/state.pt "
                    f"({type(error).__name__}), skipped")
                continue
            times = ray.get(remote.remote(Path(local).read_bytes(), repeats, threads))
        tracking.log_metrics(client, run.info.run_id,
                             {f"timing.{k}": v for k, v in times.items()}, step=0,
                             tags={f"{tracking.TAG}timing": TIMING_PROTOCOL.format(
                                 repeats=repeats, threads=threads)})
        done += 1
    log(f"timed {done} networks in {time.perf_counter() - started:.1f} s")
    return done


def reference_step(tracking_uri: str, experiment_id: str, parent_run_id: str, sweep_id: str,
                   config, *, threads: int = 1, log: Callable[[str], Any] = print) -> int:
    """Log the reference rows of `config`'s test pairs as a child run (tag
    `regablate.role=reference`, artifact `reference.csv`); returns how many rows.

    `config`: the sweep's base config. The instance optimisation uses its similarity with the
    diffusion term only (regularizers off), the same for every variant; it runs here in the
    driver, after the trials, on `threads` threads.
    """
    import torch

    from regcore.reference import reference_table

    threads = max(1, int(threads))
    started = time.perf_counter()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        table = reference_table(config.with_overrides({"loss.regularize": False}))
    finally:
        torch.set_num_threads(before)
    client = tracking.client_for(tracking_uri)
    with tracking.guard(client, "logging the reference rows"):
        run = client.create_run(experiment_id, run_name="reference", tags={
            "mlflow.parentRunId": parent_run_id, f"{tracking.TAG}role": "reference",
            f"{tracking.TAG}sweep_id": sweep_id})
    run_id = run.info.run_id
    with tempfile.TemporaryDirectory(prefix="regablate-ref-") as tmp:
        path = Path(tmp) / "reference.csv"
        table.to_csv(path, index=False)
        tracking.log_artifacts(client, run_id, [(path, None)])
    means = table.groupby("method")[["dice_mean", "true_error_mm", "method_s"]].mean()
    tracking.log_metrics(client, run_id, {
        **{f"reference.{m}.{c}": float(v) for m, row in means.iterrows() for c, v in row.items()},
        "reference.threads": float(threads)}, step=0)
    with tracking.guard(client, "closing the reference run"):
        client.set_terminated(run_id, "FINISHED")
    log("reference rows (mean over the test pairs): " + "; ".join(
        f"{m} Dice {row['dice_mean']:.3f}, true error {row['true_error_mm']:.2f} mm, "
        f"{row['method_s']:.2f} s/pair" for m, row in means.iterrows())
        + f" ({time.perf_counter() - started:.1f} s on {threads} threads)")
    return len(table)


def reference_of_plan(tracking_uri: str, plan, prog: str) -> Any:
    """`reference_step` for a sweep's plan (`sweeps.ablation.SweepPlan`), as an informative
    step on every core of the driver (the trials are over), a failure one line on stderr."""
    from regcore.runtime import available_cpus

    return safely(lambda: reference_step(
        tracking_uri, plan.experiment_id, plan.parent_run_id, plan.sweep_id, plan.base_config(),
        threads=available_cpus()), "reference step", prog)


def safely(step: Callable[[], Any], what: str, prog: str) -> Any:
    """Run an informative step; a failure is one line on stderr, not the end of the sweep."""
    try:
        return step()
    except tracking.TrackingUnreachableError:
        raise
    except Exception as error:  # noqa: BLE001 - informative steps never fail the sweep
        print(f"{prog}: {what} skipped: {type(error).__name__}: "
              f"{' '.join(str(error).split())[:300]}", file=sys.stderr)
        return None
