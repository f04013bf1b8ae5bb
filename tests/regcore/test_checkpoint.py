"""Checkpoints: weights_only round trip, RNG states, corruption and compatibility errors."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from regcore.checkpoint import (
    STATE_FILE,
    capture_rng,
    check_compatible,
    latest_valid_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    restore_rng,
    save_checkpoint,
)
from regcore.config import Config


@pytest.fixture
def saved(tmp_path):
    """Three checkpoints (epochs 1..3) of a small real module with an Adam state."""
    torch.manual_seed(0)
    model = torch.nn.Conv3d(2, 3, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    config = Config.from_flat({"variant": "baseline", "seed": 3})
    generator = torch.Generator().manual_seed(7)
    for epoch in (1, 2, 3):
        model(torch.randn(1, 2, 5, 5, 5)).sum().backward()
        optimizer.step()
        save_checkpoint(tmp_path, epoch=epoch, model=model, optimizer=optimizer, config=config,
                        rng=capture_rng(generator))
    return tmp_path, model, optimizer, config


def test_round_trip_loads_weights_only_and_restores_model(saved):
    root, model, optimizer, config = saved
    directory = list_checkpoints(root)[-1]
    assert directory.name == "epoch_0003"
    state = load_checkpoint(directory)  # loads with weights_only=True inside
    assert state["epoch"] == 3
    assert state["backbone"] == "vxm"
    assert Config.from_flat(state["config"]) == config
    fresh = torch.nn.Conv3d(2, 3, 3)
    fresh.load_state_dict(state["model"])
    for a, b in zip(fresh.parameters(), model.parameters()):
        assert torch.equal(a, b)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=1e-3)
    fresh_opt.load_state_dict(state["optimizer"])
    assert fresh_opt.state_dict()["state"][0]["step"] == 3
    # the state.pt file itself is accepted too
    assert load_checkpoint(directory / STATE_FILE)["epoch"] == 3


def test_rng_states_round_trip_through_weights_only_file(tmp_path):
    generator = torch.Generator().manual_seed(11)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.rand(3), torch.rand(2), torch.randperm(4, generator=generator)
    torch.save(capture_rng(generator), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(3).tolist(), torch.rand(2).tolist(),
                torch.randperm(9, generator=generator).tolist())
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True), generator)
    again = (random.random(), np.random.rand(3).tolist(), torch.rand(2).tolist(),
             torch.randperm(9, generator=generator).tolist())
    assert again == expected


def test_truncated_checkpoint_names_file_and_previous_one_is_used(saved):
    root, *_ = saved
    newest = list_checkpoints(root)[-1] / STATE_FILE
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"checkpoint '.*epoch_0003/state\.pt' is truncated or corrupt"):
        load_checkpoint(newest.parent)
    found = latest_valid_checkpoint(root)
    assert found is not None
    directory, state = found
    assert directory.name == "epoch_0002" and state["epoch"] == 2


def test_garbage_and_missing_checkpoints(tmp_path):
    (tmp_path / "epoch_0001").mkdir()
    (tmp_path / "epoch_0001" / STATE_FILE).write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="epoch_0001/state.pt' is truncated or corrupt"):
        load_checkpoint(tmp_path / "epoch_0001")
    assert latest_valid_checkpoint(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="checkpoint '.*nowhere' does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="is not a regablate checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


@pytest.mark.parametrize("override, message", [
    ({"model.backbone": "seed"}, "trained with backbone 'vxm', but the config asks for backbone 'seed'"),
    ({"model.enc_channels": [4, 8]}, r"has model.enc_channels == \[\], but the config has model.enc_channels == \[4, 8\]"),
    ({"variant": "combined_basic"}, "has variant == 'baseline', but the config has variant == 'combined_basic'"),
    ({"data.modality": "intensity"}, "has data.modality == 'seg4_onehot', but the config has"),
])
def test_incompatible_config_names_both_sides(saved, override, message):
    root, _, _, config = saved
    state = load_checkpoint(list_checkpoints(root)[-1])
    with pytest.raises(ValueError, match=message):
        check_compatible(state, config.with_overrides(override), "ckpt")
    # training settings may differ: a resumed run may train longer
    check_compatible(state, config.with_overrides({"train.epochs": 99, "train.lr": 1e-4}))


def test_prune_keeps_newest(saved):
    root, *_ = saved
    prune_checkpoints(root, 2)
    assert [p.name for p in list_checkpoints(root)] == ["epoch_0002", "epoch_0003"]
