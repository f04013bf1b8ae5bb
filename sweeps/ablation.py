"""The ablation sweep: the study's 2x2 design x replicate seeds, plus a regularizer-weight search,
as Ray Tune runs tracked in MLflow, ending with a summary table and the report.

    python sweeps/ablation.py                       # quick preset, embedded cohort
    python sweeps/ablation.py --preset smoke        # tests and CI (about a minute)
    python sweeps/ablation.py --preset paper --data-dir /data/neurite-oasis --address auto
    python sweeps/ablation.py --resume              # continue the latest interrupted sweep

One sweep = two Tuners, one after the other (see sweeps/space.py): the ablation grid (FIFO)
and the Optuna/ASHA weight search. Both live under `<storage-path>/<sweep-id>/` with the
sweep's state (`sweep.json`: what was asked, the parent MLflow run); `--resume` reads it back.

Every mistake of the caller (unknown preset or variant, a negative weight, a missing data
directory, an unreachable tracking server, conflicting flags, a cluster without the resources
one trial asks for) is one line on stderr and exit code 2, before any run or file is created.
Every outside resource is probed first, each within a few seconds: the Ray cluster of
`--address` (sweeps/cluster.py: malformed, nothing listening, not answering as a Ray head
within 20 s), the tracking store (sweeps/tracking.py: server /health, a sqlite file that is no
MLflow database, a folder without write permission, a database port) and the data (every file).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import secrets
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from regcore.cli import ArgumentParser, UsageError, run_cli  # noqa: E402
from regcore.config import REGULARIZERS, Config, parse_sets  # noqa: E402
from regcore.study import Study, default_study, parse_study  # noqa: E402
from regcore.variants import BASELINE  # noqa: E402
from sweeps import tracking  # noqa: E402
from sweeps.presets import PRESETS, get_preset  # noqa: E402
from sweeps.study_files import DEFAULT_STUDY, load_study, shipped_studies  # noqa: E402

__all__ = ["main", "SweepPlan", "build_plan", "parse_args", "ui_url"]

PROG = "sweeps/ablation.py"
STATE_FILE = "sweep.json"
LATEST_FILE = "LATEST"
PARTS = ("ablation", "search")
PRIMARY_METRIC = "val.dice_mean"  # the live view's "best so far"


# -- the plan: what a sweep runs, saved for --resume ------------------------------------------
@dataclass
class SweepPlan:
    sweep_id: str
    preset: str
    variants: list[str]
    seeds: list[int]
    search_trials: int
    overrides: dict[str, Any]
    cpus_per_trial: float
    gpus_per_trial: float
    max_failures: int
    experiment: str
    tracking_uri: str  # redacted: never holds credentials
    search_metric: str = "val.dice_mean"
    search_mode: str = "max"
    variant_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    parent_run_id: str | None = None
    experiment_id: str | None = None
    created_utc: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    #: the study in its file schema (`Study.to_dict`); empty in sweeps made before studies
    study: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def study_spec(self) -> Study:
        """The parsed study (parsed once per plan; not a field, so not saved in sweep.json)."""
        return parse_study(self.study, "sweep.json") if self.study else default_study()

    @property
    def runs_search(self) -> bool:
        """Whether the weight search runs: trials asked for and a search cell in the sweep."""
        from sweeps.space import search_variants

        return self.search_trials > 0 and bool(search_variants(self.study_spec, self.variants))

    def cell_overrides(self) -> dict[str, dict[str, Any]]:
        """variant -> the dotted overrides of its study cell and of `--set VARIANT:KEY=...`."""
        spec = self.study_spec
        return {v: {**spec.overrides(v), **self.variant_overrides.get(v, {})}
                for v in self.variants}

    def common_config(self) -> Config:
        """The preset and the global `--set`s, before any cell's overrides: what a trial config
        carries (each trial applies its cell's overrides, sweeps.trainable)."""
        return Config.from_flat({**self.overrides, "variant": BASELINE, "seed": self.seeds[0]})

    def base_config(self, variant: str | None = None, seed: int | None = None) -> Config:
        """The config a trial of `variant` (default: the first) and `seed` trains with."""
        variant = variant or self.variants[0]
        flat = {**self.overrides, **self.cell_overrides()[variant]}
        flat["seed"] = self.seeds[0] if seed is None else seed
        return Config.from_flat(flat)

    @property
    def epochs(self) -> int:
        return self.base_config().train.epochs


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", help=f"one of {', '.join(PRESETS)} (default: quick, or paper "
                                    f"with --data-dir)")
    p.add_argument("--study", help=f"a study file (.yaml/.json) or the name of one shipped in "
                                   f"sweeps/studies/ ({', '.join(shipped_studies())}); "
                                   f"default {DEFAULT_STUDY}")
    p.add_argument("--epochs", type=int, help="train.epochs of every trial")
    p.add_argument("--seeds", type=int, help="number of replicate seeds (0..N-1)")
    p.add_argument("--seed-list", help="explicit replicate seeds, comma-separated")
    p.add_argument("--variants", help="comma-separated cells of the study (default: all)")
    p.add_argument("--search-trials", type=int, help="trials of the weight search (0 = none)")
    p.add_argument("--search-metric", help="metric the weight search optimises "
                                           "(default val.dice_mean)")
    p.add_argument("--search-mode", choices=("max", "min"), help="default max")
    p.add_argument("--shape", help="volume shape: N or D,H,W")
    p.add_argument("--data-dir", help="Neurite OASIS directory (default: the embedded cohort)")
    p.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                   help="any dotted regcore config key, e.g. --set loss.smooth_weight=0.02; "
                        "VARIANT:KEY=VALUE for one variant only, e.g. "
                        "--set regloss:train.nan_at_epoch=2")
    p.add_argument("--cpus-per-trial", type=float, help="CPUs per trial (= torch threads)")
    p.add_argument("--gpus-per-trial", type=float, help="GPUs per trial")
    p.add_argument("--max-failures", type=int, help="retries of a failed trial from its last "
                                                    "checkpoint")
    p.add_argument("--max-concurrent", type=int, default=0,
                   help="cap on concurrent trials (default: what the cluster holds)")
    p.add_argument("--experiment", help="MLflow experiment (default regablate)")
    p.add_argument("--tracking-uri", help=f"MLflow tracking URI (default "
                                          f"{tracking.DEFAULT_TRACKING_URI})")
    p.add_argument("--address", help="join a Ray cluster: auto or host:port")
    p.add_argument("--ray-num-cpus", type=int, default=None,
                   help="CPUs of the local Ray instance (default: all cores)")
    p.add_argument("--storage-path", default="ray_results",
                   help="Ray Tune storage (shared between nodes on a cluster)")
    p.add_argument("--sweep-id", help="name of the sweep (default: <preset>-<UTC time>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the sweep --sweep-id (default: the latest one)")
    p.add_argument("--report-dir", help="where the report goes (default reports/<sweep_id>)")
    p.add_argument("--no-report", action="store_true", help="skip the report")
    p.add_argument("--no-timing", action="store_true",
                   help="skip the controlled timing of the trained networks after the trials")
    p.add_argument("--no-reference", action="store_true",
                   help="skip the reference rows (identity, instance optimisation, truth)")
    p.add_argument("--quiet", action="store_true",
                   help="print only errors and the final summary (no live progress)")
    p.add_argument("--verbose", action="store_true",
                   help="show Ray's own output (status tables, trial output) on the terminal "
                        "too; it always goes to <storage-path>/<sweep-id>/ray.log")
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return _parser().parse_args(argv)


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{what} == {text!r}, expected comma-separated integers") from None
    if not values:
        raise ValueError(f"{what} == {text!r}, expected at least one integer")
    return values


