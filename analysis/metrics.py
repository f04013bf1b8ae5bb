"""The ONE table of the outcome metrics the analysis knows: direction, unit, label, definition.

Every sign-aware computation (improvement over the baseline, the verdicts of the factorial
analysis, "best" in the report) asks `direction(name)`: +1 when higher is better, -1 when lower
is better. The names are the per-pair columns of docs/ARCHITECTURE.md (`per_pair.csv`).
"""

from __future__ import annotations

from dataclasses import dataclass

from regcore.metrics import SEG4_LABELS

__all__ = ["MetricSpec", "METRICS", "KEY_METRICS", "direction", "spec", "outcome_columns",
           "family"]


@dataclass(frozen=True)
class MetricSpec:
    name: str
    direction: int  # +1: higher is better; -1: lower is better
    unit: str  # "" when unitless
    label: str
    definition: str  # one sentence
    #: Primary metrics form one family for Holm's correction; secondary ones (per-label Dice,
    #: other units or re-expressions of a primary metric) another, so that redundant columns
    #: do not dilute the tests of the distinct outcomes.
    primary: bool = True


def _dice_label(label: str) -> MetricSpec:
    pretty = label.replace("_", " ")
    return MetricSpec(
        f"dice_{label}", +1, "", f"Dice {pretty}",
        f"Dice overlap of the {pretty} label between the fixed segmentation and the moving "
        "segmentation warped with nearest-neighbour interpolation.", primary=False,
    )


_SPECS: tuple[MetricSpec, ...] = (
    MetricSpec("dice_mean", +1, "", "Dice",
               "Dice overlap per foreground label (background excluded) between the fixed "
               "segmentation and the nearest-neighbour-warped moving segmentation, averaged "
               "over labels."),
    *(_dice_label(label) for label in SEG4_LABELS.values()),
    MetricSpec("hd95_mm", -1, "mm", "HD95",
               "95th percentile of the symmetric surface distance between fixed and warped "
               "labels, in mm, averaged over labels."),
    MetricSpec("folding_pct", -1, "%", "Folding",
               "Percentage of voxels where the Jacobian determinant of x + u(x) is <= 0 "
               "(central differences, u in voxels)."),
    MetricSpec("sdlogj", -1, "", "SDlogJ",
               "Standard deviation over voxels of the log Jacobian determinant (determinant "
               "clipped to a small positive value)."),
    MetricSpec("true_error_mm", -1, "mm", "True-deformation error",
               "Mean over the fixed image's brain mask of the distance in mm between the "
               "predicted and the known atlas-to-subject displacement (only where the data "
               "carries a ground-truth deformation)."),
    MetricSpec("mse_improvement_pct", +1, "%", "MSE improvement",
               "Relative reduction by registration of the mean squared error over all voxels "
               "between moving and fixed images: 100 (MSE before - MSE after) / MSE before."),
    MetricSpec("ncc_improvement_pct", +1, "%", "NCC improvement",
               "Relative change by registration of the global normalised cross-correlation "
               "(Pearson over all voxels) with the fixed image: 100 (NCC after - NCC before) "
               "/ |NCC before|."),
    MetricSpec("ncc_gain", +1, "", "NCC gain",
               "Global NCC of warped and fixed images minus global NCC of moving and fixed "
               "images (computed by the analysis from the per-pair ncc_after and ncc_before).",
               primary=False),
    MetricSpec("disp_max_vox", -1, "vox", "Max displacement",
               "Largest displacement length of the total transform over voxels, in voxels.",
               primary=False),
    MetricSpec("disp_max_mm", -1, "mm", "Max displacement",
               "Largest displacement length of the total transform over voxels, in mm (each "
               "component scaled by its axis spacing)."),
    MetricSpec("disp_mean_vox", -1, "vox", "Mean displacement",
               "Mean displacement length of the total transform, in voxels.", primary=False),
    MetricSpec("disp_mean_mm", -1, "mm", "Mean displacement",
               "Mean displacement length of the total transform, in mm.", primary=False),
    MetricSpec("plausibility", +1, "[0,1]", "Anatomical plausibility",
               "(1 - f) exp(-SDlogJ) with f the fraction of folded voxels: 1 for a fold-free "
               "volume-preserving field; it scores the regularity of the transform, not "
               "anatomical correctness (regcore.metrics.plausibility)."),
    MetricSpec("inference_s", -1, "s", "Inference time",
               "Median wall time of one forward pass and warp per pair after a warm-up, in "
               "seconds."),
)

METRICS: dict[str, MetricSpec] = {s.name: s for s in _SPECS}

#: The metrics the report plots per variant (true_error_mm only when present).
KEY_METRICS: tuple[str, ...] = ("dice_mean", "hd95_mm", "folding_pct", "sdlogj", "true_error_mm")


def spec(name: str) -> MetricSpec:
    try:
        return METRICS[name]
    except KeyError:
        raise ValueError(
            f"unknown metric {name!r}, expected one of {', '.join(METRICS)}"
        ) from None


def direction(name: str) -> int:
    """+1 when higher is better, -1 when lower is better."""
    return spec(name).direction


def family(name: str) -> str:
    """The Holm family of a metric: "primary" or "secondary"."""
    return "primary" if spec(name).primary else "secondary"


def outcome_columns(columns) -> list[str]:
    """The outcome metrics among `columns`, in the order of `METRICS`."""
    present = set(columns)
    return [name for name in METRICS if name in present]
