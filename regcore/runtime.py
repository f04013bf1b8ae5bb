"""Where and how a network runs: device, threads, precision, synchronisation, timing, inference.

One home for what train, evaluate, register, timing and bench all need, so that none of them
borrows another's helpers. Knows nothing of losses, data or Ray.

- `select_device(config)`: `train.device` (auto = CUDA when present), checked against
  `train.precision`; `configure_device(device, num_threads)`: cuDNN autotuning or CPU threads;
  `available_cpus()`: the CPUs this process may run on.
- `autocast(precision, device)`: "fp32" (no autocast), "bf16" or "amp" (float16, CUDA).
- `to_float32(output)`: every floating tensor of a model output in float32 (losses and metrics
  run outside autocast).
- `infer(model, moving, fixed, precision, device)`: one forward pass for evaluation.
- `synchronize(device)`, `median_seconds(fn, repeats, device, warmup)`: honest wall times.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import statistics
import time
from typing import Any, Callable

import numpy as np
import torch

from regcore.config import Config

__all__ = ["resolve_device", "select_device", "configure_device", "seed_everything", "autocast",
           "to_float32", "infer", "synchronize", "median_seconds"]


# -- device ------------------------------------------------------------------------------------
def resolve_device(wanted: str) -> torch.device:
    """"auto" = CUDA when present, else CPU; "cpu" and "cuda" as named."""
    use_cuda = wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if use_cuda else "cpu")


def select_device(config: Config) -> torch.device:
    """`train.device` resolved; ValueError when CUDA is asked for and absent, or when
    `train.precision == "amp"` would run on a CPU."""
    wanted = config.train.device
    if wanted == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device == 'cuda', but no CUDA device is available; use auto or cpu")
    device = resolve_device(wanted)
    if config.train.precision == "amp" and device.type != "cuda":
        raise ValueError(f"train.precision == 'amp' needs a CUDA device, the device is "
                         f"{device.type}; use bf16 or fp32 on a CPU")
    return device


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one, as on Linux;
    else every CPU, as on macOS)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def configure_device(device: torch.device, num_threads: int = 0) -> None:
    """cuDNN autotuning on CUDA; on the CPU `num_threads` torch threads (0 = every CPU this
    process may run on)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    else:
        torch.set_num_threads(max(1, num_threads or available_cpus()))


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's global RNGs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# -- precision ---------------------------------------------------------------------------------
def autocast(precision: str, device: torch.device):
    """The autocast context of `precision`: fp32 none, bf16 bfloat16, amp float16 (CUDA)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "amp":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def to_float32(output: Any) -> Any:
    """`output` (a dataclass, a named tuple or a tensor's holder) with every floating tensor in
    float32; anything else is returned as it is."""
    def cast(value: Any) -> Any:
        if torch.is_tensor(value) and value.is_floating_point() and value.dtype != torch.float32:
            return value.float()
        return value
    if dataclasses.is_dataclass(output):
        return dataclasses.replace(output, **{f.name: cast(getattr(output, f.name))
                                              for f in dataclasses.fields(output) if f.init})
    if hasattr(output, "_replace"):
        return output._replace(**{k: cast(v) for k, v in output._asdict().items()})
    return output


def infer(model: torch.nn.Module, moving: torch.Tensor, fixed: torch.Tensor, precision: str,
          device: torch.device) -> Any:
    """`model(moving, fixed)` under `torch.inference_mode` and `precision`, cast to float32."""
    with torch.inference_mode(), autocast(precision, device):
        return to_float32(model(moving, fixed))


# -- timing ------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], repeats: int, device: torch.device,
                   warmup: int = 1) -> float:
    """Median wall time of `repeats` calls of `fn` after `warmup` untimed calls; the device is
    synchronised before each clock start and stop."""
    if repeats < 1:
        raise ValueError(f"repeats == {repeats!r}, must be >= 1")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return float(statistics.median(times))
