"""Typed, frozen, validated configuration of one training run.

A `Config` is built from nested dataclasses; every value is checked on construction and an
error names the dotted key, the value received and what was expected. Ray Tune and MLflow see
the same configuration as a flat dict with dotted keys (`to_flat` / `from_flat`); unknown keys
are an error, never ignored.

Units: every length carries its unit in its name (`_vox` for voxels).
"""

from __future__ import annotations

import math
import re
import typing
from dataclasses import dataclass, field, fields, replace
from typing import Any

from regcore.variants import VARIANTS, get_variant

__all__ = [
    "DataConfig",
    "ModelConfig",
    "LossConfig",
    "TrainConfig",
    "Config",
    "REGULARIZERS",
    "STUDY_REG_WEIGHTS",
    "DEFAULT_REG_SCALE",
    "DEFAULT_MAX_DISPLACEMENT_MM",
    "RETIRED_KEYS",
]

#: The five regularizers of the study, in a fixed order, with the study's weights.
REGULARIZERS: tuple[str, ...] = ("smooth", "magnitude", "rigidity", "jacobian", "bending")
STUDY_REG_WEIGHTS: dict[str, float] = {
    "smooth": 0.01,
    "magnitude": 0.01,
    "rigidity": 0.005,
    "jacobian": 0.1,
    "bending": 0.005,
}
#: One multiplier on the five weights (their ratios kept): at the study's literal weights
#: (scale 1) the regularizers are inert; docs/STUDY.md has the measurements behind 300.
DEFAULT_REG_SCALE = 300.0

#: default `loss.max_displacement_mm`: binding on the embedded cohort, whose true fields pass it
#: on the tail of every test pair (docs/METRICS.md)
DEFAULT_MAX_DISPLACEMENT_MM = 25.0

MODALITIES = ("seg4_onehot", "intensity")
_VARIANT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")
#: learning rate of a variant outside the study's registry that sets none
_DEFAULT_LR = 1e-3
PAIRINGS = ("atlas", "subject")
SPACES = ("aligned", "scanner")
BACKBONES = ("vxm", "seed")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16", "amp")
LR_SCHEDULES = ("constant", "cosine")
PAIR_INPUTS = ("images", "demons", "demons2", "demons3")
AFFINE_HEADS = ("cnn", "fit")


def _fail(key: str, value: Any, expected: str) -> typing.NoReturn:
    raise ValueError(f"{key} == {value!r}, must be {expected}")


def _check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(key, value, f"one of {', '.join(choices)}")


