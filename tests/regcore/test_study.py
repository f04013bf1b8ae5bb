"""Study files: the shipped studies, the schema's checks, the cells' config overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from regcore.config import Config
from regcore.study import default_study, parse_study, read_study
from regcore.variants import VARIANTS

STUDIES = Path(__file__).resolve().parents[2] / "sweeps" / "studies"
GOOD = {
    "name": "tiny",
    "factors": {
        "affine": {"levels": [{"name": "off", "set": {"model.affine": False}},
                              {"name": "on", "set": {"model.affine": True}}]},
        "regularize": {"levels": [{"name": "off", "set": {"loss.regularize": False}},
                                  {"name": "on", "set": {"loss.regularize": True}}]},
    },
}


def _with(**changes):
    data = yaml.safe_load(yaml.safe_dump(GOOD))
    for path, value in changes.items():
        node = data
        keys = path.split("__")
        for key in keys[:-1]:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[keys[-1]] = value
    return data


def test_the_default_study_file_is_the_registry_of_the_original_design():
    study = read_study(STUDIES / "affine_x_regularizers.yaml")
    assert [c.name for c in study.cells] == list(VARIANTS)
    assert study.factor_names == ("affine", "regularize")
    for cell in study.cells:
        v = VARIANTS[cell.name]
        config = Config().with_overrides(study.overrides(cell.name))
        assert (config.affine, config.regularize, config.lr) == (v.affine, v.regularize, v.lr)
        assert cell.label == v.label
        assert cell.levels == (int(v.affine), int(v.regularize))
    assert study.baseline.name == "baseline"
    assert study.primary == "dice_mean" and study.seeds == (0, 1, 2)
    assert study.search.cells == ("regloss", "combined_enhanced")
    # the study as it was run: the same cells, the affine ones at 0.3 x the rate
    original = read_study(STUDIES / "affine_x_regularizers_original_lr.yaml")
    assert [c.name for c in original.cells] == list(VARIANTS)
    rates = {c.name: Config().with_overrides(original.overrides(c.name)).lr
             for c in original.cells}
    assert rates == {"baseline": 1e-3, "regloss": 1e-3, "combined_basic": 3e-4,
                     "combined_enhanced": 3e-4}
    default = default_study()
    assert (default.factors, default.cells, default.seeds, default.primary, default.secondary,
            default.search) == (study.factors, study.cells, study.seeds, study.primary,
                                study.secondary, study.search)


def test_every_shipped_study_parses_and_one_has_three_factors():
    studies = [read_study(p) for p in sorted(STUDIES.glob("*.yaml"))]
    assert max(len(s.factors) for s in studies) >= 3
    for study in studies:
        assert len(study.cells) == 2 ** len(study.factors)
        assert parse_study(study.to_dict(), "again") == study  # the MLflow copy reads back


def test_unnamed_cells_are_named_by_the_factors_switched_on():
    study = parse_study(GOOD, "tiny.yaml")
    assert [c.name for c in study.cells] == ["reference", "regularize", "affine",
                                             "affine-regularize"]
    assert study.overrides("affine") == {"model.affine": True, "loss.regularize": False,
                                         "variant": "affine"}
    assert study.level_names("regularize") == {"affine": "off", "regularize": "on"}
    config = Config().with_overrides(study.overrides("affine-regularize"))
    assert config.affine and config.regularize  # a variant outside the registry
    with pytest.raises(ValueError, match="unknown variant 'nope' of study 'tiny'"):
        study.cell("nope")


def test_unquoted_yaml_on_off_are_level_names():
    text = yaml.safe_dump(GOOD).replace("name: 'off'", "name: off").replace("name: 'on'",
                                                                             "name: on")
    assert "name: off" in text  # YAML 1.1 reads it as a boolean
    study = parse_study(yaml.safe_load(text), "t.yaml")
    assert [lv.name for lv in study.factors[0].levels] == ["off", "on"]


@pytest.mark.parametrize("data, message", [
    (_with(colour="red"), "study bad.yaml: unknown key 'colour', expected name, description"),
    (_with(factors__affine__levels__1__sett={}),
     "study bad.yaml: factors.affine.levels[1]: unknown key 'sett', expected name, set"),
    (_with(factors__affine__levels__1__set={"model.wings": 2}),
     "study bad.yaml: factors.affine.levels[1].set: unknown config key 'model.wings'"),
    (_with(factors__affine__levels__1__set={"loss.smooth_weight": -1}),
     "study bad.yaml: factors.affine.levels[1].set: loss.smooth_weight == -1"),
    (_with(factors__affine__levels=[{"name": "on", "set": {"model.affine": True}}]),
     "study bad.yaml: factors.affine.levels: a factor needs exactly 2 levels, got 1"),
    (_with(cells={"a": {"affine": "on", "regularize": "on"},
                  "b": {"affine": "on", "regularize": "on"}}),
     "study bad.yaml: cells.b: duplicate cell: 'a' has the same levels"),
    (_with(cells={"a": {"affine": "maybe", "regularize": "on"}}),
     "study bad.yaml: cells.a.affine: unknown level 'maybe', expected off or on"),
    (_with(metrics={"primary": "happiness"}),
     "study bad.yaml: metrics.primary: unknown metric 'happiness'"),
    (_with(factors__regularize__levels__1__set={"model.affine": True}),
     "study bad.yaml: factors: factors 'affine' and 'regularize' both set 'model.affine'"),
    (_with(factors__affine__levels__1__set={"model.affine": False}),
     "study bad.yaml: factors.affine.levels: the two levels set the same values"),
    (_with(factors__affine__levels__1__set={"seed": 3}),
     "study bad.yaml: factors.affine.levels[1].set: 'seed' cannot be set by a level"),
    (_with(seeds=[0, 0]), "study bad.yaml: seeds: seeds repeat: [0, 0]"),
    (_with(search={"space": {"loss.smooth_weight": {"loguniform": [0, 1]}}}),
     "study bad.yaml: search.space.loss.smooth_weight.loguniform: a log-uniform range needs "
     "low > 0"),
    (_with(factors={f"f{i}": {"levels": [{"name": "a", "set": {"train.epochs": 1 + i}},
                                         {"name": "b", "set": {"train.epochs": 9}}]}
                    for i in range(5)}),
     "study bad.yaml: factors: 5 factors: a full factorial study has 1 to 4"),
    ({"name": "x"}, "study bad.yaml: missing key 'factors'"),
    (_with(search={"space": {"model.affine": {"choice": [False, True]}}}),
     "study bad.yaml: search.space.model.affine: level 'off' of factor 'affine' sets it too"),
])
def test_bad_study_files_give_one_line_naming_the_place(data, message):
    with pytest.raises(ValueError) as error:
        parse_study(data, "bad.yaml")
    text = str(error.value)
    assert text.startswith(message) and "\n" not in text


def test_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="study file .* does not exist"):
        read_study(tmp_path / "none.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(ValueError, match="study broken.yaml: not valid YAML"):
        read_study(broken)
