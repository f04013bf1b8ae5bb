"""Training checkpoints: one directory per checkpoint holding `state.pt`.

`state.pt` is a plain dict of tensors, lists, numbers and strings, so it loads with
`torch.load(weights_only=True)` (no pickled objects are ever executed):

- `format`: the integer version of this layout (`FORMAT`);
- `epoch`: the number of completed epochs (1-based; the run resumes at `epoch + 1`);
- `model`, `optimizer`, `scaler` (or None): the `state_dict()`s;
- `rng`: Python's, NumPy's and torch's global RNG states, the CUDA states when present, and
  `data_order`, the state of the trainer's own data-order generator;
- `config`: the flat config (`Config.to_flat`), `backbone`: the backbone name.

Checkpoints are written with `regcore.io.atomic_dir` (a kill leaves the old one or the new one,
never half of one). A truncated or corrupt `state.pt` raises a ValueError naming the file;
`latest_valid_checkpoint(root)` walks back to the newest checkpoint that loads.
"""

from __future__ import annotations

import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from regcore.config import RETIRED_KEYS, Config
from regcore.io import atomic_dir

__all__ = [
    "FORMAT",
    "STATE_FILE",
    "save_checkpoint",
    "load_checkpoint",
    "latest_valid_checkpoint",
    "list_checkpoints",
    "check_compatible",
    "config_from_state",
    "capture_rng",
    "restore_rng",
    "prune_checkpoints",
]

FORMAT = 1
STATE_FILE = "state.pt"
_DIR_RE = re.compile(r"^epoch_(\d+)$")

#: Config keys that change the shapes or meaning of the network's weights: a checkpoint whose
#: values differ cannot be loaded into the model of another config.
STRUCTURAL_KEYS = ("variant", "model.backbone", "model.enc_channels", "model.dec_channels",
                   "model.diffeomorphic", "data.modality")

log = logging.getLogger(__name__)


def checkpoint_name(epoch: int) -> str:
    return f"epoch_{epoch:04d}"


# -- RNG states ----------------------------------------------------------------------------
def capture_rng(data_order: torch.Generator) -> dict[str, Any]:
    """All RNG states as weights_only-loadable values (NumPy's key array becomes a tensor)."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos),
                  int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
        "data_order": data_order.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], data_order: torch.Generator) -> None:
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np.asarray(np_keys, dtype=np.uint32), int(np_pos),
                         int(np_has_gauss), float(np_gauss)))
    torch.set_rng_state(state["torch"])
    data_order.set_state(state["data_order"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- save / load ---------------------------------------------------------------------------
def save_checkpoint(root: str | Path, *, epoch: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None, config: Config,
                    rng: dict[str, Any] | None = None, scaler: Any = None) -> Path:
    """Write `root/epoch_<NNNN>/state.pt` atomically and return the directory."""
    state = {
        "format": FORMAT,
        "epoch": int(epoch),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng,
        "config": config.to_flat(),
        "backbone": config.model.backbone,
    }
    target = Path(root) / checkpoint_name(epoch)
    with atomic_dir(target) as tmp:
        torch.save(state, tmp / STATE_FILE)
    return target


def _state_path(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist, expected a checkpoint "
                                f"directory holding {STATE_FILE} or the {STATE_FILE} file itself")
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint directory (or its `state.pt`) with `weights_only=True`.

    Raises FileNotFoundError when it is missing and ValueError naming the file when it is
    truncated, corrupt or not a regablate checkpoint.
    """
    file = _state_path(path)
    try:
        state = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises RuntimeError, EOFError, UnpicklingError, ...
        reason = " ".join(str(error).split())[:200]
        if "Weights only load failed" in reason:  # torch's hint to unpickle code: not for us
            reason = "not loadable with weights_only=True"
        raise ValueError(f"checkpoint {str(file)!r} is truncated or corrupt "
                         f"({type(error).__name__}: {reason})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or not all(
            key in state for key in ("epoch", "model", "config", "backbone")):
        raise ValueError(f"checkpoint {str(file)!r} is not a regablate checkpoint "
                         f"(format {FORMAT}, keys epoch/model/config/backbone)")
    return state


def config_from_state(state: dict[str, Any]) -> Config:
    """The checkpoint's config; keys retired since it was written are dropped (they only
    shaped the training loss)."""
    return Config.from_flat({k: v for k, v in state["config"].items() if k not in RETIRED_KEYS})


def check_compatible(state: dict[str, Any], config: Config, source: str | Path = "") -> None:
    """Raise a ValueError naming both sides when the checkpoint's network differs from `config`."""
    ours = config.to_flat()
    theirs = state["config"]
    where = f" {str(source)!r}" if source else ""
    if state["backbone"] != config.model.backbone:
        raise ValueError(f"checkpoint{where} was trained with backbone {state['backbone']!r}, "
                         f"but the config asks for backbone {config.model.backbone!r}")
    for key in STRUCTURAL_KEYS:
        if theirs.get(key) != ours.get(key):
            raise ValueError(f"checkpoint{where} has {key} == {theirs.get(key)!r}, but the config "
                             f"has {key} == {ours.get(key)!r}; they are incompatible")
    if config_from_state(state).affine != config.affine:  # the affine head's weights
        raise ValueError(f"checkpoint{where} was trained with the affine stage "
                         f"{'on' if not config.affine else 'off'}, but the config has it "
                         f"{'on' if config.affine else 'off'}; they are incompatible")


def list_checkpoints(root: str | Path) -> list[Path]:
    """Checkpoint directories under `root`, oldest epoch first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and (m := _DIR_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_valid_checkpoint(root: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint under `root` that loads, with its state; None when there is none.

    A truncated or corrupt one is reported (logged with its file name) and skipped, so the
    previous one is used.
    """
    for directory in reversed(list_checkpoints(root)):
        try:
            return directory, load_checkpoint(directory)
        except (ValueError, FileNotFoundError) as error:
            log.warning("skipping checkpoint: %s", error)
    return None


def prune_checkpoints(root: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (the previous one stays as a fallback)."""
    for directory in list_checkpoints(root)[:-keep]:
        shutil.rmtree(directory, ignore_errors=True)
