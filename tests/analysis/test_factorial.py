"""k-factor designs: planted effects of a 2^3 study are found with the right signs and
nothing else is claimed beyond the nominal rate; the 2x2 reads the same by names or factors."""

import itertools

import numpy as np
import pandas as pd
import pytest

from analysis.calibration import as_per_pair, simulate
from analysis.effects import design_of, factorial_effects, metric_array
from analysis.stats import contrast_inference

FACTORS = ("affine", "regularize", "diffeomorphic")
CELLS = list(itertools.product((0, 1), repeat=3))
# planted (Dice): affine +0.04, regularize -0.03, affine:regularize +0.05; the rest 0
PLANTED = {("affine",): 0.04, ("regularize",): -0.03, ("affine", "regularize"): 0.05}


def _cell_means() -> np.ndarray:
    """mu[c] with the planted contrasts: mu = sum over effects of size * w / sum(w^2)."""
    mu = np.zeros(len(CELLS))
    for subset, size in PLANTED.items():
        idx = [FACTORS.index(f) for f in subset]
        w = np.array([np.prod([2 * c[i] - 1 for i in idx]) / 2 ** (3 - len(subset))
                      for c in CELLS])
        mu += size * w / np.sum(w ** 2)
    return mu


def _study(rng, n_studies: int, n_seeds: int = 5, n_pairs: int = 10) -> np.ndarray:
    shape = (n_studies, 8, n_seeds, n_pairs)
    return (0.6 + _cell_means()[None, :, None, None]
            + rng.normal(0, 0.03, (n_studies, 1, 1, n_pairs))
            + rng.normal(0, 0.01, (n_studies, 8, 1, n_pairs))
            + rng.normal(0, 0.015, (n_studies, 8, n_seeds, 1))
            + rng.normal(0, 0.01, shape))


def _table(y: np.ndarray) -> pd.DataFrame:
    rows = []
    for c, cell in enumerate(CELLS):
        name = "-".join(f for f, on in zip(FACTORS, cell) if on) or "reference"
        for s in range(y.shape[1]):
            for p in range(y.shape[2]):
                rows.append({"variant": name, **dict(zip(FACTORS, map(bool, cell))), "seed": s,
                             "group": "ablation", "pair_id": f"p{p}", "dice_mean": y[c, s, p]})
    return pd.DataFrame(rows)


def test_a_2x2x2_study_recovers_planted_effects_and_claims_nothing_else():
    rng = np.random.default_rng(5)
    table = factorial_effects(_table(_study(rng, 1)[0]), ["dice_mean"], factors=FACTORS)
    assert list(table["effect"]) == ["affine", "regularize", "diffeomorphic",
                                     "affine:regularize", "affine:diffeomorphic",
                                     "regularize:diffeomorphic",
                                     "affine:regularize:diffeomorphic"]
    assert set(table["order"]) == {1, 2, 3}
    # over many simulated studies (the same computation, vectorised)
    design, rows = design_of(_table(_study(rng, 1)[0]), FACTORS)
    y = _study(rng, 1000)
    for name, subset in design.effects():
        result = contrast_inference(y, design.weights(subset))
        claimed = result.p < 0.05
        size = PLANTED.get(subset, 0.0)
        if size:
            assert np.mean(claimed) >= 0.9, name
            assert np.mean(claimed & (np.sign(result.estimate) != np.sign(size))) == 0, name
            assert np.mean(result.estimate) == pytest.approx(size, abs=0.003)
        else:
            assert np.mean(claimed) <= 0.07, name


def test_verdicts_read_the_signs_in_the_metric_direction():
    table = factorial_effects(_table(_study(np.random.default_rng(9), 1, n_seeds=8)[0]),
                              ["dice_mean"], factors=FACTORS)
    verdict = dict(zip(table["effect"], table["verdict"]))
    assert verdict["affine"] == "improves" and verdict["regularize"] == "worsens"
    assert verdict["affine:regularize"] == "positive synergy"
    assert verdict["affine:regularize:diffeomorphic"].startswith("no evidence")


def test_the_2x2_reads_the_same_by_the_study_names_and_by_generic_factors():
    y = simulate(np.random.default_rng(2), 1, 3, effects={"affine": 0.04, "interaction": 0.03})[0]
    by_names = as_per_pair(y).drop(columns=["affine", "regularize"])  # only variant names
    generic = as_per_pair(y).rename(columns={"affine": "stage", "regularize": "losses"})
    generic["variant"] = generic["variant"].map({"baseline": "c00", "regloss": "c01",
                                                 "combined_basic": "c10",
                                                 "combined_enhanced": "c11"})
    a = factorial_effects(by_names, ["dice_mean"])
    b = factorial_effects(generic, ["dice_mean"], factors=("stage", "losses"))
    assert list(a["effect"]) == ["affine", "regularize", "interaction"]
    assert list(b["effect"]) == ["stage", "losses", "interaction"]
    for column in ("estimate", "se", "df", "ci_lo", "ci_hi", "p", "p_holm", "verdict"):
        assert list(a[column]) == list(b[column]), column


def test_an_incomplete_design_gives_no_effects():
    table = _table(_study(np.random.default_rng(1), 1)[0])
    assert factorial_effects(table[table["variant"] != "affine"], ["dice_mean"],
                             factors=FACTORS).empty
    design, rows = design_of(table, FACTORS)
    y, pairs, dropped = metric_array(rows, design, "dice_mean")
    assert y.shape == (8, 5, 10) and len(pairs) == 10 and dropped == 0
