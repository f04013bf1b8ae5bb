"""MLflow layout of a sweep (docs/ARCHITECTURE.md, "MLflow layout"), written by our own code.

Ray's `MLflowLoggerCallback` has no parent run and opens a second run for every trial resumed
by `Tuner.restore`, so the sweep logs itself:

- the driver creates the store and the experiment once, before any trial starts (several
  processes creating a fresh sqlite database at once corrupt its schema migration), and one
  parent run per sweep;
- each trial finds its child run by the tags `regablate.sweep_id` + `regablate.trial_id` and
  reuses it after a retry or a resumed sweep, or creates it; it logs params once, metrics per
  epoch with `step=epoch`, artifacts at the end, and ends the run FINISHED or FAILED;
- the driver closes whatever a killed trial left RUNNING (`close_stale_children`).

Tracking URIs may carry `user:password@`; `redact_uri` strips them before a URI is written
anywhere (tags, params, sweep state, messages).

A tracking server that is unreachable for a while is ridden out by MLflow's own REST client
with an explicit retry budget (`HTTP_RETRY_ENV`, set by `client_for` where the operator has
not); past it a call fails with `TrackingUnreachableError`, one line naming the redacted
server. The arithmetic and the limits: docs/DEPLOYMENT.md, "Tracking-server outages".
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterable

from regcore.uris import DEFAULT_TRACKING_URI, redact_uri  # re-exported: sweeps' callers use them

__all__ = [
    "DEFAULT_TRACKING_URI",
    "redact_uri",
    "resolve_tracking_uri",
    "check_tracking_uri",
    "is_local_sqlite",
    "ensure_experiment",
    "log_dataset",
    "EXPERIMENT_KIND_TAG",
    "EXPERIMENT_KIND",
    "client_for",
    "get_or_create_parent",
    "find_child",
    "get_or_create_child",
    "log_metrics",
    "children_of",
    "close_stale_children",
    "flat_params",
    "TAG",
    "HTTP_RETRY_ENV",
    "RETRY_BUDGET_S",
    "TrackingUnreachableError",
    "configure_http_retries",
    "guard",
]

TAG = "regablate."
#: MLflow 3's UI opens an experiment of this kind on its training runs (not the GenAI overview).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
_HTTP_TIMEOUT_S = 3.0

#: MLflow's REST client settings for every process of a sweep (see the module docstring).
HTTP_RETRY_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "6",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "1.0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
#: Seconds between a call's first and last attempt with HTTP_RETRY_ENV, jitter left out:
#: urllib3 2 waits 0 s before the first retry, then factor * 2 ** (n - 1) before the n-th.
RETRY_BUDGET_S = sum(0 if n == 1 else 2 * 2 ** (n - 1) for n in range(1, 7))  # 124


class TrackingUnreachableError(RuntimeError):
    """The tracking server did not answer within the retry budget."""


def configure_http_retries() -> None:
    """Put HTTP_RETRY_ENV into os.environ where unset (MLflow reads it at every request)."""
    for key, value in HTTP_RETRY_ENV.items():
        os.environ.setdefault(key, value)


def _is_unreachable(error: BaseException) -> bool:
    """True when `error` (or what it was raised from) is a connection failure or time-out of
    the HTTP client, i.e. retries ran out, not an answer of the server."""
    import requests

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                              requests.exceptions.RetryError)):
            return True
        if "Max retries exceeded" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


class guard:
    """Turn a retries-exhausted MLflow error of `client` into TrackingUnreachableError."""

    def __init__(self, client, what: str) -> None:
        self.client, self.what = client, what

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb) -> bool:
        if isinstance(error, TrackingUnreachableError):  # from a nested guard
            return False
        if error is not None and isinstance(error, Exception) and _is_unreachable(error):
            uri = redact_uri(str(getattr(self.client, "tracking_uri", "?")))
            budget = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "?")
            raise TrackingUnreachableError(
                f"tracking server {uri} unreachable while {self.what}: gave up after "
                f"{budget} retries (MLFLOW_HTTP_REQUEST_MAX_RETRIES; ~{RETRY_BUDGET_S} s with "
                f"the sweep's defaults), last error {type(error).__name__}") from None
        return False


def is_local_sqlite(uri: str) -> bool:
    return uri.startswith("sqlite:///")


def resolve_tracking_uri(uri: str, cwd: Path | None = None) -> str:
    """Make a relative sqlite path absolute: trials run in other working directories."""
    if is_local_sqlite(uri):
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.is_absolute():
            path = (cwd or Path.cwd()) / path
        return f"sqlite:///{path.resolve()}"
    return uri


_DB_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}
_SQLITE_MAGIC = b"SQLite format 3\x00"


def check_tracking_uri(uri: str) -> None:
    """Fail fast (one line: ValueError, FileNotFoundError, PermissionError) when the tracking
    store cannot be used; every probe is bounded (a few seconds) and nothing is created.

    - http(s): the server's `/health` must answer 200 within `_HTTP_TIMEOUT_S`;
    - sqlite: the folder must exist and be writable; an existing file must be an SQLite
      database holding an MLflow store (or no table yet);
    - postgresql/mysql/mssql: the server's port must accept a connection;
    - any other scheme is refused.
    """
    parts = urllib.parse.urlsplit(uri)
    scheme = parts.scheme
    if scheme in ("http", "https"):
        _check_server(uri, parts)
    elif is_local_sqlite(uri):
        _check_sqlite(uri, Path(uri.removeprefix("sqlite:///")))
    elif scheme.split("+")[0] in _DB_PORTS:
        from sweeps.cluster import probe_tcp

        host = parts.hostname or "localhost"
        port = parts.port or _DB_PORTS[scheme.split("+")[0]]
        why = probe_tcp(host, port)
        if why is not None:
            raise ValueError(f"tracking database {redact_uri(uri)} is unreachable at "
                             f"{host}:{port} ({why}); start it or pass another --tracking-uri")
    elif scheme == "databricks":
        pass  # a profile, not a host: checked by MLflow itself when the driver opens the store
    else:
        raise ValueError(f"--tracking-uri == {redact_uri(uri)!r}, expected sqlite:///FILE, "
                         f"http(s)://HOST:PORT or a database URI")


def _check_server(uri: str, parts) -> None:
    netloc = parts.hostname or ""
    if parts.port is not None:
        netloc = f"{netloc}:{parts.port}"
    health = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/health",
                                      "", ""))
    try:
        with urllib.request.urlopen(health, timeout=_HTTP_TIMEOUT_S) as response:
            status = response.status
    except urllib.error.HTTPError as error:
        status = error.code
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise ValueError(f"tracking server {redact_uri(uri)} is unreachable ({reason}); "
                         f"start it or pass another --tracking-uri") from None
    if status != 200:
        raise ValueError(f"tracking server {redact_uri(uri)} answered HTTP {status} at "
                         f"/health, expected 200 (is it an MLflow server?)")


def _check_sqlite(uri: str, path: Path) -> None:
    import sqlite3

    parent = path.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"--tracking-uri {uri}: directory {parent} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"--tracking-uri {uri}: {path} is a directory, expected a "
                                f"database file")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and
                                                     not os.access(path, os.R_OK | os.W_OK)):
        raise PermissionError(f"--tracking-uri {uri}: no permission to write the store "
                              f"{path} (and its artifacts beside it)")
    if not path.exists() or path.stat().st_size == 0:
        return  # MLflow creates the store there
    with open(path, "rb") as handle:
        head = handle.read(len(_SQLITE_MAGIC))
    if head != _SQLITE_MAGIC:
        raise ValueError(f"--tracking-uri {uri}: {path} is not an SQLite database, expected an "
                         f"MLflow store or a new file name")
    try:
        with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True,
                                                timeout=_HTTP_TIMEOUT_S)) as db:
            tables = {row[0] for row in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error as error:
        raise ValueError(f"--tracking-uri {uri}: {path} is not a readable SQLite database "
                         f"({error})") from None
    if tables and "experiments" not in tables:
        raise ValueError(f"--tracking-uri {uri}: {path} is an SQLite database but not an MLflow "
                         f"store (no experiments table), expected an MLflow store or a new file "
                         f"name")


def client_for(uri: str):
    import mlflow

    configure_http_retries()
    return mlflow.MlflowClient(tracking_uri=uri)


def ensure_experiment(uri: str, name: str) -> str:
    """Create the store (once, from the driver) and the experiment; return the experiment id.

    A local sqlite store keeps its artifacts beside the database in `mlartifacts/`, as an
    absolute path, so trials in other working directories write to the same place.
    """
    client = client_for(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG,
                                      EXPERIMENT_KIND)
        return experiment.experiment_id
    location = None
    if is_local_sqlite(uri):
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=location,
                                    tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})


def log_dataset(client, run_id: str, identity: dict[str, Any],
                context: str = "training") -> None:
    """Record the run's data as an MLflow dataset input (what `mlflow.log_input` records; the
    client call, since a trial writes to its run by id): name, digest, a local source (the
    cohort's folder) and the profile as JSON. `identity`: `regcore.data.dataset_identity`."""
    import json

    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource
    from mlflow.entities import Dataset, DatasetInput, InputTag

    record = MetaDataset(LocalArtifactDatasetSource(identity["source"]), name=identity["name"],
                         digest=identity["digest"]).to_dict()
    record["profile"] = json.dumps(identity.get("profile", {}), sort_keys=True)
    entity = Dataset(**record)
    with guard(client, "logging the run's dataset"):
        client.log_inputs(run_id, datasets=[DatasetInput(
            entity, tags=[InputTag("mlflow.data.context", context)])])


def flat_params(flat: dict[str, Any]) -> dict[str, str]:
    """Config.to_flat values as strings, consistently typed (None -> "None", lists as [a, b])."""
    return {key: str(value) for key, value in flat.items()}


def get_or_create_parent(uri: str, experiment_id: str, sweep_id: str, preset: str,
                         params: dict[str, Any], run_id: str | None = None) -> str:
    """The sweep's parent run (reused on resume, found by id or by its sweep-id tag), RUNNING."""
    client = client_for(uri)
    run = None
    if run_id is not None:
        try:
            run = client.get_run(run_id)
        except Exception:  # deleted or from another store: fall back to the tag search
            run = None
    if run is None:
        found = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{TAG}role` = 'sweep' and tags.`{TAG}sweep_id` = '{sweep_id}'",
            max_results=1)
        run = found[0] if found else None
    if run is None:
        run = client.create_run(experiment_id, run_name=sweep_id, tags={
            f"{TAG}role": "sweep", f"{TAG}preset": preset, f"{TAG}sweep_id": sweep_id})
        _log_params(client, run.info.run_id, flat_params(params))
    elif run.info.status != "RUNNING":
        client.update_run(run.info.run_id, status="RUNNING")
    return run.info.run_id


def _log_params(client, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in sorted(params.items())]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start:start + 100])


def find_child(client, experiment_id: str, sweep_id: str, trial_id: str):
    with guard(client, f"looking up the run of trial {trial_id}"):
        found = client.search_runs(
            [experiment_id],
            filter_string=(f"tags.`{TAG}sweep_id` = '{sweep_id}' and "
                           f"tags.`{TAG}trial_id` = '{trial_id}' and tags.`{TAG}role` = 'trial'"),
            max_results=2)
    return found[0] if found else None


def get_or_create_child(client, experiment_id: str, parent_run_id: str, sweep_id: str,
                        trial_id: str, run_name: str, tags: dict[str, str],
                        params: dict[str, str], existing=None) -> tuple[str, int]:
    """(run_id, attempt): the trial's one run, reopened (RUNNING) if `existing` (the run that
    `find_child` found) is given, else created. `attempt` counts the starts of the trial, kept in
    the tag `regablate.attempts`."""
    with guard(client, f"opening the run of trial {trial_id}"):
        return _get_or_create_child(client, experiment_id, parent_run_id, sweep_id, trial_id,
                                    run_name, tags, params, existing)


def _get_or_create_child(client, experiment_id, parent_run_id, sweep_id, trial_id, run_name,
                         tags, params, existing) -> tuple[str, int]:
    from mlflow.entities import RunTag

    if existing is not None:
        run_id = existing.info.run_id
        attempt = int(existing.data.tags.get(f"{TAG}attempts", "0")) + 1
        client.update_run(run_id, status="RUNNING")
        items = {**tags, f"{TAG}attempts": str(attempt)}
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in items.items()])
        return run_id, attempt
    all_tags = {"mlflow.parentRunId": parent_run_id, f"{TAG}role": "trial",
                f"{TAG}sweep_id": sweep_id, f"{TAG}trial_id": trial_id,
                f"{TAG}attempts": "1", **tags}
    run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    _log_params(client, run.info.run_id, params)
    return run.info.run_id, 1


def log_metrics(client, run_id: str, metrics: dict[str, Any], step: int,
                tags: dict[str, str] | None = None) -> None:
    """Numeric metrics at `step` (NaN kept: MLflow stores it; non-numbers skipped), and `tags`,
    in one batch (one transaction) where they fit."""
    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    items = []
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        value = float(value)
        if math.isinf(value):
            value = math.copysign(1.7976931348623157e308, value)
        items.append(Metric(key, value, now, step))
    tag_items = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
    with guard(client, f"logging metrics at step {step}"):
        for start in range(0, max(len(items), 1), 500):
            client.log_batch(run_id, metrics=items[start:start + 500],
                             tags=tag_items if start == 0 else [])


def children_of(client, experiment_id: str, sweep_id: str) -> list:
    from mlflow.entities import ViewType

    runs, token = [], None
    while True:
        page = client.search_runs(
            [experiment_id], filter_string=(f"tags.`{TAG}sweep_id` = '{sweep_id}' and "
                                            f"tags.`{TAG}role` = 'trial'"),
            run_view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def close_stale_children(client, experiment_id: str, sweep_id: str,
                         outcome: dict[str, tuple[str, str]]) -> int:
    """End child runs left RUNNING (a killed or early-stopped trial cannot end its own run).

    `outcome`: trial id -> (status, note) from Tune's final trial states; trials missing from it
    are marked FAILED ("interrupted"). Returns how many runs were closed.
    """
    closed = 0
    with guard(client, "closing the runs of finished trials"):
        for run in children_of(client, experiment_id, sweep_id):
            if run.info.status != "RUNNING":
                continue
            trial_id = run.data.tags.get(f"{TAG}trial_id", "")
            status, note = outcome.get(trial_id, ("FAILED", "interrupted"))
            if note:
                client.set_tag(run.info.run_id, f"{TAG}end_note", note[:4000])
            client.set_terminated(run.info.run_id, status=status)
            closed += 1
    return closed


def log_artifacts(client, run_id: str, files: Iterable[tuple[Path, str | None]]) -> None:
    """Log (local path, artifact dir) pairs; directories are logged whole."""
    for path, artifact_path in files:
        path = Path(path)
        with guard(client, f"uploading artifact {path.name}"):
            if path.is_dir():
                client.log_artifacts(run_id, str(path), artifact_path)
            elif path.is_file():
                client.log_artifact(run_id, str(path), artifact_path)
