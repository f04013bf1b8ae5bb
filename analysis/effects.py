"""Effects of the ablation factors: pure functions of the tidy tables of `analysis.runs`.

Subjects are test pairs (`pair_id`), matched across variants; seeds are replicates, averaged
per subject before any statistic, so every bootstrap resamples subjects. Directions (higher or
lower is better) come from `analysis.metrics` only.

The 2x2 design per subject, with y[a, r] the seed-averaged metric of the cell
(affine a, regularize r):
- main effect of affine      = ((y[1,0] - y[0,0]) + (y[1,1] - y[0,1])) / 2
- main effect of regularize  = ((y[0,1] - y[0,0]) + (y[1,1] - y[1,0])) / 2
- interaction (synergy)      = (y[1,1] - y[1,0]) - (y[0,1] - y[0,0])
  = (combined_enhanced - combined_basic) - (regloss - baseline).
Effects are reported in the metric's units; verdicts are direction-aware: a positive synergy
means the combination helps more than the sum of its parts in the metric's good direction.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.metrics import direction, family, outcome_columns
from analysis.stats import bootstrap_ci, holm, paired_test, spearman
from regcore.variants import BASELINE, VARIANTS, variant_for

__all__ = [
    "ALPHA",
    "EFFECTS",
    "subject_table",
    "summarize",
    "improvements",
    "factorial_effects",
    "effect_verdict",
    "search_trials",
    "search_importance",
    "pareto_front",
]

ALPHA = 0.05
EFFECTS = ("affine", "regularize", "interaction")
_CELL = {(a, r): variant_for(a, r).name for a in (False, True) for r in (False, True)}


def _ablation(per_pair: pd.DataFrame) -> pd.DataFrame:
    if "group" in per_pair.columns:
        return per_pair[per_pair["group"] == "ablation"]
    return per_pair


def _metrics_of(per_pair: pd.DataFrame, metrics) -> list[str]:
    names = outcome_columns(per_pair.columns) if metrics is None else list(metrics)
    for name in names:
        direction(name)  # unknown metric names raise here
    return [m for m in names if m in per_pair.columns and per_pair[m].notna().any()]


def subject_table(per_pair: pd.DataFrame, metric: str) -> pd.DataFrame:
    """`(n_subjects, n_variants)`: the metric per subject (`pair_id`) and variant, averaged over
    seeds. Ablation trials only; variants in registry order."""
    rows = _ablation(per_pair)
    table = rows.groupby(["pair_id", "variant"])[metric].mean().unstack("variant")
    order = [v for v in VARIANTS if v in table.columns]
    order += [v for v in table.columns if v not in order]
    return table[order]


def summarize(per_pair: pd.DataFrame, metrics=None, *, seed: int = 0) -> pd.DataFrame:
    """Per variant and metric: n_subjects, n_seeds, mean, sd (over subjects, of the
    seed-averaged values) and the 95 % bootstrap CI of the mean (resampling subjects)."""
    rows = []
    ablation = _ablation(per_pair)
    for metric in _metrics_of(ablation, metrics):
        table = subject_table(ablation, metric)
        for variant in table.columns:
            values = table[variant].dropna().to_numpy()
            lo, hi = bootstrap_ci(values, seed=seed)
            rows.append({
                "variant": variant,
                "label": VARIANTS[variant].label if variant in VARIANTS else variant,
                "metric": metric,
                "n_subjects": values.size,
                "n_seeds": int(ablation.loc[ablation["variant"] == variant, "seed"].nunique()),
                "mean": float(values.mean()) if values.size else float("nan"),
                "sd": float(values.std(ddof=1)) if values.size > 1 else float("nan"),
                "ci_lo": lo,
                "ci_hi": hi,
            })
    return pd.DataFrame(rows, columns=["variant", "label", "metric", "n_subjects", "n_seeds",
                                       "mean", "sd", "ci_lo", "ci_hi"])


def _relative_pct(sign: int):
    """Vectorised statistic: 100 sign (mean variant - mean baseline) / |mean baseline|."""
    def statistic(resamples: np.ndarray) -> np.ndarray:
        base = resamples[..., 0].mean(axis=-1)
        var = resamples[..., 1].mean(axis=-1)
        return 100.0 * sign * (var - base) / np.abs(base)
    return statistic


def improvements(per_pair: pd.DataFrame, metrics=None, *, baseline: str = BASELINE,
                 seed: int = 0) -> pd.DataFrame:
    """Relative improvement (%) of every variant over `baseline`, paired by subject.

    Sign-aware: improvement = 100 (variant - baseline) / |baseline| when higher is better and
    100 (baseline - variant) / |baseline| when lower is better, so a positive number is always
    better. NaN where the baseline's mean is 0. The p-value (sign-flip permutation test of the
    per-subject differences) is Holm-corrected across the metrics of one family
    (`analysis.metrics.family`) within each variant.
    """
    ablation = _ablation(per_pair)
    rows = []
    for metric in _metrics_of(ablation, metrics):
        table = subject_table(ablation, metric)
        if baseline not in table.columns:
            continue
        sign = direction(metric)
        for variant in table.columns:
            if variant == baseline:
                continue
            pair = table[[baseline, variant]].dropna().to_numpy()
            base_mean = float(pair[:, 0].mean()) if len(pair) else float("nan")
            var_mean = float(pair[:, 1].mean()) if len(pair) else float("nan")
            with np.errstate(divide="ignore", invalid="ignore"):
                point = float(_relative_pct(sign)(pair[None])[0]) if len(pair) else float("nan")
            lo, hi = bootstrap_ci(pair, _relative_pct(sign), seed=seed)
            rows.append({
                "variant": variant, "metric": metric, "n_subjects": len(pair),
                "baseline_mean": base_mean, "variant_mean": var_mean,
                "improvement_pct": point if np.isfinite(point) else float("nan"),
                "ci_lo": lo, "ci_hi": hi,
                "p": paired_test(pair[:, 1] - pair[:, 0]) if len(pair) else float("nan"),
            })
    out = pd.DataFrame(rows, columns=["variant", "metric", "n_subjects", "baseline_mean",
                                      "variant_mean", "improvement_pct", "ci_lo", "ci_hi", "p"])
    return _holm_by(out, "variant")


def _holm_by(table: pd.DataFrame, key: str) -> pd.DataFrame:
    """Add `family` and `p_holm`: Holm across the metrics of one family, per value of `key`."""
    table = table.assign(family=[family(m) for m in table["metric"]], p_holm=np.nan)
    for _, index in table.groupby([key, "family"]).groups.items():
        table.loc[index, "p_holm"] = holm(table.loc[index, "p"].to_numpy())
    return table


def _cells(per_pair: pd.DataFrame, metric: str) -> np.ndarray | None:
    """`(n_subjects, 4)` seed-averaged values in the cell order 00, 01, 10, 11 (affine,
    regularize); subjects missing a cell are dropped. None when a cell has no trial."""
    table = subject_table(per_pair, metric)
    names = [_CELL[(a, r)] for a in (False, True) for r in (False, True)]
    if any(name not in table.columns for name in names):
        return None
    return table[names].dropna().to_numpy()


def _effect_per_subject(cells: np.ndarray, effect: str) -> np.ndarray:
    y00, y01, y10, y11 = cells[..., 0], cells[..., 1], cells[..., 2], cells[..., 3]
    if effect == "affine":
        return ((y10 - y00) + (y11 - y01)) / 2
    if effect == "regularize":
        return ((y01 - y00) + (y11 - y10)) / 2
    if effect == "interaction":
        return (y11 - y10) - (y01 - y00)
    raise ValueError(f"effect == {effect!r}, expected one of {', '.join(EFFECTS)}")


def effect_verdict(effect: str, estimate: float, ci: tuple[float, float], p_holm: float,
                   metric: str, alpha: float = ALPHA) -> str:
    """Words for one effect. Evidence needs Holm-corrected p < alpha AND a CI excluding 0;
    the sign is read in the metric's good direction."""
    lo, hi = ci
    evident = (np.isfinite(p_holm) and p_holm < alpha and np.isfinite(lo) and np.isfinite(hi)
               and (lo > 0 or hi < 0))
    good = direction(metric) * estimate > 0
    if effect == "interaction":
        if not evident:
            return "no evidence of either"
        return "positive synergy" if good else "negative synergy"
    if not evident:
        return "no evidence of an effect"
    return "improves" if good else "worsens"


