"""The ONE place where the ablation factors and the study's four variants are named.

The original study is a 2x2 factorial design: {affine stage off/on} x {regularizers off/on}.
Everything else (sweeps, analysis, reports) asks this module for the factors of a variant.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Variant", "VARIANTS", "FACTORS", "FACTOR_LABELS", "BASELINE", "get_variant",
           "variant_for"]


@dataclass(frozen=True)
class Variant:
    """One cell of the 2x2 design.

    `lr` is the cell's learning rate: 1e-3 for every cell. The original study trained the affine
    cells at 3e-4, which confounds the affine stage with its learning rate (an ablation that
    changes two things cannot say which one mattered; docs/RECIPE.md measured the lower rate
    alone costing the affine cells 0.07 Dice); `--study affine_x_regularizers_original_lr`
    runs the study with its own rates.
    """

    name: str
    label: str  # the name the original study's table used
    affine: bool
    regularize: bool
    lr: float


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("baseline", "Baseline UNet", affine=False, regularize=False, lr=1e-3),
        Variant("regloss", "RegLoss UNet", affine=False, regularize=True, lr=1e-3),
        Variant("combined_basic", "Combined (Basic)", affine=True, regularize=False, lr=1e-3),
        Variant("combined_enhanced", "Combined (Enhanced)", affine=True, regularize=True, lr=1e-3),
    )
}

#: The factors of the design, in the order (affine, regularize), and their names in words.
FACTORS: tuple[str, str] = ("affine", "regularize")
FACTOR_LABELS: dict[str, str] = {"affine": "the affine stage", "regularize": "the regularizers"}
BASELINE = "baseline"


def get_variant(name: str) -> Variant:
    """Return the variant called `name`; unknown names raise a ValueError listing the valid ones."""
    try:
        return VARIANTS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown variant {name!r}, expected one of {', '.join(VARIANTS)}"
        ) from None


def variant_for(affine: bool, regularize: bool) -> Variant:
    """Return the variant of the cell (affine, regularize)."""
    for v in VARIANTS.values():
        if v.affine == bool(affine) and v.regularize == bool(regularize):
            return v
    raise AssertionError("the 2x2 registry is incomplete")  # internal invariant
