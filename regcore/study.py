"""A study as data: two-level factors, each level a set of config overrides, run as a full
factorial design of cells x replicate seeds.

A study file (YAML; shipped ones in sweeps/studies/) declares:

    name: affine_x_regularizers           # required
    description: one paragraph            # optional
    factors:                              # 1 to 4 factors, each with exactly two levels
      affine:
        label: the affine stage           # optional, for the report
        levels:                           # the first level is the reference ("off")
          - {name: "off", set: {model.affine: false}}
          - {name: "on", set: {model.affine: true}}
      ...
    cells:                                # optional names (and labels) of the cells
      baseline: {affine: "off", regularize: "off", label: Baseline UNet}
    seeds: [0, 1, 2]                      # optional replicate seeds (default 0, 1, 2)
    metrics: {primary: dice_mean, secondary: [hd95_mm, folding_pct]}   # optional
    search:                               # optional weight search
      cells: [regloss, combined_enhanced] # default: the cells whose loss.regularize is true
      space: {loss.smooth_weight: {loguniform: [0.03, 3.0]}}   # default: each weight x/÷ 10

Every mistake (an unknown key, a level overriding an unknown config key or with a bad value,
one level only, duplicate cells, an unknown metric) raises a ValueError whose one line names
the file, the place in it and what was expected, before anything runs. A cell not named is
called by the factors at their second level (`affine-diffeomorphic`; `reference` for none).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from regcore.config import Config

__all__ = ["Level", "Factor", "Cell", "SearchSpace", "Study", "parse_study", "read_study",
           "default_study", "MAX_FACTORS", "KNOWN_METRICS", "SEARCH_KINDS"]

MAX_FACTORS = 4
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")
SEARCH_KINDS = ("loguniform", "uniform", "choice")
#: Metric names a study may declare (the per-pair columns and the network-level timings).
KNOWN_METRICS: tuple[str, ...] = ()  # filled below from regcore.metrics


@dataclass(frozen=True)
class Level:
    name: str
    overrides: Mapping[str, Any]


@dataclass(frozen=True)
class Factor:
    name: str
    label: str
    levels: tuple[Level, Level]


@dataclass(frozen=True)
class Cell:
    """One combination of factor levels; `levels[i]` is the index (0 or 1) of factor i."""

    name: str
    levels: tuple[int, ...]
    label: str


@dataclass(frozen=True)
class SearchSpace:
    cells: tuple[str, ...]
    #: config key -> (kind, arguments): ("loguniform", (lo, hi)), ("choice", (a, b, ...))
    params: Mapping[str, tuple[str, tuple]]


@dataclass(frozen=True)
class Study:
    name: str
    description: str
    factors: tuple[Factor, ...]
    cells: tuple[Cell, ...]
    seeds: tuple[int, ...]
    primary: str
    secondary: tuple[str, ...]
    search: SearchSpace | None = None
    source: str = field(default="", compare=False)

    @property
    def factor_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.factors)

    @property
    def baseline(self) -> Cell:
        """The cell with every factor at its first (reference) level."""
        return next(c for c in self.cells if not any(c.levels))

    def cell(self, name: str) -> Cell:
        for cell in self.cells:
            if cell.name == name:
                return cell
        raise ValueError(f"unknown variant {name!r} of study {self.name!r}, expected one of "
                         f"{', '.join(c.name for c in self.cells)}")

    def overrides(self, name: str) -> dict[str, Any]:
        """The dotted config overrides of a cell: its levels' `set`s and its name."""
        cell = self.cell(name)
        merged: dict[str, Any] = {}
        for factor, index in zip(self.factors, cell.levels):
            merged.update(factor.levels[index].overrides)
        return {**merged, "variant": cell.name}

    def level_names(self, name: str) -> dict[str, str]:
        """factor -> level name of a cell (the `regablate.factor.<name>` tags)."""
        cell = self.cell(name)
        return {f.name: f.levels[i].name for f, i in zip(self.factors, cell.levels)}

    def to_dict(self) -> dict[str, Any]:
        """The study in the file's schema (what the sweep logs as `study.json`)."""
        out: dict[str, Any] = {
            "name": self.name, "description": self.description,
            "factors": {f.name: {"label": f.label, "levels": [
                {"name": lv.name, "set": dict(lv.overrides)} for lv in f.levels]}
                for f in self.factors},
            "cells": {c.name: {**{f.name: f.levels[i].name for f, i in zip(self.factors,
                                                                          c.levels)},
                               "label": c.label} for c in self.cells},
            "seeds": list(self.seeds),
            "metrics": {"primary": self.primary, "secondary": list(self.secondary)},
        }
        if self.search is not None:
            out["search"] = {"cells": list(self.search.cells), "space": {
                k: {kind: list(args)} for k, (kind, args) in self.search.params.items()}}
        return out


