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

Divergence: a non-finite loss or gradient, a displacement longer than `DIVERGED_SIDES`
times the longest image side (a blow-up that a bounded similarity such as local NCC leaves
finite), and a field that samples more than `OUTSIDE_SHARE` of the fixed grid outside the
moving image (a collapse that a bound on each pass's flow keeps short: the flows saturate,
their gradient vanishes and the run would go on with Dice 0) stop the run with a
`DivergenceError` naming epoch and step.

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
from regcore.config import Config, parse_sets
from regcore.runtime import autocast, configure_device, seed_everything, select_device, to_float32
from regcore.spatial import identity_grid_vox

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
#: the share of the fixed grid whose sample point may lie outside the moving image
OUTSIDE_SHARE = 0.5


class DivergenceError(ValueError):
    """The loss (or the gradient) became NaN or infinite, or the displacement grew beyond any
    physical range; the message names epoch, step and what diverged."""


def check_displacement(total_ddf_vox: torch.Tensor, epoch: int, step: int) -> None:
    """Raise `DivergenceError` when `total_ddf_vox` `(B, 3, D, H, W)` is non-finite, longer
    than `DIVERGED_SIDES` times the longest spatial side in any component u_k anywhere (voxels),
    or sends more than `OUTSIDE_SHARE` of the grid's sample points x + u(x) outside the volume
    (half a voxel beyond the border voxels' centres)."""
    longest_vox = max(total_ddf_vox.shape[2:])
    max_vox = float(total_ddf_vox.detach().abs().amax())
    if not math.isfinite(max_vox) or max_vox > DIVERGED_SIDES * longest_vox:
        raise DivergenceError(
            f"displacement diverged at epoch {epoch}, step {step}: max |u_k| == {max_vox:g} "
            f"voxels, more than {DIVERGED_SIDES:g} x the longest image side ({longest_vox} voxels); "
            "lower train.lr or raise the regularizer weights")
    sizes = torch.tensor(total_ddf_vox.shape[2:], device=total_ddf_vox.device,
                         dtype=total_ddf_vox.dtype).view(1, 3, 1, 1, 1)
    where = identity_grid_vox(total_ddf_vox.shape[2:], total_ddf_vox.device,
                              total_ddf_vox.dtype) + total_ddf_vox.detach()
    outside = ((where < -0.5) | (where > sizes - 0.5)).any(dim=1).float().mean().item()
    if outside > OUTSIDE_SHARE:
        raise DivergenceError(
            f"displacement diverged at epoch {epoch}, step {step}: the field samples "
            f"{100 * outside:.0f} % of the fixed grid outside the moving image (more than "
            f"{100 * OUTSIDE_SHARE:.0f} %); lower train.lr")


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


