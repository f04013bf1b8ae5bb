"""Statistics: the two-level contrast inference against closed forms, Holm, Spearman, power."""

import numpy as np
import pytest
from scipy import stats as sps

from analysis.stats import (contrast_inference, holm, minimal_detectable_effect, power,
                            seeds_needed, spearman, variance_components)

DIFF = np.array([-1.0, 1.0])  # cell 1 - cell 0


def _networks_only(rng, n_seeds=(3, 4), n_pairs=6):
    """Two cells whose networks differ by an offset shared by all their pairs (no pair
    variation at all), padded to the same number of network slots with NaN."""
    offsets = [rng.normal(0.5 + 0.1 * c, 0.02 + 0.03 * c, s) for c, s in enumerate(n_seeds)]
    y = np.full((2, max(n_seeds), n_pairs), np.nan)
    for c, values in enumerate(offsets):
        y[c, :len(values)] = values[:, None]
    return y, offsets


def test_networks_only_is_welchs_t_test_on_the_network_means():
    # no pair variation: B = E = 0 and Var(L) = sum_c var_s(m_cs) / S_c with Satterthwaite's
    # df, which is exactly Welch's unequal-variance t test of the two cells' networks
    y, (a, b) = _networks_only(np.random.default_rng(1))
    result = contrast_inference(y, DIFF)
    welch = sps.ttest_ind(b, a, equal_var=False)
    assert result.estimate == pytest.approx(b.mean() - a.mean())
    assert result.p == pytest.approx(welch.pvalue, rel=1e-9)
    assert result.df == pytest.approx(welch.df, rel=1e-9)
    lo, hi = welch.confidence_interval(0.95)
    assert (result.ci_lo, result.ci_hi) == (pytest.approx(lo), pytest.approx(hi))
    assert result.var_pair == 0 and result.var_residual == pytest.approx(0, abs=1e-20)


def test_a_network_level_metric_is_the_same_test():
    y, (a, b) = _networks_only(np.random.default_rng(2))
    result = contrast_inference(y[..., :1], DIFF)  # P = 1: a property of the network
    assert result.p == pytest.approx(sps.ttest_ind(b, a, equal_var=False).pvalue, rel=1e-9)


def test_pairs_only_is_the_paired_t_test_of_the_per_pair_contrast():
    # every seed of a cell identical (no network variation): the network part is 0 and the
    # test is the one-sample t test of d_p = sum_c w_c y[c, p] over pairs, df = P - 1
    rng = np.random.default_rng(3)
    per_pair = rng.normal(0.6, 0.05, (2, 1, 9)) + np.array([0.0, 0.01])[:, None, None]
    y = np.repeat(per_pair, 3, axis=1)
    result = contrast_inference(y, DIFF)
    d = per_pair[1, 0] - per_pair[0, 0]
    ttest = sps.ttest_1samp(d, 0.0)
    assert result.p == pytest.approx(ttest.pvalue, rel=1e-9)
    assert result.df == pytest.approx(8)
    assert result.var_network == 0


def test_both_sources_enter_the_variance():
    # y = cell + network offset + pair x cell term: Var(L) has a network part and a pair part,
    # each larger than zero, and their sum is the squared standard error
    rng = np.random.default_rng(4)
    y = (rng.normal(0, 0.02, (2, 4, 1)) + rng.normal(0, 0.02, (2, 1, 12))
         + rng.normal(0, 0.005, (2, 4, 12)))
    result = contrast_inference(y, DIFF)
    assert result.var_network > 0 and result.var_pair > 0
    assert result.se ** 2 == pytest.approx(result.var_network + result.var_pair
                                           + result.var_residual)
    # the pair effect common to every cell cancels: adding it changes nothing
    shifted = y + rng.normal(0, 1.0, (1, 1, 12))
    again = contrast_inference(shifted, DIFF)
    assert again.p == pytest.approx(result.p) and again.se == pytest.approx(result.se)