# -- parsing ------------------------------------------------------------------------------------


class _Where:
    """The place in a study file an error names: `study affine.yaml: factors.affine.levels[1]`."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, path: str, message: str):
        where = f"{self.source}: {path}" if path else self.source
        raise ValueError(f"study {where}: {message}")


def _mapping(w: _Where, value: Any, path: str) -> dict:
    if not isinstance(value, dict):
        w.fail(path, f"expected a mapping, got {type(value).__name__} {value!r}")
    return value


def _keys(w: _Where, value: dict, path: str, allowed: tuple[str, ...],
          required: tuple[str, ...] = ()) -> None:
    for key in value:
        if key not in allowed:
            w.fail(path, f"unknown key {key!r}, expected {', '.join(allowed)}")
    for key in required:
        if key not in value:
            w.fail(path, f"missing key {key!r}")


def _name(w: _Where, value: Any, path: str) -> str:
    # YAML 1.1 reads unquoted on/off/yes/no as booleans: accept them as the words they were
    if isinstance(value, bool):
        value = "on" if value else "off"
    if not isinstance(value, str) or not _NAME.match(value):
        w.fail(path, f"name {value!r} must start with a letter and use letters, digits, "
                     "'_', '-' or '.'")
    return value


def _level(w: _Where, value: Any, path: str) -> Level:
    value = _mapping(w, value, path)
    _keys(w, value, path, ("name", "set"), ("name",))
    overrides = _mapping(w, value.get("set") or {}, f"{path}.set")
    for key in overrides:
        if key in ("variant", "seed"):
            w.fail(f"{path}.set", f"{key!r} cannot be set by a level (cells and seeds are the "
                                  "study's own)")
    try:
        Config.from_flat({**Config().to_flat(), **overrides})
    except (ValueError, TypeError) as error:
        w.fail(f"{path}.set", " ".join(str(error).split()))
    return Level(_name(w, value["name"], f"{path}.name"), dict(overrides))


def _factor(w: _Where, name: Any, value: Any, path: str) -> Factor:
    name = _name(w, name, path)
    value = _mapping(w, value, path)
    _keys(w, value, path, ("label", "levels"), ("levels",))
    levels = value["levels"]
    if not isinstance(levels, list) or len(levels) != 2:
        count = len(levels) if isinstance(levels, list) else type(levels).__name__
        w.fail(f"{path}.levels", f"a factor needs exactly 2 levels, got {count}")
    parsed = tuple(_level(w, lv, f"{path}.levels[{i}]") for i, lv in enumerate(levels))
    if parsed[0].name == parsed[1].name:
        w.fail(f"{path}.levels", f"the two levels share the name {parsed[0].name!r}")
    if dict(parsed[0].overrides) == dict(parsed[1].overrides):
        w.fail(f"{path}.levels", "the two levels set the same values: the factor changes nothing")
    label = value.get("label", name)
    if not isinstance(label, str):
        w.fail(f"{path}.label", f"expected text, got {label!r}")
    return Factor(name, label, parsed)  # type: ignore[arg-type]


def _check_disjoint(w: _Where, factors: tuple[Factor, ...]) -> None:
    owner: dict[str, str] = {}
    for f in factors:
        for key in {k for lv in f.levels for k in lv.overrides}:
            if key in owner:
                w.fail("factors", f"factors {owner[key]!r} and {f.name!r} both set {key!r}: "
                                  "each config key belongs to one factor")
            owner[key] = f.name


def _cells(w: _Where, value: Any, factors: tuple[Factor, ...]) -> tuple[Cell, ...]:
    named: dict[tuple[int, ...], tuple[str, str]] = {}
    for name, spec in _mapping(w, value or {}, "cells").items():
        path = f"cells.{name}"
        name = _name(w, name, path)
        spec = _mapping(w, spec, path)
        _keys(w, spec, path, (*(f.name for f in factors), "label"),
              tuple(f.name for f in factors))
        levels = []
        for f in factors:
            level = _name(w, spec[f.name], f"{path}.{f.name}")
            names = [lv.name for lv in f.levels]
            if level not in names:
                w.fail(f"{path}.{f.name}", f"unknown level {level!r}, expected "
                                           f"{' or '.join(names)}")
            levels.append(names.index(level))
        key = tuple(levels)
        if key in named:
            w.fail(path, f"duplicate cell: {named[key][0]!r} has the same levels")
        if name in {n for n, _ in named.values()}:
            w.fail(path, f"duplicate cell name {name!r}")
        named[key] = (name, str(spec.get("label", name)))
    cells = []
    for key in itertools.product((0, 1), repeat=len(factors)):
        on = [f.name for f, i in zip(factors, key) if i]
        name, label = named.get(key, ("-".join(on) if on else "reference", ""))
        cells.append(Cell(name, key, label or name))
    return tuple(cells)


def _seeds(w: _Where, value: Any) -> tuple[int, ...]:
    if value is None:
        return (0, 1, 2)
    if (not isinstance(value, list) or not value
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value)):
        w.fail("seeds", f"expected a list of integers >= 0, got {value!r}")
    if len(set(value)) != len(value):
        w.fail("seeds", f"seeds repeat: {value}")
    return tuple(value)


def _metric(w: _Where, value: Any, path: str) -> str:
    if value not in KNOWN_METRICS:
        w.fail(path, f"unknown metric {value!r}, expected one of {', '.join(KNOWN_METRICS)}")
    return value


def _metrics(w: _Where, value: Any) -> tuple[str, tuple[str, ...]]:
    value = _mapping(w, value or {}, "metrics")
    _keys(w, value, "metrics", ("primary", "secondary"))
    primary = _metric(w, value.get("primary", "dice_mean"), "metrics.primary")
    secondary = value.get("secondary", [])
    if not isinstance(secondary, list):
        w.fail("metrics.secondary", f"expected a list of metric names, got {secondary!r}")
    return primary, tuple(_metric(w, m, f"metrics.secondary[{i}]")
                          for i, m in enumerate(secondary))


def _search_param(w: _Where, key: str, value: Any, path: str) -> tuple[str, tuple]:
    value = _mapping(w, value, path)
    if len(value) != 1 or next(iter(value)) not in SEARCH_KINDS:
        w.fail(path, f"expected one of {', '.join(SEARCH_KINDS)} with its arguments, e.g. "
                     "{loguniform: [0.01, 1.0]}")
    kind, args = next(iter(value.items()))
    if not isinstance(args, list) or not args:
        w.fail(f"{path}.{kind}", f"expected a list, got {args!r}")
    if kind != "choice":
        if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool)
                                     for a in args) or not args[0] < args[1]:
            w.fail(f"{path}.{kind}", f"expected [low, high] with low < high, got {args!r}")
        if kind == "loguniform" and args[0] <= 0:
            w.fail(f"{path}.{kind}", f"a log-uniform range needs low > 0, got {args!r}")
    for sample in (args if kind == "choice" else args[:1]):
        try:
            Config().with_overrides({key: sample})
        except (ValueError, TypeError) as error:
            w.fail(path, " ".join(str(error).split()))
    return kind, tuple(args)


def _default_space(study_cells: tuple[Cell, ...]) -> dict[str, tuple[str, tuple]]:
    weights = Config().loss.reg_weights()
    return {f"loss.{name}_weight": ("loguniform", (w / 10, w * 10))
            for name, w in weights.items() if w > 0}


def _search(w: _Where, value: Any, cells: tuple[Cell, ...], regularizing: list[str],
            factors: tuple[Factor, ...]) -> SearchSpace | None:
    if value is None:
        return SearchSpace(tuple(regularizing), _default_space(cells)) if regularizing else None
    value = _mapping(w, value, "search")
    _keys(w, value, "search", ("cells", "space"))
    names = [c.name for c in cells]
    chosen = value.get("cells", regularizing)
    if not isinstance(chosen, list) or not chosen:
        w.fail("search.cells", f"expected a list of cell names, got {chosen!r}")
    for i, name in enumerate(chosen):
        if name not in names:
            w.fail(f"search.cells[{i}]", f"unknown cell {name!r}, expected one of "
                                         f"{', '.join(names)}")
    space = value.get("space")
    params = (_default_space(cells) if space is None else
              {key: _search_param(w, key, spec, f"search.space.{key}")
               for key, spec in _mapping(w, space, "search.space").items()})
    for factor in factors:  # a searched key that a level also sets would erase the factor
        for level in factor.levels:
            for key in params:
                if key in level.overrides:
                    w.fail(f"search.space.{key}", f"level {level.name!r} of factor "
                                                  f"{factor.name!r} sets it too")
    return SearchSpace(tuple(chosen), params)


def parse_study(data: Any, source: str = "<study>") -> Study:
    """A validated `Study` from the parsed file (see the module docstring)."""
    w = _Where(source)
    data = _mapping(w, data, "")
    _keys(w, data, "", ("name", "description", "factors", "cells", "seeds", "metrics",
                        "search"), ("name", "factors"))
    name = _name(w, data["name"], "name")
    factors_in = _mapping(w, data["factors"], "factors")
    if not 1 <= len(factors_in) <= MAX_FACTORS:
        w.fail("factors", f"{len(factors_in)} factors: a full factorial study has 1 to "
                          f"{MAX_FACTORS} two-level factors")
    factors = tuple(_factor(w, k, v, f"factors.{k}") for k, v in factors_in.items())
    _check_disjoint(w, factors)
    cells = _cells(w, data.get("cells"), factors)
    study_probe = Study(name, "", factors, cells, (0,), "dice_mean", ())
    regularizing = [c.name for c in cells
                    if Config.from_flat({**Config().to_flat(), **study_probe.overrides(c.name)})
                    .regularize]
    primary, secondary = _metrics(w, data.get("metrics"))
    description = data.get("description", "")
    if not isinstance(description, str):
        w.fail("description", f"expected text, got {description!r}")
    return Study(name=name, description=" ".join(description.split()), factors=factors,
                 cells=cells, seeds=_seeds(w, data.get("seeds")), primary=primary,
                 secondary=secondary, search=_search(w, data.get("search"), cells, regularizing,
                                               factors),
                 source=source)


def read_study(path: str | Path) -> Study:
    """Parse and validate a study file (YAML or JSON); one-line errors name the file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"study file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ValueError(f"study {path.name}: not valid YAML "
                         f"({' '.join(str(error).split())[:200]})") from None
    return parse_study(data, path.name)


