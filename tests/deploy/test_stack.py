"""The deployment scripts started for real on 127.0.0.1: an MLflow tracking server and a
two-node Ray cluster with token authentication, started by the very scripts the images run
(docker/scripts/start-*.sh), then used by a driver the way the sweep uses them.

Only the processes these tests start are stopped (by pid, see procs.py).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from tests.deploy.procs import (REPO, SCRIPTS, Service, cmdline_of, free_port, kill_marked,
                                listening_addresses, owned_pids, port_open, wait_for)

pytestmark = pytest.mark.slow


def _base_env(token: str) -> dict[str, str]:
    env = dict(os.environ)
    # the venv's bin first: the scripts call `ray` and `mlflow` like the images do
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = token
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """MLflow server + Ray head + Ray worker, each through its docker/scripts script."""
    work = tmp_path_factory.mktemp("stack")
    # Ray's unix socket paths must stay under 107 bytes: a short private dir in /tmp
    ray_tmp = Path(tempfile.mkdtemp(prefix="rgdep", dir="/tmp"))
    token = secrets.token_hex(16)
    env = _base_env(token)
    ray_port, dash_port, mlflow_port = free_port(), free_port(), free_port()
    services: list[Service] = []
    info = {"work": work, "ray_tmp": ray_tmp, "env": env, "ray_address": f"127.0.0.1:{ray_port}",
            "dashboard_port": dash_port, "mlflow_port": mlflow_port,
            "tracking_uri": f"http://127.0.0.1:{mlflow_port}", "services": services}
    try:
        mlflow_env = dict(env, MLFLOW_HOME=str(work / "mlflow"), MLFLOW_PORT=str(mlflow_port),
                          MLFLOW_WORKERS="1")
        (work / "mlflow").mkdir()
        services.append(Service("mlflow", [str(SCRIPTS / "start-mlflow.sh")], mlflow_env, work))
        head_env = dict(env, RAY_PORT=str(ray_port), RAY_DASHBOARD_PORT=str(dash_port),
                        RAY_NUM_CPUS="1", RAY_NUM_GPUS="0", RAY_TEMP_DIR=str(ray_tmp),
                        RAY_OBJECT_STORE_BYTES=str(200 * 2**20),
                        RAY_DASHBOARD_AGENT_PORT=str(free_port()))
        services.append(Service("ray-head", [str(SCRIPTS / "start-ray-head.sh")], head_env, work))
        wait_for(lambda: (ray_tmp / "ray_current_cluster").exists() and port_open(ray_port),
                 90, "ray head", services)
        worker_env = dict(env, RAY_HEAD_ADDRESS=info["ray_address"], RAY_NUM_CPUS="1",
                          RAY_NUM_GPUS="0", RAY_TEMP_DIR=str(ray_tmp),
                          RAY_OBJECT_STORE_BYTES=str(200 * 2**20),
                          RAY_DASHBOARD_AGENT_PORT=str(free_port()))
        services.append(Service("ray-worker", [str(SCRIPTS / "start-ray-worker.sh")], worker_env,
                                work))
        wait_for(lambda: port_open(mlflow_port), 90, "mlflow server", services)
        yield info
    finally:
        for svc in reversed(services):
            t0 = time.monotonic()
            svc.stop()
            print(f"stopped {svc.name} in {time.monotonic() - t0:.1f} s")
        # a daemon that escaped its session would still name the private temp dir
        orphans = kill_marked(str(ray_tmp))
        time.sleep(0.5)
        leftover = owned_pids({s.proc.pid for s in services}, str(ray_tmp))
        shutil.rmtree(ray_tmp, ignore_errors=True)
        assert not orphans and not leftover, f"left running: {sorted(orphans | leftover)}"


def _driver(stack, code: str, timeout_s: float = 180) -> dict:
    """Run ``code`` as a separate driver process; it prints one JSON line last."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=stack["env"],
                          capture_output=True, text=True, timeout=timeout_s)
    assert proc.returncode == 0, f"driver failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_ray_cluster_has_two_nodes_and_runs_a_task_on_each(stack):
    result = _driver(stack, f"""
        import json, time, ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        ray.init(address={stack['ray_address']!r}, logging_level="ERROR")
        deadline = time.monotonic() + 90
        while True:
            nodes = [n for n in ray.nodes() if n["Alive"]]
            if len(nodes) >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.5)

        @ray.remote(num_cpus=1)
        def where():
            return ray.get_runtime_context().get_node_id()

        ran_on = ray.get([where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            n["NodeID"], soft=False)).remote() for n in nodes])
        print(json.dumps({{"nodes": [n["NodeID"] for n in nodes], "ran_on": ran_on,
                          "cpus": ray.cluster_resources().get("CPU"),
                          "gpus": ray.cluster_resources().get("GPU", 0.0)}}))
    """)
    assert len(result["nodes"]) == 2
    assert result["ran_on"] == result["nodes"]  # each task ran on the node it was pinned to
    assert result["cpus"] == 2.0 and result["gpus"] == 0.0


