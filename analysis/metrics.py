"""The ONE table of the outcome metrics the analysis knows: direction, unit, label, definition.

Every sign-aware computation (improvement over the baseline, the verdicts of the factorial
analysis, "best" in the report) asks `direction(name)`: +1 when higher is better, -1 when lower
is better, 0 when neither is (a displacement magnitude: a variant that moves less is not better,
it is often further from the truth). Metrics with direction 0 are described, never judged.
The names are the per-pair columns of docs/ARCHITECTURE.md (`per_pair.csv`).

Families for Holm's correction: "primary" (the distinct outcomes of registration quality),
"secondary" (per-label Dice, re-expressions and other definitions of a primary outcome) and
"cost" (time). `level` says what a value describes: a test pair ("pair") or the trained network
itself ("network": one value per network, e.g. its timed inference), which decides the units of
replication in `analysis.effects`.
"""

from __future__ import annotations

from dataclasses import dataclass

from regcore.metrics import SEG4_LABELS

__all__ = ["MetricSpec", "METRICS", "KEY_METRICS", "direction", "spec", "outcome_columns",
           "family"]


@dataclass(frozen=True)
class MetricSpec:
    name: str
    direction: int  # +1: higher is better; -1: lower is better; 0: no better direction
    unit: str  # "" when unitless
    label: str
    definition: str  # one sentence
    #: Holm family: "primary", "secondary" (redundant columns must not dilute the tests of the
    #: distinct outcomes) or "cost"
    family: str = "primary"
    level: str = "pair"  # "pair" or "network"


def _dice_label(label: str) -> MetricSpec:
    pretty = label.replace("_", " ")
    return MetricSpec(
        f"dice_{label}", +1, "", f"Dice {pretty}",
        f"Dice overlap of the {pretty} label between the fixed segmentation and the moving "
        "segmentation warped with nearest-neighbour interpolation.", family="secondary",
    )


