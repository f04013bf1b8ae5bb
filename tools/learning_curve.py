"""Learning curve of one variant: test Dice and true-field error against training steps and
CPU seconds, with the identity and instance-optimisation lines (docs/RECIPE.md).

    python tools/learning_curve.py --variant baseline --epochs 24 --out docs/learning_curve.png
    python tools/learning_curve.py --set data.modality=seg4_onehot --set data.shape=64,64,64 ...

Trains the quick preset's recipe (sweeps/presets.py) for `--epochs` epochs on `--threads`
threads (`--set KEY=VALUE` overrides any config key on top of it), keeps the checkpoint of every epoch, scores each on the test pairs, computes the
reference rows (regcore.reference) on the same pairs, and writes the figure and a CSV beside it.
CPU seconds = training wall seconds x threads (validation and scoring excluded).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    import torch

    from regcore.config import Config, parse_sets
    from regcore.evaluate import PairData, evaluate_test
    from regcore.reference import reference_table
    from regcore.register import load_model
    from regcore.train import train
    from sweeps.presets import get_preset

    parser = argparse.ArgumentParser(prog="tools/learning_curve.py")
    parser.add_argument("--variant", default="baseline")
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="docs/learning_curve.png")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="a dotted config key on top of the preset")
    args = parser.parse_args(argv)
    try:
        extra = parse_sets(args.overrides)
    except ValueError as error:
        parser.error(str(error))

    flat = {**get_preset("quick").overrides, "variant": args.variant, "seed": args.seed,
            "train.epochs": args.epochs, "train.checkpoint_every": 1,
            "train.num_threads": args.threads, **extra}
    config = Config.from_flat(flat)
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="regablate-curve-"))
    kept: dict[int, Path] = {}
    epoch_s: dict[int, float] = {}

    def keep(metrics, checkpoint_dir):
        epoch = int(metrics["epoch"])
        epoch_s[epoch] = float(metrics.get("train.epoch_s", float("nan")))
        if checkpoint_dir is not None:
            kept[epoch] = work / f"epoch_{epoch:04d}.pt"
            shutil.copy(Path(checkpoint_dir) / "state.pt", kept[epoch])

    train(config, keep, out_dir=work / "run")
    steps_per_epoch = config.train.steps_per_epoch
    data = PairData.from_config(config, torch.device("cpu"))
    rows = []
    cpu_s = 0.0
    for epoch in sorted(kept):
        cpu_s += epoch_s[epoch] * args.threads
        model, _ = load_model(kept[epoch], torch.device("cpu"))
        means = evaluate_test(model, data, config, torch.device("cpu"), work / "eval").means
        rows.append({"epoch": epoch, "steps": epoch * steps_per_epoch, "cpu_s": cpu_s,
                     "dice_mean": means["dice_mean"], "true_error_mm": means["true_error_mm"]})
        print(f"epoch {epoch}: Dice {means['dice_mean']:.3f}, true error "
              f"{means['true_error_mm']:.2f} mm", flush=True)
    curve = pd.DataFrame(rows)
    refs = reference_table(config.with_overrides({"loss.regularize": False}))
    ref = refs.groupby("method")[["dice_mean", "true_error_mm", "method_s"]].mean()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    curve.to_csv(out.with_suffix(".csv"), index=False)

    fig, axes = plt.subplots(2, 2, figsize=(9, 6.5), sharey="row")
    budget = get_preset("quick").overrides["train.epochs"] * steps_per_epoch
    for col, (x, label) in enumerate((("steps", "training steps"),
                                      ("cpu_s", f"CPU seconds ({args.threads} thread)"))):
        for row, (metric, name) in enumerate((("dice_mean", "test Dice"),
                                              ("true_error_mm", "error vs true field (mm)"))):
            ax = axes[row, col]
            ax.plot(curve[x], curve[metric], "o-", ms=3, label=f"{args.variant} (network)")
            for method, style in (("identity", "k:"), ("instance_optimisation", "g--")):
                if method in ref.index:
                    ax.axhline(ref.loc[method, metric], color=style[0], ls=style[1:],
                               label=method.replace("_", " "))
            if x == "steps":
                ax.axvline(budget, color="0.6", lw=0.8, label="quick budget")
            ax.set_xlabel(label)
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    io_s = ref.loc["instance_optimisation", "method_s"] if "instance_optimisation" in ref.index \
        else float("nan")
    recipe = "quick preset" + "".join(f", {item}" for item in args.overrides)
    fig.suptitle(f"{recipe}\n{args.variant}, seed {args.seed}; instance optimisation "
                 f"{io_s:.1f} s per pair", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    print(ref.to_string())
    print(f"wrote {out} and {out.with_suffix('.csv')}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