def test_ray_health_check_passes_with_the_token_and_fails_without(stack):
    """compose's `ray-head` health check: healthcheck-ray.sh against the head."""
    check = [str(SCRIPTS / "healthcheck-ray.sh"), stack["ray_address"]]
    good = subprocess.run(check, env=stack["env"], capture_output=True, text=True, timeout=120)
    assert good.returncode == 0, good.stdout[-2000:] + good.stderr[-2000:]
    wrong = dict(stack["env"], RAY_AUTH_TOKEN="0" * 32)  # the GCS refuses another token
    bad = subprocess.run(check, env=wrong, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0
    assert "AuthenticationError" in bad.stderr


def test_mlflow_and_dashboard_bind_loopback_by_default(stack):
    # the scripts' defaults (no MLFLOW_HOST / RAY_DASHBOARD_HOST given): 127.0.0.1 only
    assert listening_addresses(stack["mlflow_port"]) == {"127.0.0.1"}
    # The venv's Ray is the minimal install, whose dashboard serves no HTTP (the images install
    # ray[default]); what can be checked here is the bind address Ray hands the dashboard.
    dashboards = [cmdline_of(pid) for pid in owned_pids(set(), str(stack["ray_tmp"]))
                  if "dashboard/dashboard.py" in cmdline_of(pid)]
    assert len(dashboards) == 1
    assert "--host=127.0.0.1" in dashboards[0]
    assert f"--port={stack['dashboard_port']}" in dashboards[0]


def test_mlflow_server_stores_runs_and_proxies_artifacts(stack):
    result = _driver(stack, f"""
        import json, os, tempfile
        from mlflow.tracking import MlflowClient
        client = MlflowClient(tracking_uri={stack['tracking_uri']!r})
        exp_id = client.create_experiment("deploy-check")
        run = client.create_run(exp_id, tags={{"regablate.role": "sweep"}})
        client.log_metric(run.info.run_id, "val.dice_mean", 0.5, step=1)
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "per_pair.csv")
            open(path, "w").write("moving,fixed,dice_mean\\na,b,0.5\\n")
            client.log_artifact(run.info.run_id, path)
        client.set_terminated(run.info.run_id)
        got = client.get_run(run.info.run_id)
        print(json.dumps({{"status": got.info.status, "dice": got.data.metrics["val.dice_mean"],
                          "artifact_uri": got.info.artifact_uri,
                          "files": [f.path for f in client.list_artifacts(run.info.run_id)]}}))
    """)
    assert result["status"] == "FINISHED"
    assert result["dice"] == 0.5
    assert result["artifact_uri"].startswith("mlflow-artifacts:")  # proxied by the server
    assert result["files"] == ["per_pair.csv"]
    stored = list((stack["work"] / "mlflow" / "mlartifacts").rglob("per_pair.csv"))
    assert len(stored) == 1 and stored[0].read_text().endswith("a,b,0.5\n")
    assert (stack["work"] / "mlflow" / "mlflow.db").is_file()


def test_smoke_sweep_through_run_sweep_lands_in_the_server_and_reports(stack, tmp_path):
    """The compose `sweep` job's path: run-sweep.sh joins the cluster as a node without CPUs,
    runs sweeps/ablation.py against the cluster and the tracking server; the report is then
    built from the server alone."""
    from mlflow.tracking import MlflowClient

    uri, experiment = stack["tracking_uri"], "regablate-deploy"
    env = dict(stack["env"], RAY_HEAD_ADDRESS=stack["ray_address"],
               RAY_TEMP_DIR=str(stack["ray_tmp"]),
               RAY_OBJECT_STORE_BYTES=str(100 * 2**20), RAY_DASHBOARD_AGENT_PORT=str(free_port()),
               RAY_USAGE_STATS_ENABLED="0")
    argv = [str(SCRIPTS / "run-sweep.sh"), "--preset", "smoke", "--address", stack["ray_address"],
            "--tracking-uri", uri, "--storage-path", str(tmp_path / "ray_results"),
            "--experiment", experiment, "--sweep-id", "deploy-smoke", "--search-trials", "0",
            "--cpus-per-trial", "1", "--no-report"]
    sweep = Service("sweep", argv, env, tmp_path)
    try:
        rc = sweep.proc.wait(timeout=600)
    finally:
        sweep.stop()  # the driver node it started (its raylet outlives the script, as in compose)
    assert rc == 0, sweep.log_tail(5000)

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("regablate.role") == "sweep"]
    assert len(parents) == 1
    parent = parents[0]
    under = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    children = [r for r in under if r.data.tags.get("regablate.role") == "trial"]
    assert len(children) == 4  # the 2x2 design, one seed
    # the reference rows (identity, instance optimisation, true field) of the same test pairs
    assert [r.data.tags.get("regablate.role") for r in under if r not in children] == ["reference"]
    assert {r.data.tags["regablate.variant"] for r in children} == {
        "baseline", "regloss", "combined_basic", "combined_enhanced"}
    assert all(r.info.status == "FINISHED" for r in children + [parent])
    assert all(r.info.artifact_uri.startswith("mlflow-artifacts:") for r in children)
    stored = list((stack["work"] / "mlflow" / "mlartifacts").rglob("per_pair.csv"))
    assert len(stored) >= 4  # uploaded by the trials through the server's proxy

    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "analysis.report", "--parent-run",
                           parent.info.run_id, "--tracking-uri", uri, "--out", str(out)],
                          env=stack["env"], capture_output=True, text=True, timeout=300,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (out / "report.md").read_text()
    assert parent.info.run_id in md
    assert (out / "report.html").is_file()
