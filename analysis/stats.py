"""Small statistics: bootstrap confidence intervals, a paired sign-flip test, Holm's correction.

Resampling unit: the subject (test pair). Seeds are replicates: callers average over seeds per
subject first, so every function here sees one value (or one row) per subject.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from scipy import stats as sps

__all__ = ["bootstrap_ci", "paired_test", "holm", "spearman"]

N_RESAMPLES = 2000
CI_LEVEL = 0.95


def bootstrap_ci(
    data: np.ndarray,
    statistic: Callable[[np.ndarray], np.ndarray] | None = None,
    *,
    n_resamples: int = N_RESAMPLES,
    level: float = CI_LEVEL,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap CI resampling rows (subjects) of `data`.

    `data` is `(n_subjects,)` or `(n_subjects, k)`. `statistic` is vectorised: it receives the
    resamples stacked as `(n_resamples, n_subjects[, k])` and returns `(n_resamples,)`
    (default: the mean over subjects). Returns `(nan, nan)` for fewer than two subjects;
    resamples whose statistic is not finite are ignored.
    """
    data = np.asarray(data, dtype=float)
    if not 0 < level < 1:
        raise ValueError(f"level == {level!r}, must be in (0, 1)")
    if n_resamples < 1:
        raise ValueError(f"n_resamples == {n_resamples!r}, must be >= 1")
    n = data.shape[0]
    if n < 2:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_resamples, n))
    resamples = data[idx]
    with np.errstate(divide="ignore", invalid="ignore"):
        values = (np.asarray(statistic(resamples), dtype=float) if statistic is not None
                  else resamples.mean(axis=1))
    values = values[np.isfinite(values)]
    if values.size == 0:
        return (float("nan"), float("nan"))
    alpha = (1 - level) / 2
    lo, hi = np.quantile(values, [alpha, 1 - alpha])
    return (float(lo), float(hi))


def paired_test(differences: np.ndarray, *, n_resamples: int = 20000, seed: int = 0) -> float:
    """Two-sided sign-flip permutation p-value of per-subject differences against 0.

    Under the null of no effect each difference is as likely positive as negative; the
    statistic is |mean|. Exact (all 2**n sign patterns) for n <= 16 subjects, else
    `n_resamples` seeded random patterns with p = (hits + 1) / (n_resamples + 1). Handles ties
    and zeros (all-zero differences give p = 1); no finite difference gives NaN. (scipy's
    Wilcoxon falls back to a slow permutation with ties, which constructed and short
    smoke-sweep data have.)
    """
    d = np.asarray(differences, dtype=float)
    d = d[np.isfinite(d)]
    n = d.size
    if n == 0:
        return float("nan")
    observed = abs(d.mean())
    if n <= 16:
        patterns = ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1) * 2 - 1
        p = float(np.mean(np.abs(patterns @ d) / n >= observed * (1 - 1e-12)))
    else:
        rng = np.random.default_rng(seed)
        signs = rng.choice(np.array([-1.0, 1.0]), size=(n_resamples, n))
        hits = int(np.sum(np.abs(signs @ d) / n >= observed * (1 - 1e-12)))
        p = (hits + 1) / (n_resamples + 1)
    return min(1.0, p)


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
