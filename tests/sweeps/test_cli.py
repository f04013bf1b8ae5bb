"""Bad input to `sweeps/ablation.py`: one line on stderr, exit code 2, before Ray starts, and
nothing created (no mlflow.db, no Ray results, no report). Plus the pure helpers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sweeps import ablation, tracking
from sweeps.cluster import trial_slots
from sweeps.presets import PRESETS
from sweeps.space import search_space
from sweeps.trainable import run_name
from regcore.config import Config, STUDY_REG_WEIGHTS

from .conftest import ABLATION, REPO


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens


def _write_state(workdir: Path, preset: str = "smoke") -> None:
    """A stored sweep (as a previous run leaves it) for the --resume conflict cases."""
    args = ablation.parse_args(["--preset", preset])
    plan = ablation.build_plan(args, preset, workdir)
    plan.sweep_id = "old-sweep"
    folder = workdir / "ray_results" / plan.sweep_id
    folder.mkdir(parents=True)
    (folder / ablation.STATE_FILE).write_text(json.dumps(ablation.asdict(plan)))
    (workdir / "ray_results" / ablation.LATEST_FILE).write_text(plan.sweep_id)


BAD_INPUTS = [
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--variants", "baseline,foo"], "unknown variant 'foo'"),
    (["--set", "loss.smooth_weight=-1"], "loss.smooth_weight == -1.0, must be >= 0"),
    (["--set", "regloss:loss.jacobian_weight=-0.5"], "loss.jacobian_weight == -0.5"),
    (["--data-dir", "no/such/dir"], "--data-dir no/such/dir: no such file or directory"),
    (["--data-dir", "empty"], "data.data_dir == "),  # a folder without subjects
    (["--tracking-uri", "http://127.0.0.1:{port}"], "tracking server http://127.0.0.1:"),
    (["--tracking-uri", "http://user:hunter2@127.0.0.1:{port}"], "is unreachable"),
    (["--resume"], "--resume: no sweep to resume"),
    (["--preset", "paper"], "--preset paper needs --data-dir"),
    (["--set", "bogus.key=1"], "unknown config key 'bogus.key'"),
    (["--set", "train.epochs"], "--set 'train.epochs', expected [VARIANT:]KEY=VALUE"),
    (["--epochs", "0"], "train.epochs == 0, must be >= 1"),
    (["--gpus-per-trial", "-1"], "--gpus-per-trial == -1, must be >= 0"),
    (["--shape", "8"], "data.shape == (8, 8, 8), must be three integers"),
    (["--seeds", "2", "--seed-list", "0,1"], "--seeds and --seed-list conflict"),
    (["--variants", "baseline", "--set", "regloss:train.epochs=2"], "variant 'regloss' is not"),
    (["--search-trials", "-1"], "--search-trials == -1, must be >= 0"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--resume", "--preset", "quick"], "--resume: --preset quick differs from the sweep's "
                                        "preset smoke"),
    (["--resume", "--epochs", "7"], "--resume: train.epochs == 7 differs from the sweep's 2"),
    # outside resources, each probed with a bounded timeout before anything starts
    (["--address", "127.0.0.1:{port}"], "--address 127.0.0.1:{port}: no Ray cluster reachable "
                                        "at 127.0.0.1:{port} (Connection refused)"),
    (["--address", "auto"], "--address auto: no running Ray cluster found"),
    (["--address", "localhost"], "--address 'localhost', expected auto, HOST:PORT or ray://"),
    (["--address", "127.0.0.1:99999"], "--address '127.0.0.1:99999', expected auto"),
    (["--address", "http://127.0.0.1:6379"], "unknown scheme 'http'"),
    (["--tracking-uri", "sqlite:///notadb.db"], "notadb.db is not an SQLite database"),
    (["--tracking-uri", "sqlite:///foreign.db"], "foreign.db is an SQLite database but not an "
                                                 "MLflow store"),
    (["--tracking-uri", "sqlite:///empty"], "empty is a directory, expected a database file"),
    (["--tracking-uri", "sqlite:///no/such/mlflow.db"], "directory"),
    (["--tracking-uri", "ftp://127.0.0.1/mlflow"], "--tracking-uri == 'ftp://127.0.0.1/mlflow', "
                                                   "expected sqlite:///FILE"),
    (["--tracking-uri", "mlflow.db"], "expected sqlite:///FILE"),
    (["--tracking-uri", "postgresql://u:hunter2@127.0.0.1:{port}/mlflow"],
     "tracking database postgresql://127.0.0.1:{port}/mlflow is unreachable"),
    (["--preset", "smoke", "--data-dir", "corrupt"],
     "aligned_seg4.nii.gz: unreadable NIfTI file"),
    (["--data-dir", "noseg"], "aligned_seg4.nii.gz: missing"),
    (["--data-dir", "listed.txt"], "missing, listed in"),
]


def _outside_resources(root: Path) -> None:
    """The broken stores and data of the table: a text file and a foreign database where the
    tracking store should be, data folders with an unreadable or a missing label map."""
    import sqlite3

    (root / "notadb.db").write_text("this is not a database\n" * 80)
    with sqlite3.connect(root / "foreign.db") as db:
        db.execute("CREATE TABLE accounts (id INTEGER)")
    for name in ("0016", "0001", "0002", "0003", "0004"):
        folder = root / "corrupt" / f"OASIS_OAS1_{name}_MR1"
        folder.mkdir(parents=True)
        (folder / "aligned_seg4.nii.gz").write_bytes(b"\x1f\x8b not a NIfTI")
    (root / "noseg" / "OASIS_OAS1_0001_MR1").mkdir(parents=True)
    (root / "noseg" / "OASIS_OAS1_0001_MR1" / "aligned_norm.nii.gz").write_bytes(b"")
    (root / "listed.txt").write_text("gone/seg4_onehot.npy\n")


@pytest.mark.parametrize("argv,expected", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_one_line_exit_2_nothing_created(tmp_path, argv, expected):
    port = _closed_port()
    argv = [a.format(port=port) for a in argv]
    expected = expected.format(port=port)
    if argv[0] == "--resume" and len(argv) > 1:
        _write_state(tmp_path)
    (tmp_path / "empty").mkdir()
    _outside_resources(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(tmp_path),
           "RAY_TMPDIR": str(tmp_path / "raytmp")}  # no cluster for `auto` to find
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ABLATION), *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert time.perf_counter() - started < 30
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("sweeps/ablation.py: error: "), lines[0]
    assert expected in lines[0], lines[0]
    assert "hunter2" not in proc.stderr
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert after == before  # no mlflow.db, no ray_results, no reports


def _run_bad(tmp_path, *argv, **extra_env) -> tuple[subprocess.CompletedProcess, float]:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(tmp_path),
           "RAY_TMPDIR": str(tmp_path / "raytmp"), **extra_env}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ABLATION), *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    return proc, time.perf_counter() - started


class _Listener:
    """A local HTTP server answering 404 to everything: a port that listens but is neither
    an MLflow server nor a Ray head."""

    def __enter__(self):
        import http.server
        import threading

        class NotFound(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the stdlib's name
                self.send_error(404)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self.server.server_address[1]

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_a_tracking_uri_that_is_not_an_mlflow_server_is_one_line(tmp_path):
    with _Listener() as port:
        proc, elapsed = _run_bad(tmp_path, "--preset", "smoke", "--tracking-uri",
                                 f"http://127.0.0.1:{port}")
    assert proc.returncode == 2 and elapsed < 30, proc.stderr
    assert proc.stderr.strip() == (f"sweeps/ablation.py: error: tracking server "
                                   f"http://127.0.0.1:{port} answered HTTP 404 at /health, "
                                   f"expected 200 (is it an MLflow server?)")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.slow
def test_an_address_that_listens_but_is_no_ray_head_gives_up_in_time(tmp_path):
    """Ray's ray.init would wait for minutes in C++ printing GCS warnings; the join watchdog
    ends it with one line (its limit shortened here to 5 s)."""
    with _Listener() as port:
        proc, elapsed = _run_bad(tmp_path, "--preset", "smoke", "--address",
                                 f"127.0.0.1:{port}", REGABLATE_RAY_JOIN_TIMEOUT_S="5")
    assert proc.returncode == 2, proc.stderr
    assert elapsed < 30
    assert proc.stderr.strip() == (f"sweeps/ablation.py: error: --address 127.0.0.1:{port}: no "
                                   f"Ray cluster answered within 5 s (is it a Ray head's GCS "
                                   f"port?)"), proc.stderr[-2000:]
    assert proc.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_a_store_directory_without_write_permission_is_one_line(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        proc, _ = _run_bad(tmp_path, "--preset", "smoke", "--tracking-uri",
                           f"sqlite:///{locked}/mlflow.db")
    finally:
        locked.chmod(0o755)
    assert proc.returncode == 2, proc.stderr
    assert "no permission to write the store" in proc.stderr.strip()
    assert list(locked.iterdir()) == []


def test_redact_uri_strips_credentials():
    assert tracking.redact_uri("http://u:secret@host:5000/p") == "http://host:5000/p"
    assert tracking.redact_uri("https://token@host") == "https://host"
    assert tracking.redact_uri("sqlite:////tmp/m.db") == "sqlite:////tmp/m.db"


def test_resolve_tracking_uri_makes_sqlite_absolute(tmp_path):
    assert tracking.resolve_tracking_uri("sqlite:///mlflow.db", tmp_path) == \
        f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert tracking.resolve_tracking_uri("http://h:1", tmp_path) == "http://h:1"


def test_trial_slots_counts_per_node():
    nodes = [{"CPU": 2.0}, {"CPU": 1.0}]
    assert trial_slots(nodes, 1, 0) == 3
    assert trial_slots(nodes, 2, 0) == 1
    assert trial_slots(nodes, 1, 1) == 0  # no GPU anywhere
    assert trial_slots([{"CPU": 8.0, "GPU": 2.0}], 2, 1) == 2


def test_search_space_ranges_and_guaranteed_points():
    base = Config()
    space, points = search_space(base, ["baseline", "regloss", "combined_enhanced"], 0, 5)
    assert space["regablate.group"] == "search"
    assert sorted(space["variant"].categories) == ["combined_enhanced", "regloss"]
    for name, default in STUDY_REG_WEIGHTS.items():
        domain = space[f"loss.{name}_weight"]
        assert domain.lower == pytest.approx(default / 10)
        assert domain.upper == pytest.approx(default * 10)
    # the study's weights run for each regularizing variant
    assert [p["variant"] for p in points] == ["regloss", "combined_enhanced"]
    assert all(p[f"loss.{n}_weight"] == w for p in points for n, w in STUDY_REG_WEIGHTS.items())
    _, one = search_space(base, ["regloss", "combined_enhanced"], 0, 1)
    assert len(one) == 1
    with pytest.raises(ValueError, match="the weight search needs a variant that regularizes"):
        search_space(base, ["baseline"], 0, 3)


def test_run_names():
    from types import SimpleNamespace

    from sweeps.trainable import trial_display_name

    assert run_name("baseline", 2, "ablation", 4) == "baseline-s2"
    assert run_name("regloss", 0, "search", 3) == "regloss-search-3"
    grid = SimpleNamespace(config={"variant": "baseline", "seed": 1,
                                   "regablate.group": "ablation"},
                           experiment_tag="2_seed=1,variant=baseline", trial_id="ab12c_00002")
    assert trial_display_name(grid) == "baseline-s1_ab12c_00002"
    searched = SimpleNamespace(config={"variant": "regloss", "seed": 0,
                                       "regablate.group": "search"},
                               experiment_tag="3_loss.smooth_weight=0.02", trial_id="9f3e2a1b")
    assert trial_display_name(searched) == "regloss-search-3_9f3e2a1b"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_validate(name, tmp_path):
    args = ablation.parse_args(["--preset", name] + (["--data-dir", str(tmp_path)]
                                                     if PRESETS[name].requires_data_dir else []))
    plan = ablation.build_plan(args, name, tmp_path)
    for variant in plan.variants:
        cfg = plan.base_config(variant)
        assert cfg.train.num_threads == int(plan.cpus_per_trial)
        assert Path(cfg.data.embedded_dir).is_absolute()


def test_paper_preset_is_the_study(tmp_path):
    args = ablation.parse_args(["--preset", "paper", "--data-dir", str(tmp_path)])
    plan = ablation.build_plan(args, "paper", tmp_path)
    cfg = plan.base_config("combined_enhanced")
    assert cfg.data.shape == (128, 128, 128) and cfg.data.modality == "seg4_onehot"
    assert cfg.data.pairing == "atlas" and cfg.model.backbone == "seed"
    assert cfg.train.epochs == 50 and cfg.train.batch_size == 1
    assert cfg.lr == 3e-4 and plan.base_config("baseline").lr == 1e-3
    assert cfg.loss.reg_weights() == STUDY_REG_WEIGHTS
    assert plan.gpus_per_trial == 1.0 and len(plan.variants) == 4


def test_command_line_overrides_the_preset(tmp_path):
    args = ablation.parse_args(["--preset", "smoke", "--epochs", "3", "--seeds", "2",
                                "--variants", "baseline,regloss", "--shape", "24,24,32",
                                "--set", "loss.smooth_weight=0.02",
                                "--set", "regloss:train.nan_at_epoch=2"])
    plan = ablation.build_plan(args, "smoke", tmp_path)
    assert plan.seeds == [0, 1] and plan.variants == ["baseline", "regloss"]
    cfg = plan.base_config("regloss")
    assert cfg.train.epochs == 3 and cfg.data.shape == (24, 24, 32)
    assert cfg.loss.smooth_weight == 0.02
    assert plan.variant_overrides == {"regloss": {"train.nan_at_epoch": 2}}
