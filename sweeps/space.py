"""The two search spaces of a sweep, run as two Tuners one after the other.

1. `ablation`: the study's 2x2 design proper, `tune.grid_search` over variant x replicate seed
   at the study's (or the command line's) weights. FIFO: every cell runs to the end.
2. `search`: a weight search for the variants that regularize. `OptunaSearch` (TPE) over the
   five regularizer weights, log-uniform from default/10 to default*10, with ASHA stopping weak
   trials early. `points_to_evaluate` holds the default weights for each regularizing variant,
   so those configurations are guaranteed to run. OptunaSearch rejects `grid_search`, which is
   why the two parts are separate Tuners.

Every trial config is the flat regcore config (`Config.to_flat`) plus `regablate.group`.
"""

from __future__ import annotations

from typing import Any

from regcore.config import REGULARIZERS, Config
from regcore.variants import VARIANTS

__all__ = ["GROUP_KEY", "SEARCH_RANGE_FACTOR", "ablation_space", "search_space",
           "search_variants"]

GROUP_KEY = "regablate.group"
#: The weight search spans default / factor .. default * factor (log-uniform).
SEARCH_RANGE_FACTOR = 10.0


def _base(base: Config) -> dict[str, Any]:
    flat = base.to_flat()
    flat.pop("variant")
    flat.pop("seed")
    return flat


def ablation_space(base: Config, variants: list[str], seeds: list[int]) -> dict[str, Any]:
    """variant x seed grid (FIFO, every trial runs all epochs)."""
    from ray import tune

    return {**_base(base), "variant": tune.grid_search(list(variants)),
            "seed": tune.grid_search(list(seeds)), GROUP_KEY: "ablation"}


def search_variants(variants: list[str]) -> list[str]:
    """The variants whose regularizers the weight search tunes (those that regularize)."""
    return [v for v in variants if VARIANTS[v].regularize]


def search_space(base: Config, variants: list[str], seed: int,
                 trials: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(param space, points to evaluate) of the weight search.

    A weight that is 0 in `base` stays 0 (a log range around 0 does not exist).
    """
    from ray import tune

    chosen = search_variants(variants)
    if not chosen:
        raise ValueError(f"the weight search needs a variant that regularizes, got "
                         f"{', '.join(variants)}; pass --search-trials 0")
    weights = base.loss.reg_weights()
    space: dict[str, Any] = {**_base(base), "seed": seed, GROUP_KEY: "search",
                             "variant": tune.choice(chosen)}
    searched = {}
    for name, default in weights.items():
        key = f"loss.{name}_weight"
        if default > 0:
            space[key] = tune.loguniform(default / SEARCH_RANGE_FACTOR,
                                         default * SEARCH_RANGE_FACTOR)
            searched[key] = default
    points = [{"variant": v, **searched} for v in chosen][:max(trials, 0)]
    return space, points


assert set(REGULARIZERS) == set(Config().loss.reg_weights())  # internal invariant
