"""Statistics helpers: Holm on hand-computed values, bootstrap coverage, paired tests."""

import numpy as np
import pytest

from analysis.stats import bootstrap_ci, holm, paired_test, spearman


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


def test_paired_test_all_zero_is_one_and_clear_shift_is_small():
    assert paired_test(np.zeros(8)) == 1.0
    assert np.isnan(paired_test(np.array([np.nan])))
    # 10 equal positive differences (ties): only the all-plus and all-minus sign patterns reach
    # |mean| = 1, so the exact two-sided p = 2 / 2**10
    assert paired_test(np.ones(10)) == pytest.approx(2 / 2**10)
    # symmetric differences: the observed mean 0 is reached by every pattern
    assert paired_test(np.array([-1.0, 1.0, -2.0, 2.0])) == 1.0


def test_paired_test_monte_carlo_for_many_subjects():
    rng = np.random.default_rng(0)
    assert paired_test(rng.normal(1.0, 0.1, 40)) == pytest.approx(1 / 20001)
    null = paired_test(rng.normal(0.0, 1.0, 40))
    assert 0.01 < null <= 1.0


def test_bootstrap_ci_covers_the_mean_and_is_seeded():
    rng = np.random.default_rng(1)
    x = rng.normal(5.0, 1.0, size=40)
    lo, hi = bootstrap_ci(x, seed=3)
    assert lo < x.mean() < hi
    assert hi - lo < 1.0  # about 2 x 1.96 / sqrt(40) = 0.62
    assert bootstrap_ci(x, seed=3) == (lo, hi)
    assert all(np.isnan(bootstrap_ci(x[:1])))


def test_bootstrap_ci_vectorised_statistic_on_rows():
    data = np.column_stack([np.full(10, 2.0), np.full(10, 3.0)])
    lo, hi = bootstrap_ci(data, lambda r: r[..., 1].mean(-1) - r[..., 0].mean(-1))
    assert lo == pytest.approx(1.0) and hi == pytest.approx(1.0)


def test_spearman_monotone_and_undefined():
    rho, p = spearman(np.arange(6), np.arange(6) ** 2)
    assert rho == pytest.approx(1.0) and p < 0.01
    assert all(np.isnan(spearman([1, 1, 1, 1], [1, 2, 3, 4])))
