"""Named sweep sizes: `smoke` (tests, CI), `quick` (the default on a laptop), `paper` (the study).

A preset is a set of dotted regcore config overrides plus the sweep's own knobs (seeds, search
trials, resources); what the grid's cells are comes from the study (sweeps/study_files.py). Every value can be overridden on the command line; the
overrides are applied on top of the preset and validated by `regcore.config.Config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Preset", "PRESETS", "get_preset"]

#: the quick recipe's multiplier on the study's learning rate (1e-3 for every cell): 2e-3; at
#: 4e-3 with 4 passes a baseline seed left the images (docs/RECIPE.md)
QUICK_LR_SCALE = 2.0
#: weights of the similarity of the earlier passes' images and of the half-resolution images
#: (`loss.pass_weight`, `loss.coarse_weight`), measured on intensities at 32^3 (docs/RECIPE.md)
QUICK_PASS_WEIGHT = 1.0
QUICK_COARSE_WEIGHT = 1.0
#: soft bound on each pass's flow (voxels of the 16^3 flow grid, i.e. 8 of the 32^3 grid; the
#: embedded cohort's true fields stay under about 3 voxels of 32^3): at lr_scale 4 without it,
#: regloss seed 2 diverged at epoch 2 in the quick sweep (docs/RECIPE.md)
QUICK_MAX_FLOW_VOX = 4.0
#: the network and schedule that quick and paper share (docs/RECIPE.md): the VoxelMorph U-Net
#: at half its widths, the Demons force as input on 3 scales, the flow at half resolution and
#: bounded, the affine stage as a fit, warm-up + cosine decay; each preset sets its passes
NETWORK_RECIPE: dict[str, Any] = {
    "model.backbone": "vxm",
    "model.enc_channels": [8, 16, 16, 16],
    "model.dec_channels": [16, 16, 16, 16, 16, 8, 8],
    "model.flow_levels": 1,
    "model.pair_input": "demons3",
    "model.max_flow_vox": QUICK_MAX_FLOW_VOX,
    "model.affine_head": "fit",
    "train.lr_schedule": "cosine",
    "train.warmup_steps": 30,
}


@dataclass(frozen=True)
class Preset:
    """One sweep size.

    `overrides`: dotted regcore config keys applied to every trial (before command-line `--set`).
    `seeds`: replicate seeds of the ablation grid (None: the study's); the weight search uses
    the first one.
    `search_trials`: trials of the Optuna weight search (0 = ablation grid only).
    `gpus_per_trial` > 0 needs a cluster with GPUs (checked before any trial starts).
    """

    name: str
    description: str
    overrides: dict[str, Any] = field(default_factory=dict)
    seeds: tuple[int, ...] | None = None
    search_trials: int = 0
    cpus_per_trial: int = 1
    gpus_per_trial: float = 0.0
    max_failures: int = 1
    requires_data_dir: bool = False


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="smoke",
            description="seconds to a minute: 32^3 embedded cohort, tiny U-Net, 2 epochs",
            overrides={
                "data.shape": [32, 32, 32],
                "data.embedded_subjects": 6,
                "data.n_test": 2,
                "data.n_val": 1,
                "model.enc_channels": [4, 8, 8],
                "model.dec_channels": [8, 8, 8, 4],
                "train.epochs": 2,
                "train.steps_per_epoch": 2,
                "train.checkpoint_every": 1,
                "train.eval_repeats": 1,
            },
            seeds=(0,),
            search_trials=2,
            max_failures=1,
        ),
        Preset(
            name="quick",
            description="the embedded cohort at 32^3 (intensities, local NCC), the VoxelMorph "
                        "U-Net, 4 variants x 3 seeds (--search-trials N adds a weight search); "
                        "about 12 to 14 minutes on 2 CPU cores",
            # Why intensities and not the study's one-hot labels: the recipe below registers
            # one-hot maps with Dice + CE too (baseline, 32^3, 360 steps at 1e-3: Dice 0.486 ->
            # 0.703), but a step costs about 1.7 x (5 channels, each with its Demons force) and
            # at 4e-3 it collapsed; a 2-core sweep affords neither. The paper preset keeps the
            # study's one-hot input (docs/RECIPE.md).
            overrides={
                "data.shape": [32, 32, 32],
                "data.modality": "intensity",
                "data.embedded_subjects": 24,
                "data.n_test": 10,
                "data.n_val": 2,
                "train.epochs": 12,
                "train.steps_per_epoch": 30,
                "train.checkpoint_every": 3,
                "train.eval_repeats": 1,
                # The training recipe (docs/RECIPE.md, measured one variant at a time, 360
                # steps): the U-Net also sees the Demons force of the pair on 3 scales, predicts
                # the flow at half resolution, runs 4 passes with shared weights (each on the
                # pair as registered so far), with half the VoxelMorph widths, warm-up + cosine
                # decay and the learning rate x LR_SCALE; the affine stage is a least-squares
                # fit of per-voxel targets (model.affine_head=fit).
                # baseline: Dice 0.499 / 9.8 mm (the old recipe) -> 0.733 / 3.4 mm (3 seeds).
                # The loss also compares each earlier pass's image (deep supervision) and the
                # images at half resolution: without them the baseline's Dice over seeds 0-2
                # ranged 0.63 to 0.74 (some seeds settle in a poor optimum), with them 0.73.
                **NETWORK_RECIPE,
                "model.passes": 4,
                "loss.pass_weight": QUICK_PASS_WEIGHT,
                "loss.coarse_weight": QUICK_COARSE_WEIGHT,
                "train.lr_scale": QUICK_LR_SCALE,
            },
            # no weight search by default: two more trials (a seventh round on 2 cores) do not
            # fit the 15 minutes; `--search-trials N` adds one
            search_trials=0,
            max_failures=1,
        ),
        Preset(
            name="paper",
            description="the study: Neurite OASIS seg4 one-hot at 128^3, atlas-to-subject, "
                        "Dice + CE, 50 epochs, batch 1, one GPU per trial; the network recipe "
                        "measured on one-hot maps at 64^3 (docs/RECIPE.md)",
            # The study's data, loss, epochs and batch; the network the recipe under which
            # one-hot maps registered in a one-hour CPU run at 64^3 (baseline, docs/RECIPE.md):
            # the quick preset's U-Net with 3 passes at the study's 1e-3. The study's own U-Net
            # is `--set model.backbone=seed --set model.pair_input=images --set model.passes=1
            # --set model.flow_levels=0`.
            overrides={
                "data.modality": "seg4_onehot",
                "data.shape": [128, 128, 128],
                "data.pairing": "atlas",
                "data.n_test": 20,
                **NETWORK_RECIPE,
                "model.passes": 3,
                "train.epochs": 50,
                "train.batch_size": 1,
                "train.checkpoint_every": 5,
                "train.device": "cuda",
            },
            search_trials=20,
            cpus_per_trial=4,
            gpus_per_trial=1.0,
            max_failures=2,
            requires_data_dir=True,
        ),
    )
}


def get_preset(name: str) -> Preset:
    """The preset called `name`; an unknown name raises a ValueError listing the valid ones."""
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown preset {name!r}, expected one of {', '.join(PRESETS)}") from None
