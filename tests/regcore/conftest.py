"""Shared fixtures for the science tests: tiny seeded volumes, CPU only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F


def make_smooth_field(shape=(16, 16, 16), amplitude_vox=2.0, seed=0, batch=1, coarse=4,
                      dtype=torch.float64):
    """A random smooth displacement (B, 3, D, H, W): coarse Gaussian noise upsampled trilinearly."""
    gen = torch.Generator().manual_seed(seed)
    coarse_field = torch.randn(batch, 3, coarse, coarse, coarse, generator=gen, dtype=dtype)
    field = F.interpolate(coarse_field, size=tuple(shape), mode="trilinear", align_corners=True)
    return amplitude_vox * field


def linear_field(a_matrix: torch.Tensor, shape=(16, 16, 16), dtype=torch.float64):
    """u(x) = A x on the voxel grid (x in voxel indices), shape (1, 3, D, H, W)."""
    axes = [torch.arange(s, dtype=dtype) for s in shape]
    x = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)  # (3, D, H, W)
    return torch.einsum("ij,jdhw->idhw", a_matrix.to(dtype), x).unsqueeze(0)


@pytest.fixture
def smooth_field():
    return make_smooth_field


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread avoids OpenMP barrier stalls on a shared CI machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
