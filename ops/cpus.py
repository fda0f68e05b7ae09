"""How many CPUs this process may really use: its affinity and its cgroup's CPU quota.

``os.cpu_count()`` is the node's core count. In a Kubernetes pod with ``limits.cpu: 3`` on a
16-core node, sizing the crop workers or torch's threads from it would start 16 workers that the
kernel throttles to 3 CPUs' worth of time slices (slower than 3 workers, and 16 workers' memory
against a limit sized for 3). The quota is in the cgroup: ``cpu.max`` (cgroup v2, ``"<quota>
<period>"`` or ``"max <period>"``) or ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (v1). A
fractional quota rounds down (1.5 CPUs → 1 worker, never 0): a worker never waits for CPU time
that the pod does not have.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cgroup_cpu_quota(root: Path = CGROUP_ROOT) -> float | None:
    """The CPUs' worth of time the cgroup may use per period, or None when unlimited or unknown."""
    v2 = _read(root / "cpu.max")
    if v2:
        quota, _, period = v2.partition(" ")
        if quota == "max":
            return None
        try:
            return int(quota) / int(period or 100_000)
        except ValueError:
            return None
    quota_us, period_us = _read(root / "cpu" / "cpu.cfs_quota_us"), _read(root / "cpu" / "cpu.cfs_period_us")
    if quota_us and period_us:
        try:
            q, p = int(quota_us), int(period_us)
        except ValueError:
            return None
        return q / p if q > 0 and p > 0 else None
    return None


def available_cpus(root: Path = CGROUP_ROOT) -> int:
    """CPUs this process may use: the smaller of its affinity set and its cgroup quota (at least 1)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    quota = cgroup_cpu_quota(root)
    if quota is not None:
        n = min(n, math.floor(quota))
    return max(1, n)
