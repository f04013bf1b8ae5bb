"""The sweep's report: `report.md`, a self-contained `report.html` and the figures as PNG.

    python -m analysis.report [--parent-run ID | --experiment NAME] [--tracking-uri URI] --out DIR

Reads one sweep from MLflow (`analysis.runs`), computes the statistics (`analysis.effects`),
draws the figures (`analysis.figures`) and writes everything into a temporary folder that
replaces DIR only when complete (`regcore.io.atomic_dir`). Every check on the input (store,
parent run, experiment, finished trials, DIR) happens before anything is written.
"""

from __future__ import annotations

import argparse
import base64
import html
import os
import re
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from analysis import effects as fx
from analysis import figures
from analysis.metrics import KEY_METRICS, METRICS, spec
from analysis.runs import Sweep, fetch_example, load_sweep
from analysis.stats import CI_LEVEL, N_RESAMPLES
from regcore.cli import UsageError, run_cli
from regcore.config import REGULARIZERS
from regcore.io import atomic_dir
from regcore.variants import BASELINE, VARIANTS

__all__ = ["build_report", "main", "SECTIONS"]

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"

#: The report's second-level headings, in order (the tests check them).
SECTIONS = (
    "Provenance",
    "Key results in the original study's layout",
    "Registration metrics",
    "Metric definitions",
    "Effects of the factors (2x2)",
    "Improvement over the baseline",
    "Weight search",
    "Research questions",
    "Example registration",
)

#: The original study's "Key Results" columns, with honest definitions and units.
KEY_RESULT_COLUMNS = (
    ("mse_improvement_pct", "MSE improvement (%)", 1.0, 2),
    ("ncc_gain", "NCC improvement (after - before)", 1.0, 4),
    ("disp_max_mm", "Max displacement (mm)", 1.0, 2),
    ("plausibility", "Anatomical plausibility [0,1]", 1.0, 3),
    ("inference_s", "Inference time (ms)", 1000.0, 1),
)
FIELD_COLUMNS = ("dice_mean", "hd95_mm", "folding_pct", "sdlogj", "true_error_mm")
FOREST_METRICS = ("dice_mean", "hd95_mm", "folding_pct", "sdlogj", "true_error_mm",
                  "mse_improvement_pct", "disp_max_mm", "plausibility", "inference_s")


# -- a tiny document model rendered to Markdown and HTML -----------------------------------


@dataclass
class Doc:
    blocks: list[tuple] = field(default_factory=list)

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def items(self, items: Sequence[str]) -> None:
        if items:
            self.blocks.append(("ul", list(items)))

    def table(self, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
        self.blocks.append(("table", list(header), [[_cell(c) for c in r] for r in rows]))

    def figure(self, filename: str, caption: str) -> None:
        self.blocks.append(("fig", filename, caption))

    def markdown(self) -> str:
        out: list[str] = []
        for block in self.blocks:
            kind = block[0]
            if kind == "h":
                out.append(f"{'#' * block[1]} {block[2]}")
            elif kind == "p":
                out.append(block[1])
            elif kind == "ul":
                out.append("\n".join(f"- {item}" for item in block[1]))
            elif kind == "table":
                header, rows = block[1], block[2]
                esc = [[c.replace("|", "\\|") for c in r] for r in [header, *rows]]
                lines = ["| " + " | ".join(esc[0]) + " |",
                         "| " + " | ".join("---" for _ in header) + " |"]
                lines += ["| " + " | ".join(r) + " |" for r in esc[1:]]
                out.append("\n".join(lines))
            elif kind == "fig":
                out.append(f"![{block[2]}]({block[1]})\n\n*{block[2]}*")
        return "\n\n".join(out) + "\n"

    def html(self, images: dict[str, bytes], title: str) -> str:
        body: list[str] = []
        for block in self.blocks:
            kind = block[0]
            if kind == "h":
                body.append(f"<h{block[1]}>{html.escape(block[2])}</h{block[1]}>")
            elif kind == "p":
                body.append(f"<p>{html.escape(block[1])}</p>")
            elif kind == "ul":
                body.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in block[1])
                            + "</ul>")
            elif kind == "table":
                head = "".join(f"<th>{html.escape(c)}</th>" for c in block[1])
                rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r)
                               + "</tr>" for r in block[2])
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody>"
                            "</table>")
            elif kind == "fig":
                data = base64.b64encode(images[block[1]]).decode("ascii")
                body.append(f'<figure><img alt="{html.escape(block[2])}" '
                            f'src="data:image/png;base64,{data}"><figcaption>'
                            f"{html.escape(block[2])}</figcaption></figure>")
        return (
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n"
        )


