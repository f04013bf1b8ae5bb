"""The report's sections, in the order of `analysis.report.SECTIONS`: the answer first, then
what the design can detect, the references, every effect, and the detail behind them.

Each `_section` function appends its blocks to a `Doc` and registers its figures in `figs`
(file name -> path); numbers come from `analysis.report.Analysis`, never recomputed here.
"""

from __future__ import annotations

import json
import urllib.parse
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import effects as fx
from analysis import figures
from analysis.document import Doc, interval, num, pct, pvalue
from analysis.metrics import KEY_METRICS, spec
from analysis.runs import fetch_example
from analysis.stats import ALPHA, CI_LEVEL, POWER
from regcore.config import REGULARIZERS
from regcore.uris import redact_uri

__all__ = ["write_all"]

#: The original study's "Key Results" columns, with honest definitions and units.
KEY_RESULT_COLUMNS = (
    ("mse_improvement_pct", "MSE improvement (%)", 1.0, 2),
    ("ncc_gain", "NCC improvement (after - before)", 1.0, 4),
    ("disp_max_mm", "Max displacement (mm)", 1.0, 2),
    ("plausibility", "Anatomical plausibility [0,1]", 1.0, 3),
    ("inference_s", "Inference time (ms)", 1000.0, 1),
)
FIELD_COLUMNS = ("dice_mean", "hd95_mm", "folding_pct", "ndv_pct", "sdlogj", "true_error_mm",
                 "disp_mag_error_mm", "labels_missing")
L2R_COLUMNS = ("l2r_dice_mean", "l2r_hd95_vox", "l2r_sdlogj")
REFERENCE_COLUMNS = ("dice_mean", "true_error_mm", "hd95_mm", "folding_pct", "sdlogj")
REFERENCE_LABELS = {"identity": "Identity (no registration)",
                    "instance_optimisation": "Instance optimisation (per pair, no network)",
                    "ground_truth": "Ground truth (the true field)"}
COST_METRICS = ("timing_inference_s", "timing_train_step_s")


def write_all(doc: Doc, a, figs: dict[str, Path], out: Path, scratch: Path) -> None:
    _intro(doc, a)
    _answer(doc, a, figs, out)
    _detectable(doc, a)
    _references(doc, a)
    _all_effects(doc, a, figs, out)
    _improvements(doc, a)
    _field_metrics(doc, a, figs, out)
    _key_results(doc, a)
    _cost(doc, a)
    _search(doc, a, figs, out)
    _questions(doc, a)
    _definitions(doc, a)
    _provenance(doc, a)
    _example(doc, a, figs, out, scratch)


# -- helpers ---------------------------------------------------------------------------------


def _digits(metric: str) -> int:
    return 4 if metric.startswith(("dice", "l2r_dice", "sdlogj", "l2r_sdlogj", "ncc")) \
        else 3 if metric == "plausibility" else 2


def _unit(metric: str) -> str:
    unit = spec(metric).unit
    return "" if unit in ("", "[0,1]") else (" %" if unit == "%" else f" {unit}")


def _row(table: pd.DataFrame, **where) -> pd.Series | None:
    mask = np.ones(len(table), dtype=bool)
    for column, value in where.items():
        mask &= (table[column] == value).to_numpy()
    rows = table[mask]
    return rows.iloc[0] if len(rows) else None


def _mean_of(a, variant: str, metric: str) -> float:
    r = _row(a.summary, variant=variant, metric=metric)
    return float(r["mean"]) if r is not None else float("nan")


def _mean_sd(a, variant: str, metric: str, scale: float = 1.0, digits: int = 3,
             with_ci: bool = False) -> str:
    r = _row(a.summary, variant=variant, metric=metric)
    if r is None:
        return "n/a"
    if r["n_infinite"]:
        return f"inf ({int(r['n_infinite'])} pair values infinite)"
    text = f"{num(r['mean'] * scale, digits)} ± {num(r['sd'] * scale, digits)}"
    return text + (f" {interval(r.ci_lo * scale, r.ci_hi * scale, digits)}" if with_ci else "")


def _signed(value: float, digits: int) -> str:
    text = num(value, digits)
    return text if text.startswith("-") or text == "n/a" else f"+{text}"


