"""A killed run does not block the runs after it; two first runs share a fresh DAGSTER_HOME.

The run is executed the way ``make demo`` executes it (``orchestration.demo``: the
local instance under ``DAGSTER_HOME``, the multiprocess executor, Dagster's pools),
in a process group that the test kills with SIGKILL while a step holds the
``warehouse`` pool slot — as the OOM killer or a crash would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pytest
from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus, RunsFilter
from dagster._core.launcher import WorkerStatus

from ops.ml.attributes import load_attributes

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent

RUN = """
import sys
from orchestration import demo
inst = demo.instance()
demo.run(demo.enrich_job, inst, partition="12", assets=sys.argv[1].split(","))
print("RUN OK", flush=True)
"""


def _env(tmp_path: Path, src: Path) -> dict[str, str]:
    return {
        **os.environ,
        "DAGSTER_HOME": str(tmp_path / "home"),
        "BATIVISION_DATA_DIR": str(tmp_path / "data"),
        "BATIVISION_SOURCE_DIR": str(src),
        "DAGSTER_DISABLE_TELEMETRY": "1",
    }


def _start(env: dict[str, str], assets: str) -> tuple[subprocess.Popen, list[str]]:
    """The run in its own process group, its output collected line by line."""
    proc = subprocess.Popen(
        [sys.executable, "-c", RUN, assets],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    return proc, lines


def _wait_for(lines: list[str], text: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in line for line in list(lines)):
        assert proc.poll() is None, "".join(lines)[-3000:]
        assert time.monotonic() < deadline, f"no {text!r} in:\n" + "".join(lines)[-3000:]
        time.sleep(0.2)


def _kill_while_publishing(env: dict[str, str], tmp_path: Path) -> str:
    """A `predictions` run SIGKILLed while it holds the `warehouse` pool slot; returns its run id.

    Another process holds the DuckDB file, so the step waits for it inside its
    step, slot held, until the kill.
    """
    blocker = duckdb.connect(str(tmp_path / "data" / "warehouse.duckdb"))
    try:
        killed, lines = _start(env, "predictions")
        _wait_for(lines, "is locked by another process", killed, timeout=600)
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait(timeout=30)
    finally:
        blocker.close()
    with _instance(env) as instance:
        (dead,) = instance.get_runs(filters=RunsFilter(statuses=[DagsterRunStatus.STARTED]))
        slots = instance.event_log_storage.get_concurrency_info("warehouse").claimed_slots
        assert [s.run_id for s in slots] == [dead.run_id], "the killed run holds the warehouse slot"
        # what Dagster's run monitoring asks the instance's launcher (orchestration/instance/local.yaml)
        assert instance.run_launcher.check_run_worker_health(dead).status == WorkerStatus.FAILED
    return dead.run_id


@contextmanager
def _instance(env: dict[str, str]) -> Iterator[DagsterInstance]:
    old = os.environ.get("DAGSTER_HOME")
    os.environ["DAGSTER_HOME"] = env["DAGSTER_HOME"]
    try:
        with DagsterInstance.get() as instance:
            yield instance
    finally:
        if old is None:
            os.environ.pop("DAGSTER_HOME")
        else:
            os.environ["DAGSTER_HOME"] = old


def _failed_and_freed(env: dict[str, str], run_id: str) -> bool:
    with _instance(env) as instance:
        run = instance.get_run_by_id(run_id)
        held = instance.event_log_storage.get_concurrency_info("warehouse").claimed_slots
        return run.status == DagsterRunStatus.FAILURE and not held


def _failure_message(env: dict[str, str], run_id: str) -> str:
    with _instance(env) as instance:
        (failure,) = instance.all_logs(run_id, of_type=DagsterEventType.RUN_FAILURE)
        return failure.dagster_event.message


def test_a_run_killed_holding_the_warehouse_slot_does_not_block_the_next_one(small_dep, tmp_path):
    env = _env(tmp_path, small_dep.root.parent)
    crop, lines = _start(env, "buildings,ortho_mosaic,chips")
    assert crop.wait(timeout=600) == 0, "".join(lines)[-3000:]

    # 1. `make ui`'s daemon: Dagster's run monitoring asks our launcher, fails the run, frees its slot.
    config = Path(env["DAGSTER_HOME"]) / "dagster.yaml"  # the project's, polling faster for the test
    config.write_text(
        config.read_text()
        .replace("poll_interval_seconds: 30", "poll_interval_seconds: 2")
        .replace("free_slots_after_run_end_seconds: 30", "free_slots_after_run_end_seconds: 2")
    )
    dead = _kill_while_publishing(env, tmp_path)
    daemon = subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster-daemon"), "run", "-w", "workspace.yaml"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not _failed_and_freed(env, dead):
            assert daemon.poll() is None, daemon.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the daemon did not fail the dead run nor free its slot"
            time.sleep(1)
    finally:
        daemon.terminate()
        daemon.wait(timeout=60)
    assert "is gone" in _failure_message(env, dead)

    # 2. No daemon: the next run's start (`make demo`, `make recover`) does the same pass, then runs.
    dead = _kill_while_publishing(env, tmp_path)
    after, lines = _start(env, "predictions")
    assert after.wait(timeout=600) == 0, "".join(lines)[-3000:]
    assert any(f"run {dead}" in line and "marked failed" in line for line in lines), "".join(lines)
    assert _failed_and_freed(env, dead) and "is gone" in _failure_message(env, dead)

    con = duckdb.connect(str(tmp_path / "data" / "warehouse.duckdb"), read_only=True)
    try:
        (b,) = con.execute("select count(*) from buildings where departement = '12'").fetchone()
        per_model = con.execute(
            "select model_name, count(*), count(distinct building_id) from predictions group by 1 order by 1"
        ).fetchall()
    finally:
        con.close()
    assert b == small_dep.n_buildings
    assert per_model == [(name, b, b) for name in sorted(load_attributes())]  # every declared model, every building


CREATE = """
from orchestration.demo import instance
print("RUNS", len(instance().get_runs()), flush=True)
"""


def test_first_runs_racing_on_a_fresh_dagster_home_all_get_the_instance(tmp_path):
    """Dagster creates its SQLite storage on first use: two processes at once used to crash one of them."""
    procs = []
    for k in range(3):
        env = {**os.environ, "DAGSTER_HOME": str(tmp_path / f"home{k}"), "DAGSTER_DISABLE_TELEMETRY": "1"}
        procs += [
            subprocess.Popen(
                [sys.executable, "-c", CREATE],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and "RUNS 0" in out, err[-3000:]
