"""Read one sweep from MLflow into tidy pandas tables.

The layout (written by `sweeps`) is the one of docs/ARCHITECTURE.md: a parent run per sweep
(tag `regablate.role=sweep`, artifact `study.json`: the study it ran, `regcore.study`; a sweep
without one ran the original 2x2), a child run per trial (tags `mlflow.parentRunId`,
`regablate.trial_id`, `regablate.variant`, `regablate.factor.<name>` = the level of each factor,
`regablate.seed`, `regablate.group`), the flat config as string params, per-epoch and `test.*`
metrics, and the artifacts `per_pair.csv` and `example.npz`.

`load_sweep` returns a `Sweep` with
- `trials`: one row per trial (de-duplicated by trial id, the FINISHED run kept, so a resumed
  sweep counts each trial once): `run_id`, `run_name`, `trial_id`, `variant`, `label`,
  `affine`, `regularize` (bool), `seed` (int), `group`, `status`, `error`, `end_note`,
  `stopped_early` (bool), `start_time`, `end_time`,
  `train_epoch_s_mean`, the typed config as `cfg.<dotted key>`, and the last value of every
  metric under its own name (`test.dice_mean`, `train.loss_total`, ...);
- `per_pair`: one row per finished trial x test pair, the columns of `per_pair.csv` plus
  `pair_id` (`moving->fixed`, the subject key matched across variants) and the trial columns
  `run_id`, `trial_id`, `variant`, `seed`, `group`, the factor columns, and the metrics of
  the network measured by the sweep's timing step (`timing.<name>` metrics of the trial's run)
  as `timing_<name>` columns (one value per network, repeated on its pairs);
- `references`: the reference methods on the same test pairs (a child run tagged
  `regablate.role=reference` with `reference.csv`): `method` (`identity`,
  `instance_optimisation`, `ground_truth`), `pair_id` and the per-pair columns; empty when the
  sweep logged none.
"""

from __future__ import annotations

import ast
import contextlib
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

from regcore.config import Config
from regcore.study import Study, default_study, parse_study

__all__ = ["Sweep", "load_sweep", "connect", "find_parent_run", "fetch_example", "parse_param"]

ROLE_TAG = "regablate.role"
FACTOR_TAG = "regablate.factor."
STUDY_FILE = "study.json"
FINISHED = "FINISHED"
TRIAL_KEYS = ("run_id", "trial_id", "variant", "seed", "group")


@dataclass
class Sweep:
    """One sweep read from MLflow (see the module docstring for the tables' columns)."""

    tracking_uri: str
    experiment_name: str
    experiment_id: str
    parent_run_id: str
    parent_tags: dict[str, str]
    trials: pd.DataFrame
    per_pair: pd.DataFrame
    duplicates_dropped: int = 0
    problems: list[str] = field(default_factory=list)
    references: pd.DataFrame = field(default_factory=pd.DataFrame)
    parent_params: dict[str, str] = field(default_factory=dict)
    study: Study = field(default_factory=default_study)

    @property
    def finished(self) -> pd.DataFrame:
        return self.trials[self.trials["status"] == FINISHED]

    @property
    def unfinished(self) -> pd.DataFrame:
        return self.trials[self.trials["status"] != FINISHED]

    @property
    def preset(self) -> str:
        return self.parent_tags.get("regablate.preset", "unknown")


# -- the tracking store ---------------------------------------------------------------------


_CLIENT_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",  # a down server fails at once, not after minutes
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # one bar per artifact floods stderr
}


@contextlib.contextmanager
def _client_env() -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in _CLIENT_ENV}
    os.environ.update(_CLIENT_ENV)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _local_store_path(tracking_uri: str) -> Path | None:
    """The file or folder behind a local tracking URI (None for servers)."""
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri[len("sqlite:///"):])
    if tracking_uri.startswith("file://"):
        return Path(tracking_uri[len("file://"):])
    if tracking_uri.startswith("databricks"):
        return None
    if "://" not in tracking_uri and ":" not in tracking_uri.split("/")[0]:
        return Path(tracking_uri)
    return None


def connect(tracking_uri: str):
    """An `MlflowClient` on a store that exists and answers; else a one-line ValueError.

    A local store that does not exist is an error: MLflow would silently create an empty one.
    """
    from mlflow.tracking import MlflowClient

    if not isinstance(tracking_uri, str) or not tracking_uri:
        raise ValueError(f"tracking_uri == {tracking_uri!r}, expected a URI such as "
                         "'sqlite:///mlflow.db' or 'http://host:5000'")
    path = _local_store_path(tracking_uri)
    if path is not None and not path.exists():
        raise ValueError(f"tracking store {tracking_uri!r} is unreachable: {path} does not exist")
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        with _client_env():
            client.search_experiments(max_results=1)
    except Exception as error:  # any failure to answer means the store is unusable
        message = " ".join(str(error).split())[:200]
        raise ValueError(f"tracking store {tracking_uri!r} is unreachable: {message}") from None
    return client


