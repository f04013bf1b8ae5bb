"""What a user sees of a sweep in MLflow, checked against a sqlite store in tmp_path: the
experiment's kind, each trial's dataset input, the params in force, the compare view link."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pandas as pd
import pytest

from regcore.config import REGULARIZERS, STUDY_REG_WEIGHTS, Config
from regcore.data import dataset_identity
from sweeps import tracking
from sweeps.trainable import trial_params


def _uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_experiment_is_created_as_custom_model_development(tmp_path):
    uri = _uri(tmp_path)
    experiment_id = tracking.ensure_experiment(uri, "regablate")
    client = tracking.client_for(uri)
    tags = client.get_experiment(experiment_id).tags
    assert tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert tracking.ensure_experiment(uri, "regablate") == experiment_id  # reused, not duplicated


def test_an_existing_experiment_without_the_kind_gets_it(tmp_path):
    uri = _uri(tmp_path)
    client = tracking.client_for(uri)
    old = client.create_experiment("older")  # as sweeps before this change left it
    assert tracking.EXPERIMENT_KIND_TAG not in client.get_experiment(old).tags
    assert tracking.ensure_experiment(uri, "older") == old
    assert client.get_experiment(old).tags[tracking.EXPERIMENT_KIND_TAG] == \
        "custom_model_development"


@pytest.fixture(scope="module")
def tiny_cohort(tmp_path_factory):
    """A 16^3 embedded cohort of 4 subjects (built in a few seconds)."""
    root = tmp_path_factory.mktemp("cohort")
    cfg = Config.from_flat({"data.shape": [16, 16, 16], "data.embedded_subjects": 4,
                            "data.n_test": 2, "data.n_val": 0, "data.embedded_dir": str(root)})
    return cfg, root


def test_each_run_logs_its_dataset_with_name_digest_and_source(tmp_path, tiny_cohort):
    cfg, _ = tiny_cohort
    identity = dataset_identity(cfg.data)
    uri = _uri(tmp_path)
    client = tracking.client_for(uri)
    run = client.create_run(tracking.ensure_experiment(uri, "regablate"))
    tracking.log_dataset(client, run.info.run_id, identity)

    inputs = client.get_run(run.info.run_id).inputs.dataset_inputs
    assert len(inputs) == 1
    dataset = inputs[0].dataset
    assert dataset.name == identity["name"] and dataset.name.startswith("embedded-mni152_16x16x16")
    assert dataset.digest == identity["digest"] and len(dataset.digest) == 16
    assert dataset.source_type == "local"
    assert json.loads(dataset.source)["uri"] == identity["source"]
    profile = json.loads(dataset.profile)
    assert profile["kind"] == "embedded cohort" and profile["subjects"] == 5  # 4 + the atlas
    assert profile["split"]["test"] == 2 and profile["shape"] == [16, 16, 16]
    assert {t.key: t.value for t in inputs[0].tags} == {"mlflow.data.context": "training"}


def test_dataset_digest_follows_the_data_not_its_path(tmp_path, tiny_cohort):
    cfg, root = tiny_cohort
    first = dataset_identity(cfg.data)
    assert dataset_identity(cfg.data)["digest"] == first["digest"]  # stable
    folder = root / first["source"].rsplit("/", 1)[1]
    moved = tmp_path / "copy"
    shutil.copytree(folder, moved / folder.name)
    as_data_dir = Config.from_flat({**cfg.to_flat(), "data.data_dir": str(moved / folder.name)})
    copied = dataset_identity(as_data_dir.data)
    assert copied["digest"] == first["digest"]  # same files, same split, elsewhere
    assert copied["profile"]["kind"] == "data directory" and copied["name"] == folder.name
    other = Config.from_flat({**as_data_dir.to_flat(), "data.pairing": "subject"})
    assert dataset_identity(other.data)["digest"] != first["digest"]
    victim = sorted((moved / folder.name).rglob("aligned_seg4.nii.gz"))[0]
    victim.write_bytes(victim.read_bytes() + b"\0")  # one file changes size
    assert dataset_identity(as_data_dir.data)["digest"] != first["digest"]


FLAT_KEYS = set(Config().to_flat())


def test_params_show_the_weights_in_force():
    baseline = trial_params(Config(variant="baseline"))
    assert set(baseline) == FLAT_KEYS
    assert all(baseline[f"loss.{name}_weight"] == "0.0" for name in REGULARIZERS)
    assert baseline["loss.regularize"] == "False" and baseline["model.affine"] == "False"
    assert baseline["train.lr"] == str(Config(variant="baseline").lr)  # not "None"
    regloss = trial_params(Config(variant="regloss"))
    assert all(regloss[f"loss.{name}_weight"] == str(w) for name, w in STUDY_REG_WEIGHTS.items())
    assert regloss["loss.regularize"] == "True"
    searched = trial_params(Config.from_flat({"variant": "regloss", "loss.smooth_weight": 0.03}))
    assert searched["loss.smooth_weight"] == "0.03"


def _analysis(uri: str):
    finished = pd.DataFrame({"run_id": ["a1", "b2", "s3"],
                             "group": ["ablation", "ablation", "search"]})
    return SimpleNamespace(sweep=SimpleNamespace(tracking_uri=uri, finished=finished,
                                                 experiment_id="7"))


def test_report_links_to_the_compare_view_only_for_a_server():
    from analysis.sections import compare_url

    url = compare_url(_analysis("http://user:secret@127.0.0.1:5000/"))
    assert url.startswith("http://127.0.0.1:5000/#/compare-runs?")
    assert "secret" not in url
    query = dict(pair.split("=", 1) for pair in url.split("?", 1)[1].split("&"))
    from urllib.parse import unquote_plus

    assert json.loads(unquote_plus(query["runs"])) == ["a1", "b2"]  # the ablation runs only
    assert json.loads(unquote_plus(query["experiments"])) == ["7"]
    assert compare_url(_analysis("sqlite:////tmp/mlflow.db")) is None


def test_ui_url_opens_the_model_training_view():
    from sweeps.ablation import ui_url

    assert ui_url("http://u:secret@mlflow:5000/", "3") == \
        "http://mlflow:5000/#/experiments/3?workflowType=machine_learning"
    assert ui_url("sqlite:////tmp/mlflow.db", "1") == \
        "http://127.0.0.1:5000/#/experiments/1?workflowType=machine_learning"
