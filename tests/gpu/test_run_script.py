"""The prepared GPU check (tests/gpu/run.sh) in its CPU fallback: every step runs and the
summary carries the figures the GPU run must report. Slow (a bench, a trial, a smoke sweep)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_gpu_check_runs_end_to_end_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable}  # Ray's socket paths need a short TMPDIR
    result = subprocess.run(["bash", str(ROOT / "tests" / "gpu" / "run.sh"), str(out), "--cpu"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed_steps"] == 0 and summary["skipped"] == {}
    assert [r["backbone"] for r in summary["bench"]["fp32"]] == ["vxm", "seed"]
    assert 0 < summary["trial"]["test.dice_mean"] <= 1
    assert summary["trial"]["train_step_s"] > 0 and summary["trial"]["device"] == "cpu"
    assert "4 trial runs" in (out / "sweep_runs.log").read_text()
    assert "problems: none" in (out / "sweep_runs.log").read_text()


def test_a_step_whose_packages_are_missing_is_skipped_with_the_reason(tmp_path):
    # a Python without the project's packages (as the GPU machine's, which lacks ray and
    # mlflow): every step says what is missing, none fails
    out = tmp_path / "out"
    script = tmp_path / "python3"
    script.write_text(f"#!/bin/sh\nexec {sys.executable} -S -I \"$@\"\n")
    script.chmod(0o755)
    env = {**os.environ, "PYTHON": str(script), "TMPDIR": str(tmp_path)}
    result = subprocess.run(["bash", str(ROOT / "tests" / "gpu" / "run.sh"), str(out), "--cpu"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:]
    assert "skipped: missing Python packages" in (out / "sweep.log").read_text()
    assert "skipped: missing Python packages" in (out / "trial.log").read_text()
    assert set(json.loads((out / "summary.json").read_text())["skipped"]) >= {"sweep", "trial"}
