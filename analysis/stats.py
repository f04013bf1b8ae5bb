"""Inference with two sources of variation: trained networks and test pairs.

An ablation measures metric y for network s (a training run: one cell of the design x one seed)
on test pair p. Every network of every cell sees the same test pairs, so networks are nested in
cells and crossed with pairs. The model behind every CI and p-value here (docs/STATISTICS.md):

    y[c, s, p] = mu[c] + a[p] + g[c, p] + b[c, s] + e[c, s, p]

- b: the network's own offset (seed-to-seed variation of training), variance sigma_b^2;
- a: how hard pair p is for every method (cancels in any contrast whose weights sum to 0);
- g: how differently the cells fare on pair p (pair-by-cell interaction), sigma_g^2;
- e: what is left (network-by-pair), sigma_e^2.

A contrast L = sum_c w[c] ybar[c] of the cell means estimates sum_c w[c] mu[c]: the effect
averaged over training runs (seeds) and over pairs drawn like the test pairs. Its variance is

    Var(L) = sum_c w[c]^2 (sigma_b^2 / S_c + sigma_e^2 / (S_c P)) + Var_pairs / P

estimated by moments (the classical quasi-F of crossed random effects, per cell so unequal
variances are allowed): A = sum_c w^2 var_s(network means) / S_c, B = var_p(per-pair contrast)
/ P, E = sum_c w^2 MS_e[c] / (S_c P), V = A + B - E with both components truncated at 0;
degrees of freedom by Satterthwaite; a t test and a t interval. The calibration (false
positives, family-wise error, power) is measured by seeded simulations in
tests/analysis/test_calibration.py and tabulated in docs/STATISTICS.md.

Arrays are `(..., C, S, P)`: any leading batch axes (many simulated studies at once), C cells,
S network slots per cell (a missing network is a row of NaN), P test pairs (1 for a property of
the network itself, such as its timed inference).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from scipy import stats as sps

__all__ = ["ALPHA", "CI_LEVEL", "POWER", "Contrast", "contrast_inference", "variance_components",
           "power", "minimal_detectable_effect", "seeds_needed", "holm", "spearman"]

ALPHA = 0.05
CI_LEVEL = 0.95
POWER = 0.80


@dataclass(frozen=True)
class Contrast:
    """The inference of one contrast (arrays shaped like the batch axes of the data).

    estimate: sum_c w[c] ybar[c]; se: sqrt of the estimated variance; df: Satterthwaite's
    degrees of freedom; p: two-sided t test of estimate = 0; ci_lo, ci_hi: the `CI_LEVEL` t
    interval; var_network, var_pair, var_residual: the three parts of se^2 (network and pair
    parts truncated at 0), so se^2 = var_network + var_pair + var_residual.
    """

    estimate: np.ndarray
    se: np.ndarray
    df: np.ndarray
    p: np.ndarray
    ci_lo: np.ndarray
    ci_hi: np.ndarray
    var_network: np.ndarray
    var_pair: np.ndarray
    var_residual: np.ndarray


def _check(y: np.ndarray) -> np.ndarray:
    y = np.asarray(y, dtype=float)
    if y.ndim < 3:
        raise ValueError(f"expected data of shape (..., cells, networks, pairs), got {y.shape}")
    return y


def _cell_moments(y: np.ndarray):
    """Per-cell moments of `y` (..., C, S, P): S_c, cell means, per-pair cell means, the
    variance of the network means, the residual mean square."""
    valid = np.isfinite(y).all(axis=-1)  # (..., C, S): a network with every pair measured
    y = np.where(valid[..., None], y, np.nan)
    n_net = valid.sum(axis=-1)  # (..., C)
    n_pairs = y.shape[-1]
    with _quiet():
        net_mean = y.mean(axis=-1)  # (..., C, S)
        cell_mean = np.nanmean(net_mean, axis=-1)  # (..., C)
        pair_mean = np.nanmean(y, axis=-2)  # (..., C, P): seeds averaged per pair
        var_net = np.nanvar(net_mean, axis=-1, ddof=1)  # (..., C); NaN when S_c < 2
        resid = (y - net_mean[..., None] - pair_mean[..., None, :]
                 + cell_mean[..., None, None])
        df_e = (n_net - 1) * (n_pairs - 1)
        ms_e = np.nansum(resid ** 2, axis=(-2, -1)) / df_e
    return n_net, cell_mean, pair_mean, var_net, ms_e, df_e


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence numpy's "mean of empty slice" warnings (empty cells give NaN, on purpose)."""
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def contrast_inference(y: np.ndarray, weights: np.ndarray, *, level: float = CI_LEVEL
                       ) -> Contrast:
    """The estimate, CI and p-value of the contrast `weights` (C,) of the cells of `y`.

    `y` is `(..., C, S, P)` (see the module docstring); `weights` `(C,)` or `(..., C)`.
    Cells with weight 0 do not enter. Needs at least 2 networks in every cell with a non-zero
    weight (else NaN: the variance between training runs cannot be estimated from one run).
    A metric of the network itself (P = 1) has no pair part. When the estimated variance is 0
    (identical values), p is 1 for a zero estimate and 0 otherwise.
    """
    y = _check(y)
    if not 0 < level < 1:
        raise ValueError(f"level == {level!r}, must be in (0, 1)")
    w = np.asarray(weights, dtype=float)
    if w.shape[-1] != y.shape[-3]:
        raise ValueError(f"expected {y.shape[-3]} weights (one per cell), got {w.shape[-1]}")
    n_net, cell_mean, pair_mean, var_net, ms_e, df_e = _cell_moments(y)
    used = w != 0
    w2 = w ** 2
    n_pairs = y.shape[-1]
    with _quiet():
        estimate = np.sum(np.where(used, w * cell_mean, 0.0), axis=-1)
        a_terms = np.where(used, w2 * var_net / n_net, 0.0)  # (..., C)
        a_df = n_net - 1
        var_a = a_terms.sum(axis=-1)
        df_a = var_a ** 2 / np.sum(np.where(used, a_terms ** 2 / a_df, 0.0), axis=-1)
        if n_pairs > 1:
            per_pair = np.sum(np.where(used[..., None], w[..., None] * pair_mean, 0.0), axis=-2)
            var_b = per_pair.var(axis=-1, ddof=1) / n_pairs
            df_b = np.full_like(var_b, n_pairs - 1.0)
            e_terms = np.where(used, w2 * ms_e / (n_net * n_pairs), 0.0)
            var_e = e_terms.sum(axis=-1)
            df_e_sum = var_e ** 2 / np.sum(np.where(used, e_terms ** 2 / df_e, 0.0), axis=-1)
        else:
            var_b = np.zeros_like(var_a)
            df_b = np.full_like(var_a, np.inf)
            var_e = np.zeros_like(var_a)
            df_e_sum = np.full_like(var_a, np.inf)
        var_network = np.maximum(var_a - var_e, 0.0)
        var_pair = np.maximum(var_b - var_e, 0.0)
        total = var_network + var_pair + var_e
        # Satterthwaite on the parts that are not truncated
        both = (var_network > 0) & (var_pair > 0)
        df_both = total ** 2 / (np.sum(np.where(used, a_terms ** 2 / a_df, 0.0), axis=-1)
                                + (var_b ** 2 / df_b if n_pairs > 1 else 0.0)
                                + (np.sum(np.where(used, e_terms ** 2 / df_e, 0.0), axis=-1)
                                   if n_pairs > 1 else 0.0))
        df = np.where(both, df_both,
                      np.where(var_network > 0, df_a,
                               np.where(var_pair > 0, df_b, df_e_sum)))
        if n_pairs == 1:
            df = df_a
        invalid = np.any(used & (n_net < 2), axis=-1) | ~np.isfinite(estimate)
        se = np.sqrt(total)
        t = np.abs(estimate) / se
        p = 2 * sps.t.sf(t, df)
        p = np.where(se > 0, p, np.where(estimate == 0, 1.0, 0.0))
        half = sps.t.ppf(0.5 + level / 2, df) * se
        half = np.where(se > 0, half, 0.0)
    nan = np.full_like(estimate, np.nan)

    def masked(x):
        return np.where(invalid, nan, x)

    return Contrast(estimate=np.where(np.isfinite(estimate), estimate, nan), se=masked(se),
                    df=masked(df), p=masked(p), ci_lo=masked(estimate - half),
                    ci_hi=masked(estimate + half), var_network=masked(var_network),
                    var_pair=masked(var_pair), var_residual=masked(var_e))