def _shape(text: str) -> list[int]:
    values = _int_list(text, "--shape")
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise ValueError(f"--shape == {text!r}, expected N or D,H,W")
    return values


def _sets(items: list[str] | None, scoped: bool = False) -> dict[str, Any]:
    """`--set KEY=VALUE` (scoped=False) or `--set VARIANT:KEY=VALUE` (scoped=True, keyed
    `VARIANT:KEY`); a malformed item of either kind is an error."""
    parsed = parse_sets(items or [], expected="[VARIANT:]KEY=VALUE with a dotted config key")
    return {key: value for key, value in parsed.items() if (":" in key) == scoped}


def _variant_overrides(items: list[str] | None, variants: list[str],
                       study: Study) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, value in _sets(items, scoped=True).items():
        variant, _, dotted = key.partition(":")
        study.cell(variant)
        if variant not in variants:
            raise ValueError(f"--set {key}=...: variant {variant!r} is not in the sweep's "
                             f"variants {', '.join(variants)}")
        if dotted in ("variant", "seed"):
            raise UsageError(f"--set {key}=... is not allowed: use --variants / --seeds")
        out.setdefault(variant, {})[dotted] = value
    return out


def _explicit_fields(args: argparse.Namespace) -> dict[str, Any]:
    """Plan fields the command line sets explicitly (for the --resume conflict check)."""
    fields: dict[str, Any] = {}
    if args.preset is not None:
        fields["preset"] = args.preset
    if args.study is not None:
        fields["study"] = None
    if args.variants is not None:
        fields["variants"] = None
    if args.seeds is not None or args.seed_list is not None:
        fields["seeds"] = None
    for name in ("search_trials", "cpus_per_trial", "gpus_per_trial", "max_failures",
                 "experiment", "search_metric", "search_mode"):
        if getattr(args, name) is not None:
            fields[name] = None
    if args.epochs is not None:
        fields["overrides:train.epochs"] = None
    if args.shape is not None:
        fields["overrides:data.shape"] = None
    if args.data_dir is not None:
        fields["overrides:data.data_dir"] = None
    for key in _sets(args.set):
        fields[f"overrides:{key}"] = None
    if _sets(args.set, scoped=True):
        fields["variant_overrides"] = None
    return fields