def _effect_sentence(a, r: pd.Series) -> str:
    """One effect in words, e.g. "turning on the affine stage changes Dice by +0.031 (95 % CI
    [0.012, 0.050], Holm p 0.004): it improves"."""
    d, m = _digits(r.metric), spec(r.metric).label
    numbers = (f"{_signed(r.estimate, d)}{_unit(r.metric)} (95 % CI "
               f"{interval(r.ci_lo, r.ci_hi, d)}, Holm p {pvalue(r.p_holm)})")
    if r.order > 1:
        names = " and ".join(a.factor_labels.get(f, f) for f in r.factors.split(":"))
        head = f"the interaction of {names} on {m}"
    else:
        head = f"turning on {a.effect_label(r.effect)}"
    if r.note:
        return f"{head}: {r.verdict}"
    if r.order > 1:
        text = f"{head} is {numbers}: {r.verdict}"
    else:
        text = f"{head} changes {m} by {numbers}: " + (
            r.verdict if r.verdict.startswith("no evidence") else f"it {r.verdict}")
    if r.verdict.startswith("no evidence") and np.isfinite(r.mde):
        text += (f"; this design detects ±{num(r.mde, d)}{_unit(r.metric)} with "
                 f"{int(POWER * 100)} % power")
    elif r.verdict.startswith("no evidence") and r.se == 0:
        text += "; the metric did not vary between networks or pairs"
    return text


def _evident(effects: pd.DataFrame) -> pd.DataFrame:
    if effects.empty:
        return effects
    return effects[~effects["verdict"].astype(str).str.startswith("no evidence")]


# -- the answer -------------------------------------------------------------------------------


def _intro(doc: Doc, a) -> None:
    d = a.design
    n_pairs = a.per_pair["pair_id"].nunique() if not a.per_pair.empty else 0
    seeds = sorted(set(a.summary["n_seeds"])) if not a.summary.empty else [0]
    factors = ", ".join(a.factor_labels[f] for f in d.factors)
    doc.p(f"Which parts of the registration method matter? This sweep ablates "
          f"{len(d.factors)} factors ({factors}) in {len(d.cells)} variants "
          f"({', '.join(a.label(v) for v in a.variants)}), "
          f"{' to '.join(str(int(n)) for n in (seeds[0], seeds[-1])[:len(set(seeds))])} "
          f"trained networks (seeds) per variant, each tested on the same {n_pairs} test "
          "pairs. Primary metric: "
          f"{spec(a.primary).label}. A verdict needs a Holm-corrected p < {ALPHA} from a test "
          "in which both the trained networks and the test pairs vary (docs/STATISTICS.md).")


def _answer(doc: Doc, a, figs: dict[str, Path], out: Path) -> None:
    doc.h(2, "Answer")
    effects = a.effects[a.effects["metric"] == a.primary] if not a.effects.empty else a.effects
    if effects.empty:
        doc.p(f"Not computed: {_why_no_effects(a)}")
        return
    d = _digits(a.primary)
    doc.table(["effect", f"{spec(a.primary).label}: estimate", f"{int(CI_LEVEL * 100)} % CI",
               "p (Holm)", "verdict", f"detectable ({int(POWER * 100)} % power)"],
              [[a.effect_label(r.effect), _signed(r.estimate, d) + _unit(a.primary),
                interval(r.ci_lo, r.ci_hi, d), pvalue(r.p_holm), r.verdict,
                f"±{num(r.mde, d)}" if np.isfinite(r.mde) else "n/a"]
               for r in effects.itertuples()])
    doc.items([_capital(_effect_sentence(a, r)) + "." for _, r in effects.iterrows()])
    others = _evident(a.effects[(a.effects["family"] == "primary")
                                & (a.effects["metric"] != a.primary)])
    doc.p("Evidence on the other primary metrics: " + (
        "; ".join(_effect_sentence(a, r) for _, r in others.iterrows()) if len(others)
        else "none") + ".")
    primary = [m for m in a.metrics if spec(m).family == "primary"]
    labels = {e: a.effect_label(e) for e in a.effects["effect"].unique()}
    figs["effects.png"] = figures.forest(a.effects, primary, out / "effects.png", labels)
    doc.figure("effects.png", "Every effect on the primary metrics with its 95 % CI over "
                              "networks and test pairs; green: better, orange: worse, grey: no "
                              "evidence; the vertical line is no effect.")


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def _why_no_effects(a) -> str:
    if not a.design.complete:
        return (f"the sweep lacks finished trials in one of the {2 ** len(a.design.factors)} "
                "cells of the design.")
    return "no metric with a better direction was logged."