_CSS = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;"
    "line-height:1.45;color:#222}table{border-collapse:collapse;margin:1em 0;font-size:0.9em}"
    "th,td{border:1px solid #bbb;padding:0.25em 0.6em;text-align:left}th{background:#eee}"
    "img{max-width:100%}figure{margin:1em 0}figcaption{font-style:italic;font-size:0.9em}"
)


def _cell(value: object) -> str:
    return " ".join(str(value).split())


# -- number formatting ----------------------------------------------------------------------


def _num(value: float, digits: int = 3) -> str:
    """`digits` decimals, more for small numbers so that two significant digits show."""
    if value is None or not np.isfinite(value):
        return "n/a"
    if value == 0:
        return f"{0:.{digits}f}"
    if abs(value) >= 1e6 or abs(value) < 1e-6:
        return f"{value:.2e}"
    decimals = max(digits, int(-np.floor(np.log10(abs(value)))) + 1)
    return f"{value:.{min(decimals, 7)}f}"


def _pct(value: float) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.1f}"


def _p(value: float) -> str:
    if value is None or not np.isfinite(value):
        return "n/a"
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def _ci(lo: float, hi: float, digits: int = 3) -> str:
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "n/a"
    return f"[{_num(lo, digits)}, {_num(hi, digits)}]"


def _digits(metric: str) -> int:
    return 4 if metric.startswith(("dice", "sdlogj", "ncc")) else 3 if metric == "plausibility" \
        else 2


def _unit(metric: str) -> str:
    unit = spec(metric).unit
    return "" if unit in ("", "[0,1]") else (" %" if unit == "%" else f" {unit}")


def _label(variant: str) -> str:
    return VARIANTS[variant].label if variant in VARIANTS else variant


# -- the analysis that the report shows ------------------------------------------------------


@dataclass
class Analysis:
    sweep: Sweep
    per_pair: pd.DataFrame
    summary: pd.DataFrame
    improvements: pd.DataFrame
    effects: pd.DataFrame
    importance: pd.DataFrame
    search: pd.DataFrame
    front: pd.Series
    metrics: list[str]


def _with_derived(per_pair: pd.DataFrame) -> pd.DataFrame:
    """Add `ncc_gain` = ncc_after - ncc_before (the study's NCC column, defined honestly)."""
    if {"ncc_after", "ncc_before"} <= set(per_pair.columns):
        return per_pair.assign(ncc_gain=per_pair["ncc_after"] - per_pair["ncc_before"])
    return per_pair


def analyse(sweep: Sweep, *, seed: int = 0) -> Analysis:
    per_pair = _with_derived(sweep.per_pair)
    metrics = [m for m in METRICS if m in per_pair.columns and per_pair[m].notna().any()]
    search = fx.search_trials(sweep.trials)
    front = (fx.pareto_front(search) if {"test.dice_mean", "test.folding_pct"}
             <= set(search.columns) else pd.Series(False, index=search.index))
    return Analysis(
        sweep=sweep,
        per_pair=per_pair,
        summary=fx.summarize(per_pair, metrics, seed=seed),
        improvements=fx.improvements(per_pair, metrics, seed=seed),
        effects=fx.factorial_effects(per_pair, metrics, seed=seed),
        importance=fx.search_importance(sweep.trials),
        search=search,
        front=front,
        metrics=metrics,
    )


# -- sections ----------------------------------------------------------------------------------


def _redact(uri: str) -> str:
    return re.sub(r"//[^/@]*@", "//***@", uri)


