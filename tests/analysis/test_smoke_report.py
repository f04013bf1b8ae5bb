"""The report from a real smoke sweep (Ray Tune + MLflow + regcore training): slow."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from analysis.report import SECTIONS, build_report
from analysis.runs import load_sweep

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def smoke_sweep(tmp_path_factory):
    """(tracking uri, work dir) of one `sweeps/ablation.py --preset smoke` run, without the
    weight search (covered on constructed runs in test_report.py) to keep CI short."""
    work = tmp_path_factory.mktemp("smoke_sweep")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "sweeps" / "ablation.py"), "--preset", "smoke",
         "--tracking-uri", uri, "--storage-path", str(work / "ray_results"),
         "--sweep-id", "smoke-test", "--search-trials", "0", "--no-report"],
        cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return uri, work


@pytest.mark.slow
def test_report_from_a_real_smoke_sweep(smoke_sweep):
    uri, work = smoke_sweep
    sweep = load_sweep(uri, experiment="regablate")
    ablation = sweep.finished[sweep.finished["group"] == "ablation"]
    assert set(ablation["variant"]) == {"baseline", "regloss", "combined_basic",
                                        "combined_enhanced"}
    assert sweep.trials["trial_id"].is_unique
    assert {"dice_mean", "hd95_mm", "folding_pct", "inference_s"} <= set(sweep.per_pair.columns)
    assert sweep.per_pair["pair_id"].nunique() >= 2
    assert sweep.preset == "smoke"

    out = work / "report"
    path = build_report(uri, parent_run_id=sweep.parent_run_id, out_dir=out)
    md = path.read_text()
    assert re.findall(r"^## (.+)$", md, flags=re.M) == list(SECTIONS)
    assert re.findall(r"^- ([1-4])\. ", md, flags=re.M) == ["1", "2", "3", "4"]
    pngs = {p.name for p in out.glob("*.png")}
    assert {"box_dice_mean.png", "box_folding_pct.png", "effects.png", "example.png"} <= pngs
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(pngs)
    assert sweep.parent_run_id in md
    assert "The sweep ran no weight search" in md