def factorial_effects(per_pair: pd.DataFrame, metrics=None, *, seed: int = 0,
                      alpha: float = ALPHA) -> pd.DataFrame:
    """Main effects of affine and regularize and their interaction, per metric.

    Columns: effect, metric, n_subjects, estimate (metric units: mean over subjects of the
    per-subject effect), ci_lo, ci_hi (95 % bootstrap over subjects), p (sign-flip permutation
    test of the per-subject effects), family, p_holm (Holm across the metrics of one family,
    within each effect), verdict.
    Empty when one of the four cells has no trial.
    """
    ablation = _ablation(per_pair)
    rows = []
    for metric in _metrics_of(ablation, metrics):
        cells = _cells(ablation, metric)
        if cells is None:
            continue
        for effect in EFFECTS:
            per_subject = _effect_per_subject(cells, effect)
            lo, hi = bootstrap_ci(cells, lambda r, e=effect: _effect_per_subject(r, e).mean(-1),
                                  seed=seed)
            rows.append({
                "effect": effect, "metric": metric, "n_subjects": len(cells),
                "estimate": float(per_subject.mean()) if len(cells) else float("nan"),
                "ci_lo": lo, "ci_hi": hi, "p": paired_test(per_subject),
            })
    out = pd.DataFrame(rows, columns=["effect", "metric", "n_subjects", "estimate", "ci_lo",
                                      "ci_hi", "p"])
    out = _holm_by(out, "effect")
    out["verdict"] = [
        effect_verdict(r.effect, r.estimate, (r.ci_lo, r.ci_hi), r.p_holm, r.metric, alpha)
        for r in out.itertuples()
    ]
    return out