def _regularization_line(ablation: pd.DataFrame) -> str:
    """The regularizer weights the ablation grid trained with, as the effective multipliers."""
    keys = ["cfg.loss.reg_scale", "cfg.loss.adaptive",
            *(f"cfg.loss.{name}_weight" for name in REGULARIZERS)]
    if ablation.empty or not set(keys) <= set(ablation.columns):
        return "Regularization of the ablation grid: not recorded in the runs' params."
    values = ablation[keys].drop_duplicates()
    if len(values) > 1:
        return "Regularization of the ablation grid: differs between trials (see the runs' params)."
    row = values.iloc[0]
    scale = float(row["cfg.loss.reg_scale"])
    weights = ", ".join(f"{name} {scale * float(row[f'cfg.loss.{name}_weight']):g}"
                        for name in REGULARIZERS)
    schedule = ("x the study's adaptive factor max(0.01, 0.1 (1 - epoch/epochs))"
                if bool(row["cfg.loss.adaptive"]) else "constant (no adaptive factor)")
    return (f"Regularization of the variants that regularize: reg_scale {scale:g} x the study's "
            f"weights = {weights}, {schedule}.")


def _provenance(doc: Doc, a: Analysis) -> None:
    s = a.sweep
    doc.h(2, "Provenance")
    ablation = s.finished[s.finished["group"] == "ablation"]
    n_pairs = a.per_pair["pair_id"].nunique() if not a.per_pair.empty else 0
    doc.items([
        f"Experiment: {s.experiment_name} (id {s.experiment_id}); tracking store "
        f"{_redact(s.tracking_uri)}.",
        f"Parent run: {s.parent_run_id}; sweep id {s.parent_tags.get('regablate.sweep_id', 'n/a')}"
        f"; preset {s.preset}.",
        f"Trials: {len(s.trials)} ({len(s.finished)} finished, {len(s.unfinished)} not); "
        f"{s.duplicates_dropped} duplicate run(s) of resumed trials dropped.",
        f"Seeds of the ablation grid: "
        f"{', '.join(map(str, sorted(ablation['seed'].unique()))) or 'none'}; "
        f"test pairs: {n_pairs}.",
        f"Statistics: subjects (test pairs) are the resampling unit, seeds are averaged per "
        f"subject first; {int(CI_LEVEL * 100)} % percentile bootstrap CIs with {N_RESAMPLES} "
        f"seeded resamples; two-sided sign-flip permutation tests (exact up to 16 subjects); "
        f"p-values Holm-corrected across metrics (primary and secondary metrics as separate "
        f"families); evidence needs corrected p < {fx.ALPHA} and a CI excluding 0. With n "
        f"subjects the smallest possible p is 2 / 2^n (n = {n_pairs}: "
        f"{_p(min(1.0, 2.0 / 2 ** n_pairs)) if n_pairs else 'n/a'}).",
        _regularization_line(ablation),
        f"Generated {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.",
    ])
    counts = s.trials.groupby(["group", "variant"], sort=False).agg(
        trials=("trial_id", "size"),
        finished=("status", lambda st: int((st == "FINISHED").sum())),
        seeds=("seed", lambda x: ", ".join(map(str, sorted(set(x))))),
    ).reset_index()
    doc.table(["group", "variant", "trials", "finished", "seeds"],
              [[r.group, _label(r.variant), r.trials, r.finished, r.seeds]
               for r in counts.itertuples()])
    failed = s.unfinished
    if failed.empty:
        doc.p("Failed or unfinished trials: none.")
    else:
        doc.p("Failed or unfinished trials:")
        doc.table(["trial id", "run", "variant", "seed", "group", "status", "reason"],
                  [[r.trial_id, r.run_name, _label(r.variant), r.seed, r.group, r.status,
                    (r.error or r.end_note or "")[:200]] for r in failed.itertuples()])
    doc.items([f"Problem: {p}" for p in s.problems])


def _mean_sd(summary: pd.DataFrame, variant: str, metric: str, scale: float = 1.0,
             digits: int = 3, with_ci: bool = False) -> str:
    row = summary[(summary["variant"] == variant) & (summary["metric"] == metric)]
    if row.empty:
        return "n/a"
    r = row.iloc[0]
    text = f"{_num(r['mean'] * scale, digits)} ± {_num(r['sd'] * scale, digits)}"
    if with_ci:
        text += f" {_ci(r.ci_lo * scale, r.ci_hi * scale, digits)}"
    return text