def variance_components(y: np.ndarray) -> dict[str, np.ndarray]:
    """Pooled standard deviations of the model's random effects, in the metric's units.

    Keys: `sd_network` (sigma_b, between training runs of one cell), `sd_pair` (between test
    pairs, common to all cells), `sd_pair_x_cell` (sigma_g), `sd_residual` (sigma_e), and
    `n_networks` (networks per cell, harmonic mean), `n_pairs`. Method-of-moments estimates,
    truncated at 0. For P = 1 only `sd_network` is defined (it then includes everything).
    """
    y = _check(y)
    n_net, cell_mean, pair_mean, var_net, ms_e, df_e = _cell_moments(y)
    n_cells, n_pairs = y.shape[-3], y.shape[-1]
    with _quiet():
        ok = n_net >= 2
        pooled_var_net = (np.nansum(np.where(ok, var_net * (n_net - 1), 0.0), axis=-1)
                          / np.sum(np.where(ok, n_net - 1, 0), axis=-1))
        s_h = n_cells / np.sum(1.0 / np.maximum(n_net, 1), axis=-1)  # harmonic mean of S_c
        out = {"n_networks": s_h, "n_pairs": np.full_like(s_h, float(n_pairs))}
        if n_pairs == 1:
            nan = np.full_like(s_h, np.nan)
            out.update(sd_network=np.sqrt(pooled_var_net), sd_pair=nan, sd_pair_x_cell=nan,
                       sd_residual=nan)
            return out
        sigma_e2 = (np.nansum(np.where(ok, ms_e * df_e, 0.0), axis=-1)
                    / np.sum(np.where(ok, df_e, 0), axis=-1))
        grand = np.nanmean(cell_mean, axis=-1)
        across = np.nanmean(pair_mean, axis=-2)  # (..., P) pair means over cells
        inter = pair_mean - cell_mean[..., None] - across[..., None, :] + grand[..., None, None]
        ms_cp = s_h * np.nansum(inter ** 2, axis=(-2, -1)) / ((n_cells - 1) * (n_pairs - 1))
        ms_p = n_cells * s_h * np.nanvar(across, axis=-1, ddof=1)
        out.update(
            sd_network=np.sqrt(np.maximum(pooled_var_net - sigma_e2 / n_pairs, 0.0)),
            sd_pair=np.sqrt(np.maximum((ms_p - ms_cp) / (n_cells * s_h), 0.0)),
            sd_pair_x_cell=np.sqrt(np.maximum((ms_cp - sigma_e2) / s_h, 0.0)),
            sd_residual=np.sqrt(sigma_e2),
        )
    return out


