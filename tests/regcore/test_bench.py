"""regcore.bench: the smoke form runs end to end and prints the table; its parts measure what
they say. Behaviour only: no assertion on timing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from regcore import bench, kernels
from regcore.config import ModelConfig
from regcore.networks import build_model

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "regcore.bench", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # a subprocess that imports torch and MONAI and runs both backbones: ~20-40 s
def test_smoke_prints_the_table():
    result = _run("--smoke", "--threads", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("device: ") and "1 threads" in lines[0]
    assert any(line.startswith("load average before: ") for line in lines)
    assert any(line.startswith("matmul fp32: ") and "GFLOP/s" in line for line in lines)
    header_at = next(i for i, line in enumerate(lines) if line.split()[:2] == ["backbone", "size"])
    assert lines[header_at].split() == list(bench.COLUMNS)
    rows = [line.split() for line in lines[header_at + 2: header_at + 4]]
    assert [row[:2] for row in rows] == [["vxm", "32^3"], ["seed", "32^3"]]
    for row in rows:
        if " ".join(row[10:12]) != "monai not":
            assert len(row) == len(bench.COLUMNS)
        numbers = [float(cell) for cell in row[2:10]]  # params .. peak_MB
        assert all(value > 0 for value in numbers), row
    vxm, seed = rows
    assert 22.5 < float(seed[2]) < 22.7  # the study's U-Net, ~22.6 M parameters
    assert float(seed[3]) > float(vxm[3])  # more FLOPs
    # MONAI is a dev extra: either measured (seconds and a ratio) or said to be absent
    assert vxm[10:] == ["monai", "not", "installed", "-"] or (
        float(vxm[10]) > 0 and vxm[11].endswith("x"))
    assert seed[10:] == ["-", "-"]


def test_bad_arguments_exit_2_with_one_line():
    result = _run("--sizes", "40")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "regcore.bench: error: --sizes 40: must be a multiple of 16 and >= 16 (the U-Nets pool "
        "4 times)"]
    assert result.stdout == ""


def test_monai_absent_is_reported_not_a_crash(monkeypatch):
    monkeypatch.setitem(sys.modules, "monai", None)  # `import monai...` now raises ImportError
    monkeypatch.setitem(sys.modules, "monai.networks.nets", None)
    torch.set_num_threads(1)
    row, how = bench.bench_backbone("vxm", 16, device=torch.device("cpu"), repeats=1, warmup=0)
    assert row.monai_fwd_s is None and row.monai_note == "monai not installed"
    assert row.cells(100.0)[10:] == ["monai not installed", "-"]
    assert row.fwd_s > 0 and row.train_s > 0 and row.peak_mb > 0 and 0 < row.reg_share_pct < 100
    assert how.startswith("process")


def test_conv_flops_match_the_published_voxelmorph_count():
    # VoxelMorph default at 128^3 with one channel per image: about 156 GMAC = 312 GFLOP. With
    # the plain decoder every conv's output size scales with the volume, so the count at 16^3
    # times 8^3 is exact.
    model = build_model(ModelConfig(), 1, affine=False)
    image = torch.rand(1, 1, 16, 16, 16)
    with kernels.use(False):
        plain = bench.conv_flops(model, image, image)
    assert plain * 8 ** 3 == pytest.approx(312e9, rel=0.02)
    # the fused upsample-conv path executes fewer FLOPs for the same result
    image = torch.rand(1, 1, 32, 32, 32)
    fused = bench.conv_flops(model, image, image)
    assert fused < 0.85 * plain * 8


def test_conv_flops_hand_count():
    # a 2 -> 3 conv with k = 3 on 4^3 outputs: 2 * 4^3 * 2 * 27 FLOPs; a 3 -> 2 transposed conv
    # with k = 2 from 4^3 inputs: 2 * 4^3 * 2 * 8
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv3d(2, 3, 3, padding=1)
            self.up = torch.nn.ConvTranspose3d(3, 2, 2, stride=2)

        def forward(self, moving, fixed):
            return self.up(self.conv(moving))

    x = torch.rand(1, 2, 4, 4, 4)
    assert bench.conv_flops(Tiny(), x, x) == 2 * 64 * 3 * 2 * 27 + 2 * 64 * 2 * 3 * 8


def test_synthetic_pair_is_registrable():
    moving, fixed, moving_labels, fixed_labels = bench.synthetic_pair(16, 5)
    assert moving.shape == fixed.shape == (1, 5, 16, 16, 16)
    assert torch.equal(moving.argmax(1), moving_labels)
    assert set(moving_labels.unique().tolist()) == {0, 1, 2, 3, 4}
    before = bench._dice_mean(moving_labels, fixed_labels, 5)
    assert 0.2 < before < 0.99  # displaced, but overlapping


def test_precision_dice_change_reports_both_precisions():
    torch.set_num_threads(1)
    result = bench.precision_dice_change("vxm", 16, 2, "bf16", torch.device("cpu"))
    assert set(result) == {"dice_before", "dice_fp32", "dice_bf16"}
    assert all(0 <= value <= 1 for value in result.values())
