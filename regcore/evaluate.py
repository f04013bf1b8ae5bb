"""Register and score pairs: the per-epoch validation and the final test evaluation.

- `PairData`: the cohort of a config as model-ready tensors (volumes cached after first load).
- `validate(...)`: `val.dice_mean` and `val.folding_pct` on `train.val_pairs` validation pairs
  (empty dict when the split has no validation pairs).
- `evaluate_test(...)`: every test pair registered and scored with `metrics.evaluate_pair`;
  writes `out_dir/per_pair.csv` (one row per test pair, the columns of docs/ARCHITECTURE.md plus
  `device` and `similarity_on`) and `out_dir/example.npz` (the first test pair).

Labels are warped with nearest neighbour by the total displacement (affine and dense field
composed, one resampling). MSE/NCC are computed on intensity images whenever the data has them
(also for models trained on one-hot label maps); otherwise on the one-hot maps; the column
`similarity_on` says which (`intensity` or `onehot`).

Inference time is measured honestly: one warm-up forward pass, then the median over
`train.eval_repeats` timed passes per pair, each under `torch.inference_mode`, with a device
synchronisation before the clock stops; the device is named in the `device` column.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from regcore.config import Config
from regcore.runtime import infer, median_seconds

__all__ = ["PairData", "validate", "evaluate_test", "TestResult", "timed_forward",
           "warp_labels", "score_pair", "refine_output"]


class PairData:
    """The pairs of one config's data split (the data layer's `PairDataset`s) as batches on the
    training device. Volumes are cached by the cohort's bounded LRU cache, not here."""

    def __init__(self, cohort: Any, config: Config, device: torch.device):
        from regcore.data import PairDataset

        self.cohort = cohort
        self.config = config
        self.device = device
        self.in_channels = 5 if config.data.modality == "seg4_onehot" else 1
        self.sets = {split: PairDataset(cohort, split) for split in ("train", "val", "test")}
        self.train_pairs = list(self.sets["train"].pairs)
        self.val_pairs = list(self.sets["val"].pairs)
        self.test_pairs = list(self.sets["test"].pairs)

    @classmethod
    def from_config(cls, config: Config, device: torch.device) -> "PairData":
        from regcore.data import load_cohort

        return cls(load_cohort(config.data), config, device)

    def train_subjects(self) -> list[str]:
        """The subjects of the training pairs (the atlas included), sorted."""
        return sorted({s for pair in self.train_pairs for s in pair})

    def subject_channels(self, subject_id: str) -> torch.Tensor:
        """(C, D, H, W) float32 model input of one subject (one-hot seg4 or its intensity)."""
        from regcore.data.volume import one_hot

        volume = self.cohort.load(subject_id)
        array = one_hot(volume.seg4) if self.in_channels == 5 else volume.image
        return torch.from_numpy(np.ascontiguousarray(array, np.float32))

    def item(self, split: str, index: int) -> dict:
        return self.sets[split][index]

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor

    def batch(self, split: str, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(moving, fixed), each (B, C, D, H, W) float32 on the device."""
        return self.collate([self.sets[split][i] for i in indices])

    def spacing_mm(self, split: str, indices: Sequence[int]) -> torch.Tensor:
        """(B, 3) float32 voxel sizes in mm of the fixed images of those pairs, on the device
        (read from the cohort's cached volumes, without building the items)."""
        pairs = self.sets[split].pairs
        rows = [np.asarray(self.cohort.load(pairs[i][1]).spacing_mm, dtype=np.float32)
                for i in indices]
        return torch.from_numpy(np.stack(rows)).to(self.device)

    def collate(self, items: Sequence[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        moving = torch.stack([item["moving"] for item in items])
        fixed = torch.stack([item["fixed"] for item in items])
        return self.to_device(moving), self.to_device(fixed)


def timed_forward(model: torch.nn.Module, moving: torch.Tensor, fixed: torch.Tensor,
                  config: Config, device: torch.device, repeats: int) -> tuple[Any, float]:
    """The model's output and the median wall time in seconds of `repeats` forward passes
    (after the caller's warm-up), each ending with a device synchronisation."""
    outputs = []

    def forward() -> None:
        outputs[:] = [infer(model, moving, fixed, config.train.precision, device)]

    seconds = median_seconds(forward, repeats, device, warmup=0)
    return outputs[0], seconds


def warp_labels(seg: torch.Tensor, ddf_vox: torch.Tensor) -> torch.Tensor:
    """(B, D, H, W) integer labels warped with nearest neighbour by (B, 3, D, H, W) voxels."""
    from regcore.spatial import warp

    return warp(seg.long(), ddf_vox.float(), mode="nearest")


def validate(model: torch.nn.Module, data: PairData, config: Config,
             device: torch.device) -> dict[str, float]:
    """`val.dice_mean` and `val.folding_pct` (means over the validation pairs), or {}."""
    from regcore.metrics import dice_per_label, folding_pct

    n = len(data.val_pairs)
    if config.train.val_pairs:
        n = min(n, config.train.val_pairs)
    if n == 0:
        return {}
    was_training = model.training
    model.eval()
    dice, folding = [], []
    for index in range(n):
        item = data.item("val", index)
        moving, fixed = data.collate([item])
        output = infer(model, moving, fixed, config.train.precision, device)
        ddf = output.total_ddf_vox.float()
        warped = warp_labels(item["moving_seg"][None].to(device), ddf)[0].cpu()
        dice.append(float(np.nanmean(list(dice_per_label(warped, item["fixed_seg"]).values()))))
        folding.append(float(folding_pct(ddf)))
    model.train(was_training)
    return {"val.dice_mean": float(np.mean(dice)), "val.folding_pct": float(np.mean(folding))}


@dataclass
class TestResult:
    table: Any  # pandas.DataFrame
    table_path: Path
    example_path: Path | None
    means: dict[str, float]


def _intensity(volume: Any) -> np.ndarray | None:
    return None if volume.image is None else np.asarray(volume.image, dtype=np.float32)[0]


def evaluate_test(model: torch.nn.Module, data: PairData, config: Config, device: torch.device,
                  out_dir: str | Path) -> TestResult:
    """Register and score every test pair; write per_pair.csv and example.npz to `out_dir`."""
    import pandas as pd

    from regcore.io import atomic_open
    from regcore.spatial import jacobian_det

    out_dir = Path(out_dir)
    model.eval()
    rows = []
    example_path = None
    refine = config.model.refine_steps
    for index, (moving_id, fixed_id) in enumerate(data.test_pairs):
        item = data.item("test", index)
        moving_in, fixed_in = data.collate([item])
        if index == 0:  # one untimed pass: allocator, cudnn autotuning, lazy initialisation
            infer(model, moving_in, fixed_in, config.train.precision, device)
        output, seconds = timed_forward(model, moving_in, fixed_in, config, device,
                                        config.train.eval_repeats)
        ddf = output.total_ddf_vox.float()  # (1, 3, D, H, W) voxels
        if refine:  # instance optimisation from the network's field; its time is the method's
            ddf, refine_s = refine_output(output, moving_in, fixed_in, config,
                                          item["spacing_mm"].double().tolist())
            seconds += refine_s
        row, extra = score_pair(data, "test", index, ddf, device)
        row["inference_s"] = seconds
        rows.append(row)
        if index == 0:
            example_path = out_dir / "example.npz"
            jac = jacobian_det(ddf)[0].cpu().numpy()
            with atomic_open(example_path, "wb") as handle:
                np.savez_compressed(handle, **extra, ddf_vox=ddf[0].cpu().numpy().astype(np.float32),
                                    jacdet=jac.astype(np.float32))
    table = pd.DataFrame(rows)
    table_path = out_dir / "per_pair.csv"
    with atomic_open(table_path, "w", encoding="utf-8", newline="") as handle:
        table.to_csv(handle, index=False)
    numeric = table.drop(columns=["moving", "fixed", "device", "similarity_on"]).apply(
        pd.to_numeric, errors="coerce")
    means = {column: float(numeric[column].mean()) for column in numeric.columns}
    return TestResult(table=table, table_path=table_path, example_path=example_path, means=means)


def refine_output(output: Any, moving: torch.Tensor, fixed: torch.Tensor,
                  config: Config, spacing_mm=(1.0, 1.0, 1.0)) -> tuple[torch.Tensor, float]:
    """(total field, seconds) of `config.model.refine_steps` steps of instance optimisation
    started from a network's output (its dense field or velocity; its affine kept fixed)."""
    from regcore.instance import optimise_pair

    # a velocity describes the whole field only for one pass; a cascade's composed field is
    # refined as a displacement
    by_velocity = config.model.diffeomorphic and config.model.passes == 1
    start = output.velocity_vox if by_velocity else output.dense_ddf_vox
    theta = output.theta if config.affine else None
    if config.model.diffeomorphic and not by_velocity:
        config = config.with_overrides({"model.diffeomorphic": False})
    with torch.inference_mode(False), torch.enable_grad():
        result = optimise_pair(moving.clone(), fixed.clone(), config,
                               steps=config.model.refine_steps, init=start.float().clone(),
                               theta=None if theta is None else theta.float().clone(),
                               spacing_mm=spacing_mm)
    return result.total_ddf_vox, result.seconds


def score_pair(data: PairData, split: str, index: int, ddf: torch.Tensor,
               device: torch.device) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The per_pair.csv row of pair `index` of `split` registered by `ddf` (1, 3, D, H, W)
    voxels (without `inference_s`), and the arrays of its example.npz (without the field)."""
    from regcore.metrics import evaluate_pair
    from regcore.spatial import warp

    moving_id, fixed_id = data.sets[split].pairs[index]
    item = data.item(split, index)
    ddf = ddf.float().to(device)
    warped_seg = warp_labels(item["moving_seg"][None].to(device), ddf)[0].cpu().numpy()
    im_m = _intensity(data.cohort.load(moving_id))
    im_f = _intensity(data.cohort.load(fixed_id))
    if im_m is not None and im_f is not None:
        similarity_on = "intensity"
        moving_sim, fixed_sim = im_m[None], im_f[None]  # (1, D, H, W)
    else:
        similarity_on = "onehot"
        moving_sim, fixed_sim = item["moving"].numpy(), item["fixed"].numpy()
    with torch.inference_mode():
        warped_sim = warp(torch.from_numpy(moving_sim)[None].to(device), ddf)[0].cpu().numpy()
    spacing_mm = item["spacing_mm"].double().numpy()
    true_ddf = item["true_ddf_vox"].numpy() if item["has_true_ddf"] else None
    row: dict[str, Any] = {"moving": moving_id, "fixed": fixed_id}
    row.update(evaluate_pair(
        moving_seg=item["moving_seg"].numpy(), fixed_seg=item["fixed_seg"].numpy(),
        warped_seg=warped_seg, ddf_vox=ddf[0].cpu().numpy(), spacing_mm=spacing_mm,
        moving_image=moving_sim, fixed_image=fixed_sim, warped_image=warped_sim,
        true_ddf_vox=true_ddf, inference_s=0.0))
    row["device"] = _device_name(device)
    row["similarity_on"] = similarity_on
    if similarity_on == "intensity":
        images = (im_f, im_m, warped_sim[0])
    else:  # label maps as integers
        images = (item["fixed_seg"].numpy(), item["moving_seg"].numpy(), warped_seg)
    extra = {"fixed": images[0], "moving": images[1], "warped": images[2],
             "fixed_seg": item["fixed_seg"].numpy(), "warped_seg": warped_seg,
             "spacing_mm": spacing_mm}
    return row, extra


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{torch.get_num_threads()}threads"