def _search_all(client, experiment_ids: list[str], filter_string: str,
                order_by: list[str] | None = None) -> list:
    runs: list = []
    token = None
    while True:
        page = client.search_runs(experiment_ids, filter_string, max_results=1000,
                                  order_by=order_by, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def find_parent_run(client, parent_run_id: str | None = None, experiment: str | None = None):
    """The sweep's parent run: by id, else the latest sweep of `experiment`, else the latest."""
    from mlflow.exceptions import MlflowException

    if parent_run_id is not None:
        try:
            run = client.get_run(parent_run_id)
        except MlflowException:
            raise ValueError(f"parent run {parent_run_id!r} not found in the tracking store"
                             ) from None
        role = run.data.tags.get(ROLE_TAG)
        if role != "sweep":
            raise ValueError(f"run {parent_run_id!r} is not a regablate sweep "
                             f"(tag {ROLE_TAG} == {role!r}, expected 'sweep')")
        if experiment is not None:
            exp = client.get_experiment(run.info.experiment_id)
            if exp.name != experiment:
                raise ValueError(f"parent run {parent_run_id!r} belongs to experiment "
                                 f"{exp.name!r}, not {experiment!r}")
        return run
    sweep_filter = f"tags.`{ROLE_TAG}` = 'sweep'"
    latest = ["attributes.start_time DESC"]
    if experiment is not None:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            names = [e.name for e in client.search_experiments()]
            raise ValueError(f"experiment {experiment!r} not found, expected one of "
                             f"{', '.join(map(repr, names)) or '(none)'}")
        runs = client.search_runs([exp.experiment_id], sweep_filter, max_results=1,
                                  order_by=latest)
        if runs:
            return runs[0]
        if not client.search_runs([exp.experiment_id], "", max_results=1):
            raise ValueError(f"experiment {experiment!r} is empty: it holds no runs")
        raise ValueError(f"experiment {experiment!r} holds no regablate sweep "
                         f"(no run tagged {ROLE_TAG}=sweep): it is not a regablate experiment")
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exp_ids, sweep_filter, max_results=1, order_by=latest) \
        if exp_ids else []
    if not runs:
        raise ValueError(f"the tracking store holds no regablate sweep "
                         f"(no run tagged {ROLE_TAG}=sweep)")
    return runs[0]


# -- params ---------------------------------------------------------------------------------


def parse_param(text: str) -> Any:
    """Undo MLflow's `str(value)`: numbers, booleans, None, lists; other text stays text."""
    stripped = text.strip()
    if stripped in ("None", "none", "null"):
        return None
    if stripped in ("True", "true"):
        return True
    if stripped in ("False", "false"):
        return False
    try:
        value = ast.literal_eval(stripped)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text
    if isinstance(value, list):
        return tuple(value)
    return value if isinstance(value, (int, float, tuple, str)) else text


def _typed_params(params: dict[str, str]) -> dict[str, Any]:
    """The config params typed (validated by `Config.from_flat` when they form a config)."""
    parsed = {key: parse_param(value) for key, value in params.items()}
    try:
        flat = Config.from_flat(parsed).to_flat()
        typed = {key: flat[key] for key in parsed if key in flat}
        parsed.update({k: tuple(v) if isinstance(v, list) else v for k, v in typed.items()})
    except (ValueError, TypeError):
        pass  # extra keys (logged by the sweep) or an older config: keep the parsed values
    return parsed


# -- trials ---------------------------------------------------------------------------------


def _as_bool(text: str | None, fallback: bool) -> bool:
    if text is None:
        return fallback
    return str(text).strip().lower() in ("true", "1", "yes")


def _factor_levels(tags: dict[str, str], variant: str, study: Study) -> dict[str, bool]:
    """factor -> True at its second level: from the `regablate.factor.<name>` tags, else the
    cell of that name in the study, else the older `regablate.<name>` true/false tags."""
    cells = {c.name: c for c in study.cells}
    levels = {}
    for i, factor in enumerate(study.factors):
        tag = tags.get(f"{FACTOR_TAG}{factor.name}")
        if tag is not None:
            levels[factor.name] = tag == factor.levels[1].name
        elif variant in cells:
            levels[factor.name] = bool(cells[variant].levels[i])
        else:
            levels[factor.name] = _as_bool(tags.get(f"regablate.{factor.name}"), False)
    return levels


