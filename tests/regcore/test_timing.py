"""The controlled timing of one trained network (what the sweep's timing step runs)."""

from __future__ import annotations

import math

import pytest
import torch

from regcore.checkpoint import load_checkpoint
from regcore.config import Config
from regcore.timing import TIMING_METRICS, median_seconds, time_network
from regcore.train import train
from tests.regcore.test_train import TINY


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("timing")
    config = Config.from_flat({**TINY, "variant": "combined_enhanced", "seed": 1,
                               "train.epochs": 1, "data.embedded_dir": str(root / "embedded"),
                               "data.modality": "intensity"})
    return train(config, out_dir=root / "run").checkpoint_dir


def test_times_inference_and_a_train_step_without_changing_the_checkpoint(checkpoint):
    before = load_checkpoint(checkpoint)["model"]
    times = time_network(checkpoint, repeats=2)
    assert set(times) == set(TIMING_METRICS)
    assert all(math.isfinite(v) and v > 0 for v in times.values())
    after = load_checkpoint(checkpoint)["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_median_seconds_runs_warmup_then_repeats():
    calls = []
    seconds = median_seconds(lambda: calls.append(1), 3, torch.device("cpu"), warmup=2)
    assert len(calls) == 5 and seconds >= 0
    with pytest.raises(ValueError, match="repeats == 0, must be >= 1"):
        median_seconds(lambda: None, 0, torch.device("cpu"))


def test_a_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        time_network(tmp_path / "nothing")
