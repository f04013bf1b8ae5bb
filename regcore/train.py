"""Train one variant of the study on one data split, then evaluate it on the test pairs.

`train(config, report, out_dir=...)` knows nothing of Ray or MLflow (it imports neither): it
runs alone, in a notebook, or under Ray Tune, where `report` forwards to `tune.report` and
`resume_from` comes from `tune.get_checkpoint()`.

`report(metrics, checkpoint_dir)` is called once per epoch with the metric names of
docs/ARCHITECTURE.md (`epoch`, `train.loss_total`, `train.loss_<term>`, `train.share_<term>`,
`train.reg_factor`, `train.lr`, `train.epoch_s`, `val.dice_mean`, `val.folding_pct`);
`checkpoint_dir` is set on checkpoint epochs (every `train.checkpoint_every` and the last one).
The last call also carries the `test.<column>` means over the test pairs.

Epochs are numbered from 1; `compute_loss` receives the 0-based epoch index, so the adaptive
regularizer factor of the study, max(0.01, 0.1 (1 - e / epochs)), starts at 0.1.

Determinism: Python's, NumPy's and torch's RNGs are seeded with `config.seed`, and the order of
the training pairs comes from a torch.Generator owned by the trainer; all four states are
saved in every checkpoint, so a run resumed from a checkpoint reaches the same weights as an
uninterrupted one (on the same device and thread count).

Test hooks (config `train.*`, 0 = off):
- `fail_at_epoch = k` raises a RuntimeError at the start of epoch k, but only in a run that
  did not resume from a checkpoint: a retried trial that resumes from its last checkpoint
  completes. (Sweeps use it to test Ray's retries.)
- `nan_at_epoch = k` makes the first similarity term NaN at the first step of epoch k; the run
  stops with a `DivergenceError` naming the epoch, the step and the non-finite terms.

Divergence: a non-finite loss or gradient, and a displacement longer than `DIVERGED_SIDES`
times the longest image side (a blow-up that a bounded similarity such as local NCC leaves
finite), stop the run with a `DivergenceError` naming epoch and step.

Command: `python -m regcore.train --variant combined_enhanced [--data-dir D] [--out-dir O]
[--epochs N] [--seed S] [--config file.json] [--set key=value ...]`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from regcore.checkpoint import (
    capture_rng,
    check_compatible,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    restore_rng,
    save_checkpoint,
)
from regcore.cli import ArgumentParser
from regcore.config import Config, parse_value
from regcore.runtime import autocast, configure_device, seed_everything, select_device, to_float32

__all__ = ["train", "TrainResult", "DivergenceError", "check_displacement", "build_config",
           "main"]

ReportFn = Callable[[dict[str, float], "str | None"], None]

#: Checkpoints kept on disk: the newest and the previous one (the fallback when the newest is
#: found truncated).
KEEP_CHECKPOINTS = 2

#: A displacement longer than this many times the longest image side (in voxels) sends every
#: voxel outside the volume: the model has diverged even when the loss is still finite (a
#: bounded similarity such as local NCC stays finite while the field grows without limit).
DIVERGED_SIDES = 2.0


class DivergenceError(ValueError):
    """The loss (or the gradient) became NaN or infinite, or the displacement grew beyond any
    physical range; the message names epoch, step and what diverged."""


def check_displacement(total_ddf_vox: torch.Tensor, epoch: int, step: int) -> None:
    """Raise `DivergenceError` when `total_ddf_vox` `(B, 3, D, H, W)` is non-finite or longer
    than `DIVERGED_SIDES` times the longest spatial side in any component u_k anywhere (voxels)."""
    longest_vox = max(total_ddf_vox.shape[2:])
    max_vox = float(total_ddf_vox.detach().abs().amax())
    if not math.isfinite(max_vox) or max_vox > DIVERGED_SIDES * longest_vox:
        raise DivergenceError(
            f"displacement diverged at epoch {epoch}, step {step}: max |u_k| == {max_vox:g} "
            f"voxels, more than {DIVERGED_SIDES:g} x the longest image side ({longest_vox} voxels); "
            "lower train.lr or raise the regularizer weights")


@dataclass
class TrainResult:
    metrics: dict[str, float]  # the last report's metrics, test.* included
    per_pair: Any  # pandas.DataFrame, one row per test pair
    per_pair_path: Path
    checkpoint_dir: Path | None
    example_path: Path | None
    history: list[dict[str, float]] = field(default_factory=list)
    device: str = "cpu"


# -- data order ----------------------------------------------------------------------------
def epoch_order(n_pairs: int, config: Config, generator: torch.Generator) -> list[list[int]]:
    """Batches of pair indices for one epoch, drawn from `generator` (the trainer's own RNG).

    `steps_per_epoch = 0`: one pass over the pairs; else that many batches, drawn from as many
    fresh permutations as needed.
    """
    batch = config.train.batch_size
    steps = config.train.steps_per_epoch or math.ceil(n_pairs / batch)
    needed = steps * batch
    flat: list[int] = []
    while len(flat) < needed:
        flat.extend(torch.randperm(n_pairs, generator=generator).tolist())
    if config.train.steps_per_epoch == 0:
        flat = flat[:n_pairs]
        return [flat[i:i + batch] for i in range(0, n_pairs, batch)]
    return [flat[i * batch:(i + 1) * batch] for i in range(steps)]


# -- the loop ------------------------------------------------------------------------------
def _nonfinite_message(epoch: int, step: int, terms: dict[str, torch.Tensor],
                       total: torch.Tensor) -> str:
    bad = [f"{name}={float(value.detach()):g}" for name, value in terms.items()
           if not torch.isfinite(value.detach()).all()]
    which = ", ".join(bad) if bad else f"total={float(total.detach()):g}"
    return f"loss became non-finite at epoch {epoch}, step {step}: {which}"


def _drop_stale_checkpoints(root: Path, start_epoch: int) -> None:
    """Remove checkpoints of an earlier run in the same folder at epochs this run will redo, so
    that the newest checkpoint on disk is always this run's (pruning keeps the newest)."""
    for directory in list_checkpoints(root):
        if int(directory.name.split("_")[-1]) >= start_epoch:
            warnings.warn(f"removing the stale checkpoint {directory} of an earlier run "
                          f"(this run starts at epoch {start_epoch})", stacklevel=3)
            shutil.rmtree(directory, ignore_errors=True)


def train(config: Config, report: ReportFn | None = None, *, out_dir: str | os.PathLike,
          resume_from: str | os.PathLike | None = None) -> TrainResult:
    """Train `config`'s variant, evaluate it on the test pairs, return a `TrainResult`.

    Writes `out_dir/checkpoints/epoch_<NNNN>/state.pt`, `out_dir/per_pair.csv`,
    `out_dir/example.npz` and `out_dir/metrics.json`. `resume_from`: a checkpoint directory or
    its `state.pt`; training continues after its epoch.
    """
    from regcore import evaluate
    from regcore.losses import compute_loss
    from regcore.networks import build_model

    if not isinstance(config, Config):
        raise TypeError(f"config is a {type(config).__name__}, expected regcore.config.Config")
    device = select_device(config)
    resume_state = None
    if resume_from is not None:
        resume_state = load_checkpoint(resume_from)
        check_compatible(resume_state, config, resume_from)
    configure_device(device, config.train.num_threads)
    seed_everything(config.seed)
    data = evaluate.PairData.from_config(config, device)
    if not data.train_pairs:
        raise ValueError(f"the data split has no training pairs (data.n_test == "
                         f"{config.data.n_test}, data.n_val == {config.data.n_val})")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_root = out_dir / "checkpoints"
    model = build_model(config.model, data.in_channels, affine=config.affine).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    scaler = torch.amp.GradScaler("cuda") if config.train.precision == "amp" else None
    order = torch.Generator()
    order.manual_seed(config.seed)
    start_epoch = 1
    checkpoint_dir: Path | None = None
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        if resume_state.get("optimizer") is not None:
            optimizer.load_state_dict(resume_state["optimizer"])
        if scaler is not None and resume_state.get("scaler") is not None:
            scaler.load_state_dict(resume_state["scaler"])
        if resume_state.get("rng") is not None:
            restore_rng(resume_state["rng"], order)
        start_epoch = int(resume_state["epoch"]) + 1
        checkpoint_dir = Path(resume_from)
        if checkpoint_dir.is_file():
            checkpoint_dir = checkpoint_dir.parent

    _drop_stale_checkpoints(ckpt_root, start_epoch)
    epochs = config.train.epochs
    history: list[dict[str, float]] = []
    metrics: dict[str, float] = {}
    for epoch in range(start_epoch, epochs + 1):
        if config.train.fail_at_epoch == epoch and resume_state is None:
            raise RuntimeError(f"train.fail_at_epoch == {epoch}: injected failure at the start of "
                               f"epoch {epoch} (a run resumed from a checkpoint does not fail)")
        started = time.perf_counter()
        model.train()
        sums: dict[str, float] = {}
        weighted_sums: dict[str, float] = {}
        total_sum = 0.0
        factor = float("nan")
        batches = epoch_order(len(data.train_pairs), config, order)
        for step, batch in enumerate(batches, start=1):
            moving, fixed = data.batch("train", batch)
            with autocast(config.train.precision, device):
                output = model(moving, fixed)
            breakdown = compute_loss(to_float32(output), fixed, config, epoch - 1, epochs,
                                     spacing_mm=data.spacing_mm("train", batch))
            terms = dict(breakdown.terms)
            weighted = dict(breakdown.weighted)
            total = breakdown.total
            if config.train.nan_at_epoch == epoch and step == 1:
                name = next(iter(terms))
                terms[name] = terms[name] * float("nan")
                weighted[name] = weighted[name] * float("nan")
                total = total + weighted[name]
            if not torch.isfinite(total.detach()):
                raise DivergenceError(_nonfinite_message(epoch, step, terms, total))
            check_displacement(output.total_ddf_vox, epoch, step)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(total).backward()
                scaler.unscale_(optimizer)
            else:
                total.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip
                                                       if config.train.grad_clip > 0 else float("inf"))
            if scaler is not None:
                scaler.step(optimizer)  # skips the step itself when the scaled gradient overflowed
                scaler.update()
            else:
                if not torch.isfinite(grad_norm):
                    raise DivergenceError(f"gradient became non-finite at epoch {epoch}, step "
                                          f"{step} (norm {float(grad_norm):g}); loss terms were finite")
                optimizer.step()
            total_sum += float(total.detach())
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach())
            for name, value in weighted.items():
                weighted_sums[name] = weighted_sums.get(name, 0.0) + float(value.detach())
            factor = float(breakdown.factor)

        n = len(batches)
        metrics = {"epoch": float(epoch), "train.loss_total": total_sum / n}
        for name, value in sums.items():
            metrics[f"train.loss_{name}"] = value / n
        # share of each weighted term in the sum of their magnitudes: well defined (in [0, 1],
        # summing to 1) also when a term is negative, as local NCC is
        magnitude = sum(abs(value) for value in weighted_sums.values())
        for name, value in weighted_sums.items():
            metrics[f"train.share_{name}"] = abs(value) / magnitude if magnitude else float("nan")
        metrics["train.reg_factor"] = factor
        metrics["train.lr"] = float(optimizer.param_groups[0]["lr"])
        metrics["train.epoch_s"] = time.perf_counter() - started
        metrics.update(evaluate.validate(model, data, config, device))

        last = epoch == epochs
        ckpt_now = None
        if last or epoch % config.train.checkpoint_every == 0:
            ckpt_now = save_checkpoint(ckpt_root, epoch=epoch, model=model, optimizer=optimizer,
                                       config=config, rng=capture_rng(order), scaler=scaler)
            prune_checkpoints(ckpt_root, KEEP_CHECKPOINTS)
            checkpoint_dir = ckpt_now
        history.append(dict(metrics))
        if last:
            break  # the last report waits for the test metrics below
        if report is not None:
            report(dict(metrics), str(ckpt_now) if ckpt_now is not None else None)

    if not metrics:  # resumed from the last epoch's checkpoint: nothing left to train
        metrics = {"epoch": float(epochs)}
    result = evaluate.evaluate_test(model, data, config, device, out_dir)
    metrics.update({f"test.{key}": value for key, value in result.means.items()})
    if report is not None:
        report(dict(metrics), str(checkpoint_dir) if checkpoint_dir is not None else None)
    from regcore.io import atomic_write_text
    atomic_write_text(out_dir / "metrics.json",
                      json.dumps({"config": config.to_flat(), "device": str(device),
                                  "metrics": metrics}, indent=2, default=float))
    return TrainResult(metrics=metrics, per_pair=result.table, per_pair_path=result.table_path,
                       checkpoint_dir=checkpoint_dir, example_path=result.example_path,
                       history=history, device=str(device))


