"""Controlled timing of one trained network: inference and a training step, measured alone.

Times measured inside trials that share a machine compare the machines' load, not the
networks. `time_network` measures one checkpoint under fixed conditions: the caller runs it for
one network at a time with nothing else on the device; one warm-up pass, then the median of
`repeats` timed passes, each ending with a device synchronisation.

- inference: `model(moving, fixed)` under `torch.inference_mode` on the first test pair (the
  network, the affine stage if any, integration and the warp of the moving image);
- train step: forward, `compute_loss` with the variant's regularizers, backward and an Adam
  step, on the same pair, on a copy of the network (the checkpoint is not changed).

Knows nothing of Ray or MLflow; the sweep's driver logs the result as `timing.<name>` metrics.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from regcore.checkpoint import config_from_state, load_checkpoint
from regcore.config import Config
from regcore.runtime import median_seconds, resolve_device

__all__ = ["time_network", "TIMING_METRICS", "median_seconds"]

#: the metric names `time_network` returns (the sweep logs them as `timing.<name>`)
TIMING_METRICS = ("inference_s", "train_step_s")


def time_network(checkpoint: str | Path, *, repeats: int = 5, device: str = "auto",
                 num_threads: int = 1, config: Config | None = None) -> dict[str, float]:
    """`{"inference_s": ..., "train_step_s": ...}` of the network in `checkpoint` (a directory
    or its state.pt), on `device` ("auto": CUDA when present) with `num_threads` CPU threads.

    `config` overrides the checkpoint's own (e.g. to point `data.embedded_dir` at another
    machine's copy of the cohort); the network must match the checkpoint.
    """
    from regcore.evaluate import PairData
    from regcore.losses import compute_loss
    from regcore.networks import build_model

    state = load_checkpoint(checkpoint)
    config = config or config_from_state(state)
    target = resolve_device(device)
    if target.type == "cpu":
        torch.set_num_threads(max(1, int(num_threads)))
    data = PairData.from_config(config, target)
    if not data.test_pairs:
        raise ValueError("the data split has no test pairs to time the network on")
    moving, fixed = data.batch("test", [0])
    spacing_mm = data.spacing_mm("test", [0])
    model = build_model(config.model, data.in_channels, affine=config.affine).to(target)
    model.load_state_dict(state["model"])
    model.eval()

    def infer() -> None:
        with torch.inference_mode():
            model(moving, fixed)

    trainee = copy.deepcopy(model).train()
    optimizer = torch.optim.Adam(trainee.parameters(), lr=config.lr)
    epochs = config.train.epochs

    def step() -> None:
        output = trainee(moving, fixed)
        loss = compute_loss(output, fixed, config, epochs - 1, epochs,
                            spacing_mm=spacing_mm).total
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return {"inference_s": median_seconds(infer, repeats, target),
            "train_step_s": median_seconds(step, repeats, target)}