def _variants(a: Analysis) -> list[str]:
    present = set(a.summary["variant"])
    return [v for v in VARIANTS if v in present] + sorted(present - set(VARIANTS))


def _key_results(doc: Doc, a: Analysis) -> None:
    doc.h(2, "Key results in the original study's layout")
    doc.p("The columns of the original study's 'Key Results' table, recomputed with honest "
          "definitions: mean ± sd over test pairs (each pair averaged over seeds). MSE "
          "improvement is the relative reduction of the image MSE by registration (%), NCC "
          "improvement is NCC after minus NCC before, max displacement is in mm, anatomical "
          "plausibility lies in [0, 1], inference time is the median warm forward pass per "
          "pair in ms. Cells are n/a where the sweep did not log the column.")
    cols = KEY_RESULT_COLUMNS
    doc.table(["Method", *(c[1] for c in cols)],
              [[_label(v), *(_mean_sd(a.summary, v, m, scale, d) for m, _, scale, d in cols)]
               for v in _variants(a)])


def _field_metrics(doc: Doc, a: Analysis, figs: dict[str, Path], out: Path) -> None:
    doc.h(2, "Registration metrics")
    doc.p(f"The field's metrics: mean ± sd over test pairs and the {int(CI_LEVEL * 100)} % "
          "bootstrap CI of the mean in brackets.")
    cols = [m for m in FIELD_COLUMNS if m in a.metrics]
    doc.table(["Method", *(figures.axis_title(m) for m in cols)],
              [[_label(v), *(_mean_sd(a.summary, v, m, 1.0, _digits(m), with_ci=True)
                             for m in cols)] for v in _variants(a)])
    labels = [m for m in a.metrics if m.startswith("dice_") and m != "dice_mean"]
    if labels:
        doc.p("Dice per label (mean ± sd):")
        doc.table(["Method", *(spec(m).label for m in labels)],
                  [[_label(v), *(_mean_sd(a.summary, v, m, 1.0, 4) for m in labels)]
                   for v in _variants(a)])
    doc.p("Every metric the sweep logged, per variant: mean ± sd [95 % bootstrap CI], with "
          "the number of test pairs and seeds (also in summary.csv).")
    variants = _variants(a)
    n = a.summary.groupby("variant")[["n_subjects", "n_seeds"]].max()
    doc.table(["metric", *(f"{_label(v)} (n = {n.loc[v, 'n_subjects']} pairs x "
                           f"{n.loc[v, 'n_seeds']} seeds)" for v in variants)],
              [[f"{figures.axis_title(m)} ({m})",
                *(_mean_sd(a.summary, v, m, 1.0, _digits(m), with_ci=True) for v in variants)]
               for m in a.metrics])
    for metric in KEY_METRICS:
        if metric in a.metrics:
            name = f"box_{metric}.png"
            figs[name] = figures.box_by_variant(a.per_pair, metric, out / name)
            doc.figure(name, f"{spec(metric).label} by variant: one point per test pair "
                             "(mean over seeds); the triangle marks the mean.")


def _definitions(doc: Doc, a: Analysis) -> None:
    doc.h(2, "Metric definitions")
    items = []
    for metric in a.metrics:
        s = spec(metric)
        unit = f", {s.unit}" if s.unit else ""
        better = "higher" if s.direction > 0 else "lower"
        items.append(f"{s.label} ({metric}{unit}; {better} is better): {s.definition}")
    doc.items(items)


def _effect_rows(sub: pd.DataFrame, with_effect: bool = False) -> list[list[str]]:
    return [[*([EFFECT_TITLES[r.effect]] if with_effect else []),
             spec(r.metric).label + f" ({r.metric})", _num(r.estimate, _digits(r.metric)),
             _ci(r.ci_lo, r.ci_hi, _digits(r.metric)), _p(r.p), _p(r.p_holm), r.verdict]
            for r in sub.itertuples()]


EFFECT_TITLES = {"affine": "Main effect of the affine stage",
                 "regularize": "Main effect of the regularizers",
                 "interaction": "Interaction (synergy)"}


