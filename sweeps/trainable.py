"""`regcore.train.train` as a Ray Tune function trainable that logs its own MLflow child run.

A trial's config is a flat dict: regcore's dotted config keys (`Config.from_flat`) plus the
sweep's own keys under `regablate.` (the group: `ablation` or `search`). What the trial needs
to reach MLflow (the tracking URI, which may carry credentials, and the parent run) comes in
a `SweepContext` through `tune.with_parameters`, so it is never written into Tune's
`params.json`/`result.json`.

Per epoch: the metrics go to MLflow (`step=epoch`) and to `tune.report`, with
`Checkpoint.from_directory(dir)` when train wrote a checkpoint. A retried trial, or one
continued by `--resume`, gets `tune.get_checkpoint()` and passes its directory to train as
`resume_from`; it reopens its own MLflow run (found by the trial-id tag) instead of creating a
second one.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune

from sweeps import tracking
from sweeps.space import GROUP_KEY

__all__ = ["SweepContext", "run_trial", "split_trial_config", "run_name", "RunCloser",
           "trial_params"]


@dataclass(frozen=True)
class SweepContext:
    """What every trial of a sweep shares (kept out of the trial config on purpose)."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    sweep_id: str
    #: variant (a cell of the study) -> its dotted overrides: the cell's factor levels, then
    #: `--set CELL:KEY=VALUE` (e.g. `--set regloss:train.nan_at_epoch=2`)
    variant_overrides: dict[str, dict[str, Any]] | None = None
    #: variant -> factor -> level name (the `regablate.factor.<name>` tags)
    factor_levels: dict[str, dict[str, str]] | None = None


