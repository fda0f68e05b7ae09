"""Workers and torch threads follow the CPUs a pod may use (its cgroup quota), not the node's cores."""

from __future__ import annotations

import os

from ops.cpus import available_cpus, cgroup_cpu_quota


def _affinity() -> int:
    return len(os.sched_getaffinity(0))


def test_cgroup_v2_quota_limits_the_cpus(tmp_path):
    (tmp_path / "cpu.max").write_text("100000 100000\n")
    assert cgroup_cpu_quota(tmp_path) == 1.0
    assert available_cpus(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs: one worker, never a throttled second
    assert available_cpus(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(tmp_path) is None
    assert available_cpus(tmp_path) == _affinity()


def test_cgroup_v1_quota_limits_the_cpus_and_a_tiny_quota_still_gives_one(tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("50000")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert cgroup_cpu_quota(tmp_path) == 0.5
    assert available_cpus(tmp_path) == 1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1")  # unlimited
    assert available_cpus(tmp_path) == _affinity()


def test_a_quota_above_the_affinity_does_not_raise_the_count(tmp_path):
    (tmp_path / "cpu.max").write_text(f"{(_affinity() + 8) * 100000} 100000")
    assert available_cpus(tmp_path) == _affinity()
    assert available_cpus(tmp_path / "missing") == _affinity()