def _known_metrics() -> tuple[str, ...]:
    from regcore.metrics import PER_PAIR_COLUMNS
    from regcore.timing import TIMING_METRICS

    return (*PER_PAIR_COLUMNS, "inference_s", *(f"timing_{m}" for m in TIMING_METRICS))


KNOWN_METRICS = _known_metrics()


def default_study() -> Study:
    """The original study's 2x2 from `regcore.variants`, every cell at the registry's one
    learning rate (sweeps/studies/affine_x_regularizers.yaml is the same study as a file; a test
    keeps the two equal)."""
    from regcore.variants import FACTOR_LABELS, VARIANTS

    data = {
        "name": "affine_x_regularizers",
        "factors": {
            "affine": {"label": FACTOR_LABELS["affine"], "levels": [
                {"name": "off", "set": {"model.affine": False}},
                {"name": "on", "set": {"model.affine": True}}]},
            "regularize": {"label": FACTOR_LABELS["regularize"], "levels": [
                {"name": "off", "set": {"loss.regularize": False}},
                {"name": "on", "set": {"loss.regularize": True}}]},
        },
        "cells": {v.name: {"affine": "on" if v.affine else "off",
                           "regularize": "on" if v.regularize else "off", "label": v.label}
                  for v in VARIANTS.values()},
        "metrics": {"primary": "dice_mean",
                    "secondary": ["hd95_mm", "folding_pct", "sdlogj", "true_error_mm"]},
    }
    return parse_study(data, "regcore.variants")
