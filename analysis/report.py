"""The sweep's report: `report.md`, a self-contained `report.html`, the figures as PNG and the
tables as CSV.

    python -m analysis.report [--parent-run ID | --experiment NAME] [--tracking-uri URI] --out DIR

Reads one sweep from MLflow (`analysis.runs`), computes the statistics (`analysis.effects`),
draws the figures (`analysis.figures`) and writes everything into a temporary folder that
replaces DIR only when complete (`regcore.io.atomic_dir`). Every check on the input (store,
parent run, experiment, finished trials, DIR) happens before anything is written. The report
opens with the answer (the effects on the primary metric); `analysis.sections` writes it.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd

from analysis import effects as fx
from analysis.document import Doc
from analysis.metrics import METRICS
from analysis.runs import Sweep, load_sweep
from regcore.cli import ArgumentParser, run_cli
from regcore.io import atomic_dir
from regcore.uris import DEFAULT_TRACKING_URI

__all__ = ["build_report", "analyse", "Analysis", "main", "SECTIONS", "TABLES"]


#: The report's second-level headings, in order (the tests check them).
SECTIONS = (
    "Answer",
    "What this design can detect",
    "Registration quality against references",
    "Effects on every metric",
    "Improvement over the baseline",
    "Registration metrics",
    "Key results in the original study's layout",
    "Computational cost",
    "Weight search",
    "Research questions",
    "Metric definitions",
    "Provenance",
    "Example registration",
)

#: The CSV tables written beside the report.
TABLES = ("summary", "effects", "improvements", "components", "sensitivity", "references")

@dataclass
class Analysis:
    """Everything the report shows, computed once from the sweep."""

    sweep: Sweep
    per_pair: pd.DataFrame
    design: fx.Design
    factor_labels: dict[str, str]
    primary: str
    baseline: str
    metrics: list[str]
    summary: pd.DataFrame
    improvements: pd.DataFrame
    effects: pd.DataFrame
    components: pd.DataFrame
    sensitivity: pd.DataFrame
    importance: pd.DataFrame
    search: pd.DataFrame
    search_metric: str
    references: pd.DataFrame = field(default_factory=pd.DataFrame)
    cell_labels: dict[str, str] = field(default_factory=dict)

    def label(self, variant: str) -> str:
        return self.cell_labels.get(variant, variant)

    def effect_label(self, effect: str) -> str:
        """"the affine stage", "the regularizers", "the affine stage x the regularizers"."""
        names = dict(self.design.effects())
        subset = names.get(effect, tuple(effect.split(":")))
        return " x ".join(self.factor_labels.get(f, f) for f in subset)

    @property
    def variants(self) -> list[str]:
        return [self.design.names[c] for c in self.design.cells]


def _with_derived(per_pair: pd.DataFrame) -> pd.DataFrame:
    """Add `ncc_gain` = ncc_after - ncc_before (the study's NCC column, defined honestly)."""
    if {"ncc_after", "ncc_before"} <= set(per_pair.columns):
        return per_pair.assign(ncc_gain=per_pair["ncc_after"] - per_pair["ncc_before"])
    return per_pair


def analyse(sweep: Sweep) -> Analysis:
    """The statistics of one sweep, for the study it ran (`sweep.study`)."""
    study = sweep.study
    factors = study.factor_names
    per_pair = _with_derived(sweep.per_pair)
    metrics = [m for m in METRICS if m in per_pair.columns and per_pair[m].notna().any()]
    design, _ = fx.design_of(per_pair, factors)
    primary = study.primary
    search_metric = sweep.parent_params.get("sweep.search_metric", "val.dice_mean")
    return Analysis(
        sweep=sweep, per_pair=per_pair, design=design,
        factor_labels={f.name: f.label for f in study.factors},
        primary=primary, baseline=study.baseline.name, metrics=metrics,
        summary=fx.summarize(per_pair, metrics, factors=factors),
        improvements=fx.improvements(per_pair, metrics, factors=factors,
                                     baseline=study.baseline.name),
        effects=fx.factorial_effects(per_pair, metrics, factors=factors),
        components=fx.components(per_pair, metrics, factors=factors),
        sensitivity=fx.design_sensitivity(per_pair, primary, factors=factors)
        if primary in metrics else pd.DataFrame(),
        importance=fx.search_importance(sweep.trials, search_metric),
        search=fx.search_trials(sweep.trials), search_metric=search_metric,
        references=sweep.references, cell_labels={c.name: c.label for c in study.cells},
    )


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


def title_of(sweep: Sweep) -> str:
    return (f"Ablation report: {sweep.experiment_name}, sweep "
            f"{sweep.parent_tags.get('regablate.sweep_id', sweep.parent_run_id)}")


def build_report(tracking_uri: str = DEFAULT_TRACKING_URI, parent_run_id: str | None = None,
                 experiment: str | None = None, out_dir: str | Path = "reports/latest",
                 *, seed: int = 0) -> Path:
    """Write the report of one sweep into `out_dir`; return the path of `report.md`.

    The sweep: `parent_run_id`, else the latest of `experiment`, else the latest in the store.
    Raises a one-line ValueError (nothing written) for an unreachable store, an unknown parent
    run or experiment, an empty or foreign experiment, a sweep without finished trials, or an
    `out_dir` that is not a report directory. `seed` is kept for callers of earlier versions
    (nothing is resampled).
    """
    from analysis import sections

    out_dir = _check_out_dir(Path(out_dir))
    sweep = load_sweep(tracking_uri, parent_run_id=parent_run_id, experiment=experiment)
    analysis = analyse(sweep)
    title = title_of(sweep)
    with atomic_dir(out_dir) as tmp, tempfile.TemporaryDirectory() as scratch:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; a report is for reading
        doc = Doc()
        figs: dict[str, Path] = {}
        doc.h(1, title)
        sections.write_all(doc, analysis, figs, tmp, Path(scratch))
        (tmp / "report.md").write_text(doc.markdown(), encoding="utf-8")
        images = {name: path.read_bytes() for name, path in figs.items()}
        (tmp / "report.html").write_text(doc.html(images, title), encoding="utf-8")
        for name in TABLES:
            table = getattr(analysis, name)
            if isinstance(table, pd.DataFrame):
                table.to_csv(tmp / f"{name}.csv", index=False)
    return out_dir / "report.md"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m analysis.report", description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--parent-run", metavar="ID", help="the sweep's parent run id")
    which.add_argument("--experiment", metavar="NAME",
                       help="the latest sweep of this experiment (default: latest anywhere)")
    parser.add_argument("--tracking-uri", default=DEFAULT_TRACKING_URI,
                        help=f"MLflow tracking URI (default {DEFAULT_TRACKING_URI})")
    parser.add_argument("--out", required=True, metavar="DIR", help="report directory")
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    path = build_report(args.tracking_uri, parent_run_id=args.parent_run,
                        experiment=args.experiment, out_dir=args.out)
    print(f"report: {path} and {path.with_suffix('.html')}")
    return 0


if __name__ == "__main__":
    run_cli(main, prog="analysis.report")