def _detectable(doc: Doc, a) -> None:
    doc.h(2, "What this design can detect")
    comp = a.components[a.components["metric"].map(lambda m: spec(m).family == "primary")] \
        if not a.components.empty else a.components
    if comp.empty:
        doc.p("Not computed: no primary metric was logged.")
        return
    doc.p("The variance components (standard deviations in the metric's units, method of "
          "moments): between trained networks of one variant (seed to seed), between test "
          "pairs (common to all variants), pair-by-variant (how differently the variants fare "
          "on a pair), and the rest. The first and the third limit what a design detects: more "
          "seeds shrink the first, more test pairs the third.")
    doc.table(["metric", "between networks", "between pairs", "pair x variant", "residual",
               "networks per variant", "pairs"],
              [[spec(r.metric).label, num(r.sd_network, _digits(r.metric)),
                num(r.sd_pair, _digits(r.metric)), num(r.sd_pair_x_cell, _digits(r.metric)),
                num(r.sd_residual, _digits(r.metric)), num(r.n_networks, 1),
                int(r.n_pairs)] for r in comp.itertuples()])
    _sensitivity(doc, a)


def _sensitivity(doc: Doc, a) -> None:
    sens = a.sensitivity
    if sens.empty:
        return
    d = _digits(a.primary)
    doc.p(f"{spec(a.primary).label}: the minimal effect this design detects with "
          f"{int(POWER * 100)} % power (two-sided, alpha {ALPHA} before Holm's correction), "
          "and the seeds per variant needed to detect effects of a given size with the same "
          "test pairs (n/a: more test pairs are needed, not more seeds, or the size is 0).")
    sens = sens[sens["target"] > 0]
    targets = list(dict.fromkeys(sens["target_label"]))
    rows = []
    for effect, group in sens.groupby("effect", sort=False):
        by = group.set_index("target_label")
        rows.append([a.effect_label(effect), f"±{num(group['mde'].iloc[0], d)}",
                     *(f"{num(by.loc[t, 'seeds_needed'], 0)} (for {num(by.loc[t, 'target'], d)})"
                       if t in by.index else "n/a" for t in targets)])
    doc.table(["effect", "detectable now", *(f"seeds for {t}" for t in targets)], rows)


# -- references -------------------------------------------------------------------------------


def _reference_means(a) -> pd.DataFrame:
    refs = a.references
    pairs = set(a.per_pair["pair_id"]) if not a.per_pair.empty else set()
    if refs.empty:
        if "dice_before_mean" not in a.per_pair.columns:
            return pd.DataFrame()
        base = a.per_pair.drop_duplicates("pair_id")
        return pd.DataFrame([{"method": "identity", "dice_mean": base["dice_before_mean"].mean()}])
    refs = refs[refs["pair_id"].isin(pairs)] if pairs else refs
    cols = [c for c in (*REFERENCE_COLUMNS, "method_s") if c in refs.columns]
    return refs.groupby("method", sort=False)[cols].mean().reset_index()


def _gap(value: float, identity: float, best: float, lower_better: bool) -> str:
    span = (identity - best) if lower_better else (best - identity)
    if not (np.isfinite(value) and np.isfinite(span)) or span == 0:
        return "n/a"
    closed = (identity - value) / span if lower_better else (value - identity) / span
    return f"{100 * closed:.0f} %"


def _references(doc: Doc, a) -> None:
    doc.h(2, "Registration quality against references")
    means = _reference_means(a)
    if means.empty:
        doc.p("The sweep logged no reference rows (identity, instance optimisation, ground "
              "truth).")
        return
    ref = means.set_index("method")
    cols = [c for c in REFERENCE_COLUMNS if c in ref.columns or c == "dice_mean"]
    rows = [[REFERENCE_LABELS.get(m, m), *(num(ref.loc[m].get(c, np.nan), _digits(c))
                                           for c in cols)] for m in ref.index]
    io = ref.loc["instance_optimisation"] if "instance_optimisation" in ref.index else None
    ident = ref.loc["identity"] if "identity" in ref.index else None
    gaps = []
    for v in a.variants:
        values = [_mean_of(a, v, c) for c in cols]
        rows.append([a.label(v), *(num(x, _digits(c)) for x, c in zip(values, cols))])
        if io is not None and ident is not None:
            gaps.append([a.label(v), *(_gap(_mean_of(a, v, c), ident.get(c, np.nan),
                                            io.get(c, np.nan), spec(c).direction < 0)
                                       for c in ("dice_mean", "true_error_mm") if c in cols)])
    doc.p("Means over the same test pairs: the identity (no registration), a per-pair "
          "optimisation of the field with the same similarity and regularizers and no network, "
          "the true field where the data has one, and every variant (mean over seeds).")
    doc.table(["method", *(figures.axis_title(c) for c in cols)], rows)
    if gaps:
        doc.p("Share of the achievable gap each variant closes: (variant - identity) / "
              "(instance optimisation - identity), for Dice and for the error against the true "
              "field (100 %: as good as optimising each pair).")
        doc.table(["variant", *(f"{spec(c).label} gap closed" for c in ("dice_mean",
                                "true_error_mm") if c in cols)], gaps)
    if "method_s" in ref.columns and io is not None:
        doc.p(f"Instance optimisation took {num(io['method_s'], 2)} s per pair.")


