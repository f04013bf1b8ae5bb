"""regcore.runtime.available_cpus: the CPUs a process may use, on Linux and where the OS has
no affinity mask (macOS)."""

from __future__ import annotations

import os

import pytest

from regcore import runtime


def test_available_cpus_follows_the_affinity_mask():
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no affinity mask on this OS")
    assert runtime.available_cpus() == len(os.sched_getaffinity(0)) >= 1


def test_available_cpus_without_an_affinity_mask(monkeypatch):
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert runtime.available_cpus() == 6
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # unknown: one
    assert runtime.available_cpus() == 1
