"""Runs whose worker process was killed: detected, marked failed, their pool slots given back.

Dagster's local run launcher cannot tell whether a run's process is still
alive, so a run killed by ``kill -9``, the OOM killer or a laptop's lid stays
``STARTED`` forever and keeps the ``warehouse`` pool slot it held: every later
run of every partition then waits on "Step blocked by limit for pool
warehouse". :class:`LocalRunLauncher` is Dagster's default launcher that can:
its run worker's pid is the first one the run's own event log records
(Dagster's "Started process for run (pid: N)", or the multiprocess executor's
parent process for a run executed in-process, like ``make demo``'s), and
the run is dead when that process is gone (or the pid now belongs to a
process younger than the run).

Two ways use it, on one machine (where the embedded default runs):

- the daemon of ``make ui`` (``dagster dev``): the instance enables Dagster's
  run monitoring, which asks this launcher about every ``STARTED`` run, marks
  the dead ones failed and frees the slots of ended runs
  (``orchestration/instance/local.yaml``);
- ``make demo`` and ``make recover`` (``python -m orchestration.recovery``),
  without a daemon: :func:`recover_dead_runs` does the same once.

Production needs none of this: the Kubernetes run launcher checks its Jobs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Self

import psutil
from dagster import DagsterEventType, DagsterInstance, DagsterRun, DagsterRunStatus, RunsFilter
from dagster._core.launcher import CheckRunHealthResult, WorkerStatus
from dagster._core.launcher.default_run_launcher import DefaultRunLauncher
from dagster._serdes import ConfigurableClassData

# How much earlier than the run the process may have started and still be its worker: the run's
# start is stamped by the worker after it started (a run launched in-process: by that process).
_START_SLACK_S = 1.0
# Runs that will not release their pool slots themselves any more.
_ENDED = (DagsterRunStatus.FAILURE, DagsterRunStatus.SUCCESS, DagsterRunStatus.CANCELED)


def run_worker_pid(instance: DagsterInstance, run_id: str) -> int | None:
    """The pid of the process executing ``run_id``: the first one its event log records."""
    for record in instance.get_records_for_run(run_id, of_type=DagsterEventType.ENGINE_EVENT, limit=20).records:
        event = record.event_log_entry.dagster_event
        meta = event.engine_event_data.metadata if event and event.engine_event_data else {}
        if "pid" in meta:
            return int(meta["pid"].value)
    return None


def worker_health(instance: DagsterInstance, run: DagsterRun) -> CheckRunHealthResult:
    """RUNNING unless the run's worker process is known and gone.

    Without a recorded pid (a run that is just starting) the answer is RUNNING:
    Dagster's monitoring fails a run on anything else.
    """
    pid = run_worker_pid(instance, run.run_id)
    if pid is None:
        return CheckRunHealthResult(WorkerStatus.RUNNING, "no run worker pid recorded yet")
    record = instance.get_run_record_by_id(run.run_id)
    started = (record.start_time or record.create_timestamp.timestamp()) if record else 0.0
    try:
        proc = psutil.Process(pid)
        alive = proc.status() != psutil.STATUS_ZOMBIE and proc.create_time() <= started + _START_SLACK_S
    except psutil.NoSuchProcess:
        alive = False
    if alive:
        return CheckRunHealthResult(WorkerStatus.RUNNING, f"run worker pid {pid} is alive", run_worker_id=str(pid))
    return CheckRunHealthResult(
        WorkerStatus.FAILED,
        f"the run worker process (pid {pid}) of run {run.run_id} is gone: killed, or its machine restarted",
        run_worker_id=str(pid),
    )


class LocalRunLauncher(DefaultRunLauncher):
    """Dagster's default launcher, able to tell its run monitoring that a run's process died."""

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData, config_value: Mapping[str, Any]) -> Self:
        return cls(inst_data=inst_data)

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        return worker_health(self._instance, run)


def recover_dead_runs(instance: DagsterInstance, log=print) -> list[str]:
    """Mark failed every started run whose worker is gone and free the pool slots it held; returns their ids.

    Also frees the slots still held by runs that ended (Dagster's daemon does it
    after ``free_slots_after_run_end_seconds``; without a daemon nobody would).
    """
    recovered = []
    storage = instance.event_log_storage
    for run in instance.get_runs(filters=RunsFilter(statuses=[DagsterRunStatus.STARTED])):
        health = worker_health(instance, run)
        if health.status != WorkerStatus.FAILED:
            continue
        instance.report_run_failed(run, f"{health.msg}; marked failed by bativision's recovery")
        recovered.append(run.run_id)
        partition = run.tags.get("dagster/partition", "unpartitioned")
        log(f"run {run.run_id} ({run.job_name}, partition {partition}): {health.msg}; marked failed")
    if storage.supports_global_concurrency_limits:
        held = storage.get_concurrency_run_ids()
        if held:
            ended = instance.get_runs(filters=RunsFilter(run_ids=list(held), statuses=list(_ENDED)))
            for run in ended:
                freed = storage.free_concurrency_slots_for_run(run.run_id)
                if freed:
                    log(f"run {run.run_id} ({run.status.value}): {freed} pool slot(s) given back")
    return recovered


def main() -> None:
    """``make recover``: one recovery pass over ``$DAGSTER_HOME``'s instance."""
    if not os.environ.get("DAGSTER_HOME"):
        raise SystemExit("DAGSTER_HOME is not set: the instance to recover is the one under it")
    with DagsterInstance.get() as instance:
        found = recover_dead_runs(instance)
        print(f"{len(found)} dead run(s) marked failed" if found else "no dead run found")


if __name__ == "__main__":
    main()