def _effects(doc: Doc, a: Analysis, figs: dict[str, Path], out: Path) -> None:
    doc.h(2, "Effects of the factors (2x2)")
    if a.effects.empty:
        doc.p("Not computed: the sweep lacks finished trials in one of the four cells of the "
              "design.")
        return
    doc.p("Per test pair, with y the metric of a cell averaged over seeds: main effect of the "
          "affine stage = mean over the regularizer levels of (affine on - off); main effect of "
          "the regularizers likewise; interaction = (Combined (Enhanced) - Combined (Basic)) - "
          "(RegLoss UNet - Baseline UNet). Estimates are in the metric's units (mean over "
          "pairs). A positive synergy means the combination helps more than the sum of its "
          "parts in the metric's good direction. Holm's correction runs across the primary "
          "metrics below; the secondary ones (per-label Dice and re-expressions of a primary "
          "metric in other units) form a family of their own.")
    header = ["metric", "estimate", f"{int(CI_LEVEL * 100)} % CI", "p", "p (Holm)", "verdict"]
    primary = a.effects[a.effects["family"] == "primary"]
    for effect, title in EFFECT_TITLES.items():
        doc.h(3, title)
        doc.table(header, _effect_rows(primary[primary["effect"] == effect]))
    secondary = a.effects[a.effects["family"] == "secondary"]
    if not secondary.empty:
        doc.h(3, "Secondary metrics")
        doc.table(["effect", *header], _effect_rows(secondary, with_effect=True))
    figs["effects.png"] = figures.forest(a.effects, list(FOREST_METRICS), out / "effects.png")
    doc.figure("effects.png", "Main effects and interaction per metric with 95 % bootstrap "
                              "CIs; the vertical line is no effect.")


def _improvements(doc: Doc, a: Analysis) -> None:
    doc.h(2, "Improvement over the baseline")
    if a.improvements.empty:
        doc.p("Not computed: the sweep has no finished baseline trials.")
        return
    doc.p("Relative improvement over Baseline UNet, paired by test pair: 100 (variant - "
          "baseline) / |baseline| where higher is better and 100 (baseline - variant) / "
          "|baseline| where lower is better, so positive is always better; 95 % bootstrap CI "
          "and Holm-corrected p (per variant, across the metrics of a family: primary, "
          "secondary). n/a where the baseline's mean is 0.")
    variants = [v for v in VARIANTS if v in set(a.improvements["variant"])]
    rows = []
    for metric in [m for m in a.metrics if m in set(a.improvements["metric"])]:
        cells = []
        for v in variants:
            r = a.improvements[(a.improvements["variant"] == v)
                               & (a.improvements["metric"] == metric)]
            if r.empty:
                cells.append("n/a")
                continue
            r = r.iloc[0]
            if not np.isfinite(r.improvement_pct):
                cells.append("n/a")
                continue
            ci = (f"[{_pct(r.ci_lo)}, {_pct(r.ci_hi)}]" if np.isfinite(r.ci_lo)
                  and np.isfinite(r.ci_hi) else "n/a")
            cells.append(f"{_pct(r.improvement_pct)} % {ci}, p {_p(r.p_holm)}")
        rows.append([f"{spec(metric).label} ({metric})", *cells])
    doc.table(["metric", *(_label(v) for v in variants)], rows)


