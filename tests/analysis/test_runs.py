"""Reading a sweep from MLflow: tidy tables, de-duplication, typed params, errors."""

import pytest

from analysis.runs import fetch_example, load_sweep, parse_param
from tests.analysis.conftest import log_sweep


def test_reads_one_row_per_trial_deduplicated_by_trial_id(sweep_store):
    store, pid = sweep_store
    sweep = load_sweep(store.uri, parent_run_id=pid)
    trials = sweep.trials
    assert sweep.duplicates_dropped == 1  # the stale RUNNING run of trial-baseline-0
    assert trials["trial_id"].is_unique
    base0 = trials[trials["trial_id"] == "trial-baseline-0"].iloc[0]
    assert base0.status == "FINISHED"
    ablation = trials[trials["group"] == "ablation"]
    assert len(ablation) == 9  # 4 variants x 2 seeds + 1 failed
    assert sweep.unfinished["trial_id"].tolist() == ["trial-regloss-9"]
    assert (trials["group"] == "search").sum() == 4
    # factors are booleans and seeds integers, the config comes back typed
    assert trials["affine"].map(type).eq(bool).all()
    assert trials["seed"].map(type).eq(int).all()
    enhanced = trials[trials["variant"] == "combined_enhanced"].iloc[0]
    assert enhanced.affine and enhanced.regularize and enhanced.label == "Combined (Enhanced)"
    assert enhanced["cfg.data.shape"] == (64, 64, 64)
    assert enhanced["cfg.train.lr"] is None and enhanced["cfg.train.epochs"] == 3
    assert isinstance(enhanced["cfg.loss.smooth_weight"], float)
    assert enhanced["train_epoch_s_mean"] == pytest.approx(2.5)
    assert "test.dice_mean" in trials.columns


def test_per_pair_has_one_row_per_finished_trial_and_pair(sweep_store):
    store, pid = sweep_store
    sweep = load_sweep(store.uri, parent_run_id=pid)
    per_pair = sweep.per_pair
    # 8 finished ablation trials + 4 search trials, 6 test pairs each
    assert len(per_pair) == 12 * 6
    assert per_pair.groupby("trial_id").size().eq(6).all()
    assert per_pair["pair_id"].str.startswith("OAS1_0016->").all()
    assert {"variant", "seed", "group", "affine", "regularize", "dice_mean",
            "hd95_mm"} <= set(per_pair.columns)


def test_finds_latest_sweep_by_experiment_and_overall(store):
    first = log_sweep(store, n_search=0, resumed=False, failed=False)
    second = log_sweep(store, n_search=0, resumed=False, failed=False)
    assert load_sweep(store.uri, experiment="regablate").parent_run_id == second
    assert load_sweep(store.uri).parent_run_id == second
    assert load_sweep(store.uri, parent_run_id=first).parent_run_id == first


def test_fetch_example_prefers_combined_enhanced(sweep_store, tmp_path):
    store, pid = sweep_store
    path, trial = fetch_example(load_sweep(store.uri, parent_run_id=pid), tmp_path)
    assert path.name == "example.npz" and path.exists()
    assert trial.variant == "combined_enhanced" and trial.group == "ablation"


@pytest.mark.parametrize("text, value", [("None", None), ("true", True), ("0.01", 0.01),
                                         ("3", 3), ("[64, 64, 64]", (64, 64, 64)),
                                         ("seg4_onehot", "seg4_onehot"), ("()", ())])
def test_parse_param(text, value):
    assert parse_param(text) == value


def _empty_experiment(store, name):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store.uri)
    return client, client.create_experiment(name, artifact_location=store.artifacts.as_uri())


def test_errors_name_the_problem(store, tmp_path):
    missing = f"sqlite:///{tmp_path / 'nowhere.db'}"
    with pytest.raises(ValueError, match="tracking store .* is unreachable"):
        load_sweep(missing)
    assert not (tmp_path / "nowhere.db").exists()  # not created as a side effect
    client, exp_id = _empty_experiment(store, "empty")
    with pytest.raises(ValueError, match="experiment 'empty' is empty"):
        load_sweep(store.uri, experiment="empty")
    _, foreign = _empty_experiment(store, "foreign")
    run = client.create_run(foreign, tags={"team": "other"})
    client.set_terminated(run.info.run_id)
    with pytest.raises(ValueError, match="experiment 'foreign' holds no regablate sweep"):
        load_sweep(store.uri, experiment="foreign")
    with pytest.raises(ValueError, match="parent run 'deadbeef' not found"):
        load_sweep(store.uri, parent_run_id="deadbeef")
    with pytest.raises(ValueError, match=f"run '{run.info.run_id}' is not a regablate sweep"):
        load_sweep(store.uri, parent_run_id=run.info.run_id)
    with pytest.raises(ValueError, match="experiment 'nope' not found"):
        load_sweep(store.uri, experiment="nope")


def test_no_finished_trials_is_an_error(store):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store.uri)
    exp_id = client.create_experiment("broken", artifact_location=store.artifacts.as_uri())
    parent = client.create_run(exp_id, tags={"regablate.role": "sweep"})
    pid = parent.info.run_id
    child = client.create_run(exp_id, tags={"mlflow.parentRunId": pid,
                                            "regablate.role": "trial",
                                            "regablate.trial_id": "t1",
                                            "regablate.variant": "baseline"})
    client.set_terminated(child.info.run_id, "FAILED")
    with pytest.raises(ValueError, match=f"sweep '{pid}' has no finished trials"):
        load_sweep(store.uri, parent_run_id=pid)