def learning_rate(config: Config, step: int, total_steps: int) -> float:
    """The learning rate of step `step` (from 0) of `total_steps`: `train.lr_schedule`."""
    base = config.lr
    train_cfg = config.train
    warmup = train_cfg.warmup_steps
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    if train_cfg.lr_schedule == "constant":
        return base
    span = max(total_steps - warmup - 1, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    final = train_cfg.lr_final_frac
    return base * (final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def set_learning_rate(optimizer: torch.optim.Optimizer, config: Config, step: int,
                      total_steps: int) -> None:
    """Write the schedule's rate into the optimizer (stateless: a resumed run continues it)."""
    rate = learning_rate(config, step, total_steps)
    for group in optimizer.param_groups:
        group["lr"] = rate


def training_batch(data, batch: list[int], config: Config, generator: torch.Generator
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(moving, fixed) of the training pairs `batch`, augmented as `config.train` says.

    With `augment_pairs` = p, each pair is replaced with probability p by a random ordered pair
    of two different training subjects (the atlas among them); with `augment_flip`, both images
    of a pair are flipped along array axis 0 (left-right) with probability 1/2. The draws come
    from the trainer's own `generator`, so a seed gives the same augmented sequence.
    """
    train_cfg = config.train
    if not train_cfg.augment_pairs and not train_cfg.augment_flip:
        return data.batch("train", batch)
    subjects = data.train_subjects()
    movings, fixeds = [], []
    for index in batch:
        draw = torch.rand(2, generator=generator).tolist()
        if draw[0] < train_cfg.augment_pairs and len(subjects) > 1:
            a, b = torch.randperm(len(subjects), generator=generator)[:2].tolist()
            moving, fixed = data.subject_channels(subjects[a]), data.subject_channels(subjects[b])
        else:
            item = data.item("train", index)
            moving, fixed = item["moving"], item["fixed"]
        if train_cfg.augment_flip and draw[1] < 0.5:
            moving, fixed = moving.flip(1), fixed.flip(1)  # (C, D, H, W): D is axis 0
        movings.append(moving)
        fixeds.append(fixed)
    return (data.to_device(torch.stack(movings).contiguous()),
            data.to_device(torch.stack(fixeds).contiguous()))


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
                          f"(this run starts at epoch {start_epoch})", stacklevel=4)
            shutil.rmtree(directory, ignore_errors=True)


@dataclass
class _Run:
    """What one training run carries from step to step."""

    config: Config
    device: torch.device
    data: Any  # evaluate.PairData
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: Any  # torch.amp.GradScaler on CUDA with precision amp, else None
    order: torch.Generator  # the order of the training pairs
    out_dir: Path
    resumed: bool
    start_epoch: int = 1
    checkpoint_dir: Path | None = None

    @property
    def ckpt_root(self) -> Path:
        return self.out_dir / "checkpoints"


def train(config: Config, report: ReportFn | None = None, *, out_dir: str | os.PathLike,
          resume_from: str | os.PathLike | None = None) -> TrainResult:
    """Train `config`'s variant, evaluate it on the test pairs, return a `TrainResult`.

    Writes `out_dir/checkpoints/epoch_<NNNN>/state.pt`, `out_dir/per_pair.csv`,
    `out_dir/example.npz` and `out_dir/metrics.json`. `resume_from`: a checkpoint directory or
    its `state.pt`; training continues after its epoch.
    """
    if not isinstance(config, Config):
        raise TypeError(f"config is a {type(config).__name__}, expected regcore.config.Config")
    run = _start(config, Path(out_dir), resume_from)
    epochs = config.train.epochs
    history: list[dict[str, float]] = []
    metrics: dict[str, float] = {}
    for epoch in range(run.start_epoch, epochs + 1):
        metrics = _train_epoch(run, epoch)
        ckpt_now = _checkpoint_if_due(run, epoch)
        history.append(dict(metrics))
        if epoch == epochs:
            break  # the last report waits for the test metrics
        if report is not None:
            report(dict(metrics), str(ckpt_now) if ckpt_now is not None else None)
    return _finish(run, metrics, history, report)


def _start(config: Config, out_dir: Path, resume_from: str | os.PathLike | None) -> _Run:
    """Device, seeds, data, model, optimiser; the checkpoint's state when resuming."""
    from regcore import evaluate
    from regcore.networks import build_model

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
    out_dir.mkdir(parents=True, exist_ok=True)
    model = build_model(config.model, data.in_channels, affine=config.affine).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    scaler = torch.amp.GradScaler("cuda") if config.train.precision == "amp" else None
    order = torch.Generator()
    order.manual_seed(config.seed)
    run = _Run(config=config, device=device, data=data, model=model, optimizer=optimizer,
               scaler=scaler, order=order, out_dir=out_dir, resumed=resume_state is not None)
    if resume_state is not None:
        _restore(run, resume_state, Path(resume_from))
    _drop_stale_checkpoints(run.ckpt_root, run.start_epoch)
    return run


def _restore(run: _Run, state: dict, resume_from: Path) -> None:
    """Weights, optimiser, scaler and data-order RNG from a checkpoint; continue after its epoch."""
    run.model.load_state_dict(state["model"])
    if state.get("optimizer") is not None:
        run.optimizer.load_state_dict(state["optimizer"])
    if run.scaler is not None and state.get("scaler") is not None:
        run.scaler.load_state_dict(state["scaler"])
    if state.get("rng") is not None:
        restore_rng(state["rng"], run.order)
    run.start_epoch = int(state["epoch"]) + 1
    run.checkpoint_dir = resume_from.parent if resume_from.is_file() else resume_from


def _train_epoch(run: _Run, epoch: int) -> dict[str, float]:
    """One pass over the epoch's batches, then validation: the epoch's metrics."""
    from regcore import evaluate

    config = run.config
    if config.train.fail_at_epoch == epoch and not run.resumed:
        raise RuntimeError(f"train.fail_at_epoch == {epoch}: injected failure at the start of "
                           f"epoch {epoch} (a run resumed from a checkpoint does not fail)")
    started = time.perf_counter()
    run.model.train()
    sums: dict[str, float] = {}
    weighted_sums: dict[str, float] = {}
    total_sum = 0.0
    factor = float("nan")
    batches = epoch_order(len(run.data.train_pairs), config, run.order)
    for step, batch in enumerate(batches, start=1):
        set_learning_rate(run.optimizer, config, (epoch - 1) * len(batches) + step - 1,
                          config.train.epochs * len(batches))
        total, terms, weighted, factor = _train_step(run, batch, epoch, step)
        total_sum += float(total.detach())
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + float(value.detach())
        for name, value in weighted.items():
            weighted_sums[name] = weighted_sums.get(name, 0.0) + float(value.detach())
    metrics = _loss_metrics(epoch, len(batches), total_sum, sums, weighted_sums)
    metrics["train.reg_factor"] = factor
    metrics["train.lr"] = float(run.optimizer.param_groups[0]["lr"])
    metrics["train.epoch_s"] = time.perf_counter() - started
    metrics.update(evaluate.validate(run.model, run.data, config, run.device))
    return metrics


def _train_step(run: _Run, batch: list[int], epoch: int, step: int):
    """Forward, loss, divergence checks, backward and the optimiser step on the training pairs
    `batch`: (total, terms, weighted terms, the adaptive regularizer factor)."""
    from regcore.losses import compute_loss

    config = run.config
    moving, fixed = training_batch(run.data, batch, config, run.order)
    with autocast(config.train.precision, run.device):
        output = run.model(moving, fixed)
    breakdown = compute_loss(to_float32(output), fixed, config, epoch - 1, config.train.epochs,
                             spacing_mm=run.data.spacing_mm("train", batch))
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
    _optimise(run, total, epoch, step)
    return total, terms, weighted, float(breakdown.factor)


def _optimise(run: _Run, total: torch.Tensor, epoch: int, step: int) -> None:
    """Backward, gradient clipping and the optimiser step (through the scaler under amp)."""
    optimizer, scaler = run.optimizer, run.scaler
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(total).backward()
        scaler.unscale_(optimizer)
    else:
        total.backward()
    clip = run.config.train.grad_clip
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(),
                                               clip if clip > 0 else float("inf"))
    if scaler is not None:
        scaler.step(optimizer)  # skips the step itself when the scaled gradient overflowed
        scaler.update()
    else:
        if not torch.isfinite(grad_norm):
            raise DivergenceError(f"gradient became non-finite at epoch {epoch}, step "
                                  f"{step} (norm {float(grad_norm):g}); loss terms were finite")
        optimizer.step()


def _loss_metrics(epoch: int, n_steps: int, total_sum: float, sums: dict[str, float],
                  weighted_sums: dict[str, float]) -> dict[str, float]:
    """`epoch`, the epoch's mean loss terms and each weighted term's share."""
    metrics = {"epoch": float(epoch), "train.loss_total": total_sum / n_steps}
    for name, value in sums.items():
        metrics[f"train.loss_{name}"] = value / n_steps
    # share of each weighted term in the sum of their magnitudes: well defined (in [0, 1],
    # summing to 1) also when a term is negative, as local NCC is
    magnitude = sum(abs(value) for value in weighted_sums.values())
    for name, value in weighted_sums.items():
        metrics[f"train.share_{name}"] = abs(value) / magnitude if magnitude else float("nan")
    return metrics


def _checkpoint_if_due(run: _Run, epoch: int) -> Path | None:
    """Save (and prune) a checkpoint on checkpoint epochs and the last one; its directory."""
    config = run.config
    if epoch != config.train.epochs and epoch % config.train.checkpoint_every != 0:
        return None
    saved = save_checkpoint(run.ckpt_root, epoch=epoch, model=run.model,
                            optimizer=run.optimizer, config=config, rng=capture_rng(run.order),
                            scaler=run.scaler)
    prune_checkpoints(run.ckpt_root, KEEP_CHECKPOINTS)
    run.checkpoint_dir = saved
    return saved


def _finish(run: _Run, metrics: dict[str, float], history: list[dict[str, float]],
            report: ReportFn | None) -> TrainResult:
    """The test evaluation, the last report, metrics.json; the `TrainResult`."""
    from regcore import evaluate
    from regcore.io import atomic_write_text

    config = run.config
    if not metrics:  # resumed from the last epoch's checkpoint: nothing left to train
        metrics = {"epoch": float(config.train.epochs)}
    result = evaluate.evaluate_test(run.model, run.data, config, run.device, run.out_dir)
    metrics.update({f"test.{key}": value for key, value in result.means.items()})
    checkpoint_dir = run.checkpoint_dir
    if report is not None:
        report(dict(metrics), str(checkpoint_dir) if checkpoint_dir is not None else None)
    atomic_write_text(run.out_dir / "metrics.json",
                      json.dumps({"config": config.to_flat(), "device": str(run.device),
                                  "metrics": metrics}, indent=2, default=float))
    return TrainResult(metrics=metrics, per_pair=result.table, per_pair_path=result.table_path,
                       checkpoint_dir=checkpoint_dir, example_path=result.example_path,
                       history=history, device=str(run.device))


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
    flat.update(parse_sets(overrides))
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
