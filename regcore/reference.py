"""Reference rows: what a registration can reach on the test pairs of a config, with no network.

`reference_table(config)` registers every test pair of `config`'s data split three ways and
scores it exactly like `evaluate.evaluate_test` (the columns of per_pair.csv):

- `identity`: the zero field (the unregistered pair);
- `instance_optimisation`: `regcore.instance.optimise_pair` from zero, `io_steps` Adam steps
  with the config's similarity, its regularizers when it regularizes, and the diffusion term
  `model.refine_smooth_weight` at `model.refine_lr`;
- `ground_truth`: the cohort's true field, on the pairs that have one (embedded cohort, the
  atlas as moving image); absent for data without one.

Every row has `method` first and `method_s`: the seconds the method took on the pair (0 for the
identity and the truth). The sweep logs the table as `reference.csv` (analysis/runs.py).
"""

from __future__ import annotations

import torch

from regcore.config import Config

__all__ = ["reference_table", "REFERENCE_METHODS"]

REFERENCE_METHODS = ("identity", "instance_optimisation", "ground_truth")


def reference_table(config: Config, *, io_steps: int | None = None, io_levels: int | None = None,
                    max_pairs: int | None = None, device: str | torch.device = "cpu"):
    """A DataFrame: `method`, `moving`, `fixed`, the per-pair metric columns, `method_s`.

    `io_steps`, `io_levels`: steps per level and pyramid levels of the instance optimisation
    (default `instance.DEFAULT_IO_STEPS`, `DEFAULT_IO_LEVELS`);
    `max_pairs`: the first that many test pairs only (None: all).
    """
    import pandas as pd

    from regcore.evaluate import PairData, score_pair
    from regcore.instance import DEFAULT_IO_LEVELS, DEFAULT_IO_STEPS, optimise_pair

    if not isinstance(config, Config):
        raise TypeError(f"config is a {type(config).__name__}, expected regcore.config.Config")
    steps = DEFAULT_IO_STEPS if io_steps is None else io_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"io_steps == {io_steps!r}, must be an integer >= 1")
    device = torch.device(device)
    data = PairData.from_config(config, device)
    n = len(data.test_pairs) if max_pairs is None else min(max_pairs, len(data.test_pairs))
    rows = []
    for index in range(n):
        item = data.item("test", index)
        moving, fixed = data.collate([item])
        zero = torch.zeros((1, 3, *moving.shape[2:]), device=device)
        row, _ = score_pair(data, "test", index, zero, device)
        rows.append({"method": "identity", **row, "method_s": 0.0})
        result = optimise_pair(moving, fixed, config, steps=steps,
                               spacing_mm=item["spacing_mm"].double().tolist(),
                               levels=DEFAULT_IO_LEVELS if io_levels is None else io_levels)
        row, _ = score_pair(data, "test", index, result.total_ddf_vox, device)
        rows.append({"method": "instance_optimisation", **row, "method_s": result.seconds})
        if item["has_true_ddf"]:
            row, _ = score_pair(data, "test", index, item["true_ddf_vox"][None], device)
            rows.append({"method": "ground_truth", **row, "method_s": 0.0})
    table = pd.DataFrame(rows)
    return table.drop(columns=["inference_s"], errors="ignore")
