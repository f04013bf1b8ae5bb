"""Starting or joining Ray, and checking that the cluster can run a trial at all.

A trial that asks for a GPU on a CPU-only cluster would wait forever in Tune's queue, so the
driver compares what one trial asks for with what the nodes have before any trial starts,
and fails with one line (exit 2) instead of hanging.
"""

from __future__ import annotations

import os
import sys

from regcore.cli import UsageError

__all__ = ["start_ray", "trial_slots", "check_resources"]


def start_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Join the cluster at `address` (`auto` or `host:port`), or start a local instance.

    Without `address` a fresh local instance is started even when `RAY_ADDRESS` is set, so a
    laptop run never lands on somebody's cluster by accident.
    """
    import ray

    kwargs = dict(include_dashboard=False, log_to_driver=True,
                  configure_logging=True, logging_level="warning")
    if address:
        ray.init(address=address, **kwargs)
        return
    for attempt in (1, 2, 3):
        try:
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, **kwargs)
            return
        except Exception as error:  # Ray waits only 30 s for its raylet: a loaded machine
            if attempt == 3 or "timed out during startup" not in str(error):
                raise
            print(f"Ray did not start in time ({error}); trying once more", file=sys.stderr)
            ray.shutdown()


def _alive_nodes() -> list[dict[str, float]]:
    import ray

    return [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]


def trial_slots(nodes: list[dict[str, float]], cpus_per_trial: float,
                gpus_per_trial: float) -> int:
    """How many trials fit at once: per node, the fewer of CPU and GPU slots, summed."""
    total = 0
    for resources in nodes:
        slots = int(resources.get("CPU", 0) // cpus_per_trial) if cpus_per_trial > 0 else 10**6
        if gpus_per_trial > 0:
            slots = min(slots, int(resources.get("GPU", 0) // gpus_per_trial))
        total += slots
    return total


def check_resources(cpus_per_trial: float, gpus_per_trial: float) -> int:
    """Raise UsageError when no node can host one trial; return the number of trial slots."""
    import ray

    nodes = _alive_nodes()
    slots = trial_slots(nodes, cpus_per_trial, gpus_per_trial)
    if slots < 1:
        have = ray.cluster_resources()
        raise UsageError(
            f"no node of the Ray cluster can run a trial asking for {cpus_per_trial:g} CPU and "
            f"{gpus_per_trial:g} GPU (--cpus-per-trial/--gpus-per-trial); the cluster has "
            f"{have.get('CPU', 0):g} CPU and {have.get('GPU', 0):g} GPU in {len(nodes)} node(s)")
    return slots