def build_plan(args: argparse.Namespace, preset_name: str, cwd: Path) -> SweepPlan:
    """Preset + command line -> a validated plan (raises ValueError/UsageError on bad input)."""
    preset = get_preset(preset_name)
    study = load_study(args.study, cwd)
    variants = _plan_variants(args, study)
    seeds = _plan_seeds(args, preset, study)
    search_trials, cpus, gpus, max_failures = _plan_resources(args, preset)
    overrides = _plan_overrides(args, preset, study, cwd, cpus)
    # Validate every trial's config now, not in a worker: unknown keys, negative weights, ...
    per_variant = _variant_overrides(args.set, variants, study)
    for v in variants:
        Config.from_flat({**overrides, **study.overrides(v), **per_variant.get(v, {}),
                          "seed": seeds[0]})

    uri = args.tracking_uri or tracking.DEFAULT_TRACKING_URI
    return SweepPlan(
        sweep_id=args.sweep_id or "", preset=preset.name, variants=variants, seeds=seeds,
        search_trials=search_trials, overrides=overrides, cpus_per_trial=float(cpus),
        gpus_per_trial=float(gpus), max_failures=max_failures,
        experiment=args.experiment or "regablate",
        tracking_uri=tracking.redact_uri(tracking.resolve_tracking_uri(uri, cwd)),
        search_metric=args.search_metric or "val.dice_mean",
        search_mode=args.search_mode or "max", variant_overrides=per_variant,
        study=study.to_dict(),
    )


def _plan_variants(args: argparse.Namespace, study: Study) -> list[str]:
    """`--variants` (each a cell of the study, none repeated), else all the study's cells."""
    variants = [c.name for c in study.cells]
    if args.variants is not None:
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        if not variants:
            raise ValueError(f"--variants == {args.variants!r}, expected a comma-separated list")
        for v in variants:
            study.cell(v)
        if len(set(variants)) != len(variants):
            raise ValueError(f"--variants == {args.variants!r} repeats a variant")
    return variants


def _plan_seeds(args: argparse.Namespace, preset, study: Study) -> list[int]:
    """`--seeds N` or `--seed-list`, else the preset's, else the study's replicate seeds."""
    seeds = list(study.seeds if preset.seeds is None else preset.seeds)
    if args.seeds is not None and args.seed_list is not None:
        raise UsageError("--seeds and --seed-list conflict: pass one of them")
    if args.seeds is not None:
        if args.seeds < 1:
            raise ValueError(f"--seeds == {args.seeds}, must be >= 1")
        seeds = list(range(args.seeds))
    if args.seed_list is not None:
        seeds = _int_list(args.seed_list, "--seed-list")
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds == {seeds}, must be distinct integers >= 0")
    return seeds


def _plan_resources(args: argparse.Namespace, preset) -> tuple[int, float, float, int]:
    """(search trials, CPUs and GPUs per trial, retries), flags over the preset, checked."""
    search_trials = preset.search_trials if args.search_trials is None else args.search_trials
    if search_trials < 0:
        raise ValueError(f"--search-trials == {search_trials}, must be >= 0")
    cpus = preset.cpus_per_trial if args.cpus_per_trial is None else args.cpus_per_trial
    gpus = preset.gpus_per_trial if args.gpus_per_trial is None else args.gpus_per_trial
    if not cpus > 0:
        raise ValueError(f"--cpus-per-trial == {cpus:g}, must be > 0")
    if gpus < 0:
        raise ValueError(f"--gpus-per-trial == {gpus:g}, must be >= 0")
    max_failures = preset.max_failures if args.max_failures is None else args.max_failures
    if max_failures < 0:
        raise ValueError(f"--max-failures == {max_failures}, must be >= 0")
    if args.max_concurrent < 0:
        raise ValueError(f"--max-concurrent == {args.max_concurrent}, must be >= 0")
    return search_trials, cpus, gpus, max_failures


def _plan_overrides(args: argparse.Namespace, preset, study: Study, cwd: Path,
                    cpus: float) -> dict[str, Any]:
    """Every trial's dotted config overrides: the preset's, then the flags and `--set`."""
    overrides: dict[str, Any] = dict(preset.overrides)
    if args.epochs is not None:
        overrides["train.epochs"] = args.epochs
    if args.shape is not None:
        overrides["data.shape"] = _shape(args.shape)
    if args.data_dir is not None:
        overrides["data.data_dir"] = args.data_dir
    overrides.update(_sets(args.set))
    for key in ("variant", "seed"):
        if key in overrides:
            raise UsageError(f"--set {key}=... is not allowed: use --variants / --seeds")
    _check_factor_keys(study, _sets(args.set))
    _absolute_data_paths(overrides, preset, cwd)
    overrides.setdefault("train.num_threads", max(1, int(round(cpus))))
    return overrides