def test_one_network_per_cell_is_not_estimable_and_identical_values_are_certain():
    y = np.random.default_rng(5).normal(0, 1, (2, 1, 5))
    assert np.isnan(contrast_inference(y, DIFF).p)  # no replicate of the training
    same = np.zeros((2, 3, 4))
    assert contrast_inference(same, DIFF).p == 1.0
    shifted = same + np.array([0.0, 1.0])[:, None, None]
    result = contrast_inference(shifted, DIFF)
    assert result.p == 0.0 and result.ci_lo == result.ci_hi == 1.0
    with pytest.raises(ValueError, match="expected 2 weights"):
        contrast_inference(same, np.ones(3))


def test_variance_components_recover_the_simulated_sizes():
    rng = np.random.default_rng(6)
    n = 4000  # studies, pooled by averaging their estimates
    y = (rng.normal(0, 0.03, (n, 1, 1, 10)) + rng.normal(0, 0.01, (n, 4, 1, 10))
         + rng.normal(0, 0.015, (n, 4, 5, 1)) + rng.normal(0, 0.008, (n, 4, 5, 10)))
    comp = variance_components(y)
    assert np.mean(comp["sd_residual"] ** 2) == pytest.approx(0.008 ** 2, rel=0.03)
    assert np.mean(comp["sd_network"] ** 2) == pytest.approx(0.015 ** 2, rel=0.05)
    assert np.mean(comp["sd_pair_x_cell"] ** 2) == pytest.approx(0.01 ** 2, rel=0.1)
    assert np.mean(comp["sd_pair"] ** 2) == pytest.approx(0.03 ** 2, rel=0.1)


def test_power_mde_and_seeds_needed_agree():
    se, df = 0.01, 8
    mde = minimal_detectable_effect(se, df)
    assert power(mde, se, df) == pytest.approx(0.8, abs=1e-6)
    assert power(0.0, se, df) == pytest.approx(0.05)
    # normal approximation: (1.96 + 0.84) se, inflated by the t quantiles at 8 df
    assert 2.8 * se < mde < 3.5 * se
    comp = {"sd_network": 0.015, "sd_residual": 0.0, "sd_pair_x_cell": 0.0, "n_pairs": 10}
    w = np.array([-0.5, -0.5, 0.5, 0.5])  # a main effect of a 2x2: sum w^2 = 1
    needed = seeds_needed(0.03, w, comp)
    se_needed = 0.015 / np.sqrt(needed)
    assert power(0.03, se_needed, 4 * (needed - 1)) >= 0.8
    se_fewer = 0.015 / np.sqrt(needed - 1)
    assert power(0.03, se_fewer, 4 * (needed - 2)) < 0.8
    # a pair part that alone exceeds the effect cannot be overcome by more seeds
    limited = {**comp, "sd_pair_x_cell": 0.2}
    assert np.isnan(seeds_needed(0.03, w, limited))


def test_holm_matches_hand_computation():
    # sorted: 0.005 (x4 = 0.02), 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> running
    # max 0.06); NaN is not counted in m and stays NaN.
    p = [0.01, 0.04, np.nan, 0.03, 0.005]
    np.testing.assert_allclose(holm(p), [0.03, 0.06, np.nan, 0.06, 0.02])


def test_holm_caps_at_one_and_keeps_order():
    np.testing.assert_allclose(holm([0.6, 0.5]), [1.0, 1.0])
    np.testing.assert_allclose(holm([0.001]), [0.001])
    assert holm([]).size == 0


@pytest.mark.parametrize("bad, message", [([1.5], "p-values must lie in [0, 1]"),
                                          ([[0.1, 0.2]], "expected a 1-D sequence")])
def test_holm_rejects_bad_input(bad, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        holm(bad)


def test_spearman_monotone_and_undefined():
    rho, p = spearman(np.arange(6), np.arange(6) ** 2)
    assert rho == pytest.approx(1.0) and p < 0.01
    assert all(np.isnan(spearman([1, 1, 1, 1], [1, 2, 3, 4])))
