"""Effects on constructed data whose answer is known."""

import numpy as np
import pandas as pd
import pytest

from analysis.effects import (factorial_effects, improvements, pareto_front, search_importance,
                              summarize)
from tests.analysis.constructed import make_per_pair


def _row(table, effect, metric):
    return table[(table["effect"] == effect) & (table["metric"] == metric)].iloc[0]


def test_additive_effects_give_no_interaction_and_detect_main_effects():
    effects = factorial_effects(make_per_pair(dice=(0.05, 0.03, 0.0), hd95=(-0.5, -0.3, 0.0)))
    for metric in ("dice_mean", "hd95_mm"):
        inter = _row(effects, "interaction", metric)
        assert inter.ci_lo <= 0 <= inter.ci_hi
        assert inter.verdict == "no evidence of either"
    affine = _row(effects, "affine", "dice_mean")
    assert affine.estimate == pytest.approx(0.05, abs=0.005)
    assert affine.ci_lo > 0 and affine.verdict == "improves"
    reg = _row(effects, "regularize", "hd95_mm")
    assert reg.estimate == pytest.approx(-0.3, abs=0.1)
    assert reg.verdict == "improves"  # lower HD95 is better
    assert set(effects["metric"]) >= {"dice_mean", "hd95_mm", "folding_pct", "inference_s"}
    assert "true_error_mm" not in set(effects["metric"])  # all NaN: no ground truth


def test_injected_synergy_is_detected_with_the_right_sign():
    # dice: +0.04 only when both factors are on (higher is better: positive synergy);
    # hd95: -0.6 mm only when both are on (lower is better: positive synergy as well);
    # folding: +1 % only when both are on (lower is better: negative synergy).
    data = make_per_pair(dice=(0.02, 0.02, 0.04), hd95=(-0.2, -0.2, -0.6),
                         folding=(0.0, -1.0, 1.0))
    effects = factorial_effects(data)
    dice = _row(effects, "interaction", "dice_mean")
    assert dice.estimate == pytest.approx(0.04, abs=0.006)
    assert dice.ci_lo > 0 and dice.p_holm < 0.05
    assert dice.verdict == "positive synergy"
    hd95 = _row(effects, "interaction", "hd95_mm")
    assert hd95.estimate < 0 and hd95.verdict == "positive synergy"
    folding = _row(effects, "interaction", "folding_pct")
    assert folding.estimate > 0 and folding.verdict == "negative synergy"


def test_improvement_is_sign_aware_for_lower_is_better_metrics():
    data = make_per_pair(noise=0.0)
    base = data["variant"] == "baseline"
    # overwrite with exact values: baseline hd95 4 mm, every other variant 3 mm
    data.loc[base, "hd95_mm"] = 4.0
    data.loc[~base, "hd95_mm"] = 3.0
    data.loc[base, "folding_pct"] = 2.0
    data.loc[~base, "folding_pct"] = 3.0
    table = improvements(data, ["hd95_mm", "folding_pct", "dice_mean"])
    hd95 = table[(table["variant"] == "regloss") & (table["metric"] == "hd95_mm")].iloc[0]
    assert hd95.improvement_pct == pytest.approx(25.0)  # (4 - 3) / 4
    folding = table[(table["variant"] == "regloss") & (table["metric"] == "folding_pct")].iloc[0]
    assert folding.improvement_pct == pytest.approx(-50.0)  # worse: (2 - 3) / 2
    dice = table[(table["variant"] == "combined_basic") & (table["metric"] == "dice_mean")]
    assert dice.iloc[0].improvement_pct > 0  # affine adds 0.05 Dice
    assert set(table["variant"]) == {"regloss", "combined_basic", "combined_enhanced"}


def test_summary_averages_seeds_per_subject_before_the_bootstrap():
    data = make_per_pair(n_subjects=5, seeds=(0, 1), noise=0.0)
    # make the seeds disagree by +-0.1: the seed average per subject removes it exactly
    data.loc[data["seed"] == 0, "dice_mean"] += 0.1
    data.loc[data["seed"] == 1, "dice_mean"] -= 0.1
    summary = summarize(data, ["dice_mean"])
    base = summary[summary["variant"] == "baseline"].iloc[0]
    expected = data[(data["variant"] == "baseline") & (data["seed"] == 0)]["dice_mean"] - 0.1
    assert base.n_subjects == 5 and base.n_seeds == 2
    assert base["mean"] == pytest.approx(expected.mean())
    assert base["sd"] == pytest.approx(expected.std(ddof=1))
    assert base.ci_lo <= base["mean"] <= base.ci_hi


def test_unknown_metric_is_rejected():
    with pytest.raises(ValueError, match="unknown metric 'dice_typo'"):
        summarize(make_per_pair(n_subjects=3), ["dice_typo"])


