"""Speed and memory of the registration networks: `python -m regcore.bench`.

For each backbone and size it prints one row: parameters, convolution GFLOP per forward pass
(counted from the conv layers' shapes), inference time of one registration (network + warp,
under `torch.inference_mode`), the achieved GFLOP/s and its fraction of this machine's measured
matmul GFLOP/s, the time of one training step (forward, loss with all five regularizers,
backward, gradient clipping, Adam), the regularizers' share of that step, the peak memory of
the step, and MONAI's `VoxelMorph` on the same input in the same run (vxm rows) with the
speed ratio. Every time is the median of `--repeats` runs after a warm-up.

The header names the device (CPU model and thread count, or the GPU), the precision and the
load average: the machine may be shared, so read the numbers with the load in mind.

Memory: on the CPU, the process's peak resident set size during the step (Linux `VmHWM`, reset
through /proc/self/clear_refs before the step; the process's lifetime peak if it cannot be
reset); on a GPU, `torch.cuda.max_memory_allocated`.

`--precision bf16` runs the networks under bf16 autocast (CPU; `amp` = float16 autocast on a
GPU). The displacement stays float32 (see `regcore.networks`). The Dice cost of the lower
precision is measured on a synthetic pair: the model is trained for `--dice-steps` steps in
float32, then the warped-label Dice of fp32 and bf16 inference with the same weights is
compared.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from regcore.cli import run_cli
from regcore.config import Config
from regcore.networks import build_model, count_parameters
from regcore.runtime import (autocast, configure_device, median_seconds, resolve_device,
                             synchronize, to_float32)

__all__ = ["BenchRow", "bench_backbone", "conv_flops", "matmul_gflops", "device_name", "main",
           "COLUMNS"]

#: the printed table's columns, in order
COLUMNS = ("backbone", "size", "params_M", "GFLOP", "fwd_s", "GFLOP/s", "of_matmul_pct",
           "train_s", "reg_share_pct", "peak_MB", "monai_fwd_s", "monai/ours")

SMOKE_SIZES = (32,)
#: the voxel size the synthetic pairs stand for (the regularizers' magnitude threshold is in mm)
SYNTHETIC_SPACING_MM = (1.0, 1.0, 1.0)


@dataclass
class BenchRow:
    backbone: str
    size: int
    params_m: float
    gflop: float
    fwd_s: float
    train_s: float
    reg_share_pct: float
    peak_mb: float
    monai_fwd_s: float | None
    monai_note: str = ""

    def cells(self, matmul: float) -> list[str]:
        achieved = self.gflop / self.fwd_s
        monai = f"{self.monai_fwd_s:.3f}" if self.monai_fwd_s is not None else self.monai_note
        ratio = (f"{self.monai_fwd_s / self.fwd_s:.2f}x" if self.monai_fwd_s is not None else "-")
        return [self.backbone, f"{self.size}^3", f"{self.params_m:.2f}", f"{self.gflop:.1f}",
                f"{self.fwd_s:.3f}", f"{achieved:.0f}", f"{100 * achieved / matmul:.0f}",
                f"{self.train_s:.3f}", f"{self.reg_share_pct:.1f}", f"{self.peak_mb:.0f}", monai,
                ratio]


# -- machine ----------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    """'AMD EPYC ..., 2 threads' or the GPU's name."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    model = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    return f"{model}, {torch.get_num_threads()} threads"


def matmul_gflops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048,
                  repeats: int = 3) -> float:
    """This machine's measured matrix-product speed (best of `repeats`), GFLOP/s."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


# -- FLOPs ------------------------------------------------------------------------------------
def conv_flops(model: torch.nn.Module, moving: torch.Tensor, fixed: torch.Tensor) -> float:
    """FLOPs (2 x multiply-adds) of every convolution executed in one forward pass.

    Counted from the shapes of each convolution op that actually runs (`aten.convolution`,
    `aten.mkldnn_convolution`, `aten.conv3d`, `aten.conv_transpose3d`, seen through a dispatch
    mode): a conv makes (C_in / groups) x k^3 multiply-adds per output element; a transposed
    conv (C_out / groups) x k^3 per input element. So the count is what the model computes (e.g. the fused upsample-conv of
    `regcore.networks` counts its cheaper coarse conv), not a nominal layer count. Other ops
    (pooling, norms, warps) are a few FLOPs per voxel and left out.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    # op -> transposed? (None: read the `transposed` argument of aten.convolution)
    conv_ops = {aten.convolution.default: None, aten.mkldnn_convolution.default: False,
                aten.conv3d.default: False, aten.conv3d.padding: False,
                aten.conv_transpose3d.input: True}

    class _ConvCounter(TorchDispatchMode):
        flops = 0.0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in conv_ops:
                x, weight = args[0], args[1]
                transposed = conv_ops[func]
                if transposed is None:
                    transposed = bool(args[6])
                taps = weight[0, 0].numel()  # prod(kernel)
                if transposed:  # weight (C_in, C_out / groups, k...)
                    self.flops += 2.0 * x.numel() * weight.shape[1] * taps
                else:  # weight (C_out, C_in / groups, k...)
                    self.flops += 2.0 * out.numel() * weight.shape[1] * taps
            return out

    counter = _ConvCounter()
    with torch.inference_mode(), counter:
        model(moving, fixed)
    return counter.flops


