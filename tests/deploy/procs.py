"""Start the deployment scripts as real processes and stop exactly those processes.

Every service is started in a new session (``start_new_session=True``); Ray's daemons
(gcs_server, raylet, dashboard, agents, workers) inherit that session. Stopping a service
sends SIGTERM to its main process, then SIGTERM and, after a grace period, SIGKILL to each
process still in its session or whose command line names the service's private temp dir.
Nothing is stopped by name and ``ray stop`` is never called: it would take down every Ray
cluster of the machine, including other people's.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "docker" / "scripts"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _session_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces: split after its closing parenthesis
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[3])  # field 6 of stat: session id


def cmdline_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def owned_pids(session_ids: set[int], marker: str | None) -> set[int]:
    """Live (not zombie) pids in one of ``session_ids`` or whose command line has ``marker``."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if pid == os.getpid():
            continue
        if not _alive(pid):
            continue
        if _session_of(pid) in session_ids or (marker and marker in cmdline_of(pid)):
            found.add(pid)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class Service:
    """One script started in its own session, its output in ``log_path``."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, cwd=REPO,
            )

    def log_tail(self, n_chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n_chars:]

    def stop(self, grace_s: float = 15.0) -> set[int]:
        """Stop the service and every process of its session; return the pids signalled.

        SIGTERM goes to the main process only (``ray start --block`` and ``mlflow server``
        shut their children down in order on SIGTERM, as `docker stop` asks them to), or to
        every process of the session when the main process has already exited; what is still
        alive in the session after ``grace_s`` gets SIGKILL.
        """
        sid = self.proc.pid  # a new session's id is its leader's pid
        pids = owned_pids({sid}, None)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        else:  # the leader is gone (a script that left daemons behind): signal them directly
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            self.proc.poll()
            if not owned_pids({sid}, None):
                break
            time.sleep(0.3)
        leftover = owned_pids({sid}, None)
        if leftover:
            print(f"{self.name}: SIGKILL after {grace_s} s:",
                  [cmdline_of(p)[:60] for p in leftover])
        for pid in leftover:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        return pids | leftover


def kill_marked(marker: str) -> set[int]:
    """SIGKILL the live processes whose command line names ``marker`` (a private temp dir):
    daemons that left their session, if any. Returns their pids."""
    pids = owned_pids(set(), marker)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def wait_for(predicate, timeout_s: float, what: str, services: list[Service] = ()) -> None:
    """Poll ``predicate`` until true; on time-out fail with the services' log tails."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        for svc in services:
            if svc.proc.poll() is not None:
                raise RuntimeError(f"{svc.name} exited ({svc.proc.returncode}) while waiting for "
                                   f"{what}:\n{svc.log_tail()}")
        time.sleep(0.5)
    logs = "\n".join(f"--- {s.name}\n{s.log_tail()}" for s in services)
    raise TimeoutError(f"{what} not ready after {timeout_s} s\n{logs}")


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def listening_addresses(port: int) -> set[str]:
    """Local IPv4/IPv6 addresses with a socket LISTENing on ``port`` (from /proc/net/tcp*)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr_hex, port_hex = local.split(":")
            if state != "0A" or int(port_hex, 16) != port:  # 0A: TCP_LISTEN
                continue
            if len(addr_hex) == 8:  # IPv4, little-endian bytes
                found.add(".".join(str(int(addr_hex[i:i + 2], 16)) for i in (6, 4, 2, 0)))
            else:
                found.add("::" if int(addr_hex, 16) == 0 else addr_hex.lower())
    return found