def _trial_row(run, study: Study) -> dict[str, Any]:
    tags = run.data.tags
    variant = tags.get("regablate.variant") or run.data.params.get("variant", "unknown")
    labels = {c.name: c.label for c in study.cells}
    seed_text = tags.get("regablate.seed", run.data.params.get("seed"))
    row: dict[str, Any] = {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name,
        "trial_id": tags.get("regablate.trial_id", run.info.run_id),
        "variant": variant,
        "label": labels.get(variant, variant),
        **_factor_levels(tags, variant, study),
        "seed": int(seed_text) if seed_text not in (None, "", "None") else -1,
        "group": tags.get("regablate.group", "ablation"),
        "status": run.info.status,
        "error": tags.get("regablate.error", ""),
        "end_note": tags.get("regablate.end_note", ""),
        "stopped_early": _as_bool(tags.get("regablate.stopped_early"), False),
        "start_time": pd.to_datetime(run.info.start_time, unit="ms", utc=True),
        "end_time": (pd.to_datetime(run.info.end_time, unit="ms", utc=True)
                     if run.info.end_time else pd.NaT),
    }
    row.update({f"cfg.{k}": v for k, v in _typed_params(run.data.params).items()})
    row.update({k: _unclamped(v) for k, v in run.data.metrics.items()})
    return row


def _unclamped(value: float) -> float:
    # MLflow's SQL store keeps +-inf (an HD95 whose structure vanished) as +-DBL_MAX
    return math.copysign(math.inf, value) if abs(value) == sys.float_info.max else value


