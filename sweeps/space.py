"""The two search spaces of a sweep, run as two Tuners one after the other.

1. `ablation`: the study's design proper, `tune.grid_search` over cell ("variant") x replicate
   seed; each trial applies its cell's overrides (sweeps.trainable). FIFO: every cell runs to the end.
2. `search`: a weight search over the study's search cells and space (by default the cells
   that regularize, and each non-zero regularizer weight log-uniform from default/10 to
   default*10). `OptunaSearch` (TPE) with ASHA stopping weak trials early.
   `points_to_evaluate` holds each searched cell's own values, so those configurations are
   guaranteed to run. OptunaSearch rejects `grid_search`, which is
   why the two parts are separate Tuners.

Every trial config is the flat regcore config (`Config.to_flat`) plus `regablate.group`.
"""

from __future__ import annotations

from typing import Any

from regcore.config import Config
from regcore.study import Study

__all__ = ["GROUP_KEY", "ablation_space", "search_space", "search_variants"]

GROUP_KEY = "regablate.group"


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


def search_variants(study: Study, variants: list[str]) -> list[str]:
    """The cells of the sweep whose weights the search tunes (the study's search cells)."""
    if study.search is None:
        return []
    return [v for v in variants if v in study.search.cells]


def _domain(kind: str, args: tuple):
    from ray import tune

    if kind == "loguniform":
        return tune.loguniform(*args)
    if kind == "uniform":
        return tune.uniform(*args)
    return tune.choice(list(args))


def _inside(kind: str, args: tuple, value: Any) -> bool:
    if kind == "choice":
        return value in args
    return isinstance(value, (int, float)) and args[0] <= value <= args[1]


def search_space(base: Config, plan_configs: dict[str, Config], study: Study, seed: int,
                 trials: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(param space, points to evaluate) of the weight search over the study's search space.

    `base`: the sweep's config before any cell's overrides; `plan_configs`: the config each
    cell trains with in the ablation grid. Their
    values of the searched keys are the points to evaluate, so those configurations are sure
    to run (a cell whose value lies outside the space gets no point).
    """
    from ray import tune

    chosen = search_variants(study, list(plan_configs))
    if not chosen:
        raise ValueError(f"the weight search needs one of the study's search cells, got "
                         f"{', '.join(plan_configs)}; pass --search-trials 0")
    params = study.search.params
    space: dict[str, Any] = {**_base(base), "seed": seed,
                             GROUP_KEY: "search", "variant": tune.choice(chosen)}
    space.update({key: _domain(kind, args) for key, (kind, args) in params.items()})
    points = []
    for v in chosen:
        flat = plan_configs[v].to_flat()
        if all(_inside(kind, args, flat[key]) for key, (kind, args) in params.items()):
            points.append({"variant": v, **{key: flat[key] for key in params}})
    return space, points[:max(trials, 0)]