def _check_number(key: str, value: Any, *, lo: float | None = None, lo_open: bool = False,
                  hi: float | None = None, integer: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(key, value, "an integer" if integer else "a number")
    if integer and not isinstance(value, int):
        _fail(key, value, "an integer")
    if not math.isfinite(value):
        _fail(key, value, "finite")
    if lo is not None and (value <= lo if lo_open else value < lo):
        _fail(key, value, f"{'>' if lo_open else '>='} {lo}")
    if hi is not None and value > hi:
        _fail(key, value, f"<= {hi}")


def _check_channels(key: str, value: Any, min_len: int) -> None:
    if not isinstance(value, tuple) or len(value) < min_len or not all(
        isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in value
    ):
        _fail(key, value, f"a list of at least {min_len} positive integers")


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are prepared.

    `data_dir=None` selects the embedded cohort (built from nilearn's MNI152 template on first use
    under `embedded_dir`). Volumes are resampled to `shape` (nearest for labels, linear for
    intensities); the voxel spacing is tracked so mm metrics stay correct.
    """

    data_dir: str | None = None
    embedded_dir: str = ".regablate/embedded"
    embedded_subjects: int = 24
    modality: str = "seg4_onehot"  # the study's input: one-hot seg4 label maps, 5 channels each
    space: str = "aligned"  # Neurite's aligned_* files, or the scanner-space files the study used
    shape: tuple[int, int, int] = (64, 64, 64)
    pairing: str = "atlas"  # atlas-to-subject (the study) or subject-to-subject
    atlas: str = "OAS1_0016"
    n_test: int = 20
    n_val: int = 2
    split_seed: int = 0

    def __post_init__(self) -> None:
        if self.data_dir is not None and (not isinstance(self.data_dir, str) or not self.data_dir):
            _fail("data.data_dir", self.data_dir, "a directory path or None")
        _check_number("data.embedded_subjects", self.embedded_subjects, lo=4, integer=True)
        _check_choice("data.modality", self.modality, MODALITIES)
        _check_choice("data.space", self.space, SPACES)
        shape = tuple(self.shape) if isinstance(self.shape, (list, tuple)) else self.shape
        if not (isinstance(shape, tuple) and len(shape) == 3
                and all(isinstance(s, int) and not isinstance(s, bool) and 16 <= s <= 512 for s in shape)):
            _fail("data.shape", self.shape, "three integers between 16 and 512")
        object.__setattr__(self, "shape", shape)
        _check_choice("data.pairing", self.pairing, PAIRINGS)
        if not isinstance(self.atlas, str) or not self.atlas:
            _fail("data.atlas", self.atlas, "a subject id such as 'OAS1_0016'")
        _check_number("data.n_test", self.n_test, lo=1, integer=True)
        _check_number("data.n_val", self.n_val, lo=0, integer=True)
        _check_number("data.split_seed", self.split_seed, lo=0, integer=True)


@dataclass(frozen=True)
class ModelConfig:
    """The network. `backbone` picks the U-Net; channel widths are configurable.

    `enc_channels`/`dec_channels`: empty means the backbone's defaults (vxm: 16-32-32-32 /
    32-32-32-32-32-16-16; seed: 32-64-128-256 with a 512 bottleneck, decoder mirrored).
    """

    backbone: str = "vxm"
    enc_channels: tuple[int, ...] = ()
    dec_channels: tuple[int, ...] = ()
    diffeomorphic: bool = False
    int_steps: int = 7
    #: the affine stage (the study's first factor); None: the variant's (regcore.variants)
    affine: bool | None = None
    #: how the affine stage predicts theta: "cnn" (the study's: convolutions, global pooling,
    #: two dense layers) or "fit" (a least-squares fit of per-voxel targets a small CNN
    #: predicts from the pair and its Demons force; networks.AffineFitHead)
    affine_head: str = "cnn"
    #: the flow predicted on a grid 2^flow_levels coarser (the decoder stops that many
    #: upsamplings short) and upsampled trilinearly; 0 = full resolution (vxm backbone only)
    flow_levels: int = 0
    #: what the U-Net sees: "images" (moving, fixed), or also their Demons force
    #: (networks.demons_force, 3 channels per image channel) on 1, 2 or 3 scales: "demons",
    #: "demons2", "demons3"
    pair_input: str = "images"
    #: the U-Net applied this many times (shared weights), each pass to the pair as registered
    #: by the passes before; the residual fields compose (with `diffeomorphic`, each pass's
    #: velocity is integrated; `velocity_vox` is the first pass's)
    passes: int = 1
    #: soft bound B on each pass's flow, B tanh(flow / B), in voxels of the flow's grid (0: none)
    max_flow_vox: float = 0.0
    #: instance optimisation after the network at test time (regcore.instance): Adam steps
    #: on the network's field per test pair (0 = off), its learning rate (voxels per step) and
    #: the diffusion weight it adds to the configured loss
    refine_steps: int = 0
    refine_lr: float = 0.1
    refine_smooth_weight: float = 1.0

    def __post_init__(self) -> None:
        _check_choice("model.backbone", self.backbone, BACKBONES)
        if self.affine is not None and not isinstance(self.affine, bool):
            _fail("model.affine", self.affine, "true, false or none (the variant's)")
        for key in ("enc_channels", "dec_channels"):
            value = getattr(self, key)
            value = tuple(value) if isinstance(value, list) else value
            object.__setattr__(self, key, value)
            if value != ():
                _check_channels(f"model.{key}", value, 1)
        if not isinstance(self.diffeomorphic, bool):
            _fail("model.diffeomorphic", self.diffeomorphic, "true or false")
        _check_number("model.int_steps", self.int_steps, lo=1, hi=20, integer=True)
        _check_choice("model.pair_input", self.pair_input, PAIR_INPUTS)
        _check_choice("model.affine_head", self.affine_head, AFFINE_HEADS)
        _check_number("model.passes", self.passes, lo=1, hi=4, integer=True)
        _check_number("model.max_flow_vox", self.max_flow_vox, lo=0)
        _check_number("model.flow_levels", self.flow_levels, lo=0, hi=3, integer=True)
        _check_number("model.refine_steps", self.refine_steps, lo=0, hi=100000, integer=True)
        _check_number("model.refine_lr", self.refine_lr, lo=0, lo_open=True, hi=10.0)
        _check_number("model.refine_smooth_weight", self.refine_smooth_weight, lo=0)


@dataclass(frozen=True)
class LossConfig:
    """Similarity terms and the five regularizers.

    Similarity for one-hot labels: `dice_weight` x soft Dice + `ce_weight` x cross-entropy (the
    study: 0.7 / 0.3). For intensities: `mse_weight` x MSE + `ncc_weight` x local NCC.
    Regularizer weights act only when the variant regularizes. Each term's effective weight is
    `reg_scale` x its `<name>_weight` x the study's adaptive factor
    max(0.01, 0.1 (1 - epoch/epochs)) (1 when `adaptive` is false); the `<name>_weight` defaults
    are the study's, and `reg_scale` (default `DEFAULT_REG_SCALE`) lifts them out of inertness.
    """

    dice_weight: float = 0.7
    ce_weight: float = 0.3
    dice_exclude_background: bool = True
    mse_weight: float = 0.0
    ncc_weight: float = 1.0
    ncc_window: int = 9
    #: weight of the similarity of the earlier passes' warped images (their mean; deep
    #: supervision of the cascade, `model.passes` > 1): each pass is asked to register as far
    #: as it can, not only the last one (0: only the final image is compared)
    pass_weight: float = 0.0
    #: weight of the similarity of warped and fixed images averaged 2x2x2 (local NCC over
    #: `coarse_window()` boxes): a coarse view of the same misalignment, less prone to the
    #: local minima of the full-resolution term (0: off)
    coarse_weight: float = 0.0
    smooth_weight: float = STUDY_REG_WEIGHTS["smooth"]
    magnitude_weight: float = STUDY_REG_WEIGHTS["magnitude"]
    rigidity_weight: float = STUDY_REG_WEIGHTS["rigidity"]
    jacobian_weight: float = STUDY_REG_WEIGHTS["jacobian"]
    bending_weight: float = STUDY_REG_WEIGHTS["bending"]
    reg_scale: float = DEFAULT_REG_SCALE
    #: the magnitude regularizer's threshold, in mm (the same physical size on any grid)
    max_displacement_mm: float = DEFAULT_MAX_DISPLACEMENT_MM
    adaptive: bool = True
    #: apply the five regularizers (the study's second factor); None: the variant's
    regularize: bool | None = None

    def __post_init__(self) -> None:
        if self.regularize is not None and not isinstance(self.regularize, bool):
            _fail("loss.regularize", self.regularize, "true, false or none (the variant's)")
        for key in ("dice_weight", "ce_weight", "mse_weight", "ncc_weight", "pass_weight",
                    "coarse_weight", *(f"{r}_weight" for r in REGULARIZERS), "reg_scale"):
            _check_number(f"loss.{key}", getattr(self, key), lo=0)
        _check_number("loss.ncc_window", self.ncc_window, lo=3, integer=True)
        if self.ncc_window % 2 == 0:
            _fail("loss.ncc_window", self.ncc_window, "odd")
        _check_number("loss.max_displacement_mm", self.max_displacement_mm, lo=0, lo_open=True)
        for key in ("dice_exclude_background", "adaptive"):
            if not isinstance(getattr(self, key), bool):
                _fail(f"loss.{key}", getattr(self, key), "true or false")

    def coarse_window(self) -> int:
        """The local-NCC window of the coarse term: `ncc_window` halved (the images are), odd."""
        return max(3, (self.ncc_window // 2) | 1)

    def reg_weights(self) -> dict[str, float]:
        """The five regularizer weights by name, in `REGULARIZERS` order (before `reg_scale`)."""
        return {r: getattr(self, f"{r}_weight") for r in REGULARIZERS}


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, checkpoints and the test hooks.

    `lr=None` takes the variant's learning rate from the study. `fail_at_epoch` and
    `nan_at_epoch` exist for tests only: they inject a crash or a NaN loss (0 = off).
    """

    epochs: int = 50
    steps_per_epoch: int = 0  # 0 = one pass over the training pairs
    batch_size: int = 1
    lr: float | None = None
    grad_clip: float = 1.0
    checkpoint_every: int = 5
    val_pairs: int = 0  # 0 = all validation pairs
    device: str = "auto"
    precision: str = "fp32"
    num_threads: int = 0  # 0 = all cores available to the process
    eval_repeats: int = 3  # inference-time repeats per pair (median reported)
    #: learning-rate schedule over the run's steps: linear warm-up over `warmup_steps`, then
    #: constant or a cosine decay to `lr_final_frac` x lr at the last step
    lr_schedule: str = "constant"
    #: one multiplier on the learning rate in force (the explicit one or the variant's), so a
    #: recipe can raise every cell's rate and keep the study's ratios between them
    lr_scale: float = 1.0
    warmup_steps: int = 0
    lr_final_frac: float = 0.05
    #: on-the-fly augmentation: the share of training pairs replaced by a random ordered pair
    #: of two training subjects (the atlas among them), and a left-right flip of both images
    #: of a pair with probability 1/2 (array axis 0: the embedded and Neurite grids are RAS)
    augment_pairs: float = 0.0
    augment_flip: bool = False
    fail_at_epoch: int = 0
    nan_at_epoch: int = 0

    def __post_init__(self) -> None:
        _check_number("train.epochs", self.epochs, lo=1, integer=True)
        _check_number("train.steps_per_epoch", self.steps_per_epoch, lo=0, integer=True)
        _check_number("train.batch_size", self.batch_size, lo=1, integer=True)
        if self.lr is not None:
            _check_number("train.lr", self.lr, lo=0, lo_open=True, hi=1.0)
        _check_number("train.grad_clip", self.grad_clip, lo=0)
        _check_number("train.checkpoint_every", self.checkpoint_every, lo=1, integer=True)
        _check_number("train.val_pairs", self.val_pairs, lo=0, integer=True)
        _check_choice("train.device", self.device, DEVICES)
        _check_choice("train.precision", self.precision, PRECISIONS)
        _check_number("train.num_threads", self.num_threads, lo=0, integer=True)
        _check_number("train.eval_repeats", self.eval_repeats, lo=1, integer=True)
        _check_choice("train.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _check_number("train.lr_scale", self.lr_scale, lo=0, lo_open=True, hi=100.0)
        _check_number("train.warmup_steps", self.warmup_steps, lo=0, integer=True)
        _check_number("train.lr_final_frac", self.lr_final_frac, lo=0, hi=1.0)
        _check_number("train.augment_pairs", self.augment_pairs, lo=0, hi=1.0)
        if not isinstance(self.augment_flip, bool):
            _fail("train.augment_flip", self.augment_flip, "true or false")
        _check_number("train.fail_at_epoch", self.fail_at_epoch, lo=0, integer=True)
        _check_number("train.nan_at_epoch", self.nan_at_epoch, lo=0, integer=True)


@dataclass(frozen=True)
class Config:
    """One training run: a variant of the study, a seed, and the four sections."""

    variant: str = "combined_enhanced"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        # a variant of another study (a cell of a study file) names its factors explicitly
        if self.variant not in VARIANTS:
            if not isinstance(self.variant, str) or not _VARIANT_NAME.match(self.variant):
                _fail("variant", self.variant, "a name of letters, digits, '_', '-' or '.'")
            if self.model.affine is None or self.loss.regularize is None:
                get_variant(self.variant)  # raises with the list of the study's names
        _check_number("seed", self.seed, lo=0, integer=True)

    # -- derived ---------------------------------------------------------------------------
    @property
    def affine(self) -> bool:
        """The affine stage in force: `model.affine`, else the variant's."""
        explicit = self.model.affine
        return explicit if explicit is not None else VARIANTS[self.variant].affine

    @property
    def regularize(self) -> bool:
        """The regularizers in force: `loss.regularize`, else the variant's."""
        explicit = self.loss.regularize
        return explicit if explicit is not None else VARIANTS[self.variant].regularize

    @property
    def lr(self) -> float:
        """The learning rate in force: the explicit one, else the variant's (study default),
        times `train.lr_scale`."""
        if self.train.lr is not None:
            return self.train.lr * self.train.lr_scale
        base = VARIANTS[self.variant].lr if self.variant in VARIANTS else _DEFAULT_LR
        return base * self.train.lr_scale

    def in_force(self) -> "Config":
        """The config with every derived value written out: the factors and the learning rate
        explicit, and the five regularizer weights 0 when the variant does not regularize
        (what a run trains with, as MLflow shows it)."""
        flat = self.to_flat()
        flat.update({"model.affine": self.affine, "loss.regularize": self.regularize,
                     "train.lr": self.lr, "train.lr_scale": 1.0})
        if not self.regularize:
            flat.update({f"loss.{name}_weight": 0.0 for name in REGULARIZERS})
        return Config.from_flat(flat)

    # -- flat dotted dicts for Ray Tune and MLflow ----------------------------------------
    def to_flat(self) -> dict[str, Any]:
        """`{"variant": ..., "seed": ..., "data.shape": [64, 64, 64], "loss.smooth_weight": ...}`.

        Tuples become lists so the dict is JSON-serialisable; `from_flat(to_flat(c)) == c`.
        """
        flat: dict[str, Any] = {"variant": self.variant, "seed": self.seed}
        for section in _SECTIONS:
            for f in fields(getattr(self, section)):
                value = getattr(getattr(self, section), f.name)
                flat[f"{section}.{f.name}"] = list(value) if isinstance(value, tuple) else value
        return flat

    @classmethod
    def from_flat(cls, flat: dict[str, Any]) -> "Config":
        """Build a config from dotted keys (missing keys take defaults; unknown keys raise)."""
        top: dict[str, Any] = {}
        sections: dict[str, dict[str, Any]] = {s: {} for s in _SECTIONS}
        for key, value in flat.items():
            if key in RETIRED_KEYS:
                raise ValueError(f"config key {key!r} was retired: use {RETIRED_KEYS[key]}")
            head, _, rest = str(key).partition(".")
            if rest and head in sections:
                valid = {f.name for f in fields(_SECTIONS[head])}
                if rest not in valid:
                    raise ValueError(
                        f"unknown config key {key!r}, expected one of "
                        f"{', '.join(f'{head}.{v}' for v in sorted(valid))}"
                    )
                sections[head][rest] = _coerce(_SECTIONS[head], rest, value, key)
            elif not rest and key in ("variant", "seed"):
                top[key] = value
            else:
                raise ValueError(
                    f"unknown config key {key!r}, expected variant, seed or a key of the sections "
                    f"{', '.join(_SECTIONS)}"
                )
        return cls(**top, **{s: _SECTIONS[s](**kw) for s, kw in sections.items()})

    def with_overrides(self, overrides: dict[str, Any]) -> "Config":
        """A copy with dotted-key overrides applied (validated like `from_flat`)."""
        flat = self.to_flat()
        flat.update(overrides)
        return Config.from_flat(flat)


#: keys of earlier versions -> what replaces them (a checkpoint drops them: they only shaped the
#: training loss, never the network)
RETIRED_KEYS: dict[str, str] = {
    "loss.max_displacement_vox": "loss.max_displacement_mm (the magnitude threshold is in mm, "
                                 "the same physical size on any grid)",
}

_SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "loss": LossConfig,
    "train": TrainConfig,
}


def _coerce(section: type, name: str, value: Any, key: str) -> Any:
    """Coerce values that came through JSON/CLI/MLflow: lists to tuples, ints to floats where a
    float is declared. Anything else is left for the dataclass to validate."""
    hints = typing.get_type_hints(section)
    hint = hints[name]
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, int) and not isinstance(value, bool) and hint in (float, float | None):
        return float(value)
    return value


def parse_sets(items, expected: str = "key=value such as train.epochs=5") -> dict[str, Any]:
    """`--set KEY=VALUE` items -> {key: parsed value}; a ValueError names a bad item and what
    was `expected`."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set {item!r}, expected {expected}")
        out[key] = parse_value(value)
    return out


def parse_value(text: str) -> Any:
    """Parse a command-line override value: JSON-ish (numbers, true/false, none, lists)."""
    import json

    lowered = text.strip().lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        if "," in text:
            return [parse_value(part) for part in text.split(",")]
        return text


def replace_section(config: Config, section: str, **changes: Any) -> Config:
    """`replace_section(cfg, "train", epochs=2)`: a copy with one section changed."""
    return replace(config, **{section: replace(getattr(config, section), **changes)})