# -- every effect -----------------------------------------------------------------------------


def _effect_rows(a, sub: pd.DataFrame) -> list[list[str]]:
    return [[a.effect_label(r.effect), f"{spec(r.metric).label} ({r.metric})",
             _signed(r.estimate, _digits(r.metric)), interval(r.ci_lo, r.ci_hi, _digits(r.metric)),
             pvalue(r.p), pvalue(r.p_holm), r.verdict] for r in sub.itertuples()]


FAMILY_TITLES = {"primary": "Primary metrics", "secondary": "Secondary metrics",
                 "cost": "Cost (properties of the network, one value per network)"}


def _all_effects(doc: Doc, a, figs: dict[str, Path], out: Path) -> None:
    doc.h(2, "Effects on every metric")
    if a.effects.empty:
        doc.p(f"Not computed: {_why_no_effects(a)}")
        return
    doc.p("Contrast coding of the two-level factors: a main effect is the mean with the factor "
          "on minus the mean with it off, averaged over the other factors; a two-factor "
          "interaction is the effect of one factor with the other on minus with it off (in the "
          "2x2: (Combined (Enhanced) - Combined (Basic)) - (RegLoss UNet - Baseline UNet)). "
          "Estimates are in the metric's units. A positive synergy helps more than the sum of "
          "its parts in the metric's good direction. Holm's correction runs across the metrics "
          "of each family, within each effect; displacement magnitudes have no better "
          "direction and get no verdict.")
    header = ["effect", "metric", "estimate", f"{int(CI_LEVEL * 100)} % CI", "p", "p (Holm)",
              "verdict"]
    for fam, title in FAMILY_TITLES.items():
        sub = a.effects[a.effects["family"] == fam]
        if not sub.empty:
            doc.h(3, title)
            doc.table(header, _effect_rows(a, sub))
    _interaction_plots(doc, a, figs, out)


def _marginal_means(a, f: str, g: str) -> pd.DataFrame:
    """Mean of the primary metric at each level pair of (f, g), averaged over the other
    factors, with its CI (a contrast of the cell means)."""
    from analysis.stats import contrast_inference

    d = a.design
    _, rows = fx.design_of(a.per_pair, d.factors)
    y, _, _ = fx.metric_array(rows, d, a.primary)
    i, j = d.factors.index(f), d.factors.index(g)
    out = []
    for lf in (0, 1):
        for lg in (0, 1):
            w = np.array([1.0 if (c[i], c[j]) == (lf, lg) else 0.0 for c in d.cells])
            result = contrast_inference(y, w / w.sum())
            out.append({f: lf, g: lg, "mean": float(result.estimate),
                        "ci_lo": float(result.ci_lo), "ci_hi": float(result.ci_hi)})
    return pd.DataFrame(out)


def _interaction_plots(doc: Doc, a, figs: dict[str, Path], out: Path) -> None:
    pairs = [s for _, s in a.design.effects() if len(s) == 2]
    if not pairs or a.primary not in a.metrics:
        return
    doc.h(3, "Interaction plots")
    labels = {f: a.factor_labels[f] for f in a.design.factors}
    for f, g in pairs:
        name = f"interaction_{f}_{g}.png"
        figs[name] = figures.interaction_plot(_marginal_means(a, f, g), a.primary, f, g,
                                              out / name, labels)
        doc.figure(name, f"{spec(a.primary).label} at each level of {labels[f]} (x) and "
                         f"{labels[g]} (lines), with 95 % CIs: parallel lines mean no "
                         "interaction.")