# -- the regularizer-weight search -----------------------------------------------------------

_NOT_SEARCHED = {"cfg.seed", "cfg.data.split_seed"}


def search_trials(trials: pd.DataFrame) -> pd.DataFrame:
    """The finished trials of the weight search (`group == "search"`)."""
    return trials[(trials["group"] == "search") & (trials["status"] == "FINISHED")]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _searched_params(trials: pd.DataFrame) -> list[str]:
    """`cfg.*` columns that vary across the given trials: numbers, and the variant (the
    search may choose among the regularizing variants)."""
    names = []
    for column in trials.columns:
        if not column.startswith("cfg.") or column in _NOT_SEARCHED:
            continue
        values = trials[column]
        if column == "cfg.variant":
            if values.nunique() > 1:
                names.append(column)
        elif values.map(_is_number).all() and values.astype(float).nunique() > 1:
            names.append(column)
    return names


def _optuna_importance(trials: pd.DataFrame, params: list[str], objective: str,
                       maximize: bool) -> tuple[dict[str, float], str]:
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize" if maximize else "minimize")
    dists = {}
    for p in params:
        if p == "cfg.variant":
            dists[p] = CategoricalDistribution(sorted(trials[p].unique()))
            continue
        values = trials[p].astype(float)
        lo, hi = float(values.min()), float(values.max())
        dists[p] = FloatDistribution(lo, hi, log=lo > 0)
    for _, row in trials.iterrows():
        study.add_trial(optuna.trial.create_trial(
            params={p: row[p] if p == "cfg.variant" else float(row[p]) for p in params},
            distributions=dists, value=float(row[objective])))
    try:
        from optuna.importance import FanovaImportanceEvaluator

        evaluator, name = FanovaImportanceEvaluator(seed=0), "fANOVA (optuna)"
        importance = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except ImportError:  # fANOVA needs scikit-learn; PED-ANOVA does not
        from optuna.importance import PedAnovaImportanceEvaluator

        evaluator, name = PedAnovaImportanceEvaluator(), "PED-ANOVA (optuna)"
        importance = optuna.importance.get_param_importances(study, evaluator=evaluator)
    return {k: float(v) for k, v in importance.items()}, name


def search_importance(trials: pd.DataFrame, objective: str = "test.dice_mean") -> pd.DataFrame:
    """Which searched config values matter for `objective` over the search trials.

    Columns: param, importance (optuna's fANOVA share of variance, summing to 1; NaN with fewer
    than 3 trials), method, spearman_rho and spearman_p (rank correlation of the value, hence
    also of its log, with the objective: the direction optuna's importance lacks).
    """
    search = search_trials(trials)
    if objective not in search.columns:
        return pd.DataFrame(columns=["param", "importance", "method", "spearman_rho",
                                     "spearman_p"])
    search = search[search[objective].notna()]
    params = _searched_params(search)
    importance, method = {}, "too few trials"
    if params and len(search) >= 3:
        metric = objective.split(".", 1)[-1]
        importance, method = _optuna_importance(search, params, objective,
                                                maximize=direction(metric) > 0)
    rows = []
    for p in params:
        rho, p_value = ((float("nan"), float("nan")) if p == "cfg.variant" else
                        spearman(search[p].astype(float), search[objective].astype(float)))
        rows.append({"param": p.removeprefix("cfg."), "importance": importance.get(p, np.nan),
                     "method": method, "spearman_rho": rho, "spearman_p": p_value})
    out = pd.DataFrame(rows, columns=["param", "importance", "method", "spearman_rho",
                                      "spearman_p"])
    return out.sort_values("importance", ascending=False, na_position="last",
                           kind="stable").reset_index(drop=True)


def pareto_front(points: pd.DataFrame, maximize: str = "test.dice_mean",
                 minimize: str = "test.folding_pct") -> pd.Series:
    """Boolean mask of the rows not dominated in (`maximize` higher, `minimize` lower).

    A row is dominated when another is at least as good in both and strictly better in one.
    Rows with a missing value are never on the front.
    """
    up = points[maximize].to_numpy(dtype=float)
    down = points[minimize].to_numpy(dtype=float)
    ok = np.isfinite(up) & np.isfinite(down)
    front = np.zeros(len(points), dtype=bool)
    for i in np.flatnonzero(ok):
        at_least = ok & (up >= up[i]) & (down <= down[i])
        strictly = (up > up[i]) | (down < down[i])
        front[i] = not np.any(at_least & strictly)
    return pd.Series(front, index=points.index, name="pareto")