def test_missing_cell_gives_no_factorial_effects():
    data = make_per_pair(n_subjects=4)
    assert factorial_effects(data[data["variant"] != "regloss"]).empty


def test_pareto_front_of_dice_up_and_folding_down():
    points = pd.DataFrame({"test.dice_mean": [0.7, 0.8, 0.75, 0.6, np.nan],
                           "test.folding_pct": [0.1, 0.5, 0.6, 0.05, 0.0]})
    # 0.75/0.6 is dominated by 0.8/0.5; the NaN row never counts
    assert pareto_front(points).tolist() == [True, True, False, True, False]


def test_search_importance_finds_the_weight_that_matters():
    rng = np.random.default_rng(0)
    n = 16
    smooth = 10 ** rng.uniform(-3, 0, n)
    bending = 10 ** rng.uniform(-3, 0, n)
    trials = pd.DataFrame({
        "group": "search", "status": "FINISHED",
        "cfg.loss.smooth_weight": smooth, "cfg.loss.bending_weight": bending,
        "cfg.seed": 0, "cfg.train.epochs": 2,
        "val.dice_mean": 0.7 - 0.1 * np.log10(smooth) * -1 + rng.normal(0, 0.002, n),
    })
    table = search_importance(trials)
    assert table["param"].tolist()[0] == "loss.smooth_weight"
    assert set(table["param"]) == {"loss.smooth_weight", "loss.bending_weight"}
    top = table.iloc[0]
    assert top.importance > 0.5 and top.spearman_rho > 0.9
    assert search_importance(trials.assign(group="ablation")).empty


def test_holm_runs_within_each_family_of_metrics():
    from analysis.stats import holm

    effects = factorial_effects(make_per_pair())
    inter = effects[effects["effect"] == "interaction"]
    assert set(inter.loc[inter["metric"].str.startswith("dice_c"), "family"]) == {"secondary"}
    for fam in ("primary", "secondary"):
        rows = inter[inter["family"] == fam]
        np.testing.assert_allclose(rows["p_holm"], holm(rows["p"].to_numpy()))
    assert set(inter.loc[inter["family"] == "primary", "metric"]) == {
        "dice_mean", "hd95_mm", "folding_pct", "sdlogj"}
    assert set(inter.loc[inter["family"] == "cost", "metric"]) == {"inference_s"}
    # displacement magnitudes have no better direction: described, never judged
    assert not set(effects["metric"]) & {"disp_max_mm", "disp_max_vox"}


def test_search_importance_includes_a_searched_variant():
    trials = pd.DataFrame({
        "group": "search", "status": "FINISHED",
        "cfg.variant": ["regloss", "combined_enhanced"] * 6,
        "cfg.loss.smooth_weight": 0.01, "cfg.seed": 0,
        "val.dice_mean": [0.6, 0.8, 0.61, 0.79, 0.6, 0.8] * 2,
    })
    table = search_importance(trials)
    assert table["param"].tolist() == ["variant"]
    assert table.iloc[0].importance == pytest.approx(1.0)
    assert np.isnan(table.iloc[0].spearman_rho)


def test_a_search_too_small_to_rank_says_so_and_stopped_trials_count():
    # four trials, two of them stopped early by ASHA: every one has its last val.dice_mean,
    # none has test metrics; four points cannot rank five weights
    trials = pd.DataFrame({
        "group": "search", "status": "FINISHED", "stopped_early": [False, True, True, False],
        "cfg.loss.smooth_weight": [0.01, 0.05, 0.002, 0.01], "cfg.seed": 0,
        "val.dice_mean": [0.60, 0.55, 0.58, 0.61],
    })
    table = search_importance(trials)
    assert table["param"].tolist() == ["loss.smooth_weight"]
    assert table.iloc[0].n_trials == 4
    assert np.isnan(table.iloc[0].importance)
    assert table.iloc[0].method.startswith("too few trials to rank")


def test_a_failed_network_leaves_the_others_analysed():
    """A cell with one network fewer (a trial that failed: no rows at all) keeps every pair and
    its other networks; the effects stay estimable (an unbalanced design)."""
    full = make_per_pair(dice=(0.05, 0.03, 0.0))
    lost = full[~((full["variant"] == "regloss") & (full["seed"] == 2))]
    summary = summarize(lost, ["dice_mean"]).set_index("variant")
    assert summary.loc["regloss", "n_seeds"] == 2 and summary.loc["baseline", "n_seeds"] == 3
    assert (summary["n_subjects"] == full["pair_id"].nunique()).all()
    assert np.isfinite(summary["mean"]).all() and np.isfinite(summary["ci_lo"]).all()
    effects = factorial_effects(lost, ["dice_mean"])
    affine = _row(effects, "affine", "dice_mean")
    assert np.isfinite(affine.p) and affine.estimate == pytest.approx(0.05, abs=0.01)