def _improvements(doc: Doc, a) -> None:
    doc.h(2, "Improvement over the baseline")
    if a.improvements.empty:
        doc.p(f"Not computed: the sweep has no finished trials of the baseline "
              f"({a.label(a.baseline)}).")
        return
    doc.p(f"Relative improvement over {a.label(a.baseline)}: 100 (variant - baseline) / "
          "|baseline| where higher is better and 100 (baseline - variant) / |baseline| where "
          "lower is better, so positive is always better; 95 % CI by the delta method over "
          "networks and pairs; p of the difference, Holm-corrected per variant across the "
          "metrics of a family. n/a where the baseline's mean is 0.")
    variants = [v for v in a.variants if v in set(a.improvements["variant"])]
    rows = []
    for metric in [m for m in a.metrics if m in set(a.improvements["metric"])]:
        cells = []
        for v in variants:
            r = _row(a.improvements, variant=v, metric=metric)
            cells.append("n/a" if r is None or not np.isfinite(r.improvement_pct) else
                         f"{pct(r.improvement_pct)} % [{pct(r.ci_lo)}, {pct(r.ci_hi)}], "
                         f"p {pvalue(r.p_holm)}")
        rows.append([f"{spec(metric).label} ({metric})", *cells])
    doc.table(["metric", *(a.label(v) for v in variants)], rows)


# -- the numbers behind them -----------------------------------------------------------------


def _field_metrics(doc: Doc, a, figs: dict[str, Path], out: Path) -> None:
    doc.h(2, "Registration metrics")
    doc.p("Mean ± sd over test pairs (each pair averaged over seeds) and the 95 % CI of the "
          "mean over networks and pairs in brackets. Learn2Reg's own definitions (HD95 in "
          "voxels on surface elements, SDlogJ of det J + 3 cropped by 2 voxels) are given "
          "beside ours where the sweep logged them.")
    for cols in (FIELD_COLUMNS, L2R_COLUMNS):
        present = [m for m in cols if m in a.metrics]
        if present:
            doc.table(["Method", *(figures.axis_title(m) for m in present)],
                      [[a.label(v), *(_mean_sd(a, v, m, 1.0, _digits(m), with_ci=True)
                                      for m in present)] for v in a.variants])
    labels = [m for m in a.metrics if m.startswith("dice_") and m not in ("dice_mean",
                                                                            "dice_before_mean")]
    if labels:
        doc.p("Dice per label (mean ± sd):")
        doc.table(["Method", *(spec(m).label for m in labels)],
                  [[a.label(v), *(_mean_sd(a, v, m, 1.0, 4) for m in labels)]
                   for v in a.variants])
    doc.p("Every metric the sweep logged is in summary.csv.")
    for metric in KEY_METRICS:
        if metric in a.metrics:
            name = f"box_{metric}.png"
            figs[name] = figures.box_by_variant(a.per_pair, metric, out / name)
            doc.figure(name, f"{spec(metric).label} by variant: one point per test pair "
                             "(mean over seeds); the triangle marks the mean.")


def _key_results(doc: Doc, a) -> None:
    doc.h(2, "Key results in the original study's layout")
    doc.p("The columns of the original study's 'Key Results' table, recomputed with honest "
          "definitions: mean ± sd over test pairs (each pair averaged over seeds). MSE "
          "improvement is the relative reduction of the image MSE by registration (%), NCC "
          "improvement is NCC after minus NCC before, max displacement is in mm (described, "
          "not judged), anatomical plausibility lies in [0, 1], inference time is the median "
          "warm forward pass per pair in ms as timed inside the trials (the controlled timing "
          "is under Computational cost). Cells are n/a where the sweep did not log the column.")
    doc.table(["Method", *(c[1] for c in KEY_RESULT_COLUMNS)],
              [[a.label(v), *(_mean_sd(a, v, m, scale, d) for m, _, scale, d in KEY_RESULT_COLUMNS)]
               for v in a.variants])


def _cost(doc: Doc, a) -> None:
    doc.h(2, "Computational cost")
    present = [m for m in COST_METRICS if m in a.metrics]
    if not present:
        doc.p("The sweep ran no timing step: the only times are those the trials measured "
              "while sharing the machine (Key results), which are not comparable between "
              "variants.")
        return
    doc.p("Timed after the trials by the sweep's timing step: one network at a time, alone on "
          "its device, warm, median of repeats. A time is a property of the trained network, "
          "so the network is the only unit of these tests (never the test pair).")
    doc.table(["Method", *(f"{spec(m).label} (ms, median over repeats; mean over seeds)"
                           for m in present)],
              [[a.label(v), *(num(_mean_of(a, v, m) * 1000, 1) for m in present)]
               for v in a.variants])
    cost = a.effects[a.effects["family"] == "cost"] if not a.effects.empty else a.effects
    cost = cost[cost["metric"].isin(present)] if not cost.empty else cost
    if not cost.empty:
        doc.items([_capital(_effect_sentence(a, r)) + "." for _, r in cost.iterrows()])