def _search(doc: Doc, a: Analysis, figs: dict[str, Path], out: Path) -> None:
    doc.h(2, "Weight search")
    search = a.search
    if search.empty:
        doc.p("The sweep ran no weight search (no finished trials of group 'search').")
        return
    stopped = int(search["stopped_early"].sum()) if "stopped_early" in search else 0
    doc.p(f"{len(search)} finished search trials ({stopped} stopped early by the scheduler, "
          "without test metrics unless they reached the last epoch). Importance of each "
          "searched value for the "
          "test Dice: optuna's fANOVA importance (share of the objective's variance explained "
          "by the value, over the search trials; needs at least 3 trials) beside the Spearman "
          "rank correlation of the value with the test Dice (sign = direction).")
    if a.importance.empty:
        doc.p("No config value varied across the search trials.")
    else:
        doc.table(["parameter", "importance", "method", "Spearman rho", "p"],
                  [[r.param, _num(r.importance, 3), r.method, _num(r.spearman_rho, 2),
                    _p(r.spearman_p)] for r in a.importance.itertuples()])
    if not {"test.dice_mean", "test.folding_pct"} <= set(search.columns):
        doc.p("The search trials logged no test.dice_mean / test.folding_pct: no front.")
        return
    params = [f"cfg.{p}" for p in a.importance["param"]] if not a.importance.empty else []
    on = search[a.front].sort_values("test.folding_pct")
    doc.p(f"Pareto front of test Dice (higher) against folding % (lower): {len(on)} of "
          f"{len(search)} trials are not dominated.")
    doc.table(["run", "test Dice", "folding %", *(p.removeprefix("cfg.") for p in params)],
              [[r["run_name"], _num(r["test.dice_mean"], 4), _num(r["test.folding_pct"], 3),
                *(_num(float(r[p]), 4) if fx._is_number(r[p]) else str(r[p]) for p in params)]
               for _, r in on.iterrows()])
    ablation = a.sweep.finished[a.sweep.finished["group"] == "ablation"]
    figs["search_front.png"] = figures.search_front(search, a.front, ablation,
                                                    out / "search_front.png")
    doc.figure("search_front.png", "Test Dice against folding % of the weight-search trials "
                                   "(Pareto front in red) and of the ablation trials.")


def _effect(a: Analysis, effect: str, metric: str) -> pd.Series | None:
    rows = a.effects[(a.effects["effect"] == effect) & (a.effects["metric"] == metric)]
    return rows.iloc[0] if not rows.empty else None


def _effect_sentence(a: Analysis, effect: str, metric: str) -> str:
    r = _effect(a, effect, metric)
    if r is None:
        return f"{spec(metric).label}: n/a"
    unit = _unit(metric)
    return (f"{_num(r.estimate, _digits(metric))}{unit} "
            f"(95 % CI {_ci(r.ci_lo, r.ci_hi, _digits(metric))}, Holm p {_p(r.p_holm)}: "
            f"{r.verdict})")


def _mean_of(a: Analysis, variant: str, metric: str) -> float:
    row = a.summary[(a.summary["variant"] == variant) & (a.summary["metric"] == metric)]
    return float(row.iloc[0]["mean"]) if not row.empty else float("nan")


def _questions(doc: Doc, a: Analysis) -> None:
    doc.h(2, "Research questions")
    answers = []
    # (1) individual contributions
    if a.effects.empty:
        answers.append("1. Individual contributions of affine vs regularization: not "
                       "answerable, the 2x2 design is incomplete in this sweep.")
        answers.append("2. Synergy: not answerable for the same reason.")
    else:
        parts = []
        for metric in ("dice_mean", "hd95_mm", "folding_pct"):
            if metric in set(a.effects["metric"]):
                parts.append(f"on {spec(metric).label} the affine stage changes the metric by "
                             f"{_effect_sentence(a, 'affine', metric)} and the regularizers by "
                             f"{_effect_sentence(a, 'regularize', metric)}")
        bigger = ""
        ra, rr = _effect(a, "affine", "dice_mean"), _effect(a, "regularize", "dice_mean")
        if ra is not None and rr is not None:
            evident = [n for n, r in (("the affine stage", ra), ("the regularizers", rr))
                       if r.verdict != "no evidence of an effect"]
            if abs(ra.estimate) == abs(rr.estimate):
                bigger = " Both change Dice by the same amount."
            else:
                who = ("the affine stage" if abs(ra.estimate) > abs(rr.estimate)
                       else "the regularizers")
                bigger = f" The larger change of Dice in magnitude comes from {who}"
                bigger += (f"; evidence of an effect on Dice for {' and '.join(evident)}."
                           if evident else ", but neither effect on Dice has evidence.")
        answers.append("1. Individual contributions of affine vs regularization: "
                       + "; ".join(parts) + "." + bigger)
        inter = a.effects[(a.effects["effect"] == "interaction")
                          & (a.effects["family"] == "primary")]
        groups = {v: [spec(m).label for m in inter.loc[inter["verdict"] == v, "metric"]]
                  for v in ("positive synergy", "negative synergy", "no evidence of either")}
        answers.append(
            "2. Synergy: the interaction on Dice is "
            f"{_effect_sentence(a, 'interaction', 'dice_mean')}. Across the "
            f"{len(inter)} primary metrics: positive synergy in "
            f"{', '.join(groups['positive synergy']) or 'none'}; negative synergy in "
            f"{', '.join(groups['negative synergy']) or 'none'}; no evidence of either in "
            f"{len(groups['no evidence of either'])}.")
    # (3) computational trade-offs
    variants = _variants(a)
    times = [f"{_label(v)} {_num(_mean_of(a, v, 'inference_s') * 1000, 1)} ms"
             for v in variants]
    finished = a.sweep.finished[a.sweep.finished["group"] == "ablation"]
    epoch = finished.groupby("variant")["train_epoch_s_mean"].mean()
    epochs = [f"{_label(v)} {_num(float(epoch.get(v, np.nan)), 2)} s" for v in variants]
    cost = ""
    if not a.effects.empty and "inference_s" in set(a.effects["metric"]):
        cost = (f" Effect on inference time of the regularizers: "
                f"{_effect_sentence(a, 'regularize', 'inference_s')}; of the affine stage: "
                f"{_effect_sentence(a, 'affine', 'inference_s')}.")
    answers.append("3. Computational trade-offs: inference time per pair (mean) "
                   + "; ".join(times) + ". Training time per epoch (mean over epochs and "
                   "seeds) " + "; ".join(epochs) + "." + cost)
    # (4) accuracy-plausibility balance
    answers.append("4. Accuracy-plausibility balance: " + _balance(a))
    doc.items(answers)


