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


BAD_STUDY = """name: mine
factors:
  affine:
    levels:
      - {name: "off", set: {model.affine: false}}
      - {name: "on", set: {model.affine: true}}
  regularize:
    levels:
      - {name: "off", set: {loss.regularize: false}}
      - {name: "on", set: {loss.regularize: true}}
"""


@pytest.mark.parametrize("study, argv, expected", [
    (None, ["--study", "nope"], "--study 'nope': no such file and no shipped study of that "
                                "name (shipped: affine_x_regularizers, "),
    (BAD_STUDY + "colour: red\n", [], "study mine.yaml: unknown key 'colour'"),
    (BAD_STUDY.replace("model.affine: true", "model.wings: 2"), [],
     "study mine.yaml: factors.affine.levels[1].set: unknown config key 'model.wings'"),
    (BAD_STUDY + "cells:\n  a: {affine: 'on', regularize: 'on'}\n"
                 "  b: {affine: 'on', regularize: 'on'}\n", [],
     "study mine.yaml: cells.b: duplicate cell: 'a' has the same levels"),
    (BAD_STUDY.replace('      - {name: "on", set: {model.affine: true}}\n', ""), [],
     "study mine.yaml: factors.affine.levels: a factor needs exactly 2 levels, got 1"),
    ("name: [unclosed\n", [], "study mine.yaml: not valid YAML"),
    (BAD_STUDY, ["--variants", "baseline"], "unknown variant 'baseline' of study 'mine', "
                                            "expected one of reference, regularize, affine"),
    (BAD_STUDY, ["--set", "model.affine=true"], "--set model.affine=... conflicts with level "
                                                "'off' of the study's factor 'affine'"),
])
def test_bad_study_one_line_exit_2_nothing_created(study, argv, expected, tmp_path,
                                                   monkeypatch, capsys):
    """`--study`: an unknown name, and bad study files (the schema is checked before Ray
    starts), through the command itself."""
    from regcore.cli import run_cli
    from sweeps.ablation import PROG, main

    if study is not None:
        (tmp_path / "mine.yaml").write_text(study)
        argv = ["--study", "mine.yaml", *argv]
    before = sorted(tmp_path.rglob("*"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        run_cli(main, ["--preset", "smoke", *argv], prog=PROG)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err
    assert sorted(tmp_path.rglob("*")) == before


def test_study_cells_and_seeds_make_the_plan(tmp_path):
    """The 3-factor study: its eight cells, each with its levels' overrides; the preset's seeds
    unless it has none (quick takes the study's); `--variants` picks cells."""
    from sweeps.ablation import build_plan, parse_args

    study = "affine_x_regularizers_x_diffeomorphic"
    plan = build_plan(parse_args(["--study", study]), "quick", tmp_path)
    assert len(plan.variants) == 8 and plan.seeds == [0, 1, 2]
    assert plan.study_spec.name == study
    from sweeps.presets import QUICK_COARSE_WEIGHT, QUICK_LR_SCALE, QUICK_PASS_WEIGHT

    # one rate for every cell, times the quick recipe's multiplier (train.lr_scale)
    cfg = plan.base_config("affine-regularize-diffeomorphic", seed=1)
    # the quick recipe's loss (deep supervision of the passes, the coarse term) under every cell
    assert all((plan.base_config(v).loss.pass_weight, plan.base_config(v).loss.coarse_weight)
               == (QUICK_PASS_WEIGHT, QUICK_COARSE_WEIGHT) for v in plan.variants)
    assert QUICK_PASS_WEIGHT > 0 and QUICK_COARSE_WEIGHT > 0
    assert (cfg.affine, cfg.regularize, cfg.model.diffeomorphic, cfg.seed) == (True, True, True, 1)
    assert cfg.lr == pytest.approx(1e-3 * QUICK_LR_SCALE)
    ref = plan.base_config("reference")
    assert (ref.affine, ref.regularize, ref.model.diffeomorphic) == (False, False, False)
    assert ref.lr == pytest.approx(1e-3 * QUICK_LR_SCALE)
    assert ref.data.shape == (32, 32, 32)  # the preset under every cell
    smoke = build_plan(parse_args(["--study", study, "--variants", "reference,diffeomorphic"]),
                       "smoke", tmp_path)
    assert smoke.variants == ["reference", "diffeomorphic"] and smoke.seeds == [0]
    assert smoke.cell_overrides()["diffeomorphic"]["model.diffeomorphic"] is True
    # the default is the original 2x2, the registry's names and its one learning rate; the
    # original rates are a study of their own
    default = build_plan(parse_args([]), "quick", tmp_path)
    assert default.variants == ["baseline", "regloss", "combined_basic", "combined_enhanced"]
    assert [default.base_config(v).lr / QUICK_LR_SCALE for v in default.variants] == \
        pytest.approx([1e-3] * 4)
    original = build_plan(parse_args(["--study", "affine_x_regularizers_original_lr"]), "quick",
                          tmp_path)
    assert [original.base_config(v).lr / QUICK_LR_SCALE for v in original.variants] == \
        pytest.approx([1e-3, 1e-3, 3e-4, 3e-4])


def _cell_configs(study, cells):
    return {c: Config.from_flat(study.overrides(c)) for c in cells}


def test_search_space_ranges_and_guaranteed_points():
    from regcore.study import default_study

    study, base = default_study(), Config()
    configs = _cell_configs(study, ["baseline", "regloss", "combined_enhanced"])
    space, points = search_space(base, configs, study, 0, 5)
    assert space["regablate.group"] == "search"
    assert sorted(space["variant"].categories) == ["combined_enhanced", "regloss"]
    for name, default in STUDY_REG_WEIGHTS.items():
        domain = space[f"loss.{name}_weight"]
        assert domain.lower == pytest.approx(default / 10)
        assert domain.upper == pytest.approx(default * 10)
    # the study's weights run for each regularizing variant
    assert [p["variant"] for p in points] == ["regloss", "combined_enhanced"]
    assert all(p[f"loss.{n}_weight"] == w for p in points for n, w in STUDY_REG_WEIGHTS.items())
    _, one = search_space(base, _cell_configs(study, ["regloss", "combined_enhanced"]), study,
                          0, 1)
    assert len(one) == 1
    with pytest.raises(ValueError, match="the weight search needs one of the study's search"):
        search_space(base, _cell_configs(study, ["baseline"]), study, 0, 3)


def test_search_space_of_a_study_file(tmp_path):
    """A study's own search cells and space (uniform, choice); a cell whose value lies outside
    the space gets no guaranteed point."""
    from regcore.study import parse_study

    study = parse_study({
        "name": "lr_x_reg",
        "factors": {"regularize": {"levels": [{"name": "off", "set": {"loss.regularize": False}},
                                              {"name": "on", "set": {"loss.regularize": True}}]},
                    "affine": {"levels": [{"name": "off", "set": {"model.affine": False}},
                                          {"name": "on", "set": {"model.affine": True}}]}},
        "search": {"cells": ["regularize", "regularize-affine"],
                   "space": {"loss.smooth_weight": {"uniform": [0.0, 0.05]},
                             "train.lr": {"choice": [1e-3, 3e-4]}}},
    })
    base = Config().with_overrides({"train.lr": 1e-3})
    configs = {c.name: Config.from_flat({**base.to_flat(), **study.overrides(c.name)})
               for c in study.cells}
    configs["regularize-affine"] = configs["regularize-affine"].with_overrides(
        {"train.lr": 1e-2})
    space, points = search_space(base, configs, study, 3, 8)
    assert sorted(space["variant"].categories) == ["regularize", "regularize-affine"]
    assert space["seed"] == 3
    assert (space["loss.smooth_weight"].lower, space["loss.smooth_weight"].upper) == (0.0, 0.05)
    assert sorted(space["train.lr"].categories) == [3e-4, 1e-3]
    assert points == [{"variant": "regularize", "loss.smooth_weight": 0.01, "train.lr": 1e-3}]


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
    assert cfg.data.pairing == "atlas" and cfg.loss.dice_weight == 0.7
    assert cfg.train.epochs == 50 and cfg.train.batch_size == 1
    # the network recipe measured on one-hot maps at 64^3, at the study's rate for every cell
    assert (cfg.model.backbone, cfg.model.pair_input, cfg.model.passes) == ("vxm", "demons3", 3)
    assert cfg.model.affine_head == "fit" and cfg.train.lr_schedule == "cosine"
    assert cfg.lr == 1e-3 and plan.base_config("baseline").lr == 1e-3
    assert cfg.loss.reg_weights() == STUDY_REG_WEIGHTS
    assert cfg.loss.pass_weight == 0 and cfg.loss.coarse_weight == 0  # the study's loss
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