def _search(doc: Doc, a, figs: dict[str, Path], out: Path) -> None:
    doc.h(2, "Weight search")
    search, metric = a.search, a.search_metric
    if search.empty:
        doc.p("The sweep ran no weight search (no trials of group 'search').")
        return
    stopped = int(search["stopped_early"].sum()) if "stopped_early" in search else 0
    doc.p(f"{len(search)} search trials, {stopped} of them stopped early by the scheduler. The "
          f"importance and the front use the searched metric ({metric}) of every trial at its "
          "last report, stopped trials included.")
    if a.importance.empty:
        doc.p("No config value varied across the search trials.")
    elif a.importance["importance"].isna().all():
        n = len(a.importance)
        doc.p(f"The search is too small to rank the weights: {len(search)} trials for {n} "
              f"searched value{'s' if n > 1 else ''} ({a.importance['method'].iloc[0]}). The "
              "rank correlations below describe these trials only.")
    if not a.importance.empty:
        doc.table(["parameter", "importance", "method", "Spearman rho", "p"],
                  [[r.param, num(r.importance, 3), r.method, num(r.spearman_rho, 2),
                    pvalue(r.spearman_p)] for r in a.importance.itertuples()])
    _search_front(doc, a, figs, out)


def _search_front(doc: Doc, a, figs: dict[str, Path], out: Path) -> None:
    metric, search = a.search_metric, a.search
    other = "val.folding_pct"
    if not {metric, other} <= set(search.columns):
        return
    front = fx.pareto_front(search, maximize=metric, minimize=other) if spec(
        metric.split(".", 1)[-1]).direction > 0 else pd.Series(False, index=search.index)
    on = search[front].sort_values(other)
    doc.p(f"Pareto front of {metric} (higher) against {other} (lower): {len(on)} of "
          f"{len(search)} trials are not dominated.")
    params = [f"cfg.{p}" for p in a.importance["param"]] if not a.importance.empty else []
    doc.table(["run", metric, other, *(p.removeprefix("cfg.") for p in params)],
              [[r["run_name"], num(r[metric], 4), num(r[other], 3),
                *(num(float(r[p]), 4) if fx.is_number(r[p]) else str(r[p]) for p in params)]
               for _, r in on.iterrows()])
    ablation = a.sweep.finished[a.sweep.finished["group"] == "ablation"]
    figs["search_front.png"] = figures.search_front(search, front, ablation,
                                                    out / "search_front.png", metric, other)
    doc.figure("search_front.png", f"{metric} against {other} of the weight-search trials "
                                   "(Pareto front in red) and of the ablation trials.")


def _questions(doc: Doc, a) -> None:
    doc.h(2, "Research questions")
    answers = []
    if a.effects.empty:
        answers.append("1. Individual contributions of each factor: not answerable, "
                       f"{_why_no_effects(a)}")
        answers.append("2. Synergy: not answerable for the same reason.")
    else:
        mains = a.effects[(a.effects["order"] == 1) & (a.effects["family"] == "primary")]
        inter = a.effects[(a.effects["order"] > 1) & (a.effects["family"] == "primary")]
        answers.append("1. Individual contributions of each factor: " + _contributions(a, mains))
        answers.append("2. Synergy: " + _synergy(a, inter))
    answers.append("3. Computational trade-offs: " + _tradeoffs(a))
    answers.append("4. Accuracy-plausibility balance: " + _balance(a))
    doc.items(answers)


def _contributions(a, mains: pd.DataFrame) -> str:
    primary = mains[mains["metric"] == a.primary]
    parts = [_effect_sentence(a, r) for _, r in primary.iterrows()]
    evident = _evident(mains)
    text = "; ".join(parts) + "."
    if len(primary) > 1 and primary["estimate"].notna().any():
        top = primary.loc[primary["estimate"].abs().idxmax()]
        text += (f" The largest change of {spec(a.primary).label} in magnitude comes from "
                 f"{a.effect_label(top.effect)}.")
    if len(evident):
        text += " Evidence on the primary metrics: " + ", ".join(
            f"{a.effect_label(r.effect)} ({spec(r.metric).label}: {r.verdict})"
            for r in evident.itertuples()) + "."
    else:
        text += " No main effect on a primary metric has evidence."
    return text


def _synergy(a, inter: pd.DataFrame) -> str:
    primary = inter[inter["metric"] == a.primary]
    text = "; ".join(_effect_sentence(a, r) for _, r in primary.iterrows()) + "."
    groups = {v: [spec(r.metric).label for r in inter.itertuples() if r.verdict.startswith(v)]
              for v in ("positive synergy", "negative synergy")}
    return (text + f" Across the {inter['metric'].nunique()} primary metrics: positive synergy "
            f"in {', '.join(groups['positive synergy']) or 'none'}; negative synergy in "
            f"{', '.join(groups['negative synergy']) or 'none'}.")