def _balance(a: Analysis) -> str:
    variants = _variants(a)
    if "dice_mean" not in a.metrics or "folding_pct" not in a.metrics:
        return "not answerable: the sweep logged no Dice or folding."
    table = pd.DataFrame({"test.dice_mean": [_mean_of(a, v, "dice_mean") for v in variants],
                          "test.folding_pct": [_mean_of(a, v, "folding_pct") for v in variants]},
                         index=variants)
    front = fx.pareto_front(table)
    on = table[front].sort_values("test.dice_mean", ascending=False)
    dice, fold = table["test.dice_mean"], table["test.folding_pct"]
    best_dice = [v for v in variants if dice[v] == dice.max()]
    least_fold = [v for v in variants if fold[v] == fold.min()]
    text = (f"among the variants, {', '.join(_label(v) for v in on.index)} "
            f"{'is' if len(on) == 1 else 'are'} not dominated in (Dice higher, folding lower). "
            f"Highest mean Dice: {', '.join(map(_label, best_dice))} "
            f"({_num(dice.max(), 4)}); least mean folding: "
            f"{', '.join(map(_label, least_fold))} ({_num(fold.min(), 3)} %).")
    if len(on) == 1:
        text += f" {_label(on.index[0])} gives the best balance in this sweep."
    else:
        text += (" No variant is best on both; the choice depends on how much folding a use "
                 "tolerates.")
    if not a.search.empty and a.front.any():
        best = a.search[a.front].sort_values("test.dice_mean", ascending=False).iloc[0]
        text += (f" In the weight search, the front's most accurate trial {best['run_name']} "
                 f"reaches Dice {_num(best['test.dice_mean'], 4)} at "
                 f"{_num(best['test.folding_pct'], 3)} % folding.")
    return text


def _example(doc: Doc, a: Analysis, figs: dict[str, Path], out: Path, scratch: Path) -> None:
    doc.h(2, "Example registration")
    found = fetch_example(a.sweep, scratch)
    if found is None:
        doc.p("No trial of this sweep logged an example.npz.")
        return
    path, trial = found
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    title = f"{_label(trial['variant'])}, seed {trial['seed']} (run {trial['run_id']})"
    figs["example.png"] = figures.example_slices(arrays, out / "example.png", title)
    jac = arrays["jacdet"]
    doc.p(f"One test pair registered by {title}: mid-slices of the fixed, moving and warped "
          "images; the yellow grid is the fixed image's grid moved to x + u(x) (in-plane "
          "components), the cyan line the fixed segmentation's outline; the Jacobian "
          f"determinant ranges from {_num(float(jac.min()), 3)} to {_num(float(jac.max()), 3)}"
          f" with {_num(100.0 * float((jac <= 0).mean()), 3)} % of voxels folded "
          "(det J <= 0, outlined in black).")
    doc.figure("example.png", "Fixed, moving, warped with the deformation grid, and the "
                              "Jacobian determinant (axial, coronal, sagittal mid-slices).")


