"""Effects of the ablation factors: pure functions of the tidy tables of `analysis.runs`.

The unit of replication is the trained network (one cell of the design x one seed); the test
pairs are a second, crossed source of variation. Every CI and p-value comes from
`analysis.stats.contrast_inference`, whose model and calibration are in docs/STATISTICS.md.

A design has k two-level factors (the study's: affine stage, regularizers) and up to 2^k cells
(variants). With x_f = -1 / +1 for the levels of factor f, the effect of a set E of factors is
the contrast with weights w[c] = prod_{f in E} x_f(c) / 2^(k - |E|):
- a main effect is mean(level on) - mean(level off), averaged over the other factors;
- a two-factor interaction is (effect of f at g on) - (effect of f at g off), averaged over the
  rest: in the 2x2 design (combined_enhanced - combined_basic) - (regloss - baseline).
Effects are in the metric's units; verdicts read them in the metric's good direction
(`analysis.metrics`): a positive synergy helps more than the sum of its parts.

Metrics of the network itself (`level == "network"` in `analysis.metrics`, e.g. timings) are
reduced to one value per network (the median over its pairs) and analysed with the network as
the only unit. Metrics without a better direction (displacement magnitudes) get no effects and
no verdicts: they are described, not judged.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats as sps

from analysis.metrics import direction, family, outcome_columns, spec
from analysis.stats import (ALPHA, CI_LEVEL, contrast_inference, holm, minimal_detectable_effect,
                            spearman, variance_components, seeds_needed)
from regcore.variants import BASELINE, FACTORS, VARIANTS

__all__ = [
    "ALPHA",
    "EFFECTS",
    "Design",
    "design_of",
    "metric_array",
    "subject_table",
    "summarize",
    "improvements",
    "factorial_effects",
    "effect_verdict",
    "components",
    "design_sensitivity",
    "search_trials",
    "search_importance",
    "pareto_front",
    "is_number",
]

#: The effects of the study's 2x2 design, in report order.
EFFECTS = ("affine", "regularize", "interaction")


# -- the design ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Design:
    """The factors of a sweep and its cells.

    factors: factor names (columns of the per-pair table holding each row's level, bool);
    cells: every level combination present, as tuples of 0/1 in the factors' order, sorted
    (the 2x2: (0, 0) baseline, (0, 1) regloss, (1, 0) combined_basic, (1, 1) combined_enhanced);
    names: cell -> variant name.
    """

    factors: tuple[str, ...]
    cells: tuple[tuple[int, ...], ...]
    names: dict[tuple[int, ...], str]

    @property
    def complete(self) -> bool:
        return len(self.cells) == 2 ** len(self.factors)

    @property
    def baseline(self) -> tuple[int, ...]:
        return (0,) * len(self.factors)

    def effects(self) -> list[tuple[str, tuple[str, ...]]]:
        """(name, factor subset) of every main effect and interaction, by order then factor
        order. With two factors the interaction is called "interaction" (the study's name)."""
        out = []
        k = len(self.factors)
        for order in range(1, k + 1):
            for subset in itertools.combinations(self.factors, order):
                name = subset[0] if order == 1 else (
                    "interaction" if k == 2 else ":".join(subset))
                out.append((name, subset))
        return out

    def weights(self, subset: tuple[str, ...]) -> np.ndarray:
        """The contrast weights of the effect of `subset` over `cells` (module docstring)."""
        k = len(self.factors)
        index = [self.factors.index(f) for f in subset]
        return np.array([np.prod([2 * cell[i] - 1 for i in index]) / 2 ** (k - len(subset))
                         for cell in self.cells], dtype=float)

    def cell_weights(self, cell: tuple[int, ...]) -> np.ndarray:
        return np.array([1.0 if c == cell else 0.0 for c in self.cells])


def _ablation(per_pair: pd.DataFrame) -> pd.DataFrame:
    if "group" in per_pair.columns:
        return per_pair[per_pair["group"] == "ablation"]
    return per_pair


def _with_factors(per_pair: pd.DataFrame, factors: tuple[str, ...]) -> pd.DataFrame:
    """The table with one bool column per factor (the study's factors derived from the variant
    names through the registry when the table lacks them)."""
    missing = [f for f in factors if f not in per_pair.columns]
    if not missing:
        return per_pair
    if any(f not in FACTORS for f in missing):
        raise ValueError(f"the per-pair table lacks the factor columns {missing}")
    unknown = sorted(set(per_pair["variant"]) - set(VARIANTS))
    if unknown:
        raise ValueError(f"variants {unknown} are not in the study's registry and the table "
                         f"has no factor columns {missing}")
    return per_pair.assign(**{f: per_pair["variant"].map(lambda v, f=f: getattr(VARIANTS[v], f))
                              for f in missing})


def design_of(per_pair: pd.DataFrame, factors=None) -> tuple[Design, pd.DataFrame]:
    """The design of the ablation rows of `per_pair` and those rows with a `_cell` column.

    `factors`: the factor columns (default: the study's `affine`, `regularize`). Raises a
    ValueError when one cell holds two variant names (the table's factors do not identify the
    variants).
    """
    factors = tuple(FACTORS if factors is None else factors)
    rows = _with_factors(_ablation(per_pair), factors)
    cells = [tuple(int(bool(v)) for v in values) for values in rows[list(factors)].to_numpy()] \
        if len(rows) else []
    rows = rows.assign(_cell=cells)
    names: dict[tuple[int, ...], str] = {}
    for cell, variant in zip(rows["_cell"], rows["variant"]):
        if names.setdefault(cell, variant) != variant:
            raise ValueError(f"cell {dict(zip(factors, cell))} holds two variants: "
                             f"{names[cell]!r} and {variant!r}")
    return Design(factors, tuple(sorted(names)), names), rows


def _metrics_of(per_pair: pd.DataFrame, metrics, *, judged: bool = False) -> list[str]:
    names = outcome_columns(per_pair.columns) if metrics is None else list(metrics)
    for name in names:
        spec(name)  # unknown metric names raise here
    present = [m for m in names if m in per_pair.columns and per_pair[m].notna().any()]
    return [m for m in present if direction(m) != 0] if judged else present


def metric_array(rows: pd.DataFrame, design: Design, metric: str
                 ) -> tuple[np.ndarray, list[str], int]:
    """`(C, S, P)` values of `metric` (rows from `design_of`), the pair ids, and the number of
    pairs dropped because some network lacks a finite value there.

    Networks are the (cell, seed) combinations, S the most seeds of any cell (missing networks
    are NaN rows). A network-level metric gives P = 1 (the median over each network's pairs).
    """
    table = rows.pivot_table(index=["_cell", "seed"], columns="pair_id", values=metric,
                             aggfunc="mean", dropna=False)
    table = table.replace([np.inf, -np.inf], np.nan)
    # the pivot holds every (cell, seed) combination: a network that never reported (a failed
    # trial) is an all-NaN row, dropped here so that it does not empty every pair
    table = table.dropna(axis=0, how="all")
    if spec(metric).level == "network":
        values = table.median(axis=1, skipna=True).to_frame("network")
        pairs, dropped = ["network"], 0
    else:
        keep = table.notna().all(axis=0)
        dropped = int((~keep).sum())
        values = table.loc[:, keep]
        pairs = list(values.columns)
    n_seeds = max((len(g) for _, g in values.groupby(level=0)), default=0)
    y = np.full((len(design.cells), max(n_seeds, 1), len(pairs)), np.nan)
    for c, cell in enumerate(design.cells):
        if cell not in values.index.get_level_values(0):
            continue
        block = values.xs(cell, level=0).to_numpy(dtype=float)
        y[c, :len(block)] = block
    return y, pairs, dropped


def _infinite(rows: pd.DataFrame, metric: str) -> int:
    return int(np.isinf(pd.to_numeric(rows[metric], errors="coerce")).sum())


# -- tables ------------------------------------------------------------------------------------


def subject_table(per_pair: pd.DataFrame, metric: str) -> pd.DataFrame:
    """`(n_subjects, n_variants)`: the metric per test pair (`pair_id`) and variant, averaged
    over seeds (descriptive: for plots). Ablation trials only; variants in registry order."""
    rows = _ablation(per_pair)
    table = rows.groupby(["pair_id", "variant"])[metric].mean().unstack("variant")
    order = [v for v in VARIANTS if v in table.columns]
    order += [v for v in table.columns if v not in order]
    return table[order]


def summarize(per_pair: pd.DataFrame, metrics=None, *, factors=None, seed: int = 0
              ) -> pd.DataFrame:
    """Per variant and metric: n_subjects (pairs), n_seeds (networks), mean, sd (over pairs of
    the seed-averaged values; over networks for a network-level metric), sd_seeds (between the
    networks' means), and the 95 % CI of the
    mean over networks and pairs (`contrast_inference` of the cell alone). `n_infinite` counts
    the pair values that are +-inf (a structure that vanished: HD95); the mean is then inf.
    `seed` is accepted for compatibility (the CIs are not resampled)."""
    columns = ["variant", "label", "metric", "n_subjects", "n_seeds", "mean", "sd", "sd_seeds",
               "ci_lo", "ci_hi", "n_infinite"]
    design, rows = design_of(per_pair, factors)
    out = []
    for metric in _metrics_of(rows, metrics):
        y, pairs, _ = metric_array(rows, design, metric)
        network_level = spec(metric).level == "network"
        for c, cell in enumerate(design.cells):
            variant = design.names[cell]
            n_inf = _infinite(rows[rows["variant"] == variant], metric)
            block = y[c][np.isfinite(y[c]).all(axis=1)]
            result = contrast_inference(y, design.cell_weights(cell))
            per_pair_mean = block.mean(axis=0) if block.size else np.array([])
            out.append({
                "variant": variant,
                "label": VARIANTS[variant].label if variant in VARIANTS else variant,
                "metric": metric,
                "n_subjects": len(pairs) if spec(metric).level != "network" else 0,
                "n_seeds": len(block),
                "mean": float("inf") if n_inf else float(result.estimate),
                "sd": float(block.mean(axis=1).std(ddof=1) if network_level else
                            per_pair_mean.std(ddof=1)) if max(len(block), per_pair_mean.size) > 1
                else np.nan,
                "sd_seeds": float(block.mean(axis=1).std(ddof=1)) if len(block) > 1 else np.nan,
                "ci_lo": np.nan if n_inf else float(result.ci_lo),
                "ci_hi": np.nan if n_inf else float(result.ci_hi),
                "n_infinite": n_inf,
            })
    return pd.DataFrame(out, columns=columns)


def _holm_by(table: pd.DataFrame, key: str) -> pd.DataFrame:
    """Add `family` and `p_holm`: Holm across the metrics of one family, per value of `key`."""
    table = table.assign(family=[family(m) for m in table["metric"]], p_holm=np.nan)
    for _, index in table.groupby([key, "family"]).groups.items():
        table.loc[index, "p_holm"] = holm(table.loc[index, "p"].to_numpy(dtype=float))
    return table


def improvements(per_pair: pd.DataFrame, metrics=None, *, baseline: str = BASELINE,
                 factors=None, seed: int = 0) -> pd.DataFrame:
    """Relative improvement (%) of every variant over `baseline`.

    improvement = 100 s (mean variant - mean baseline) / |mean baseline|, s = +1 when higher is
    better and -1 when lower is better, so positive is always better; NaN where the baseline's
    mean is 0. CI: delta method on the same two-level variance (networks and pairs); p: the t
    test of the difference (networks and pairs), Holm-corrected across the metrics of one
    family within each variant.
    """
    columns = ["variant", "metric", "n_subjects", "baseline_mean", "variant_mean",
               "difference", "improvement_pct", "ci_lo", "ci_hi", "p"]
    design, rows = design_of(per_pair, factors)
    base = next((cell for cell, name in design.names.items() if name == baseline), None)
    out = []
    for metric in ([] if base is None else _metrics_of(rows, metrics, judged=True)):
        y, pairs, _ = metric_array(rows, design, metric)
        sign = direction(metric)
        e_base = design.cell_weights(base)
        base_mean = float(contrast_inference(y, e_base).estimate)
        for cell in design.cells:
            if cell == base:
                continue
            w_diff = design.cell_weights(cell) - e_base
            diff = contrast_inference(y, w_diff)
            ratio = float(diff.estimate) / base_mean if base_mean else np.nan
            point = 100 * sign * ratio if base_mean else np.nan
            half = np.nan
            if base_mean:  # delta method; the t quantile of the difference keeps CI and p agreed
                rel = contrast_inference(y, 100 * sign * (w_diff - ratio * e_base) / abs(base_mean))
                half = float(rel.se) * float(sps.t.ppf(0.5 + CI_LEVEL / 2, float(diff.df)))
            out.append({
                "variant": design.names[cell], "metric": metric, "n_subjects": len(pairs),
                "baseline_mean": base_mean, "variant_mean": base_mean + float(diff.estimate),
                "difference": float(diff.estimate),
                "improvement_pct": point, "ci_lo": point - half, "ci_hi": point + half,
                "p": float(diff.p),
            })
    return _holm_by(pd.DataFrame(out, columns=columns), "variant")


def effect_verdict(effect: str, estimate: float, ci: tuple[float, float], p_holm: float,
                   metric: str, alpha: float = ALPHA) -> str:
    """Words for one effect. Evidence needs Holm-corrected p < alpha AND a CI excluding 0;
    the sign is read in the metric's good direction. Main effects: "improves" / "worsens" /
    "no evidence of an effect"; interactions: "positive synergy" / "negative synergy" / "no
    evidence of either"."""
    lo, hi = ci
    evident = (np.isfinite(p_holm) and p_holm < alpha and np.isfinite(lo) and np.isfinite(hi)
               and (lo > 0 or hi < 0))
    good = direction(metric) * estimate > 0
    if effect == "interaction" or ":" in effect:
        if not evident:
            return "no evidence of either"
        return "positive synergy" if good else "negative synergy"
    if not evident:
        return "no evidence of an effect"
    return "improves" if good else "worsens"


EFFECT_COLUMNS = ["effect", "factors", "order", "metric", "n_subjects", "n_networks",
                  "estimate", "se", "df", "ci_lo", "ci_hi", "p", "mde", "family", "p_holm",
                  "verdict", "note"]


def factorial_effects(per_pair: pd.DataFrame, metrics=None, *, factors=None, seed: int = 0,
                      alpha: float = ALPHA) -> pd.DataFrame:
    """Every main effect and interaction of the design, per metric with a better direction.

    Columns: effect (factor name, "interaction" in a two-factor design, else "a:b"), factors
    (the subset, ":"-joined), order, metric, n_subjects (test pairs used; 0 for network-level
    metrics), n_networks, estimate (metric units), se, df, ci_lo, ci_hi (95 % t interval over
    networks and pairs), p (t test), mde (the effect detectable with 80 % power at alpha), family,
    p_holm (Holm across the metrics of one family, within each effect), verdict (words; it
    starts with "no evidence" when nothing is claimed), note (why an effect is not estimable).
    Empty when the design is incomplete (a cell without trials). `seed` is accepted for
    compatibility (nothing is resampled).
    """
    design, rows = design_of(per_pair, factors)
    out = []
    if design.complete and len(design.factors) > 0:
        for metric in _metrics_of(rows, metrics, judged=True):
            out.extend(_metric_effects(design, rows, metric, alpha))
    table = pd.DataFrame(out, columns=EFFECT_COLUMNS[:-4] + ["note"])
    table = _holm_by(table, "effect")
    table["verdict"] = [
        (effect_verdict(r.effect, r.estimate, (r.ci_lo, r.ci_hi), r.p_holm, r.metric, alpha)
         + (f" ({r.note})" if r.note else ""))
        for r in table.itertuples()
    ]
    return table[EFFECT_COLUMNS]


def _metric_effects(design: Design, rows: pd.DataFrame, metric: str, alpha: float) -> list[dict]:
    y, pairs, _ = metric_array(rows, design, metric)
    n_inf = _infinite(rows, metric)
    n_networks = int(np.isfinite(y).all(axis=-1).sum())
    note = ""
    if n_inf:
        note = f"not estimable: {n_inf} pair values are infinite (a structure vanished)"
    elif np.any(np.isfinite(y).all(axis=-1).sum(axis=-1) < 2):
        note = "not estimable: needs at least 2 seeds per cell"
    out = []
    for name, subset in design.effects():
        result = contrast_inference(y, design.weights(subset))
        finite = not note
        out.append({
            "effect": name, "factors": ":".join(subset), "order": len(subset), "metric": metric,
            "n_subjects": len(pairs) if spec(metric).level != "network" else 0,
            "n_networks": n_networks,
            "estimate": float(result.estimate) if finite else np.nan,
            "se": float(result.se) if finite else np.nan,
            "df": float(result.df) if finite else np.nan,
            "ci_lo": float(result.ci_lo) if finite else np.nan,
            "ci_hi": float(result.ci_hi) if finite else np.nan,
            "p": float(result.p) if finite else np.nan,
            "mde": minimal_detectable_effect(float(result.se), float(result.df), alpha)
            if finite else np.nan,
            "note": note,
        })
    return out


def components(per_pair: pd.DataFrame, metrics=None, *, factors=None) -> pd.DataFrame:
    """The variance components of every metric (`analysis.stats.variance_components`): one
    row per metric with sd_network, sd_pair, sd_pair_x_cell, sd_residual, n_networks (per cell)
    and n_pairs."""
    design, rows = design_of(per_pair, factors)
    out = []
    for metric in _metrics_of(rows, metrics):
        y, pairs, _ = metric_array(rows, design, metric)
        if _infinite(rows, metric):
            continue
        values = {k: float(v) for k, v in variance_components(y).items()}
        out.append({"metric": metric, **values})
    return pd.DataFrame(out, columns=["metric", "sd_network", "sd_pair", "sd_pair_x_cell",
                                      "sd_residual", "n_networks", "n_pairs"])


def design_sensitivity(per_pair: pd.DataFrame, metric: str, targets=None, *, factors=None,
                       alpha: float = ALPHA) -> pd.DataFrame:
    """What the design could detect for one metric, per effect: the minimal detectable effect
    at 80 % power (`mde`, the design that ran) and the seeds per cell needed to detect each
    effect size in `targets` (default: 1 and 2 network sd, and the effect's own estimate).

    Columns: effect, mde, target, target_label, seeds_needed (NaN: more test pairs are needed,
    not more seeds, or the effect is 0).
    """
    design, rows = design_of(per_pair, factors)
    columns = ["effect", "mde", "target", "target_label", "seeds_needed"]
    if not design.complete or metric not in rows.columns or _infinite(rows, metric):
        return pd.DataFrame(columns=columns)
    y, _, _ = metric_array(rows, design, metric)
    comp = {k: float(v) for k, v in variance_components(y).items()}
    out = []
    for name, subset in design.effects():
        w = design.weights(subset)
        result = contrast_inference(y, w)
        mde = minimal_detectable_effect(float(result.se), float(result.df), alpha)
        sizes = list(targets) if targets is not None else [
            (comp["sd_network"], "1 network sd"), (2 * comp["sd_network"], "2 network sd"),
            (abs(float(result.estimate)), "the estimate")]
        for size, label in (s if isinstance(s, tuple) else (s, f"{s:g}") for s in sizes):
            out.append({"effect": name, "mde": mde, "target": size, "target_label": label,
                        "seeds_needed": seeds_needed(size, w, comp, alpha=alpha)})
    return pd.DataFrame(out, columns=columns)


# -- the regularizer-weight search -----------------------------------------------------------

_NOT_SEARCHED = {"cfg.seed", "cfg.data.split_seed"}
#: fewer trials than this per searched value cannot rank the values (fANOVA on a handful of
#: points describes noise)
MIN_TRIALS_PER_PARAM = 4
MIN_TRIALS = 10


def search_trials(trials: pd.DataFrame) -> pd.DataFrame:
    """The trials of the weight search (`group == "search"`) that ended, stopped early by the
    scheduler or not (FINISHED runs; failed ones carry no result)."""
    return trials[(trials["group"] == "search") & (trials["status"] == "FINISHED")]


def is_number(value) -> bool:
    """An int or float, not a bool (a searched parameter's value that reads as a number)."""
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
        elif values.map(is_number).all() and values.astype(float).nunique() > 1:
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


def min_search_trials(n_params: int) -> int:
    """Trials needed before the weight search's importances are shown as a ranking."""
    return max(MIN_TRIALS, MIN_TRIALS_PER_PARAM * n_params)


def search_importance(trials: pd.DataFrame, objective: str = "val.dice_mean") -> pd.DataFrame:
    """Which searched config values matter for `objective` (the searched metric, at each
    trial's last report: trials stopped early by ASHA count) over the search trials.

    Columns: param, importance (optuna's fANOVA share of variance, summing to 1; NaN when the
    search has fewer than `min_search_trials` trials: too few to rank), method, spearman_rho and
    spearman_p (rank correlation of the value, hence also of its log, with the objective: the
    direction the importance lacks), n_trials.
    """
    columns = ["param", "importance", "method", "spearman_rho", "spearman_p", "n_trials"]
    search = search_trials(trials)
    if objective not in search.columns:
        return pd.DataFrame(columns=columns)
    search = search[search[objective].notna()]
    params = _searched_params(search)
    importance, method = {}, f"too few trials to rank (need {min_search_trials(len(params))})"
    if params and len(search) >= min_search_trials(len(params)):
        metric = objective.split(".", 1)[-1]
        importance, method = _optuna_importance(search, params, objective,
                                                maximize=direction(metric) > 0)
    rows = []
    for p in params:
        rho, p_value = ((float("nan"), float("nan")) if p == "cfg.variant" else
                        spearman(search[p].astype(float), search[objective].astype(float)))
        rows.append({"param": p.removeprefix("cfg."), "importance": importance.get(p, np.nan),
                     "method": method, "spearman_rho": rho, "spearman_p": p_value,
                     "n_trials": len(search)})
    out = pd.DataFrame(rows, columns=columns)
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
