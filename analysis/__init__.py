"""From MLflow to a statistical report of an ablation sweep.

`runs` reads one sweep into tidy tables, `metrics` holds the one table of metric directions
and definitions, `stats` the bootstrap / sign-flip / Holm helpers, `effects` the per-variant
summaries, improvements over the baseline, the 2x2 factorial effects and the weight-search
analysis, `figures` the plots and `report` the command and `build_report`. Imports `regcore`,
never `sweeps`.
"""