# -- entry points ---------------------------------------------------------------------------


def _check_out_dir(out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "report.md").exists():
        raise ValueError(f"--out {out_dir} exists, is not empty and holds no report.md: "
                         "refusing to replace it, expected a new or a report directory")
    if out_dir.resolve() in (Path.cwd().resolve(), Path.home().resolve(), Path("/")):
        raise ValueError(f"--out {out_dir} is the working, home or root directory, expected a "
                         "directory of its own")
    return out_dir


def build_report(tracking_uri: str = DEFAULT_TRACKING_URI, parent_run_id: str | None = None,
                 experiment: str | None = None, out_dir: str | Path = "reports/latest",
                 *, seed: int = 0) -> Path:
    """Write the report of one sweep into `out_dir`; return the path of `report.md`.

    The sweep: `parent_run_id`, else the latest of `experiment`, else the latest in the store.
    Raises a one-line ValueError (nothing written) for an unreachable store, an unknown parent
    run or experiment, an empty or foreign experiment, a sweep without finished trials, or an
    `out_dir` that is not a report directory.
    """
    out_dir = _check_out_dir(Path(out_dir))
    sweep = load_sweep(tracking_uri, parent_run_id=parent_run_id, experiment=experiment)
    analysis = analyse(sweep, seed=seed)
    title = (f"Ablation report: {sweep.experiment_name}, sweep "
             f"{sweep.parent_tags.get('regablate.sweep_id', sweep.parent_run_id)}")
    with atomic_dir(out_dir) as tmp, tempfile.TemporaryDirectory() as scratch:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; a report is for reading
        doc = Doc()
        figs: dict[str, Path] = {}
        doc.h(1, title)
        doc.p(f"Ablation of a deformable registration network in a 2x2 design: affine stage "
              f"off/on x regularizers off/on (variants: "
              f"{', '.join(v.label for v in VARIANTS.values())}; baseline: "
              f"{_label(BASELINE)}).")
        _provenance(doc, analysis)
        _key_results(doc, analysis)
        _field_metrics(doc, analysis, figs, tmp)
        _definitions(doc, analysis)
        _effects(doc, analysis, figs, tmp)
        _improvements(doc, analysis)
        _search(doc, analysis, figs, tmp)
        _questions(doc, analysis)
        _example(doc, analysis, figs, tmp, Path(scratch))
        (tmp / "report.md").write_text(doc.markdown(), encoding="utf-8")
        images = {name: path.read_bytes() for name, path in figs.items()}
        (tmp / "report.html").write_text(doc.html(images, title), encoding="utf-8")
        analysis.summary.to_csv(tmp / "summary.csv", index=False)
        analysis.effects.to_csv(tmp / "effects.csv", index=False)
        analysis.improvements.to_csv(tmp / "improvements.csv", index=False)
    return out_dir / "report.md"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2 through run_cli, not argparse's usage
        raise UsageError(message)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = _Parser(prog="python -m analysis.report", description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--parent-run", metavar="ID", help="the sweep's parent run id")
    which.add_argument("--experiment", metavar="NAME",
                       help="the latest sweep of this experiment (default: latest anywhere)")
    parser.add_argument("--tracking-uri", default=DEFAULT_TRACKING_URI,
                        help=f"MLflow tracking URI (default {DEFAULT_TRACKING_URI})")
    parser.add_argument("--out", required=True, metavar="DIR", help="report directory")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    path = build_report(args.tracking_uri, parent_run_id=args.parent_run,
                        experiment=args.experiment, out_dir=args.out, seed=args.seed)
    print(f"report: {path} and {path.with_suffix('.html')}")
    return 0


if __name__ == "__main__":
    run_cli(main, prog="analysis.report")