_SPECS: tuple[MetricSpec, ...] = (
    MetricSpec("dice_mean", +1, "", "Dice",
               "Dice overlap per foreground label (background excluded) between the fixed "
               "segmentation and the nearest-neighbour-warped moving segmentation, averaged "
               "over the labels present in the fixed map (a label that vanished from the "
               "warped map scores 0; one absent from the fixed map is NaN, left out and "
               "counted in labels_missing)."),
    *(_dice_label(label) for label in SEG4_LABELS.values()),
    MetricSpec("hd95_mm", -1, "mm", "HD95",
               "95th percentile of the symmetric surface distance between fixed and warped "
               "labels (surface voxels), in mm, averaged over labels; infinite when a label "
               "vanished from the warped map or appeared in it."),
    MetricSpec("labels_missing", -1, "", "Labels missing",
               "Number of foreground labels present in only one of the fixed and warped maps "
               "(a structure that vanished or appeared; its HD95 is infinite).",
               family="secondary"),
    MetricSpec("folding_pct", -1, "%", "Folding",
               "Percentage of voxels where the Jacobian determinant of x + u(x) is <= 0 "
               "(central differences, u in voxels)."),
    MetricSpec("ndv_pct", -1, "%", "NDV",
               "Non-diffeomorphic volume (Liu et al. 2024, digital diffeomorphism): percentage "
               "of the volume covered by inverted tetrahedra of the deformed voxel grid, the "
               "mean of the two 5-tetrahedra splits of each cube; it sees folds that central "
               "differences miss.", family="secondary"),
    MetricSpec("sdlogj", -1, "", "SDlogJ",
               "Standard deviation over voxels of the log Jacobian determinant (determinant "
               "clipped to a small positive value)."),
    MetricSpec("true_error_mm", -1, "mm", "True-deformation error",
               "Mean over the fixed image's brain mask of the distance in mm between the "
               "predicted and the known atlas-to-subject displacement (only where the data "
               "carries a ground-truth deformation)."),
    MetricSpec("true_disp_mean_mm", 0, "mm", "True displacement",
               "Mean length in mm of the known atlas-to-subject displacement over the fixed "
               "brain mask (described, not judged: the size of the task).", family="secondary"),
    MetricSpec("disp_mag_error_mm", -1, "mm", "Displacement length error",
               "Mean over the fixed brain mask of |length of the predicted displacement - "
               "length of the true one| in mm (a field shrunk or inflated by its regularizers "
               "scores high).", family="secondary"),
    MetricSpec("l2r_dice_mean", +1, "", "Dice (Learn2Reg)",
               "Learn2Reg's Dice: per label, NaN where the fixed or the moving map lacks it; "
               "nanmean over labels (regcore.metrics.l2r_scores).", family="secondary"),
    MetricSpec("l2r_hd95_vox", -1, "vox", "HD95 (Learn2Reg)",
               "Learn2Reg's HD95: area-weighted surface elements on the voxel-corner grid, "
               "95th percentile by cumulative area, the larger direction, in voxels; infinite "
               "where a label vanished from the warped map; nanmean over labels.",
               family="secondary"),
    MetricSpec("l2r_sdlogj", -1, "", "SDlogJ (Learn2Reg)",
               "Learn2Reg's SDlogJ: std of log(clip(det J + 3)) over the volume cropped by 2 "
               "voxels on every side (central differences); not comparable with SDlogJ.",
               family="secondary"),
    MetricSpec("mse_improvement_pct", +1, "%", "MSE improvement",
               "Relative reduction by registration of the mean squared error over all voxels "
               "between moving and fixed images: 100 (MSE before - MSE after) / MSE before.",
               family="secondary"),
    MetricSpec("ncc_improvement_pct", +1, "%", "NCC improvement",
               "Relative change by registration of the global normalised cross-correlation "
               "(Pearson over all voxels) with the fixed image: 100 (NCC after - NCC before) "
               "/ |NCC before|.", family="secondary"),
    MetricSpec("ncc_gain", +1, "", "NCC gain",
               "Global NCC of warped and fixed images minus global NCC of moving and fixed "
               "images (computed by the analysis from the per-pair ncc_after and ncc_before).",
               family="secondary"),
    MetricSpec("disp_max_vox", 0, "vox", "Max displacement",
               "Largest displacement length of the total transform over voxels, in voxels "
               "(described, not judged: moving less is not better).", family="secondary"),
    MetricSpec("disp_max_mm", 0, "mm", "Max displacement",
               "Largest displacement length of the total transform over voxels, in mm (each "
               "component scaled by its axis spacing; described, not judged).",
               family="secondary"),
    MetricSpec("disp_mean_vox", 0, "vox", "Mean displacement",
               "Mean displacement length of the total transform, in voxels (described, not "
               "judged).", family="secondary"),
    MetricSpec("disp_mean_mm", 0, "mm", "Mean displacement",
               "Mean displacement length of the total transform, in mm (described, not "
               "judged).", family="secondary"),
    MetricSpec("plausibility", +1, "[0,1]", "Anatomical plausibility",
               "(1 - f) exp(-SDlogJ) with f the fraction of folded voxels: 1 for a fold-free "
               "volume-preserving field; it scores the regularity of the transform, not "
               "anatomical correctness, and re-expresses folding and SDlogJ "
               "(regcore.metrics.plausibility).", family="secondary"),
    MetricSpec("inference_s", -1, "s", "Inference time (in the trial)",
               "Median wall time of one forward pass and warp per pair after a warm-up, "
               "measured inside the trial while other trials shared the machine: a property "
               "of the network, analysed with the network as the unit.", family="cost",
               level="network"),
    MetricSpec("timing_inference_s", -1, "s", "Inference time",
               "Median wall time of one forward pass and warp of one test pair, measured after "
               "the trials for one network at a time, alone on its device, warm, median of "
               "repeats (sweeps' timing step).", family="cost", level="network"),
    MetricSpec("timing_train_step_s", -1, "s", "Train step time",
               "Median wall time of one training step (forward, loss with the variant's "
               "regularizers, backward, optimiser step), measured like the inference time.",
               family="cost", level="network"),
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
    """The Holm family of a metric: "primary", "secondary" or "cost"."""
    return spec(name).family


def outcome_columns(columns) -> list[str]:
    """The outcome metrics among `columns`, in the order of `METRICS`."""
    present = set(columns)
    return [name for name in METRICS if name in present]