def split_trial_config(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(regcore flat config, sweep keys under `regablate.`)."""
    meta = {k: v for k, v in config.items() if k.startswith(tracking.TAG)}
    flat = {k: v for k, v in config.items() if not k.startswith(tracking.TAG)}
    return flat, meta


def run_name(variant: str, seed: int, group: str, index: int | str) -> str:
    """`<variant>-s<seed>` for the ablation grid, `<variant>-search-<n>` for the weight search
    (`n` counts the search's trials from 1)."""
    if group == "search":
        return f"{variant}-search-{index}"
    return f"{variant}-s{seed}"


def trial_display_name(trial) -> str:
    """Tune's trial name: the MLflow run name, then `_<trial id>` (Tune's trial_name_creator).

    Tune's experiment tag starts with the trial's index: 1-based from a searcher (the weight
    search), which is the `n` of `<variant>-search-<n>`.
    """
    config = trial.config
    head = str(trial.experiment_tag).split("_", 1)[0]
    index = int(head) if head.isdigit() else trial.trial_id
    name = run_name(str(config.get("variant")), config.get("seed"),
                    str(config.get(GROUP_KEY, "ablation")), index)
    return f"{name}_{trial.trial_id}"


def _run_name_of(context, variant: str, seed: int, group: str, trial_id: str) -> str:
    name = context.get_trial_name()
    if name.endswith(f"_{trial_id}"):
        return name[: -len(trial_id) - 1]
    return run_name(variant, seed, group, trial_id)


def trial_params(cfg) -> dict[str, str]:
    """The run's params: the config in force (`Config.in_force`): the factors and learning
    rate written out, and 0 for every regularizer weight of a variant that applies none, so
    the MLflow UI never shows a weight the network was not trained with."""
    return tracking.flat_params(cfg.in_force().to_flat())


def _bool(value: bool) -> str:
    return "true" if value else "false"


def run_trial(config: dict[str, Any], ctx: SweepContext) -> None:
    """One trial: train the configured variant, log it to its MLflow child run."""
    entered = time.perf_counter()
    import regcore.train  # noqa: F401  (imported here: its cost is the trial's setup time)

    cfg, group = _trial_config(config, ctx)
    context = tune.get_context()
    trial_id = context.get_trial_id()
    client = tracking.client_for(ctx.tracking_uri)
    done = tracking.find_child(client, ctx.experiment_id, ctx.sweep_id, trial_id)
    if done is not None and done.info.status == "FINISHED":
        # Tune's experiment state is saved every few seconds: a driver killed right after a
        # trial finished may hand it out again. Its run says it is done: report, don't retrain.
        tune.report({**done.data.metrics, "regablate.replayed": 1.0})
        return
    run_id, _attempt = tracking.get_or_create_child(
        client, ctx.experiment_id, ctx.parent_run_id, ctx.sweep_id, trial_id,
        _run_name_of(context, cfg.variant, cfg.seed, group, trial_id),
        _trial_tags(cfg, group, context, done, ctx), trial_params(cfg), existing=done)
    if done is None:  # a new run: its data as an MLflow dataset input (once per run)
        from regcore.data import dataset_identity

        tracking.log_dataset(client, run_id, dataset_identity(cfg.data))

    checkpoint = tune.get_checkpoint()
    started = time.perf_counter()
    setup_s = started - entered  # imports, MLflow run: the trial's own orchestration cost
    report = _epoch_reporter(client, run_id, checkpoint, started, setup_s)
    out_dir = Path(context.get_trial_dir()) / "out"
    result = _train_logged(cfg, report, out_dir, checkpoint, client, run_id)
    _end_run(client, run_id, result, done, time.perf_counter() - started, setup_s)


def _trial_config(config: dict[str, Any], ctx: SweepContext):
    """(the trial's `Config` with its cell's overrides applied, its group)."""
    from regcore.config import Config

    flat, meta = split_trial_config(config)
    flat.update((ctx.variant_overrides or {}).get(str(flat.get("variant")), {}))
    return Config.from_flat(flat), str(meta.get(GROUP_KEY, "ablation"))


def _trial_tags(cfg, group: str, context, done, ctx: SweepContext) -> dict[str, str]:
    """The child run's tags: the variant and its factors, seed, group, where it runs."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    earlier_nodes = [n for n in (done.data.tags.get(f"{tracking.TAG}node_ids", "")
                                 if done is not None else "").split(",") if n]
    return {
        f"{tracking.TAG}variant": cfg.variant,
        f"{tracking.TAG}affine": _bool(cfg.affine),
        f"{tracking.TAG}regularize": _bool(cfg.regularize),
        f"{tracking.TAG}seed": str(cfg.seed),
        f"{tracking.TAG}group": group,
        f"{tracking.TAG}node_id": node_id,
        f"{tracking.TAG}node_ids": ",".join(dict.fromkeys(earlier_nodes + [node_id])),
        f"{tracking.TAG}host": socket.gethostname(),
        f"{tracking.TAG}pid": str(os.getpid()),
        f"{tracking.TAG}trial_name": context.get_trial_name(),
        **{f"{tracking.TAG}factor.{name}": level
           for name, level in (ctx.factor_levels or {}).get(cfg.variant, {}).items()},
    }


def _epoch_reporter(client, run_id: str, checkpoint, started: float, setup_s: float):
    """train's `report`: each epoch's metrics to MLflow (step = epoch) and to Tune."""
    first_report = [True]

    def report(metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        epoch = int(metrics.get("epoch", 0))
        extra_tags = {}
        if first_report[0] and checkpoint is not None:
            extra_tags[f"{tracking.TAG}resumed_from_epoch"] = str(max(epoch - 1, 0))
        first_report[0] = False
        tracking.log_metrics(client, run_id, metrics, step=epoch, tags=extra_tags)
        payload = dict(metrics)
        payload["trial.train_s"] = time.perf_counter() - started
        payload["trial.setup_s"] = setup_s
        if checkpoint_dir is not None:
            tune.report(payload, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir))
        else:
            tune.report(payload)

    return report


def _train_logged(cfg, report, out_dir: Path, checkpoint, client, run_id: str):
    """`regcore.train.train` (resumed from Tune's checkpoint if any); a failure or an early
    stop ends the MLflow run before it propagates."""
    from regcore.train import train

    try:
        if checkpoint is not None:
            with checkpoint.as_directory() as resume_dir:
                return train(cfg, report, out_dir=out_dir, resume_from=resume_dir)
        return train(cfg, report, out_dir=out_dir)
    except SystemExit:
        # Tune stops a trial (ASHA) by exiting its thread inside tune.report.
        client.set_tag(run_id, f"{tracking.TAG}stopped_early", "true")
        client.set_terminated(run_id, status="FINISHED")
        raise
    except tracking.TrackingUnreachableError:
        # the server stayed away past the retry budget: writing the error to it would wait as
        # long again; the run stays RUNNING and the driver closes it (RunCloser)
        raise
    except BaseException as error:
        message = " ".join(f"{type(error).__name__}: {error}".split())
        client.set_tag(run_id, f"{tracking.TAG}error", message[:4000])
        client.set_terminated(run_id, status="FAILED")
        raise


def _end_run(client, run_id: str, result, done, train_s: float, setup_s: float) -> None:
    """Artifacts, the closing metrics and tags, and FINISHED."""
    tracking.log_artifacts(client, run_id, [
        (Path(result.per_pair_path), None),
        (Path(result.example_path), None),
        *([(Path(result.checkpoint_dir), "checkpoint")] if result.checkpoint_dir else []),
    ])
    end_tags = {f"{tracking.TAG}device": str(getattr(result, "device", ""))}
    earlier = done.data.tags.get(f"{tracking.TAG}error") if done is not None else None
    if earlier is not None:  # an earlier attempt failed and this retry completed
        end_tags[f"{tracking.TAG}recovered_error"] = earlier
    tracking.log_metrics(client, run_id, {"trial.train_s": train_s, "trial.setup_s": setup_s},
                         step=int(result.metrics.get("epoch", 0)), tags=end_tags)
    with tracking.guard(client, "ending the run"):
        if earlier is not None:
            client.delete_tag(run_id, f"{tracking.TAG}error")
        client.set_terminated(run_id, status="FINISHED")


class RunCloser(tune.Callback):
    """Driver-side Tune callback: ends a trial's MLflow run that its trial could not end.

    A trial stopped early by ASHA, or one whose process died, leaves its run RUNNING. The
    tracking URI is a class attribute set by the driver at run time, so it is not pickled into
    Tune's experiment state (it may carry credentials).
    """

    tracking_uri: str | None = None

    def __init__(self, experiment_id: str, sweep_id: str) -> None:
        self.experiment_id = experiment_id
        self.sweep_id = sweep_id

    def _close(self, trial, status: str, note: str) -> None:
        uri = type(self).tracking_uri
        if uri is None:
            return
        client = tracking.client_for(uri)
        try:
            with tracking.guard(client, f"closing the run of trial {trial.trial_id}"):
                run = tracking.find_child(client, self.experiment_id, self.sweep_id,
                                          trial.trial_id)
                if run is not None and run.info.status == "RUNNING":
                    if note:
                        client.set_tag(run.info.run_id, f"{tracking.TAG}end_note", note)
                    client.set_terminated(run.info.run_id, status=status)
        except tracking.TrackingUnreachableError as error:
            # the sweep goes on; close_stale_children ends the run at the end of the sweep
            print(f"warning: {error}", file=sys.stderr)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._close(trial, "FINISHED", "stopped by the scheduler")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._close(trial, "FAILED", "trial errored")
