"""A backfill of several départements, launched the way the UI launches it.

Starts `dagster dev` from workspace.yaml on 127.0.0.1 (webserver + daemon, SQLite
storage in a temporary DAGSTER_HOME), sends the UI's `launchPartitionBackfill`
GraphQL mutation for two départements, and waits for their runs to succeed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ui")]

REPO = Path(__file__).resolve().parent.parent
ASSETS = ["buildings", "ortho_mosaic", "chips"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _graphql(port: int, query: str, variables: dict | None = None) -> dict:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query, "variables": variables or {}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        body = json.loads(resp.read())
    assert "errors" not in body, body
    return body["data"]


@pytest.fixture(scope="module")
def dagster_dev(tmp_path_factory):
    from synthetic import generate_departement

    root = tmp_path_factory.mktemp("ui")
    for k, dep in enumerate(("12", "2A")):
        generate_departement(root / "sample", dep, 150, seed=k, tile_px=1000)
    home = root / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "orchestration" / "instance" / "local.yaml", home / "dagster.yaml")
    port = _free_port()
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "BATIVISION_DATA_DIR": str(root / "data"),
        "BATIVISION_SOURCE_DIR": str(root / "sample"),
    }
    dagster = Path(sys.executable).parent / "dagster"
    log = open(root / "dagster_dev.log", "w")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(
        [str(dagster), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                _graphql(port, "{ version }")
                break
            except Exception:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((root / "dagster_dev.log").read_text()[-3000:]) from None
                time.sleep(1)
        yield port, root
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


LAUNCH = """
mutation($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
  }
}"""

STATUS = """
query($id: String!) {
  partitionBackfillOrError(backfillId: $id) {
    ... on PartitionBackfill { status }
  }
  runsOrError(filter: {tags: [{key: "dagster/backfill", value: $id}]}) {
    ... on Runs { results { runId status tags { key value } } }
  }
}"""


def test_backfill_of_two_departements_from_the_ui_runs(dagster_dev):
    port, root = dagster_dev
    params = {
        "partitionNames": ["12", "2A"],
        "assetSelection": [{"path": [a]} for a in ASSETS],
        "title": "test backfill",
    }
    launched = _graphql(port, LAUNCH, {"params": params})["launchPartitionBackfill"]
    assert launched["__typename"] == "LaunchBackfillSuccess", launched
    backfill = launched["backfillId"]
    deadline = time.monotonic() + 400
    while True:
        data = _graphql(port, STATUS, {"id": backfill})
        status = data["partitionBackfillOrError"]["status"]
        runs = data["runsOrError"]["results"]
        if status in ("COMPLETED", "COMPLETED_SUCCESS", "FAILED", "COMPLETED_FAILED", "CANCELED"):
            break
        assert time.monotonic() < deadline, (status, runs, (root / "dagster_dev.log").read_text()[-3000:])
        time.sleep(2)
    assert status in ("COMPLETED", "COMPLETED_SUCCESS"), (status, runs)
    partitions = sorted(t["value"] for r in runs for t in r["tags"] if t["key"] == "dagster/partition")
    assert partitions == ["12", "2A"]
    assert {r["status"] for r in runs} == {"SUCCESS"}
    for dep in ("12", "2A"):
        assert list((root / "data" / "store" / "chips" / dep).glob("*.index.parquet")), dep
