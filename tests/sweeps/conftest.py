"""Fixtures for the sweep tests: a real sweep in a subprocess, real Ray, real MLflow (sqlite).

Every process a test starts carries a marker in its environment (`REGABLATE_TEST_MARK`);
Ray's own processes inherit it, so cleanup finds exactly the processes this test started
(by pid, through /proc) and nothing of anybody else's: no `ray stop`, no `pkill`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ABLATION = REPO / "sweeps" / "ablation.py"
MARK = "REGABLATE_TEST_MARK"


def marked_pids(mark: str, workdir: Path | None = None) -> list[int]:
    """Pids of live processes whose environment holds MARK=mark, or (Ray's Python agents
    rewrite their environment area with their process title) whose working directory is
    inside `workdir`, the test's own temporary directory."""
    needle = f"{MARK}={mark}".encode()
    root = str(workdir.resolve()) if workdir is not None else None
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            cwd = os.readlink(entry / "cwd") if root else ""
        except OSError:
            continue
        if needle in environ.split(b"\0") or (root and (cwd == root or
                                                        cwd.startswith(root + os.sep))):
            pids.append(int(entry.name))
    return pids


def kill_marked(mark: str, grace_s: float = 3.0, workdir: Path | None = None) -> None:
    """SIGTERM, then SIGKILL, every process carrying our mark (or working in `workdir`)."""
    pids = marked_pids(mark, workdir)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + grace_s
    while time.time() < deadline and marked_pids(mark, workdir):
        time.sleep(0.2)
    for pid in marked_pids(mark, workdir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class SweepEnv:
    """A working directory, an environment and a runner for `sweeps/ablation.py`."""

    def __init__(self, workdir: Path, embedded_dir: Path) -> None:
        self.workdir = workdir
        self.mark = uuid.uuid4().hex
        # Ray's sockets live under its temp dir: keep the path short (AF_UNIX limit 107 bytes).
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
        self.env.update({MARK: self.mark, "RAY_TMPDIR": str(self.ray_tmp),
                         "PYTHONPATH": os.pathsep.join(
                             [str(REPO)] + ([os.environ["PYTHONPATH"]]
                                            if os.environ.get("PYTHONPATH") else [])),
                         "RAY_DEDUP_LOGS": "0",
                         "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"})
        self.env.pop("MLFLOW_TRACKING_URI", None)
        self.embedded_dir = embedded_dir
        self.db = workdir / "mlflow.db"
        self.uri = f"sqlite:///{self.db}"

    def args(self, *extra: str) -> list[str]:
        return [sys.executable, str(ABLATION), "--set", f"data.embedded_dir={self.embedded_dir}",
                *extra]

    def run(self, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(self.args(*extra), cwd=self.workdir, env=self.env, text=True,
                              capture_output=True, timeout=timeout)

    def popen(self, *extra: str, log: Path) -> subprocess.Popen:
        handle = open(log, "w")
        return subprocess.Popen(self.args(*extra), cwd=self.workdir, env=self.env, text=True,
                                stdout=handle, stderr=subprocess.STDOUT)

    def cleanup(self) -> None:
        kill_marked(self.mark, workdir=self.workdir)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def embedded_dir(tmp_path_factory) -> Path:
    """One embedded cohort folder shared by the sweep tests (each size is built once)."""
    return tmp_path_factory.mktemp("embedded")


@pytest.fixture
def sweep_env(tmp_path, embedded_dir):
    env = SweepEnv(tmp_path, embedded_dir)
    yield env
    env.cleanup()


def mlflow_client(env: SweepEnv):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=env.uri)


def sweep_runs(env: SweepEnv, experiment: str = "regablate"):
    """(parent runs, child runs) of the experiment, all statuses."""
    client = mlflow_client(env)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r} in {env.uri}"
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("regablate.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("regablate.role") == "trial"]
    return parents, children
