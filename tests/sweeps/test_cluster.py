"""The sweep on a two-node Ray cluster on 127.0.0.1 with an MLflow tracking server, and the
fail-fast check of the resources a trial asks for. Slow (CI runs them).

Both nodes and the server are started by the test with `ray start` / `mlflow server`; every
process carries the test's environment marker and is stopped by pid (see conftest), never by
`ray stop`, which would take down other people's Ray on a shared machine.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from .conftest import MARK, kill_marked, mlflow_client, sweep_runs

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_env(base: dict[str, str]) -> dict[str, str]:
    env = dict(base)
    if (Path.home() / ".ray" / "auth_token").exists():
        env["RAY_AUTH_MODE"] = "token"  # the head enables token auth when the token exists
    return env


def _ray_start(env: dict[str, str], *args: str) -> None:
    ports = ["--node-manager-port", str(_free_port()), "--object-manager-port", str(_free_port()),
             "--dashboard-agent-listen-port", str(_free_port()),
             "--dashboard-agent-grpc-port", str(_free_port()),
             "--runtime-env-agent-port", str(_free_port()),
             "--metrics-export-port", str(_free_port())]
    proc = subprocess.run([str(BIN / "ray"), "start", "--num-cpus", "1", "--disable-usage-stats",
                           *ports, *args], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


@pytest.fixture
def two_nodes(sweep_env):
    """(address, worker marker): a head and a worker node, one CPU each."""
    port = _free_port()
    env = _ray_env(sweep_env.env)
    _ray_start(env, "--head", "--port", str(port), "--include-dashboard", "false")
    worker_mark = uuid.uuid4().hex
    worker_env = {**env, MARK: worker_mark}
    try:
        _ray_start(worker_env, "--address", f"127.0.0.1:{port}")
        yield f"127.0.0.1:{port}", worker_mark
    finally:
        kill_marked(worker_mark)


@pytest.fixture
def mlflow_server(sweep_env):
    port = _free_port()
    root = sweep_env.workdir / "server"
    root.mkdir()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root}/server.db",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        env=sweep_env.env, cwd=root, stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        raise AssertionError((root / "server.log").read_text()[-2000:])
    yield uri
    proc.terminate()
    proc.wait(timeout=30)


def test_two_node_cluster_with_tracking_server_survives_a_lost_node(sweep_env, two_nodes,
                                                                     mlflow_server):
    """The smoke sweep on two one-CPU nodes with an MLflow server: trials run on both nodes;
    the worker node is killed while it trains one; that trial is retried from its checkpoint
    on the head and the sweep completes."""
    address, worker_mark = two_nodes
    proc = sweep_env.popen("--preset", "smoke", "--sweep-id", "cluster", "--search-trials", "0",
                           "--epochs", "6", "--max-failures", "2", "--address", address,
                           "--tracking-uri", mlflow_server, "--no-report",
                           log=sweep_env.workdir / "sweep.log")
    sweep_env.uri = mlflow_server
    try:
        def both_nodes_training():
            _, children = sweep_runs(sweep_env)
            running = [r for r in children if r.info.status == "RUNNING"
                       and r.data.metrics.get("epoch", 0) >= 2]
            nodes = {r.data.tags["regablate.node_id"] for r in running}
            return running if len(nodes) == 2 else None

        deadline = time.time() + 400
        running = None
        while running is None and time.time() < deadline and proc.poll() is None:
            try:
                running = both_nodes_training()
            except Exception:
                running = None
            time.sleep(0.5)
        assert running, (sweep_env.workdir / "sweep.log").read_text()[-3000:]
        kill_marked(worker_mark)  # the worker node dies mid-trial
        assert proc.wait(timeout=500) == 0, (sweep_env.workdir / "sweep.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not sweep_env.db.exists()  # everything went to the server
    parents, children = sweep_runs(sweep_env)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 4
    assert all(r.info.status == "FINISHED" for r in children), \
        [(r.info.run_name, r.info.status, r.data.tags.get("regablate.error")) for r in children]
    nodes = {n for r in children for n in r.data.tags["regablate.node_ids"].split(",")}
    assert len(nodes) == 2, nodes  # trials ran on both nodes
    moved = [r for r in children if len(r.data.tags["regablate.node_ids"].split(",")) == 2]
    assert moved, "no trial was retried on the remaining node"
    for run in moved:
        assert int(run.data.tags["regablate.attempts"]) >= 2
        assert int(run.data.tags.get("regablate.resumed_from_epoch", "0")) >= 1
    client = mlflow_client(sweep_env)
    for run in children:  # artifacts went through the server, from both nodes
        assert "per_pair.csv" in {a.path for a in client.list_artifacts(run.info.run_id)}
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "epoch"))
        assert steps.count(1) == 1, (run.info.run_name, steps)  # never restarted from scratch


def test_gpu_trial_on_cpu_only_cluster_fails_fast(sweep_env):
    started = time.perf_counter()
    proc = sweep_env.run("--preset", "smoke", "--gpus-per-trial", "1", "--ray-num-cpus", "1",
                         timeout=180)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("sweeps/ablation.py: error: no node of the Ray cluster can run a "
                           "trial asking for 1 CPU and 1 GPU"), line
    assert "Traceback" not in proc.stderr
    assert time.perf_counter() - started < 120
    assert not sweep_env.db.exists() and not (sweep_env.workdir / "ray_results").exists()
