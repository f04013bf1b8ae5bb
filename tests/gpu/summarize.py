"""Helpers of tests/gpu/run.sh: check the smoke sweep's MLflow runs; collect the figures.

    python tests/gpu/summarize.py check-runs TRACKING_URI
    python tests/gpu/summarize.py summary OUT FAILED_STEPS
"""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path


def check_runs(uri: str) -> int:
    """The smoke sweep: one FINISHED run per ablation trial, each with its test metrics and its
    per-pair table; trials that shared the GPU ran on the device the sweep asked for."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("regablate")
    runs = client.search_runs([exp.experiment_id], "tags.`regablate.role` = 'trial'")
    problems = []
    for run in runs:
        name = run.info.run_name
        if run.info.status != "FINISHED":
            problems.append(f"{name}: {run.info.status}")
        if "test.dice_mean" not in run.data.metrics:
            problems.append(f"{name}: no test.dice_mean")
        if "per_pair.csv" not in {a.path for a in client.list_artifacts(run.info.run_id)}:
            problems.append(f"{name}: no per_pair.csv")
    devices = sorted({r.data.tags.get("regablate.device", "?") for r in runs})
    print(f"{len(runs)} trial runs, devices {devices}; problems: {problems or 'none'}")
    return 0 if runs and not problems else 1


def _bench_rows(log: Path) -> list[dict[str, str]]:
    """The table rows of a `regcore.bench` log (header line starting with 'backbone')."""
    if not log.is_file():
        return []
    lines = log.read_text().splitlines()
    head = next((i for i, line in enumerate(lines) if line.split()[:1] == ["backbone"]), None)
    if head is None:
        return []
    names = lines[head].split()
    rows = []
    for line in lines[head + 1:]:
        cells = line.split()
        if cells and set(cells[0]) == {"-"}:
            continue  # the table's rule
        if len(cells) != len(names):
            break
        rows.append(dict(zip(names, cells)))
    return rows


def _gpu_samples(path: Path) -> dict[str, float]:
    """Utilisation during the trial: the samples whose memory use is above the idle level."""
    if not path.is_file():
        return {}
    samples = []
    for row in csv.reader(path.read_text().splitlines()):
        try:
            samples.append((float(row[1]), float(row[2])))
        except (IndexError, ValueError):
            continue
    if not samples:
        return {}
    idle = min(m for _, m in samples)
    busy = [u for u, m in samples if m > idle + 512]  # the trial holds > 0.5 GB
    if not busy:
        return {"samples": len(samples)}
    return {"samples": len(samples), "busy_samples": len(busy),
            "util_mean_pct": sum(busy) / len(busy),
            "util_median_pct": sorted(busy)[len(busy) // 2],
            "share_at_or_above_80_pct": sum(u >= 80 for u in busy) / len(busy),
            "memory_peak_mib": max(m for _, m in samples)}


def summary(out: str, failed: str) -> int:
    folder = Path(out)
    result = {"failed_steps": int(failed), "skipped": {}, "bench": {}, "trial": {}, "gpu": {}}
    for log in sorted(folder.glob("*.log")):
        text = log.read_text()
        if text.startswith("skipped:"):
            result["skipped"][log.stem] = text.strip()
    for log in sorted(folder.glob("bench_*.log")):
        result["bench"][log.stem.removeprefix("bench_")] = _bench_rows(log)
        dice = re.search(r"dice check .*change ([+-][0-9.]+)", log.read_text())
        if dice:
            result["bench"][f"{log.stem}_dice_change"] = float(dice.group(1))
    metrics = folder / "trial_metrics.json"
    if metrics.is_file():
        data = json.loads(metrics.read_text())
        values, config = data["metrics"], data["config"]
        steps = config["train.steps_per_epoch"]
        result["trial"] = {k: values.get(k) for k in ("epoch", "test.dice_before_mean",
                                                      "test.dice_mean", "train.epoch_s")}
        result["trial"]["device"] = data.get("device")
        if steps and values.get("train.epoch_s"):
            step_s = values["train.epoch_s"] / steps
            # the paper preset: 50 epochs, one pass over the training pairs each; Neurite
            # OASIS v1.0 has 414 subjects, 20 test + 2 validation + the atlas leave 391
            result["trial"]["train_step_s"] = step_s
            result["trial"]["paper_trial_h_extrapolated"] = 50 * 391 * step_s / 3600
    result["gpu"] = _gpu_samples(folder / "nvidia_smi.csv")
    (folder / "summary.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    sys.exit({"check-runs": check_runs, "summary": summary}[command](*rest))