def _deduplicate(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per trial id: the FINISHED run if any, else the latest one."""
    ranked = trials.assign(
        _finished=(trials["status"] == FINISHED).astype(int),
        _start=trials["start_time"].astype("int64"),
    ).sort_values(["_finished", "_start"], ascending=False, kind="stable")
    kept = ranked.drop_duplicates("trial_id", keep="first")
    return kept.drop(columns=["_finished", "_start"]).sort_values(
        ["group", "variant", "seed", "trial_id"], kind="stable").reset_index(drop=True)


def _epoch_time(client, run_id: str) -> float:
    history = client.get_metric_history(run_id, "train.epoch_s")
    values = [m.value for m in history]
    return float(sum(values) / len(values)) if values else float("nan")


def _read_study(client, parent, problems: list[str]) -> Study:
    """The study the sweep ran (`study.json` of the parent run), else the original 2x2."""
    names = {Path(a.path).name for a in client.list_artifacts(parent.info.run_id)}
    if STUDY_FILE not in names:
        return default_study()
    with tempfile.TemporaryDirectory(prefix="regablate-study-") as tmp:
        try:
            local = client.download_artifacts(parent.info.run_id, STUDY_FILE, tmp)
            return parse_study(json.loads(Path(local).read_text(encoding="utf-8")), STUDY_FILE)
        except (ValueError, OSError) as error:
            problems.append(f"{STUDY_FILE} of the parent run unreadable, the original 2x2 "
                            f"assumed: {' '.join(str(error).split())[:200]}")
            return default_study()


def _read_per_pair(client, trial: pd.Series, dst: Path, keys: tuple[str, ...]) -> pd.DataFrame:
    local = client.download_artifacts(trial["run_id"], "per_pair.csv", str(dst))
    table = pd.read_csv(local)
    missing = {"moving", "fixed"} - set(table.columns)
    if missing:
        raise ValueError(f"per_pair.csv of run {trial['run_id']} lacks the columns "
                         f"{sorted(missing)}")
    table.insert(0, "pair_id", table["moving"].astype(str) + "->" + table["fixed"].astype(str))
    for i, key in enumerate(keys):
        table.insert(i, key, trial[key])
    return table


def load_sweep(tracking_uri: str, parent_run_id: str | None = None,
               experiment: str | None = None) -> Sweep:
    """Read one sweep (by parent run id, else the latest of `experiment`, else the latest).

    Raises a one-line ValueError when the store is unreachable, the parent run or the
    experiment does not exist, the experiment is empty or not a regablate experiment, or no
    trial finished.
    """
    with _client_env():
        return _load_sweep(tracking_uri, parent_run_id, experiment)


def _load_sweep(tracking_uri: str, parent_run_id: str | None,
                experiment: str | None) -> Sweep:
    client = connect(tracking_uri)
    parent = find_parent_run(client, parent_run_id, experiment)
    pid = parent.info.run_id
    exp = client.get_experiment(parent.info.experiment_id)
    children = _search_all(client, [exp.experiment_id], f"tags.mlflow.parentRunId = '{pid}'")
    runs = [r for r in children if r.data.tags.get(ROLE_TAG, "trial") == "trial"]
    references = [r for r in children if r.data.tags.get(ROLE_TAG) == "reference"]
    if not runs:
        raise ValueError(f"sweep {pid!r} (experiment {exp.name!r}) has no trial runs")
    problems: list[str] = []
    study = _read_study(client, parent, problems)
    raw = pd.DataFrame([_trial_row(r, study) for r in runs])
    trials = _deduplicate(raw)
    if not (trials["status"] == FINISHED).any():
        counts = trials["status"].value_counts().to_dict()
        raise ValueError(f"sweep {pid!r} has no finished trials (statuses: {counts})")
    keys = (*TRIAL_KEYS, *study.factor_names)
    tables = []
    with tempfile.TemporaryDirectory(prefix="regablate-runs-") as tmp:
        for i, (_, trial) in enumerate(trials[trials["status"] == FINISHED].iterrows()):
            try:
                tables.append(_read_per_pair(client, trial, Path(tmp) / str(i), keys))
            except Exception as error:  # a trial without its table is reported, not fatal
                if trial["stopped_early"]:
                    continue  # stopped by the scheduler before its test evaluation
                problems.append(f"trial {trial['trial_id']} ({trial['variant']}, seed "
                                f"{trial['seed']}): per_pair.csv unreadable: "
                                f"{' '.join(str(error).split())[:160]}")
    trials["train_epoch_s_mean"] = [
        _epoch_time(client, rid) if status == FINISHED else float("nan")
        for rid, status in zip(trials["run_id"], trials["status"])
    ]
    per_pair = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(
        columns=[*keys, "pair_id", "moving", "fixed"])
    per_pair = _with_network_metrics(per_pair, trials)
    reference_table = _read_references(client, references, problems)
    return Sweep(
        tracking_uri=tracking_uri,
        experiment_name=exp.name,
        experiment_id=exp.experiment_id,
        parent_run_id=pid,
        parent_tags=dict(parent.data.tags),
        trials=trials,
        per_pair=per_pair,
        duplicates_dropped=len(raw) - len(trials),
        problems=problems,
        references=reference_table,
        parent_params=dict(parent.data.params),
        study=study,
    )


TIMING_PREFIX = "timing."


def _with_network_metrics(per_pair: pd.DataFrame, trials: pd.DataFrame) -> pd.DataFrame:
    """`timing.<name>` metrics of each trial's run as `timing_<name>` columns of its pairs."""
    names = [c for c in trials.columns if str(c).startswith(TIMING_PREFIX)]
    if not names or per_pair.empty:
        return per_pair
    table = trials[["run_id", *names]].rename(
        columns={n: n.replace(".", "_", 1) for n in names})
    return per_pair.merge(table, on="run_id", how="left")


def _read_references(client, runs: list, problems: list[str]) -> pd.DataFrame:
    """The reference rows of the newest FINISHED reference run (empty when there is none)."""
    done = sorted((r for r in runs if r.info.status == FINISHED),
                  key=lambda r: r.info.start_time, reverse=True)
    if not done:
        return pd.DataFrame()
    run = done[0]
    with tempfile.TemporaryDirectory(prefix="regablate-ref-") as tmp:
        try:
            table = pd.read_csv(client.download_artifacts(run.info.run_id, "reference.csv", tmp))
        except Exception as error:  # noqa: BLE001 - reported, the report goes on without it
            problems.append(f"reference run {run.info.run_id}: reference.csv unreadable: "
                            f"{' '.join(str(error).split())[:160]}")
            return pd.DataFrame()
    missing = {"method", "moving", "fixed"} - set(table.columns)
    if missing:
        problems.append(f"reference run {run.info.run_id}: reference.csv lacks {sorted(missing)}")
        return pd.DataFrame()
    table.insert(1, "pair_id", table["moving"].astype(str) + "->" + table["fixed"].astype(str))
    return table


def fetch_example(sweep: Sweep, dst_dir: str | os.PathLike,
                  prefer: tuple[str, ...] = ("combined_enhanced", "regloss", "combined_basic",
                                             "baseline")) -> tuple[Path, pd.Series] | None:
    """Download the `example.npz` of one finished ablation trial (preferring the first variant
    of `prefer` that has one, lowest seed first): `(path, trial row)`, or None when no trial
    logged one."""
    from mlflow.tracking import MlflowClient

    with _client_env():
        return _fetch_example(MlflowClient(tracking_uri=sweep.tracking_uri), sweep, dst_dir,
                              prefer)


def _fetch_example(client, sweep: Sweep, dst_dir, prefer) -> tuple[Path, pd.Series] | None:
    finished = sweep.finished
    order = {v: i for i, v in enumerate(prefer)}
    candidates = finished.assign(
        _rank=finished["variant"].map(lambda v: order.get(v, len(order))),
        _search=(finished["group"] != "ablation").astype(int),
    ).sort_values(["_search", "_rank", "seed"], kind="stable")
    for _, trial in candidates.iterrows():
        try:
            names = {Path(a.path).name for a in client.list_artifacts(trial["run_id"])}
            if "example.npz" not in names:
                continue
            path = client.download_artifacts(trial["run_id"], "example.npz", str(dst_dir))
            return Path(path), trial
        except Exception:  # noqa: BLE001 - try the next trial
            continue
    return None
