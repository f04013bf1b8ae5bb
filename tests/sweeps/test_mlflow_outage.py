"""The MLflow tracking server goes away for a while during a sweep (issue 9).

`sweeps/tracking.py` gives MLflow's REST client an explicit retry budget (~2 minutes): a short
outage pauses the trials and loses nothing; past the budget a call fails with one line naming
the (redacted) server. The slow test kills a real `mlflow server` (started by
docker/scripts/start-mlflow.sh, sqlite backend in tmp_path) while trials train, and restarts it
on the same port with the same stores. Every process is stopped by pid (tests/deploy/procs.py,
tests/sweeps/conftest.py).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from sweeps import tracking
from tests.deploy.procs import SCRIPTS, Service, free_port, owned_pids, port_open, wait_for

from .conftest import mlflow_client, sweep_runs

EPOCHS = 4
OUTAGE_S = 10.0


def test_unreachable_past_the_budget_fails_with_the_redacted_server(monkeypatch):
    """Nothing listens on the port and no retries are allowed: one clear error, no password."""
    for key in tracking.HTTP_RETRY_ENV:  # unset here, restored (unset) after the test
        monkeypatch.setenv(key, "placeholder")
        monkeypatch.delenv(key)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    port = free_port()
    uri = f"http://alice:hunter2@127.0.0.1:{port}"
    client = tracking.client_for(uri)
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"  # the operator's value wins
    assert os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] == "2"  # the sweep's budget
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "30"
    assert tracking.RETRY_BUDGET_S == 124
    with pytest.raises(tracking.TrackingUnreachableError) as caught:
        tracking.log_metrics(client, "0" * 32, {"train.loss_total": 1.0}, step=3)
    message = str(caught.value)
    assert f"tracking server http://127.0.0.1:{port} unreachable while logging metrics at " \
           f"step 3" in message, message
    assert "hunter2" not in message and "alice" not in message
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" in message
    assert "\n" not in message


def _kill_session(svc: Service) -> None:
    """SIGKILL the server and every process of its session (a crash, not a clean stop)."""
    sid = svc.proc.pid
    for pid in owned_pids({sid}, None) | {sid}:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    svc.proc.wait(timeout=30)
    wait_for(lambda: not owned_pids({sid}, None), 30, "the killed server's processes to exit")


@pytest.mark.slow
def test_sweep_survives_a_short_server_outage(sweep_env):
    work = sweep_env.workdir
    port = free_port()
    home = work / "server"
    home.mkdir()
    env = dict(sweep_env.env, MLFLOW_HOME=str(home), MLFLOW_PORT=str(port), MLFLOW_WORKERS="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    uri = f"http://127.0.0.1:{port}"
    services = [Service("mlflow", [str(SCRIPTS / "start-mlflow.sh")], env, work)]
    proc = None
    try:
        wait_for(lambda: port_open(port), 90, "mlflow server", services)
        sweep_env.uri = uri  # sweep_runs / mlflow_client read the server
        proc = sweep_env.popen("--preset", "smoke", "--sweep-id", "outage", "--search-trials",
                               "0", "--epochs", str(EPOCHS), "--tracking-uri", uri,
                               "--no-report", log=work / "sweep.log")

        started: list = []

        def a_trial_started():
            try:
                started[:] = sweep_runs(sweep_env)[1]
            except Exception:  # the experiment may not exist yet
                return False
            return bool(started)

        wait_for(lambda: proc.poll() is not None or a_trial_started(), 100, "a child run")
        assert proc.poll() is None, (work / "sweep.log").read_text()[-3000:]
        _kill_session(services[0])
        # these trials had epochs left to log when the server died (an epoch takes seconds)
        unfinished = {r.info.run_id for r in started if r.data.metrics.get("epoch", 0) < EPOCHS}
        assert unfinished
        assert not port_open(port)
        time.sleep(OUTAGE_S)
        # the outage happened mid-sweep: the trials were still running when it ended
        assert proc.poll() is None, (work / "sweep.log").read_text()[-3000:]
        services.append(Service("mlflow-restarted", [str(SCRIPTS / "start-mlflow.sh")], env,
                                work))
        wait_for(lambda: port_open(port), 90, "the restarted mlflow server", services[1:])
        assert proc.wait(timeout=300) == 0, (work / "sweep.log").read_text()[-3000:]
        children = _check_runs(sweep_env)  # through the restarted server
        # every epoch those trials logged after the kill went to the restarted server
        assert unfinished <= {r.info.run_id for r in children}
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        for svc in reversed(services):
            svc.stop()


def _check_runs(sweep_env) -> list:
    parents, children = sweep_runs(sweep_env)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    names = sorted(r.info.run_name for r in children)
    assert names == ["baseline-s0", "combined_basic-s0", "combined_enhanced-s0", "regloss-s0"], \
        names  # exactly one run per trial
    assert len({r.data.tags["regablate.trial_id"] for r in children}) == 4
    client = mlflow_client(sweep_env)
    for run in children:
        assert run.info.status == "FINISHED", (run.info.run_name,
                                               run.data.tags.get("regablate.error"))
        assert run.data.tags["regablate.attempts"] == "1"  # no trial failed and was retried
        for key in ("epoch", "train.loss_total", "val.dice_mean"):
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
            assert steps == list(range(1, EPOCHS + 1)), (run.info.run_name, key, steps)
        assert "test.dice_mean" in run.data.metrics
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"per_pair.csv", "example.npz", "checkpoint"} <= artifacts, artifacts
        assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")] == \
            ["checkpoint/state.pt"]
    return children
