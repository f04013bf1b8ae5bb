"""The report built from MLflow runs: every section and figure; bad inputs change nothing."""

import base64
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import pandas as pd

from analysis.report import SECTIONS, TABLES, _umask, build_report, main
from tests.analysis.conftest import log_sweep

ROOT = Path(__file__).resolve().parents[2]
FIGURES = {"box_dice_mean.png", "box_hd95_mm.png", "box_folding_pct.png", "box_sdlogj.png",
           "effects.png", "search_front.png", "example.png", "interaction_affine_regularize.png"}


@pytest.fixture(scope="module")
def report_dir(sweep_store, tmp_path_factory):
    store, pid = sweep_store
    out = tmp_path_factory.mktemp("report") / "report"
    path = build_report(store.uri, parent_run_id=pid, out_dir=out)
    assert path == out / "report.md"
    return out


def test_report_holds_every_section_and_figure(report_dir):
    md = (report_dir / "report.md").read_text()
    headings = re.findall(r"^## (.+)$", md, flags=re.M)
    assert headings == list(SECTIONS)
    assert md.startswith("# Ablation report: regablate")
    for sub in ("Primary metrics", "Secondary metrics", "Interaction plots"):
        assert f"### {sub}" in md
    pngs = {p.name for p in report_dir.glob("*.png")}
    assert pngs == FIGURES  # true_error_mm is all NaN here: no box plot for it
    html = (report_dir / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(FIGURES)
    for name in FIGURES:
        assert f"]({name})" in md
        png = (report_dir / name).read_bytes()
        assert png.startswith(b"\x89PNG")
        assert base64.b64encode(png).decode("ascii") in html
    assert "<h2>Research questions</h2>" in html
    assert not list(report_dir.parent.glob(".report.*"))  # no temporary left behind
    assert report_dir.stat().st_mode & 0o055 == 0o055 & ~_umask()  # readable like any folder
    assert {f"{t}.csv" for t in TABLES} <= {p.name for p in report_dir.glob("*.csv")}


def _section(md: str, title: str) -> str:
    return md.split(f"## {title}\n")[1].split("\n## ")[0]


def test_the_answer_comes_first_with_estimates_cis_and_verdicts(report_dir):
    md = (report_dir / "report.md").read_text()
    answer = _section(md, "Answer")
    assert md.index("## Answer") < md.index("## Provenance")
    rows = [line for line in answer.splitlines() if line.startswith("| the ")]
    assert [r.split("|")[1].strip() for r in rows] == [
        "the affine stage", "the regularizers", "the affine stage x the regularizers"]
    # constructed: affine +0.05 Dice, regularizers +0.03, no interaction
    affine = [c.strip() for c in rows[0].strip("|").split("|")]
    assert float(affine[1]) == pytest.approx(0.05, abs=0.005) and affine[4] == "improves"
    assert rows[2].split("|")[5].strip() == "no evidence of either"
    assert "Turning on the affine stage changes Dice by +0.05" in answer
    assert "this design detects ±" in answer  # the no-evidence verdict says what it could see
    assert "](effects.png)" in answer


def test_report_says_what_the_design_can_detect(report_dir):
    section = _section((report_dir / "report.md").read_text(), "What this design can detect")
    for column in ("between networks", "between pairs", "pair x variant", "residual"):
        assert column in section
    assert re.search(r"^\| Dice \| \d", section, flags=re.M)
    assert "| effect | detectable now |" in section and "seeds for the estimate" in section


def test_timings_are_analysed_per_network_and_the_same_network_shows_no_difference(report_dir):
    cost = _section((report_dir / "report.md").read_text(), "Computational cost")
    assert "one network at a time, alone on its device" in cost
    # regloss and baseline share one architecture: no evidence on inference time; the
    # affine stage adds 10 ms (constructed), found with the networks as the unit
    assert ("Turning on the regularizers changes Inference time by" in cost
            and "no evidence of an effect" in cost.split("Turning on the regularizers changes "
                                                      "Inference time")[1].split("\n")[0])
    assert re.search(r"Turning on the affine stage changes Inference time by \+0\.0\d+ s .*: it worsens", cost)
    effects = pd.read_csv(report_dir / "effects.csv")
    timing = effects[effects["metric"] == "timing_inference_s"]
    assert set(timing["n_subjects"]) == {0}  # no pairs: one value per network
    assert set(timing["n_networks"]) == {8}


def test_displacement_magnitudes_get_no_verdict(report_dir):
    effects = pd.read_csv(report_dir / "effects.csv")
    assert not set(effects["metric"]) & {"disp_max_mm", "disp_mean_mm", "disp_max_vox"}
    assert "Max displacement (disp_max_mm, mm; no better direction" in (
        report_dir / "report.md").read_text()


def test_references_and_the_gap_each_variant_closes(report_dir):
    section = _section((report_dir / "report.md").read_text(),
                       "Registration quality against references")
    assert "| Identity (no registration) | 0.4000 |" in section
    assert "| Instance optimisation (per pair, no network) | 0.8200 |" in section
    # baseline Dice is about 0.67: (0.67 - 0.40) / (0.82 - 0.40) = 64 %
    baseline = next(line for line in section.splitlines()
                    if line.startswith("| Baseline UNet |") and "%" in line)
    assert 55 <= float(baseline.split("|")[2].strip().rstrip(" %")) <= 75


def test_a_search_too_small_to_rank_says_so(report_dir):
    search = _section((report_dir / "report.md").read_text(), "Weight search")
    assert "The search is too small to rank the weights: 4 trials" in search
    assert "stopped trials included" in search


def test_report_tables_carry_the_numbers(report_dir):
    md = (report_dir / "report.md").read_text()
    # the original study's columns and rows, labels from regcore.variants
    assert ("| Method | MSE improvement (%) | NCC improvement (after - before) | "
            "Max displacement (mm) | Anatomical plausibility [0,1] | Inference time (ms) |") in md
    for label in ("Baseline UNet", "RegLoss UNet", "Combined (Basic)", "Combined (Enhanced)"):
        assert f"| {label} | " in md
    # constructed: inference 0.05 s (+ 0.01 s with the affine stage), MSE improvement 40 %
    # (+ 5 affine, + 3 regularizers), plausibility 0.9 (+ 0.05 regularizers)
    key = _section(md, "Key results in the original study's layout")
    base = next(line for line in key.splitlines() if line.startswith("| Baseline UNet |"))
    cells = [c.strip() for c in base.strip("|").split("|")]
    assert float(cells[1].split(" ± ")[0]) == pytest.approx(40.0, abs=0.5)
    assert float(cells[4].split(" ± ")[0]) == pytest.approx(0.9)
    assert float(cells[5].split(" ± ")[0]) == pytest.approx(50.0, abs=1.0)
    enhanced = next(line for line in key.splitlines() if line.startswith("| Combined (Enh"))
    assert float(enhanced.strip("|").split("|")[5].split(" ± ")[0]) == pytest.approx(60.0, abs=1)
    # four research questions answered with numbers
    questions = re.findall(r"^- ([1-4])\. ", md, flags=re.M)
    assert questions == ["1", "2", "3", "4"]
    # provenance: the failed trial is listed with its status
    assert "trial-regloss-9" in md and "FAILED" in md
    assert "1 duplicate run(s) of resumed trials dropped" in md
    # the regularization the grid trained with, as effective weights (the default config)
    assert ("Regularization of the variants that regularize: reg_scale 300 x the study's weights = "
            "smooth 3, magnitude 3, rigidity 1.5, jacobian 30, bending 1.5, x the study's adaptive "
            "factor max(0.01, 0.1 (1 - epoch/epochs)).") in md
    # the additive constructed data: no synergy on Dice
    primary = md.split("### Primary metrics")[1].split("###")[0]
    dice_line = next(line for line in primary.splitlines()
                     if line.startswith("| the affine stage x the regularizers | Dice (dice_mean)"))
    assert dice_line.rstrip().endswith("| no evidence of either |")


def test_report_replaces_a_previous_report(sweep_store, report_dir, tmp_path):
    store, pid = sweep_store
    out = tmp_path / "again"
    shutil.copytree(report_dir, out)
    (out / "stale.txt").write_text("old")
    build_report(store.uri, experiment="regablate", out_dir=out)
    assert not (out / "stale.txt").exists() and (out / "report.html").exists()
    assert not list(tmp_path.glob(".again.*"))


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "analysis.report", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def test_cli_bad_inputs_exit_2_with_one_line_and_write_nothing(store, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from regcore.cli import run_cli

    client = MlflowClient(tracking_uri=store.uri)
    client.create_experiment("empty", artifact_location=store.artifacts.as_uri())
    foreign = client.create_experiment("foreign", artifact_location=store.artifacts.as_uri())
    client.set_terminated(client.create_run(foreign).info.run_id)
    out = tmp_path / "out"
    uri = ["--tracking-uri", store.uri]
    cases = [
        ([*uri, "--experiment", "empty"], "experiment 'empty' is empty"),
        ([*uri, "--experiment", "foreign"], "experiment 'foreign' holds no regablate sweep"),
        ([*uri, "--parent-run", "0123abcd"], "parent run '0123abcd' not found"),
        (["--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}"], "is unreachable"),
        ([*uri, "--experiment", "a", "--parent-run", "b"], "not allowed with argument"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            run_cli(main, [*args, "--out", str(out)], prog="analysis.report")
        err = capsys.readouterr().err
        assert exit_info.value.code == 2
        assert err.startswith("analysis.report: error: ") and err.count("\n") == 1
        assert message in err
        assert not out.exists()
    assert not (tmp_path / "none.db").exists()
    # the real command line: one line on stderr, exit code 2, no default store created
    result = _cli("--experiment", "foreign", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "unreachable" in result.stderr
    assert not out.exists() and not (tmp_path / "mlflow.db").exists()


def test_out_dir_that_is_not_a_report_is_refused(sweep_store, tmp_path):
    store, pid = sweep_store
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("keep me")
    with pytest.raises(ValueError, match="holds no report.md: refusing to replace it"):
        build_report(store.uri, parent_run_id=pid, out_dir=precious)
    assert (precious / "thesis.tex").read_text() == "keep me"


def test_partial_sweep_reports_what_it_cannot_compute(store, tmp_path):
    from tests.analysis.constructed import make_per_pair

    data = make_per_pair(n_subjects=4, seeds=(0,))
    data = data[data["variant"].isin(["baseline", "regloss"])]
    pid = log_sweep(store, per_pair=data, n_search=0, resumed=False, failed=False)
    md = build_report(store.uri, parent_run_id=pid, out_dir=tmp_path / "r").read_text()
    assert re.findall(r"^## (.+)$", md, flags=re.M) == list(SECTIONS)
    assert "lacks finished trials in one of the 4 cells" in md
    assert "The sweep ran no weight search" in md
    assert "No trial of this sweep logged an example.npz." in md
    assert "1. Individual contributions of each factor: not answerable" in md
    assert "| RegLoss UNet | " in md and "| Combined (Basic) | " not in md
    assert {p.name for p in (tmp_path / "r").glob("*.png")} == {
        "box_dice_mean.png", "box_hd95_mm.png", "box_folding_pct.png", "box_sdlogj.png"}


def test_report_gives_learn2regs_columns_beside_ours(report_dir):
    section = _section((report_dir / "report.md").read_text(), "Registration metrics")
    ours = next(line for line in section.splitlines() if line.startswith("| Method | Dice"))
    assert "NDV (%), lower is better" in ours and "Labels missing, lower is better" in ours
    l2r = next(line for line in section.splitlines() if line.startswith("| Method | Dice (L"))
    assert l2r.split(" | ")[1:] == ["Dice (Learn2Reg), higher is better",
                                    "HD95 (Learn2Reg) (vox), lower is better",
                                    "SDlogJ (Learn2Reg), lower is better |"]
    # the definitions state the missing-structure rule
    assert "scores as the worst case, never the best" in (report_dir / "report.md").read_text()