# -- memory -----------------------------------------------------------------------------------
def _release_freed_memory() -> None:
    """Give freed heap memory back to the OS so the next peak is the step's own."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    with contextlib.suppress(OSError):
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def measure_peak_mb(fn: Callable[[], object], device: torch.device) -> tuple[float, str]:
    """(peak memory in MB while `fn` runs, how it was measured)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2 ** 20, "cuda max_memory_allocated"
    _release_freed_memory()
    fresh = _reset_peak_rss()
    fn()
    how = "process peak RSS during the step" if fresh else "process lifetime peak RSS"
    return _peak_rss_mb(), how


# -- precision --------------------------------------------------------------------------------
def _cpu_has_fast_bf16() -> bool:
    with contextlib.suppress(AttributeError, RuntimeError):
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


# -- inputs -----------------------------------------------------------------------------------
def synthetic_pair(size: int, channels: int = 5, seed: int = 0, amplitude_vox: float = 2.0,
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor,
                                                               torch.Tensor, torch.Tensor]:
    """(moving one-hot, fixed one-hot, moving labels, fixed labels) on a size^3 grid.

    Labels 0..channels-1 are the quantile bands of a smooth random field; the fixed labels are
    the moving labels warped (nearest) by a smooth random displacement of `amplitude_vox`
    voxels, so a good registration exists and Dice measures it.
    """
    from regcore.spatial import warp

    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 1, 6, 6, 6, generator=gen)
    field = F.interpolate(coarse, size=(size,) * 3, mode="trilinear", align_corners=True)
    edges = torch.quantile(field.flatten()[:: max(1, field.numel() // 100000)],
                           torch.linspace(0, 1, channels + 1)[1:-1])
    moving_labels = torch.bucketize(field[:, 0], edges)  # (1, D, H, W) in 0..channels-1
    coarse_ddf = torch.randn(1, 3, 5, 5, 5, generator=gen)
    ddf = amplitude_vox * F.interpolate(coarse_ddf, size=(size,) * 3, mode="trilinear",
                                        align_corners=True)
    fixed_labels = warp(moving_labels, ddf, mode="nearest")

    def one_hot(labels: torch.Tensor) -> torch.Tensor:
        return F.one_hot(labels, channels).permute(0, 4, 1, 2, 3).float().to(device)

    return (one_hot(moving_labels), one_hot(fixed_labels), moving_labels.to(device),
            fixed_labels.to(device))


def _random_pair(size: int, channels: int, device: torch.device):
    moving, fixed, _, _ = synthetic_pair(size, channels, device=device)
    return moving, fixed


# -- one backbone at one size -----------------------------------------------------------------
def _loss_config(backbone: str, size: int, affine: bool, diffeomorphic: bool) -> Config:
    variant = "combined_enhanced" if affine else "regloss"  # the regularizers are on
    return Config(variant=variant).with_overrides({
        "model.backbone": backbone, "model.diffeomorphic": diffeomorphic,
        "data.shape": [size, size, size]})


def _monai_voxelmorph(in_channels: int, diffeomorphic: bool, int_steps: int):
    """MONAI's VoxelMorph with its default U-Net widths, for the same input channels and the
    same integration setting as ours (0 steps = a plain displacement)."""
    from monai.networks.nets import VoxelMorph, VoxelMorphUNet

    unet = VoxelMorphUNet(spatial_dims=3, in_channels=2 * in_channels, unet_out_channels=32,
                          channels=(16, 32, 32, 32, 32, 32), final_conv_channels=(16, 16))
    return VoxelMorph(backbone=unet, integration_steps=int_steps if diffeomorphic else 0)


def bench_backbone(backbone: str, size: int, *, device: torch.device, precision: str = "fp32",
                   channels: int = 5, affine: bool = False, diffeomorphic: bool = False,
                   repeats: int = 3, warmup: int = 1, monai: bool = True) -> tuple[BenchRow, str]:
    """Measure one backbone at size^3; returns the row and how memory was measured."""
    torch.manual_seed(0)
    config = _loss_config(backbone, size, affine, diffeomorphic)
    model = build_model(config.model, channels, affine=affine).to(device)
    moving, fixed = _random_pair(size, channels, device)
    flops = conv_flops(model, moving, fixed)

    model.eval()

    def infer():
        with autocast(precision, device):
            return model.register(moving, fixed)

    fwd_s = median_seconds(infer, repeats, device, warmup)

    from regcore.losses import compute_loss
    from regcore.regularizers import regularizer_terms

    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        with autocast(precision, device):
            output = model(moving, fixed)
        loss = compute_loss(to_float32(output), fixed, config, 0, 1,
                            spacing_mm=SYNTHETIC_SPACING_MM)
        loss.total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
        optimizer.step()

    # the first step is measured for memory (it allocates Adam's state, which then stays) and
    # serves as (part of) the warm-up
    peak_mb, memory_how = measure_peak_mb(train_step, device)
    train_s = median_seconds(train_step, repeats, device, max(warmup - 1, 0))

    # the regularizers' cost inside a step: all five, forward and backward, on a field of the
    # step's size (the loss config's weights; the step above computes exactly these)
    ddf = (0.5 * torch.randn(1, 3, size, size, size, device=device)).requires_grad_()

    def regularizers():
        terms = regularizer_terms(ddf, SYNTHETIC_SPACING_MM, config.loss.max_displacement_mm)
        sum(terms.values()).backward()

    reg_s = median_seconds(regularizers, repeats, device, 1)

    monai_s, note = None, ""
    if monai and backbone == "vxm":
        try:
            peer = _monai_voxelmorph(channels, diffeomorphic, config.model.int_steps).to(device)
        except ImportError:
            note = "monai not installed"
        else:
            peer.eval()

            def infer_monai():
                with torch.inference_mode(), autocast(precision, device):
                    return peer(moving, fixed)

            monai_s = median_seconds(infer_monai, repeats, device, warmup)
    elif backbone != "vxm":
        note = "-"
    else:
        note = "skipped"
    row = BenchRow(backbone=backbone, size=size, params_m=count_parameters(model) / 1e6,
                   gflop=flops / 1e9, fwd_s=fwd_s, train_s=train_s,
                   reg_share_pct=100.0 * reg_s / train_s, peak_mb=peak_mb,
                   monai_fwd_s=monai_s, monai_note=note)
    return row, memory_how


# -- the Dice cost of lower precision ---------------------------------------------------------
def _dice_mean(warped: torch.Tensor, fixed: torch.Tensor, labels: int) -> float:
    scores = []
    for label in range(1, labels):
        a, b = warped == label, fixed == label
        size = int(a.sum()) + int(b.sum())
        if size:
            scores.append(2.0 * int((a & b).sum()) / size)
    return float(sum(scores) / len(scores))


def precision_dice_change(backbone: str, size: int, steps: int, precision: str,
                          device: torch.device, channels: int = 5) -> dict[str, float]:
    """Train `steps` fp32 steps on a synthetic pair, then compare warped-label Dice of fp32
    and `precision` inference with the same weights."""
    from regcore.losses import compute_loss
    from regcore.spatial import warp

    torch.manual_seed(0)
    moving, fixed, moving_labels, fixed_labels = synthetic_pair(size, channels, device=device)
    config = _loss_config(backbone, size, False, False)
    model = build_model(config.model, channels, affine=False).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        compute_loss(model(moving, fixed), fixed, config, 0, 1,
                     spacing_mm=SYNTHETIC_SPACING_MM).total.backward()
        optimizer.step()
    model.eval()
    result = {"dice_before": _dice_mean(moving_labels, fixed_labels, channels)}
    for name in ("fp32", precision):
        with autocast(name, device):
            output = model.register(moving, fixed)
        warped = warp(moving_labels, output.total_ddf_vox.float(), mode="nearest")
        result[f"dice_{name}"] = _dice_mean(warped, fixed_labels, channels)
    return result


# -- command ----------------------------------------------------------------------------------
def _load_average() -> str:
    with contextlib.suppress(OSError):
        return ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return "unknown"


def format_table(rows: Sequence[BenchRow], matmul: float) -> str:
    cells = [list(COLUMNS)] + [row.cells(matmul) for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m regcore.bench", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["vxm", "seed"],
                        choices=["vxm", "seed"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[64, 128],
                        help="cubic volume sizes (multiples of 16)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measure (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--precision", choices=["fp32", "bf16", "amp"], default=None,
                        help="fp32 (CPU default), bf16 autocast, amp = float16 autocast "
                             "(CUDA default)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = all available)")
    parser.add_argument("--channels", type=int, default=5,
                        help="channels per image (5 = one-hot seg4, 1 = intensity)")
    parser.add_argument("--affine", action="store_true", help="include the affine stage")
    parser.add_argument("--diffeomorphic", action="store_true",
                        help="integrate a velocity (7 squarings; MONAI likewise)")
    parser.add_argument("--no-monai", action="store_true", help="skip MONAI's VoxelMorph")
    parser.add_argument("--dice-steps", type=int, default=60,
                        help="fp32 training steps before the lower-precision Dice check")
    parser.add_argument("--dice-size", type=int, default=32)
    parser.add_argument("--smoke", action="store_true",
                        help=f"tiny run for tests: sizes {SMOKE_SIZES}, 1 repeat, no warm-up, "
                             "3 Dice steps")
    return parser


def _check_args(args: argparse.Namespace) -> torch.device:
    for size in args.sizes:
        if size < 16 or size % 16:
            raise ValueError(f"--sizes {size}: must be a multiple of 16 and >= 16 (the U-Nets "
                             "pool 4 times)")
    for name in ("repeats", "dice_steps", "channels"):
        value = getattr(args, name)
        if value < (0 if name == "dice_steps" else 1):
            raise ValueError(f"--{name.replace('_', '-')} == {value}, must be "
                             f"{'>= 0' if name == 'dice_steps' else '>= 1'}")
    if args.warmup < 0 or args.threads < 0:
        raise ValueError(f"--warmup == {args.warmup} and --threads == {args.threads} must be >= 0")
    if args.dice_size < 16 or args.dice_size % 16:
        raise ValueError(f"--dice-size {args.dice_size}: must be a multiple of 16 and >= 16")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but no CUDA device is available")
    device = resolve_device(args.device)
    if args.precision is None:
        args.precision = "amp" if device.type == "cuda" else "fp32"
    if args.precision == "amp" and device.type != "cuda":
        raise ValueError("--precision amp needs a CUDA device; use bf16 or fp32 on a CPU")
    return device


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.smoke:
        args.sizes, args.repeats, args.warmup, args.dice_steps = list(SMOKE_SIZES), 1, 0, 3
        args.dice_size = 32
    device = _check_args(args)
    configure_device(device, args.threads)
    matmul = matmul_gflops(device)
    print(f"device: {device_name(device)}; torch {torch.__version__}; precision {args.precision}")
    print(f"load average before: {_load_average()}")
    print(f"matmul fp32: {matmul:.0f} GFLOP/s (2048^2, best of 3)")
    if args.precision == "bf16" and device.type == "cpu" and not _cpu_has_fast_bf16():
        print("note: this CPU has no native bf16 kernels (oneDNN needs AVX-512 BF16/BW or "
              "AVX-NE-CONVERT); bf16 autocast falls back to PyTorch's reference convolution "
              "and is much slower than fp32 here")
    print(f"input: {args.channels} channels per image; affine stage "
          f"{'on' if args.affine else 'off'}; diffeomorphic {'on' if args.diffeomorphic else 'off'}"
          f"; median of {args.repeats} after {args.warmup} warm-up")
    monai_wanted = not args.no_monai
    rows, memory_how = [], ""
    for backbone in args.backbones:
        for size in args.sizes:
            print(f"measuring {backbone} at {size}^3 ...", file=sys.stderr, flush=True)
            row, memory_how = bench_backbone(
                backbone, size, device=device, precision=args.precision, channels=args.channels,
                affine=args.affine, diffeomorphic=args.diffeomorphic, repeats=args.repeats,
                warmup=args.warmup, monai=monai_wanted)
            rows.append(row)
    print()
    print(format_table(rows, matmul))
    print()
    print("fwd_s: one registration (network + warp), inference mode; train_s: forward, loss "
          "with the five regularizers, backward, clipping, Adam; reg_share_pct: the five "
          "regularizers (forward + backward) as a share of train_s; GFLOP: conv layers of one "
          f"forward; peak_MB: {memory_how}.")
    if args.precision != "fp32" and args.dice_steps > 0:
        dice = precision_dice_change(args.backbones[0], args.dice_size, args.dice_steps,
                                     args.precision, device, args.channels)
        change = dice[f"dice_{args.precision}"] - dice["dice_fp32"]
        print(f"dice check ({args.backbones[0]}, {args.dice_size}^3 synthetic pair, "
              f"{args.dice_steps} fp32 training steps): before {dice['dice_before']:.4f}, "
              f"fp32 {dice['dice_fp32']:.4f}, {args.precision} "
              f"{dice[f'dice_{args.precision}']:.4f}, change {change:+.4f}")
    print(f"load average after: {_load_average()}")
    return 0


if __name__ == "__main__":
    run_cli(main, prog="regcore.bench")