# -- command -------------------------------------------------------------------------------
def build_config(variant: str, *, config_file: str | None = None, data_dir: str | None = None,
                 epochs: int | None = None, seed: int | None = None,
                 overrides: Sequence[str] = ()) -> Config:
    """The validated config of the command line: file, then flags, then `--set key=value`."""
    flat: dict[str, Any] = {}
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise FileNotFoundError(f"--config {config_file!r} does not exist")
        try:
            loaded = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"--config {config_file!r} is not valid JSON ({error})") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"--config {config_file!r} holds a {type(loaded).__name__}, expected "
                             f"an object of dotted config keys")
        flat.update(loaded)
    if variant is not None:
        flat["variant"] = variant
    if data_dir is not None:
        flat["data.data_dir"] = data_dir
    if epochs is not None:
        flat["train.epochs"] = epochs
    if seed is not None:
        flat["seed"] = seed
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}, expected key=value such as train.epochs=5")
        flat[key.strip()] = parse_value(value)
    return Config.from_flat(flat)


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m regcore.train",
        description="Train one variant of the study on one data split and evaluate it on the "
                    "test pairs. Writes checkpoints/, per_pair.csv, example.npz and metrics.json "
                    "to the output folder.")
    parser.add_argument("--variant", default=None,
                        help="baseline, regloss, combined_basic or combined_enhanced "
                             "(default: the config file's, else combined_enhanced)")
    parser.add_argument("--data-dir", default=None,
                        help="Neurite OASIS folder (default: the embedded cohort)")
    parser.add_argument("--out-dir", default=None,
                        help="output folder (default: runs/<variant>-s<seed>)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--config", default=None, help="JSON file of dotted config keys")
    parser.add_argument("--resume", default=None, help="checkpoint directory or state.pt")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="any dotted config key, e.g. train.lr=1e-4")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    config = build_config(args.variant, config_file=args.config, data_dir=args.data_dir,
                          epochs=args.epochs, seed=args.seed, overrides=args.overrides)
    select_device(config)  # device/precision errors before any work
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise FileNotFoundError(f"--data-dir {args.data_dir!r} is not a directory")
    if args.resume is not None:
        check_compatible(load_checkpoint(args.resume), config, args.resume)
    out_dir = Path(args.out_dir or f"runs/{config.variant}-s{config.seed}")
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out-dir {str(out_dir)!r} exists and is not a directory")

    bar = None
    if not args.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=config.train.epochs, desc=config.variant, unit="epoch", file=sys.stderr)

    def progress(metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        if bar is not None:
            bar.n = int(metrics["epoch"])
            postfix = {"loss": f"{metrics['train.loss_total']:.4f}"} if "train.loss_total" in metrics else {}
            if "val.dice_mean" in metrics:
                postfix["val_dice"] = f"{metrics['val.dice_mean']:.3f}"
            bar.set_postfix(postfix)
            bar.refresh()

    try:
        result = train(config, progress, out_dir=out_dir, resume_from=args.resume)
    finally:
        if bar is not None:
            bar.close()
    m = result.metrics
    print(f"variant {config.variant}, seed {config.seed}, {config.train.epochs} epochs on "
          f"{result.device}")
    for key in ("test.dice_before_mean", "test.dice_mean", "test.hd95_mm", "test.folding_pct",
                "test.sdlogj", "test.true_error_mm", "test.inference_s"):
        if key in m:
            print(f"  {key:24s} {m[key]:.4f}")
    print(f"outputs in {out_dir} (per_pair.csv, example.npz, metrics.json, checkpoints/)")
    return 0


if __name__ == "__main__":
    from regcore.cli import run_cli

    run_cli(main, prog="regcore.train")