def _tradeoffs(a) -> str:
    metric = next((m for m in COST_METRICS if m in a.metrics), None)
    if metric is None:
        return ("not answered: the sweep ran no controlled timing step, and times measured "
                "inside trials that share a machine are not comparable.")
    times = "; ".join(f"{a.label(v)} {num(_mean_of(a, v, metric) * 1000, 1)} ms"
                      for v in a.variants)
    cost = a.effects[(a.effects["metric"] == metric)] if not a.effects.empty else a.effects
    evident = _evident(cost)
    text = f"{spec(metric).label} per network: {times}."
    if len(evident):
        text += " " + " ".join(_capital(_effect_sentence(a, r)) + "."
                               for _, r in evident.iterrows())
    else:
        text += " No factor has evidence of changing it."
    return text


def _balance(a) -> str:
    if "dice_mean" not in a.metrics or "folding_pct" not in a.metrics:
        return "not answerable: the sweep logged no Dice or folding."
    table = pd.DataFrame({"dice": [_mean_of(a, v, "dice_mean") for v in a.variants],
                          "folding": [_mean_of(a, v, "folding_pct") for v in a.variants]},
                         index=a.variants)
    front = fx.pareto_front(table, maximize="dice", minimize="folding")
    on = table[front].sort_values("dice", ascending=False)
    best = table["dice"].idxmax()
    least = table["folding"].idxmin()
    text = (f"among the variants, {', '.join(a.label(v) for v in on.index)} "
            f"{'is' if len(on) == 1 else 'are'} not dominated in (Dice higher, folding lower). "
            f"Highest mean Dice: {a.label(best)} ({num(table['dice'].max(), 4)}); least mean "
            f"folding: {a.label(least)} ({num(table['folding'].min(), 3)} %).")
    if len(on) == 1:
        return text + f" {a.label(on.index[0])} gives the best balance in this sweep."
    return text + (" No variant is best on both; the choice depends on how much folding a "
                   "use tolerates.")


def _definitions(doc: Doc, a) -> None:
    doc.h(2, "Metric definitions")
    items = []
    for metric in a.metrics:
        s = spec(metric)
        unit = f", {s.unit}" if s.unit else ""
        better = ("no better direction" if s.direction == 0 else
                  f"{'higher' if s.direction > 0 else 'lower'} is better")
        items.append(f"{s.label} ({metric}{unit}; {better}; {s.family}): {s.definition}")
    doc.items(items)
    doc.p("A structure that vanished from the warped map or appeared in it scores as the worst "
          "case, never the best: its HD95 is infinite (ours and Learn2Reg's), so the pair's "
          "mean over labels is infinite, every mean over pairs that includes it is infinite, "
          "and an effect on that metric is reported as not estimable with the count of "
          "infinite pair values; labels_missing counts such labels per pair. Dice leaves out "
          "a label absent from the fixed map (NaN, as Learn2Reg) and scores one that vanished "
          "from the warped map 0. docs/METRICS.md gives every definition beside Learn2Reg's.")


# -- provenance and the example --------------------------------------------------------------


def compare_url(a) -> str | None:
    """The MLflow UI's compare view of the ablation runs, when the store is a server."""
    uri = a.sweep.tracking_uri
    if not uri.startswith(("http://", "https://")):
        return None
    runs = a.sweep.finished[a.sweep.finished["group"] == "ablation"]["run_id"].tolist()
    query = urllib.parse.urlencode({"runs": json.dumps(runs),
                                    "experiments": json.dumps([a.sweep.experiment_id])})
    return f"{redact_uri(uri).rstrip('/')}/#/compare-runs?{query}"


