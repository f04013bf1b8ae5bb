"""Constructed per-pair tables whose effects are known (shared by the analysis tests)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from regcore.variants import VARIANTS

LABELS = ("cortex", "subcortical", "white_matter", "csf")


def make_per_pair(n_subjects: int = 12, seeds=(0, 1, 2), *, dice=(0.05, 0.03, 0.0),
                  hd95=(-0.5, -0.3, 0.0), folding=(0.0, -1.0, 0.0), noise: float = 0.004,
                  seed: int = 0) -> pd.DataFrame:
    """One row per (variant, seed, test pair) of the ablation group.

    Each metric is subject_base + affine_effect * a + reg_effect * r + interaction * a * r +
    noise, with the effects given as (affine, regularize, interaction) in the metric's units.
    """
    rng = np.random.default_rng(seed)
    subjects = [f"OAS1_{i:04d}" for i in range(1, n_subjects + 1)]
    base = {
        "dice_mean": rng.uniform(0.6, 0.75, n_subjects),
        "hd95_mm": rng.uniform(3.0, 5.0, n_subjects),
        "folding_pct": rng.uniform(1.5, 2.5, n_subjects),
    }
    effects = {"dice_mean": dice, "hd95_mm": hd95, "folding_pct": folding}
    rows = []
    for variant in VARIANTS.values():
        a, r = float(variant.affine), float(variant.regularize)
        for s in seeds:
            for i, subject in enumerate(subjects):
                row = {"variant": variant.name, "affine": variant.affine,
                       "regularize": variant.regularize, "seed": s, "group": "ablation",
                       "run_id": f"{variant.name}-{s}", "trial_id": f"{variant.name}-{s}",
                       "moving": "OAS1_0016", "fixed": subject,
                       "pair_id": f"OAS1_0016->{subject}"}
                for metric, (ea, er, ei) in effects.items():
                    scale = noise * (100 if metric != "dice_mean" else 1)
                    row[metric] = (base[metric][i] + ea * a + er * r + ei * a * r
                                   + rng.normal(0, scale))
                for k, label in enumerate(LABELS):
                    row[f"dice_{label}"] = row["dice_mean"] + 0.01 * (k - 1.5)
                row["inference_s"] = 0.05 + 0.01 * a + rng.normal(0, 0.001)
                row["mse_improvement_pct"] = 40 + 5 * a + 3 * r + rng.normal(0, 0.5)
                row["plausibility"] = 0.9 + 0.05 * r
                row["sdlogj"] = 0.3 - 0.1 * r + rng.normal(0, 0.01)
                row["disp_max_vox"] = 8.0 - 3.0 * r + rng.normal(0, 0.2)
                row["disp_max_mm"] = 1.5 * row["disp_max_vox"]
                row["ncc_before"] = 0.5
                row["ncc_after"] = 0.8 + 0.02 * a + rng.normal(0, 0.01)
                row["ncc_improvement_pct"] = 100 * (row["ncc_after"] - 0.5) / 0.5
                row["dice_before_mean"] = 0.4
                row["true_error_mm"] = float("nan")
                row["ndv_pct"] = 0.5 * row["folding_pct"]
                row["labels_missing"] = 0.0
                row["l2r_dice_mean"] = row["dice_mean"]
                row["l2r_hd95_vox"] = 0.7 * row["hd95_mm"] / 1.5
                row["l2r_sdlogj"] = 0.1 * row["sdlogj"]
                rows.append(row)
    return pd.DataFrame(rows)
