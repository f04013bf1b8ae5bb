"""Seeded simulated ablation studies whose answer is known: the calibration of the inference.

    python -m analysis.calibration [--studies N]      # the tables of docs/STATISTICS.md

A study of the 2x2 design: y[c, s, p] = base + a[p] + g[c, p] + b[c, s] + e[c, s, p] + mu[c],
the model of `analysis.stats`, with the sizes of the variance components measured on this
project's quick sweep of the embedded cohort (`SIZES`, docs/STATISTICS.md). Null studies
(mu = 0) give the false-positive rate of each effect; planted effects give the power and the
sign. tests/analysis/test_calibration.py pins the same numbers.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.stats import ALPHA, contrast_inference
from regcore.variants import VARIANTS

#: Cells in the order of `analysis.effects.design_of` for the study: (affine, regularize)
#: = 00, 01, 10, 11.
CELLS = ("baseline", "regloss", "combined_basic", "combined_enhanced")
WEIGHTS = {
    "affine": np.array([-0.5, -0.5, 0.5, 0.5]),
    "regularize": np.array([-0.5, 0.5, -0.5, 0.5]),
    "interaction": np.array([1.0, -1.0, -1.0, 1.0]),
}
SIZES = {"sd_network": 0.015, "sd_pair": 0.03, "sd_pair_x_cell": 0.01, "sd_residual": 0.01}


def simulate(rng: np.random.Generator, n_studies: int, n_seeds: int, n_pairs: int = 10,
             effects: dict[str, float] | None = None, sizes: dict[str, float] | None = None
             ) -> np.ndarray:
    """`(n_studies, 4, n_seeds, n_pairs)` Dice values; `effects` plants contrasts of the given
    sizes (e.g. {"affine": 0.03}: the affine main effect is +0.03)."""
    sd = {**SIZES, **(sizes or {})}
    mu = np.zeros(4)
    for name, size in (effects or {}).items():
        w = WEIGHTS[name]
        mu += size * w / np.sum(w ** 2)  # contrast w . mu == size; other contrasts unchanged
    shape = (n_studies, 4, n_seeds, n_pairs)
    return (0.6 + mu[None, :, None, None]
            + rng.normal(0, sd["sd_pair"], (n_studies, 1, 1, n_pairs))
            + rng.normal(0, sd["sd_pair_x_cell"], (n_studies, 4, 1, n_pairs))
            + rng.normal(0, sd["sd_network"], (n_studies, 4, n_seeds, 1))
            + rng.normal(0, sd["sd_residual"], shape))


def rejection_rate(y: np.ndarray, effect: str, alpha: float = ALPHA) -> tuple[float, float]:
    """(share of studies claiming `effect` at `alpha`, share claiming it with a negative sign)."""
    result = contrast_inference(y, WEIGHTS[effect])
    claimed = result.p < alpha
    return float(np.mean(claimed)), float(np.mean(claimed & (result.estimate < 0)))


def false_positive_table(n_studies: int = 4000, seeds=(3, 5, 10), n_pairs: int = 10,
                         seed: int = 0) -> list[list[str]]:
    """Rows (seeds, affine %, regularize %, interaction %) of null studies."""
    rng = np.random.default_rng(seed)
    rows = []
    for n_seeds in seeds:
        y = simulate(rng, n_studies, n_seeds, n_pairs)
        rows.append([str(n_seeds), *(f"{100 * rejection_rate(y, e)[0]:.1f}" for e in WEIGHTS)])
    return rows


def power_table(n_studies: int = 4000, seeds=(3, 5, 10), sizes=(1, 2, 4), n_pairs: int = 10,
                seed: int = 0) -> list[list[str]]:
    """Rows (seeds, effect in network sd, power of a main effect, of the interaction) of
    studies with that effect planted."""
    rng = np.random.default_rng(seed)
    rows = []
    for n_seeds in seeds:
        for size in sizes:
            effect = size * SIZES["sd_network"]
            main = rejection_rate(simulate(rng, n_studies, n_seeds, n_pairs,
                                           effects={"affine": effect}), "affine")[0]
            inter = rejection_rate(simulate(rng, n_studies, n_seeds, n_pairs,
                                            effects={"interaction": effect}), "interaction")[0]
            rows.append([str(n_seeds), f"{size} ({effect:.3f})", f"{100 * main:.0f}",
                         f"{100 * inter:.0f}"])
    return rows


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m analysis.calibration",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=4000, help="studies per table cell")
    args = parser.parse_args(argv)
    sizes = ", ".join(f"{k} {v}" for k, v in SIZES.items())
    print(f"Simulated 2x2 studies, 10 test pairs, variance components: {sizes}; "
          f"{args.studies} studies per cell.\n")
    print("False-positive rate (%) of each effect, no effect planted:\n")
    print(_markdown(["seeds per variant", "affine", "regularize", "interaction"],
                    false_positive_table(args.studies)))
    print("\nPower (%) with an effect planted, in network sd (Dice):\n")
    print(_markdown(["seeds per variant", "effect", "main effect", "interaction"],
                    power_table(args.studies)))
    return 0


def as_per_pair(y: np.ndarray, metric: str = "dice_mean") -> pd.DataFrame:
    """One simulated study `(4, S, P)` as the tidy per-pair table of `analysis.runs`."""
    rows = []
    for c, variant in enumerate(CELLS):
        v = VARIANTS[variant]
        for s in range(y.shape[1]):
            for p in range(y.shape[2]):
                rows.append({"variant": variant, "affine": v.affine, "regularize": v.regularize,
                             "seed": s, "group": "ablation", "run_id": f"{variant}-{s}",
                             "pair_id": f"atlas->s{p:02d}", metric: y[c, s, p]})
    return pd.DataFrame(rows)


if __name__ == "__main__":
    raise SystemExit(main())