def _absolute_data_paths(overrides: dict[str, Any], preset, cwd: Path) -> None:
    """Make `data.data_dir` (checked to exist) and `data.embedded_dir` absolute, in place:
    trials run in their own working directories, and on other nodes."""
    data_dir = overrides.get("data.data_dir")
    if data_dir is not None:
        data_path = Path(str(data_dir)).expanduser()
        data_path = data_path if data_path.is_absolute() else cwd / data_path
        if not data_path.exists():  # a Neurite OASIS folder, or the study's list of .npy files
            raise FileNotFoundError(f"--data-dir {data_dir}: no such file or directory")
        overrides["data.data_dir"] = str(data_path.resolve())
    elif preset.requires_data_dir:
        raise UsageError(f"--preset {preset.name} needs --data-dir (the Neurite OASIS directory)")
    embedded = Path(str(overrides.get("data.embedded_dir", Config().data.embedded_dir)))
    overrides["data.embedded_dir"] = str(embedded if embedded.is_absolute() else cwd / embedded)


def _check_factor_keys(study: Study, sets: dict[str, Any]) -> None:
    """A global `--set` may not change what a factor's levels set: it would erase the factor."""
    for factor in study.factors:
        for level in factor.levels:
            for key in sets:
                if key in level.overrides:
                    raise UsageError(
                        f"--set {key}=... conflicts with level {level.name!r} of the study's "
                        f"factor {factor.name!r}, which sets it; change the study file, or set "
                        f"it for one cell with --set CELL:{key}=...")


def _new_sweep_id(preset: str) -> str:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{preset}-{stamp}-{secrets.token_hex(2)}"


def _load_state(storage: Path, sweep_id: str | None) -> SweepPlan:
    if sweep_id is None:
        latest = storage / LATEST_FILE
        if not latest.is_file():
            raise UsageError(f"--resume: no sweep to resume in {storage} (no {LATEST_FILE} file); "
                             f"pass --storage-path or --sweep-id")
        sweep_id = latest.read_text(encoding="utf-8").strip()
    state = storage / sweep_id / STATE_FILE
    if not state.is_file():
        raise UsageError(f"--resume: sweep {sweep_id!r} has no {STATE_FILE} in {storage}")
    data = json.loads(state.read_text(encoding="utf-8"))
    return SweepPlan(**data)


def _check_resume_conflicts(args: argparse.Namespace, stored: SweepPlan, cwd: Path) -> None:
    explicit = _explicit_fields(args)
    if "preset" in explicit and explicit["preset"] != stored.preset:
        raise UsageError(f"--resume: --preset {explicit['preset']} differs from the sweep's "
                         f"preset {stored.preset} ({stored.sweep_id})")
    asked = build_plan(args, stored.preset, cwd)
    if "study" in explicit and asked.study_spec != stored.study_spec:
        raise UsageError(f"--resume: --study {args.study} differs from the sweep's study "
                         f"{stored.study_spec.name} ({stored.sweep_id})")
    for name in explicit:
        if name in ("preset", "study"):
            continue
        if name.startswith("overrides:"):
            key = name.split(":", 1)[1]
            mine = asked.overrides.get(key)
            theirs = stored.overrides.get(key, Config.from_flat({}).to_flat().get(key))
        else:
            mine, theirs = getattr(asked, name), getattr(stored, name)
        if mine != theirs:
            label = name.split(":", 1)[-1]
            raise UsageError(f"--resume: {label} == {mine!r} differs from the sweep's "
                             f"{theirs!r} ({stored.sweep_id}); a resumed sweep keeps its plan")
    if args.tracking_uri is not None:
        uri = tracking.redact_uri(tracking.resolve_tracking_uri(args.tracking_uri, cwd))
        if uri != stored.tracking_uri:
            raise UsageError(f"--resume: --tracking-uri {uri} differs from the sweep's "
                             f"{stored.tracking_uri}")


# -- running ------------------------------------------------------------------------------
def _trial_dirname(trial) -> str:
    return trial.trial_id


def _reporter():
    from ray.tune import CLIReporter

    return CLIReporter(
        parameter_columns={"variant": "variant", "seed": "seed", "regablate.group": "group"},
        metric_columns={"epoch": "epoch", "train.loss_total": "loss",
                        "val.dice_mean": "val dice", "val.folding_pct": "val fold%",
                        "test.dice_mean": "test dice", "trial.train_s": "train s"},
        max_report_frequency=30, sort_by_metric=False)


def _fit(part: str, plan: SweepPlan, sweep_dir: Path, trainable, make_tuner) -> Any:
    from ray.tune import Tuner

    path = sweep_dir / part
    if Tuner.can_restore(str(path)):
        tuner = Tuner.restore(str(path), trainable=trainable, resume_unfinished=True,
                              resume_errored=True)
    else:
        tuner = make_tuner()
    return tuner.fit()


