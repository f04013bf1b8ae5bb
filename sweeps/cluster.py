"""Starting or joining Ray, and checking that the cluster can run a trial at all.

A trial that asks for a GPU on a CPU-only cluster would wait forever in Tune's queue, so the
driver compares what one trial asks for with what the nodes have before any trial starts,
and fails with one line (exit 2) instead of hanging.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import urllib.parse

from regcore.cli import UsageError

__all__ = ["start_ray", "trial_slots", "check_resources", "check_address", "parse_address",
           "probe_tcp", "CONNECT_TIMEOUT_S", "JOIN_TIMEOUT_S"]

#: Seconds a probe of an outside service (Ray, a tracking server or database) may take.
CONNECT_TIMEOUT_S = 5.0
#: Seconds `ray.init` may take to join a cluster whose port answered the probe (environment
#: REGABLATE_RAY_JOIN_TIMEOUT_S overrides it for a slow cluster).
JOIN_TIMEOUT_S = int(os.environ.get("REGABLATE_RAY_JOIN_TIMEOUT_S", "20"))


def parse_address(address: str) -> tuple[str, int]:
    """`host:port` or `ray://host:port` -> (host, port); a one-line UsageError otherwise."""
    expected = "expected auto, HOST:PORT or ray://HOST:PORT"
    text = address.strip()
    if "://" in text:
        parts = urllib.parse.urlsplit(text)
        if parts.scheme != "ray":
            raise UsageError(f"--address {address!r}: unknown scheme {parts.scheme!r}, {expected}")
        text = parts.netloc
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--address {address!r}, {expected}")
    return host, int(port)


def probe_tcp(host: str, port: int, timeout_s: float = CONNECT_TIMEOUT_S) -> str | None:
    """None when something accepts a TCP connection at host:port within `timeout_s`, else why
    not. The name lookup runs in a thread so that it, too, is bounded."""
    outcome: list[str | None] = ["no answer within %g s" % timeout_s]

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                outcome[0] = None
        except OSError as error:
            outcome[0] = error.strerror or type(error).__name__

    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(timeout_s + 1.0)
    return outcome[0]


def _auto_address() -> str | None:
    """What Ray's `address="auto"` would join: RAY_ADDRESS, else the address of the latest
    cluster started on this machine (Ray writes it to <RAY_TMPDIR>/ray/ray_current_cluster)."""
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if env and env not in ("auto", "local"):
        return env
    current = os.path.join(os.environ.get("RAY_TMPDIR", "/tmp"), "ray", "ray_current_cluster")
    try:
        with open(current, encoding="utf-8") as handle:
            return handle.read().strip() or None
    except OSError:
        return None


def check_address(address: str | None) -> None:
    """Fail fast (UsageError, one line) when `--address` names no reachable Ray cluster: a
    malformed address, `auto` without a cluster, or a port where nothing listens. Bounded by
    CONNECT_TIMEOUT_S; Ray itself would retry for minutes, printing GCS warnings."""
    if not address:
        return
    target = address
    if address.strip() == "auto":
        target = _auto_address()
        if target is None:
            raise UsageError("--address auto: no running Ray cluster found (RAY_ADDRESS is "
                             "unset and no cluster was started on this machine); start one "
                             "with `ray start --head` or pass HOST:PORT")
    host, port = parse_address(target)
    why = probe_tcp(host, port)
    if why is not None:
        shown = address if target == address else f"{address} ({target})"
        raise UsageError(f"--address {shown}: no Ray cluster reachable at {host}:{port} "
                         f"({why}); start it or pass "
                         f"another --address")


@contextlib.contextmanager
def _captured_output(sink):
    """Point fds 1 and 2 at the file `sink` for the block (Ray's C++ core writes its GCS
    warnings there, below Python); restored afterwards."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def _join(address: str, kwargs: dict) -> str:
    """`ray.init(address=...)` within JOIN_TIMEOUT_S; Ray's output meanwhile is returned, not
    shown. The port answered check_address, but something that is not a Ray head keeps
    ray.init waiting in C++ for minutes, out of reach of Python signals: a watchdog thread
    ends the process then with one line and exit code 2 (nothing has been written yet)."""
    import tempfile

    import ray

    terminal = os.dup(2)

    def expire() -> None:
        os.write(terminal, (f"sweeps/ablation.py: error: --address {address}: no Ray cluster "
                            f"answered within {JOIN_TIMEOUT_S} s (is it a Ray head's GCS "
                            f"port?)\n").encode())
        os._exit(2)

    watchdog = threading.Timer(JOIN_TIMEOUT_S, expire)
    watchdog.daemon = True
    with tempfile.TemporaryFile("w+") as sink:
        try:
            with _captured_output(sink):
                watchdog.start()
                try:
                    ray.init(address=address, **kwargs)
                finally:
                    watchdog.cancel()
        except ConnectionError as error:
            ray.shutdown()
            raise UsageError(f"--address {address}: {' '.join(str(error).split())}") from None
        finally:
            os.close(terminal)
        sink.seek(0)
        return sink.read()


def start_ray(address: str | None, num_cpus: int | None = None) -> str:
    """Join the cluster at `address` (`auto` or `host:port`), or start a local instance.

    Without `address` a fresh local instance is started even when `RAY_ADDRESS` is set, so a
    laptop run never lands on somebody's cluster by accident. Returns what Ray printed while
    it started or joined (kept for the sweep's log).
    """
    import ray

    kwargs = dict(include_dashboard=False, log_to_driver=True,
                  configure_logging=True, logging_level="warning")
    if address:
        return _join(address, kwargs)
    import tempfile

    for attempt in (1, 2, 3):
        # Ray's start-up messages are kept for the sweep's log; shown only if it fails
        with tempfile.TemporaryFile("w+") as sink:
            try:
                with _captured_output(sink):
                    ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1,
                             **kwargs)
                sink.seek(0)
                return sink.read()
            except Exception as error:  # Ray waits only 30 s for its raylet: a loaded machine
                sink.seek(0)
                sys.stderr.write(sink.read())
                if attempt == 3 or "timed out during startup" not in str(error):
                    raise
                print(f"Ray did not start in time ({error}); trying once more",
                      file=sys.stderr)
                ray.shutdown()
    return ""


def _alive_nodes() -> list[dict[str, float]]:
    import ray

    return [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]


def trial_slots(nodes: list[dict[str, float]], cpus_per_trial: float,
                gpus_per_trial: float) -> int:
    """How many trials fit at once: per node, the fewer of CPU and GPU slots, summed."""
    total = 0
    for resources in nodes:
        slots = int(resources.get("CPU", 0) // cpus_per_trial) if cpus_per_trial > 0 else 10**6
        if gpus_per_trial > 0:
            slots = min(slots, int(resources.get("GPU", 0) // gpus_per_trial))
        total += slots
    return total


def check_resources(cpus_per_trial: float, gpus_per_trial: float) -> int:
    """Raise UsageError when no node can host one trial; return the number of trial slots."""
    import ray

    nodes = _alive_nodes()
    slots = trial_slots(nodes, cpus_per_trial, gpus_per_trial)
    if slots < 1:
        have = ray.cluster_resources()
        raise UsageError(
            f"no node of the Ray cluster can run a trial asking for {cpus_per_trial:g} CPU and "
            f"{gpus_per_trial:g} GPU (--cpus-per-trial/--gpus-per-trial); the cluster has "
            f"{have.get('CPU', 0):g} CPU and {have.get('GPU', 0):g} GPU in {len(nodes)} node(s)")
    return slots