def power(effect: float, se: float, df: float, alpha: float = ALPHA) -> float:
    """Power of the two-sided t test at level `alpha` for a true `effect`, standard error `se`
    and `df` degrees of freedom (noncentral t)."""
    if not (np.isfinite(se) and se > 0 and np.isfinite(df) and df > 0):
        return float("nan")
    crit = sps.t.ppf(1 - alpha / 2, df)
    shift = abs(effect) / se
    # scipy's noncentral t returns NaN far in a tail, where the probability is ~0 (or ~1)
    upper = sps.nct.sf(crit, df, shift)
    if not np.isfinite(upper):
        upper = sps.norm.sf(crit - shift)
    lower = np.nan_to_num(sps.nct.cdf(-crit, df, shift), nan=0.0)
    return float(min(1.0, upper + lower))


def minimal_detectable_effect(se: float, df: float, alpha: float = ALPHA,
                              target: float = POWER) -> float:
    """The smallest |effect| the two-sided t test detects with probability `target`."""
    if not (np.isfinite(se) and se > 0 and np.isfinite(df) and df > 0):
        return float("nan")
    lo, hi = 0.0, 20.0 * se
    while power(hi, se, df, alpha) < target:
        hi *= 2
    for _ in range(60):  # bisection: power is increasing in |effect|
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if power(mid, se, df, alpha) < target else (lo, mid)
    return hi


def seeds_needed(effect: float, weights: np.ndarray, components: dict[str, float], *,
                 alpha: float = ALPHA, target: float = POWER, max_seeds: int = 200) -> float:
    """Seeds per cell for which a contrast `weights` of true size `effect` reaches power
    `target`, given the variance components of `variance_components` (and its `n_pairs`).

    Var(L; S) = sum w^2 [(sd_network^2 + sd_residual^2 / P) / S + sd_pair_x_cell^2 / P], with
    C (S - 1) degrees of freedom. NaN when even `max_seeds` do not reach it (the test pairs
    then limit the precision: more pairs are needed, not more seeds).
    """
    w2 = float(np.sum(np.asarray(weights, dtype=float) ** 2))
    n_cells = int(np.count_nonzero(weights))
    n_pairs = float(components["n_pairs"])
    per_net = float(components["sd_network"]) ** 2
    fixed = 0.0
    if n_pairs > 1:
        per_net += float(components["sd_residual"]) ** 2 / n_pairs
        fixed = float(components["sd_pair_x_cell"]) ** 2 / n_pairs
    if not np.isfinite(per_net + fixed) or effect == 0 or not np.isfinite(effect):
        return float("nan")
    for seeds in range(2, max_seeds + 1):
        se = np.sqrt(w2 * (per_net / seeds + fixed))
        if se == 0 or power(effect, se, n_cells * (seeds - 1), alpha) >= target:
            return float(seeds)
    return float("nan")


def holm(p_values) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (same order as given; NaN stays NaN, not counted).

    Sorted ascending p_(1) <= ... <= p_(m): adjusted p_(i) = max_{j<=i} min(1, (m - j + 1) p_(j)).
    """
    p = np.asarray(p_values, dtype=float)
    if p.ndim != 1:
        raise ValueError(f"expected a 1-D sequence of p-values, got shape {p.shape}")
    finite = np.isfinite(p)
    if np.any((p[finite] < 0) | (p[finite] > 1)):
        raise ValueError(f"p-values must lie in [0, 1], got {p[finite].tolist()}")
    out = np.full_like(p, np.nan)
    idx = np.flatnonzero(finite)
    m = idx.size
    if m == 0:
        return out
    order = idx[np.argsort(p[idx], kind="stable")]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def spearman(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Spearman rank correlation and its p-value; (nan, nan) when undefined (n < 3 or constant)."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return (float("nan"), float("nan"))
    result = sps.spearmanr(x, y)
    return (float(result.statistic), float(result.pvalue))