def _run_tuners(plan: SweepPlan, sweep_dir: Path, ctx, slots: int) -> dict[str, Any]:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from sweeps.progress import ProgressCallback
    from sweeps.space import ablation_space, search_space
    from sweeps.trainable import RunCloser, run_trial, trial_display_name

    resources = {"cpu": plan.cpus_per_trial}
    if plan.gpus_per_trial > 0:
        resources["gpu"] = plan.gpus_per_trial
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), resources)
    base = plan.common_config()

    def run_config(part: str):
        return tune.RunConfig(
            name=part, storage_path=str(sweep_dir),
            failure_config=tune.FailureConfig(max_failures=plan.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            callbacks=[RunCloser(ctx.experiment_id, ctx.sweep_id), ProgressCallback(part)],
            progress_reporter=_reporter(), verbose=1)

    results: dict[str, Any] = {}

    def ablation_tuner():
        return tune.Tuner(
            trainable, param_space=ablation_space(base, plan.variants, plan.seeds),
            tune_config=tune.TuneConfig(reuse_actors=True, max_concurrent_trials=slots,
                                        trial_name_creator=trial_display_name,
                                        trial_dirname_creator=_trial_dirname),
            run_config=run_config("ablation"))

    results["ablation"] = _fit("ablation", plan, sweep_dir, trainable, ablation_tuner)

    study = plan.study_spec
    if plan.runs_search:
        def search_tuner():
            import optuna

            configs = {v: plan.base_config(v) for v in plan.variants}
            space, points = search_space(base, configs, study, plan.seeds[0],
                                         plan.search_trials)
            sampler = optuna.samplers.TPESampler(
                seed=plan.seeds[0], n_startup_trials=max(1, plan.search_trials // 2))
            searcher = OptunaSearch(points_to_evaluate=points, sampler=sampler)
            # max_t one past the last epoch: at max_t ASHA stops the trial inside its last
            # report, before it could log its artifacts; trials end on their own there.
            scheduler = ASHAScheduler(time_attr="training_iteration", max_t=plan.epochs + 1,
                                      grace_period=1, reduction_factor=2)
            return tune.Tuner(
                trainable, param_space=space,
                tune_config=tune.TuneConfig(
                    metric=plan.search_metric, mode=plan.search_mode, search_alg=searcher,
                    scheduler=scheduler, num_samples=plan.search_trials,
                    max_concurrent_trials=slots, reuse_actors=True,
                    trial_name_creator=trial_display_name, trial_dirname_creator=_trial_dirname),
                run_config=run_config("search"))

        results["search"] = _fit("search", plan, sweep_dir, trainable, search_tuner)
    return results


def _trial_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for part, grid in results.items():
        for result in grid:
            config = result.config or {}
            trial_id = Path(str(result.path)).name if result.path else ""
            row = {"group": part, "trial_id": result.metrics.get("trial_id", trial_id),
                   "variant": config.get("variant"), "seed": config.get("seed"),
                   "status": "FAILED" if result.error else "FINISHED",
                   "error": _last_line(result.error)}
            row.update({k: v for k, v in result.metrics.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)})
            rows.append(row)
    return rows


def _last_line(error: BaseException | None) -> str:
    """The exception line of a Tune error (its text is a remote traceback)."""
    if error is None:
        return ""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:500]


SUMMARY_METRICS = ("test.dice_mean", "test.hd95_mm", "test.folding_pct", "test.sdlogj",
                   "test.dice_before_mean", "trial.train_s")


def summary_table(rows: list[dict[str, Any]]):
    """variant x (mean, sd over seeds) of the key test metrics, ablation trials only."""
    import pandas as pd

    frame = pd.DataFrame([r for r in rows if r["group"] == "ablation"])
    if frame.empty:
        return frame
    cols = [c for c in SUMMARY_METRICS if c in frame.columns]
    ok = frame[frame["status"] == "FINISHED"]
    counts = frame.groupby("variant")["status"].agg(
        trials="count", failed=lambda s: int((s == "FAILED").sum()))
    if not cols or ok.empty:
        return counts
    grouped = ok.groupby("variant")[cols]
    mean, sd = grouped.mean(), grouped.std()
    table = pd.DataFrame(index=mean.index)
    for col in cols:
        table[col.removeprefix("test.")] = [
            f"{m:.4g}" + ("" if sd_ != sd_ else f" ± {sd_:.2g}")  # sd is NaN for one seed
            for m, sd_ in zip(mean[col], sd[col])]
    return counts.join(table)


def _build_report(plan: SweepPlan, tracking_uri: str, out_dir: Path) -> Path:
    """The report of the parent run, in-process (`python -m analysis.report` does the same),
    then logged as the parent run's artifacts."""
    from analysis.report import build_report

    path = Path(build_report(tracking_uri=tracking_uri, parent_run_id=plan.parent_run_id,
                             experiment=plan.experiment, out_dir=out_dir))
    # the whole report folder (md, html, png figures, csv tables) as the parent run's
    # artifacts under report/, so the MLflow UI shows it beside the runs
    tracking.log_artifacts(tracking.client_for(tracking_uri), plan.parent_run_id,
                           [(path.parent, "report")])
    return path


def main(argv: Sequence[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    if args.quiet and args.verbose:
        raise UsageError("--quiet and --verbose conflict: pass one of them")
    cwd = Path.cwd()
    storage = Path(args.storage_path).expanduser()
    storage = (storage if storage.is_absolute() else cwd / storage).resolve()

    # 1. Validate everything before Ray starts or anything is written.
    if args.resume:
        plan = _load_state(storage, args.sweep_id)
        _check_resume_conflicts(args, plan, cwd)
        raw_uri = (tracking.resolve_tracking_uri(args.tracking_uri, cwd) if args.tracking_uri
                   else plan.tracking_uri)
    else:
        preset_name = args.preset or ("paper" if args.data_dir else "quick")
        plan = build_plan(args, preset_name, cwd)
        plan.sweep_id = args.sweep_id or _new_sweep_id(plan.preset)
        if (storage / plan.sweep_id).exists():
            raise UsageError(f"sweep {plan.sweep_id!r} already exists in {storage}: pass "
                             f"--resume to continue it, or another --sweep-id")
        raw_uri = tracking.resolve_tracking_uri(args.tracking_uri or
                                                tracking.DEFAULT_TRACKING_URI, cwd)
    # Every outside resource, each probed within a few seconds: the cluster, the store, data.
    from sweeps.cluster import check_address

    check_address(args.address)
    tracking.check_tracking_uri(raw_uri)
    if plan.overrides.get("data.data_dir") is not None:
        from regcore.data import check_data

        import tempfile

        # every file of the split, before Ray starts; a split it makes goes to a scratch
        # folder, so a failed check leaves the data folder as it was
        with tempfile.TemporaryDirectory(prefix="regablate-check-") as scratch:
            check_data(plan.base_config().data, split_dir=scratch)
    report_dir = Path(args.report_dir) if args.report_dir else cwd / "reports" / plan.sweep_id

    # 2. Ray, and the resources one trial asks for.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # CLIReporter with our metric columns
    # Tune snapshots its experiment state at most every 10 s by default; a driver killed in
    # between loses trial completions. A small sweep's state is tiny: snapshot often.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # the terminal shows the sweep's own lines: Ray's output goes to ray.log as it comes
    # (deduplicated lines would be flushed at ray.shutdown, after the summary), MLflow's
    # INFO lines ("Creating initial MLflow database tables...") are not shown
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    if args.address and "RAY_AUTH_MODE" not in os.environ and (
            Path.home() / ".ray" / "auth_token").exists():
        # A head started with ~/.ray/auth_token present enables token auth; a driver joining it
        # must say so (Ray reads the mode when it is imported).
        os.environ["RAY_AUTH_MODE"] = "token"
    import ray

    from sweeps.cluster import check_resources, start_ray

    joined = start_ray(args.address, args.ray_num_cpus)
    try:
        slots = check_resources(plan.cpus_per_trial, plan.gpus_per_trial)
        if args.max_concurrent:
            slots = min(slots, args.max_concurrent)
        return _run(plan, args, storage, raw_uri, report_dir, slots, started, joined)
    finally:
        ray.shutdown()


def _log_parent_dataset(plan: SweepPlan, raw_uri: str) -> None:
    """The sweep's data as a dataset input of the parent run too (once): the runs table shows
    the parent row collapsed over its trials, with its Dataset column filled."""
    from regcore.data import dataset_identity

    client = tracking.client_for(raw_uri)
    if not client.get_run(plan.parent_run_id).inputs.dataset_inputs:
        tracking.log_dataset(client, plan.parent_run_id,
                             dataset_identity(plan.common_config().data))


def ui_url(tracking_uri: str, experiment_id: str) -> str:
    """Where the MLflow UI shows the sweep's runs. MLflow 3.17's UI opens on its GenAI pages
    unless the address asks for model training (`workflowType`; the experiment's
    `mlflow.experimentKind` tag alone does not switch it)."""
    base = (tracking.redact_uri(tracking_uri).rstrip("/")
            if tracking_uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000")
    return f"{base}/#/experiments/{experiment_id}?workflowType=machine_learning"


def _trial_total(plan: SweepPlan) -> int:
    """How many trials the sweep runs: the ablation grid and the search's samples."""
    search = plan.search_trials if plan.runs_search else 0
    return len(plan.variants) * len(plan.seeds) + search


def _write_study(plan: SweepPlan, sweep_dir: Path) -> Path:
    """`study.json` (the study the sweep runs) in the sweep's folder; the analysis reads it from
    the parent run's artifacts."""
    from regcore.io import atomic_write_text

    sweep_dir.mkdir(parents=True, exist_ok=True)
    path = sweep_dir / "study.json"
    atomic_write_text(path, json.dumps(plan.study_spec.to_dict(), indent=2))
    return path


def _run(plan: SweepPlan, args: argparse.Namespace, storage: Path, raw_uri: str,
         report_dir: Path, slots: int, started: float, joined: str = "") -> int:
    from sweeps.progress import Console

    # 3. Data, the MLflow store (created once, here), the parent run, the sweep's state.
    console = Console(quiet=args.quiet)
    _open_sweep(plan, storage, raw_uri, slots, console)
    client = tracking.client_for(raw_uri)
    results, tune_s = _tune(plan, storage / plan.sweep_id, raw_uri, slots, client, console,
                            tee=args.verbose, joined=joined)
    rows = _trial_rows(results)
    outcome = {r["trial_id"]: (r["status"], r["error"]) for r in rows}
    tracking.close_stale_children(client, plan.experiment_id, plan.sweep_id, outcome)
    if not args.no_timing:
        from sweeps.after_trials import safely, timing_step

        resources = {"cpu": plan.cpus_per_trial, "gpu": plan.gpus_per_trial}
        safely(lambda: timing_step(raw_uri, plan.experiment_id, plan.sweep_id, resources),
               "timing step", PROG)
    if not args.no_reference:
        from sweeps.after_trials import reference_of_plan
        reference_of_plan(raw_uri, plan, PROG)
    # 4. Summary, Ray's overhead, the report.
    sweep_metrics = _print_summary(plan, rows, results, tune_s, slots)
    tracking.log_metrics(client, plan.parent_run_id, sweep_metrics, step=0)
    return _close_sweep(plan, args, client, raw_uri, report_dir, started)


def _open_sweep(plan: SweepPlan, storage: Path, raw_uri: str, slots: int, console) -> None:
    """The data, the experiment, the parent run (with study.json) and the sweep's state file."""
    from regcore.io import atomic_write_text

    if plan.overrides.get("data.data_dir") is None:
        from regcore.data import ensure_embedded

        ensure_embedded(plan.base_config().data)
    plan.experiment_id = tracking.ensure_experiment(raw_uri, plan.experiment)
    sweep_dir = storage / plan.sweep_id
    plan.parent_run_id = tracking.get_or_create_parent(
        raw_uri, plan.experiment_id, plan.sweep_id, plan.preset,
        {"sweep.variants": ",".join(plan.variants), "sweep.seeds": ",".join(map(str, plan.seeds)),
         "sweep.search_trials": plan.search_trials, "sweep.cpus_per_trial": plan.cpus_per_trial,
         "sweep.gpus_per_trial": plan.gpus_per_trial, "sweep.max_failures": plan.max_failures,
         "sweep.search_metric": plan.search_metric, "sweep.study": plan.study_spec.name,
         **{k: v for k, v in plan.common_config().to_flat().items()
            if k not in ("variant", "seed")}},
        run_id=plan.parent_run_id)
    _log_parent_dataset(plan, raw_uri)
    study_file = _write_study(plan, storage / plan.sweep_id)
    tracking.log_artifacts(tracking.client_for(raw_uri), plan.parent_run_id, [(study_file, None)])
    if not plan.created_utc:
        plan.created_utc = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    atomic_write_text(sweep_dir / STATE_FILE, json.dumps(asdict(plan), indent=2))
    atomic_write_text(storage / LATEST_FILE, plan.sweep_id + "\n")
    ray_log = sweep_dir / "ray.log"
    console.say(f"sweep {plan.sweep_id}: study {plan.study_spec.name}, preset {plan.preset}, "
                f"{len(plan.variants)} cells x {len(plan.seeds)} seeds + {plan.search_trials} "
                f"search trials, {slots} at a time; MLflow {plan.tracking_uri} experiment "
                f"{plan.experiment} parent run {plan.parent_run_id}; Ray's output: {ray_log}")


def _tune(plan: SweepPlan, sweep_dir: Path, raw_uri: str, slots: int, client, console, *,
          tee: bool, joined: str):
    """(the Tuners' results, seconds of Tune time); the parent run is FAILED if they raise."""
    from sweeps.progress import Progress, ProgressCallback, RayLog, View
    from sweeps.trainable import RunCloser, SweepContext

    ctx = SweepContext(tracking_uri=raw_uri, experiment_id=plan.experiment_id,
                       parent_run_id=plan.parent_run_id, sweep_id=plan.sweep_id,
                       variant_overrides=plan.cell_overrides(),
                       factor_levels={v: plan.study_spec.level_names(v) for v in plan.variants})
    RunCloser.tracking_uri = raw_uri
    if plan.search_trials > 0 and not plan.runs_search:
        console.say(f"{PROG}: none of {', '.join(plan.variants)} is a search cell of the study "
                    f"{plan.study_spec.name}: weight search skipped")
    tune_started = time.perf_counter()
    status = "FAILED"
    try:
        # Ray's status tables, checkpoint messages and the trials' output go to ray.log; the
        # terminal shows one live line (sweeps/progress.py)
        with RayLog(sweep_dir / "ray.log", tee=tee, preamble=joined) as redirected:
            console.stream = redirected.terminal
            ProgressCallback.view = view = View(
                Progress(_trial_total(plan), plan.epochs, metric=PRIMARY_METRIC,
                         started=time.monotonic()), console)
            try:
                results = _run_tuners(plan, sweep_dir, ctx, slots)
            finally:
                view.finish()
                ProgressCallback.view = None
                console.stream = sys.stdout
        status = "FINISHED"
    finally:
        tune_s = time.perf_counter() - tune_started
        if status == "FAILED":
            client.set_terminated(plan.parent_run_id, status="FAILED")
    return results, tune_s


def _print_summary(plan: SweepPlan, rows: list[dict], results, tune_s: float,
                   slots: int) -> dict[str, float]:
    """Print the summary table, Ray's overhead, the best search trial and the failures; the
    sweep's own metrics."""
    import pandas as pd

    train_s = sum(float(r.get("trial.train_s", 0.0) or 0.0) for r in rows)
    setup_s = sum(float(r.get("trial.setup_s", 0.0) or 0.0) for r in rows)
    busy_pct = 100.0 * train_s / (slots * tune_s) if tune_s > 0 else float("nan")
    per_trial_overhead_s = (slots * tune_s - train_s) / max(len(rows), 1)
    failed = [r for r in rows if r["status"] == "FAILED"]
    with pd.option_context("display.width", 200, "display.max_columns", 30,
                           "display.float_format", "{:.4g}".format):
        print("\nablation summary (mean and sd over seeds):")
        print(summary_table(rows).to_string())
    print(f"\n{len(rows)} trials ({len(failed)} FAILED) in {tune_s:.1f} s of Tune time with "
          f"{slots} slot(s); the trials trained for {train_s:.1f} s in all: slots busy "
          f"{busy_pct:.1f} %, overhead {per_trial_overhead_s:.1f} s per trial (of which "
          f"{setup_s / max(len(rows), 1):.1f} s imports and MLflow set-up inside the trial)")
    best = _best_search_line(plan, rows, results)
    if best is not None:
        print(best)
    for r in failed:
        print(f"FAILED {r['group']} {r['variant']}-s{r['seed']} ({r['trial_id']}): {r['error']}")
    return {"sweep.trials": len(rows), "sweep.failed": len(failed), "sweep.tune_s": tune_s,
            "sweep.trials_train_s": train_s, "sweep.trials_setup_s": setup_s,
            "sweep.slots": slots, "sweep.busy_pct": busy_pct,
            "sweep.overhead_per_trial_s": per_trial_overhead_s}


def _best_search_line(plan: SweepPlan, rows: list[dict], results) -> str | None:
    """'best weight-search trial (...): variant, weights', or None without a finished one."""
    searched = [r for r in rows if r["group"] == "search" and r["status"] == "FINISHED"
                and isinstance(r.get(plan.search_metric), float)
                and r[plan.search_metric] == r[plan.search_metric]]
    if not searched:
        return None
    pick = max if plan.search_mode == "max" else min
    best = pick(searched, key=lambda r: r[plan.search_metric])
    config = next(g for g in results["search"] if not g.error and (g.config or {}).get(
        "variant") == best["variant"] and g.metrics.get("trial_id") == best["trial_id"]).config
    weights = ", ".join(f"{k.split('.')[1].removesuffix('_weight')} {config[k]:.3g}"
                        for k in sorted(config) if k.startswith("loss.")
                        and k.endswith("_weight") and k.split(".")[1].removesuffix("_weight")
                        in REGULARIZERS)
    return (f"best weight-search trial ({plan.search_metric} {best[plan.search_metric]:.4g}): "
            f"{best['variant']}, {weights}")


def _close_sweep(plan: SweepPlan, args: argparse.Namespace, client, raw_uri: str,
                 report_dir: Path, started: float) -> int:
    """The report (unless --no-report), the wall time, the parent run FINISHED; exit code."""
    report_path, code = None, 0
    if not args.no_report:
        try:
            report_path = _build_report(plan, raw_uri, report_dir)
        except ValueError as error:  # e.g. every trial failed: the sweep itself is recorded
            print(f"{PROG}: report not written: {' '.join(str(error).split())}", file=sys.stderr)
            code = 1
    wall_s = time.perf_counter() - started
    tracking.log_metrics(client, plan.parent_run_id, {"sweep.wall_s": wall_s}, step=0)
    client.set_terminated(plan.parent_run_id, status="FINISHED")
    print(f"sweep {plan.sweep_id} done in {wall_s:.1f} s; parent run {plan.parent_run_id}")
    if report_path is not None:
        print(f"report: {report_path}")
    hint = ("" if raw_uri.startswith(("http://", "https://")) else
            f" (after `mlflow ui --backend-store-uri {plan.tracking_uri}`)")
    print(f"MLflow UI: {ui_url(raw_uri, plan.experiment_id)}{hint}")
    return code

if __name__ == "__main__":
    run_cli(main, prog=PROG)