def _regularization_line(ablation: pd.DataFrame) -> str:
    """The regularizer weights the ablation grid trained with, as the effective multipliers."""
    keys = ["cfg.loss.reg_scale", "cfg.loss.adaptive",
            *(f"cfg.loss.{name}_weight" for name in REGULARIZERS)]
    if ablation.empty or not set(keys) <= set(ablation.columns):
        return "Regularization of the ablation grid: not recorded in the runs' params."
    regularized = ablation[ablation["regularize"]] if "regularize" in ablation else ablation
    values = regularized[keys].drop_duplicates()
    if len(values) != 1:
        return "Regularization of the ablation grid: differs between trials (see the runs' params)."
    row = values.iloc[0]
    scale = float(row["cfg.loss.reg_scale"])
    weights = ", ".join(f"{name} {scale * float(row[f'cfg.loss.{name}_weight']):g}"
                        for name in REGULARIZERS)
    schedule = ("x the study's adaptive factor max(0.01, 0.1 (1 - epoch/epochs))"
                if bool(row["cfg.loss.adaptive"]) else "constant (no adaptive factor)")
    return (f"Regularization of the variants that regularize: reg_scale {scale:g} x the study's "
            f"weights = {weights}, {schedule}.")


def _provenance(doc: Doc, a) -> None:
    s = a.sweep
    doc.h(2, "Provenance")
    ablation = s.finished[s.finished["group"] == "ablation"]
    n_pairs = a.per_pair["pair_id"].nunique() if not a.per_pair.empty else 0
    doc.items([
        f"Experiment: {s.experiment_name} (id {s.experiment_id}); tracking store "
        f"{redact_uri(s.tracking_uri)}.",
        f"Parent run: {s.parent_run_id}; sweep id {s.parent_tags.get('regablate.sweep_id', 'n/a')}"
        f"; preset {s.preset}.",
        f"Trials: {len(s.trials)} ({len(s.finished)} finished, {len(s.unfinished)} not); "
        f"{s.duplicates_dropped} duplicate run(s) of resumed trials dropped.",
        f"Seeds of the ablation grid: "
        f"{', '.join(map(str, sorted(ablation['seed'].unique()))) or 'none'}; "
        f"test pairs: {n_pairs}.",
        "Statistics: the trained networks (variant x seed) and the test pairs are both sources "
        "of variation; every CI and p-value comes from a two-level moment estimate of the "
        "variance (networks nested in variants, crossed with pairs) with Satterthwaite's "
        "degrees of freedom and a t distribution; p-values Holm-corrected across the metrics "
        f"of a family; evidence needs corrected p < {ALPHA}. Calibration on simulated studies: "
        "docs/STATISTICS.md.",
        _regularization_line(ablation),
        f"Generated {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.",
    ])
    url = compare_url(a)
    if url:
        doc.link("The ablation runs side by side in the MLflow UI (compare view)", url)
    _trial_counts(doc, a)


def _trial_counts(doc: Doc, a) -> None:
    s = a.sweep
    counts = s.trials.groupby(["group", "variant"], sort=False).agg(
        trials=("trial_id", "size"),
        finished=("status", lambda st: int((st == "FINISHED").sum())),
        seeds=("seed", lambda x: ", ".join(map(str, sorted(set(x))))),
    ).reset_index()
    doc.table(["group", "variant", "trials", "finished", "seeds"],
              [[r.group, a.label(r.variant), r.trials, r.finished, r.seeds]
               for r in counts.itertuples()])
    failed = s.unfinished
    if failed.empty:
        doc.p("Failed or unfinished trials: none.")
    else:
        doc.p("Failed or unfinished trials:")
        doc.table(["trial id", "run", "variant", "seed", "group", "status", "reason"],
                  [[r.trial_id, r.run_name, a.label(r.variant), r.seed, r.group, r.status,
                    (r.error or r.end_note or "")[:200]] for r in failed.itertuples()])
    doc.items([f"Problem: {p}" for p in s.problems])


def _example(doc: Doc, a, figs: dict[str, Path], out: Path, scratch: Path) -> None:
    doc.h(2, "Example registration")
    found = fetch_example(a.sweep, scratch)
    if found is None:
        doc.p("No trial of this sweep logged an example.npz.")
        return
    path, trial = found
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    title = f"{a.label(trial['variant'])}, seed {trial['seed']} (run {trial['run_id']})"
    figs["example.png"] = figures.example_slices(arrays, out / "example.png", title)
    jac = arrays["jacdet"]
    doc.p(f"One test pair registered by {title}: mid-slices of the fixed, moving and warped "
          "images; the yellow grid is the fixed image's grid moved to x + u(x) (in-plane "
          "components), the cyan line the fixed segmentation's outline; the Jacobian "
          f"determinant ranges from {num(float(jac.min()), 3)} to {num(float(jac.max()), 3)}"
          f" with {num(100.0 * float((jac <= 0).mean()), 3)} % of voxels folded "
          "(det J <= 0, outlined in black).")
    doc.figure("example.png", "Fixed, moving, warped with the deformation grid, and the "
                              "Jacobian determinant (axial, coronal, sagittal mid-slices).")
