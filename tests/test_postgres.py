"""Dagster's storage on PostgreSQL, configured by ``orchestration/instance/prod.yaml``.

A real PostgreSQL server is started on 127.0.0.1; the instance is built from
the repository's prod.yaml with only the environment variables it names, a
partition is materialized through it, and the test then reads Postgres
directly: the run and its materialization events must be there. prod.yaml also
keeps the steps' stdout/stderr in Cloud Storage: the storage emulator stands in
(``STORAGE_EMULATOR_HOST``, see ``tests/test_compute_logs.py``).
"""

from __future__ import annotations

import shutil

import pytest
from dagster import AssetKey, DagsterInstance, materialize

from orchestration.definitions import all_assets
from orchestration.environment import REPO_ROOT
from resources.gcs import gcs_client
from tests.standins.servers import gcs_emulator, postgres_server

pytestmark = [pytest.mark.postgres, pytest.mark.slow, pytest.mark.xdist_group("postgres")]

PROD_YAML = REPO_ROOT / "orchestration" / "instance" / "prod.yaml"


@pytest.fixture(scope="module")
def pg():
    with postgres_server() as server:
        yield server


@pytest.fixture(scope="module")
def log_bucket(tmp_path_factory):
    """The Cloud Storage emulator with the bucket prod.yaml's compute logs go to: {variable: value}."""
    with gcs_emulator(tmp_path_factory.mktemp("gcs")) as url:
        gcs_client(url).create_bucket("bativision-logs")
        yield {
            "STORAGE_EMULATOR_HOST": url,
            "BATIVISION_GCS_BUCKET": "bativision-logs",
            "BATIVISION_COMPUTE_LOG_PREFIX": "bativision/compute-logs",
        }


@pytest.fixture
def instance(pg, log_bucket, tmp_path, monkeypatch):
    for k, v in {**pg.env(), **log_bucket}.items():
        monkeypatch.setenv(k, v)
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(PROD_YAML, home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    inst = DagsterInstance.get()
    yield inst
    inst.dispose()


def test_prod_instance_stores_runs_events_and_schedules_in_postgres(instance):
    assert type(instance.run_storage).__name__ == "PostgresRunStorage"
    assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
    assert type(instance.schedule_storage).__name__ == "PostgresScheduleStorage"
    assert type(instance.compute_log_manager).__name__ == "GCSComputeLogManager"


def test_a_materialized_partition_is_recorded_in_postgres(instance, pg, small_dep, tmp_path, monkeypatch):
    monkeypatch.setenv("BATIVISION_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("BATIVISION_SOURCE_DIR", str(small_dep.root.parent))
    from orchestration.environment import local_resources

    result = materialize(
        all_assets, selection=["buildings"], partition_key="12", resources=local_resources(), instance=instance
    )
    assert result.success
    con = pg.connect()
    try:
        cur = con.cursor()
        cur.execute("select status, partition from runs where run_id = %s", (result.run_id,))
        assert cur.fetchall() == [("SUCCESS", "12")]
        cur.execute(
            "select asset_key, partition from event_logs where run_id = %s and dagster_event_type = %s",
            (result.run_id, "ASSET_MATERIALIZATION"),
        )
        assert cur.fetchall() == [('["buildings"]', "12")]
        cur.execute("select count(*) from event_logs where run_id = %s", (result.run_id,))
        assert cur.fetchone()[0] > 5  # step start/success, logs, ... all in Postgres
        cur.execute("select to_regclass('jobs'), to_regclass('instigators')")  # schedule storage tables
        assert all(cur.fetchone())
    finally:
        con.close()
    # and Dagster reads it back through the instance
    mat = instance.get_latest_materialization_event(AssetKey("buildings"))
    assert mat is not None and mat.run_id == result.run_id


@pytest.mark.reliability
def test_the_storage_password_given_by_the_environment_is_nowhere_in_the_run_records(
    instance, pg, log_bucket, small_dep, tmp_path, monkeypatch
):
    """prod.yaml reads DAGSTER_PG_PASSWORD from the environment: no run config, tag, event or log line holds it."""
    monkeypatch.setenv("BATIVISION_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("BATIVISION_SOURCE_DIR", str(small_dep.root.parent))
    from orchestration.environment import local_resources

    result = materialize(
        all_assets, selection=["buildings"], partition_key="12", resources=local_resources(), instance=instance
    )
    assert result.success
    assert pg.password not in PROD_YAML.read_text()
    con = pg.connect()
    try:
        cur = con.cursor()
        for table, column in [("runs", "run_body"), ("run_tags", "value"), ("event_logs", "event")]:
            cur.execute(
                f"select count(*), count(*) filter (where {column} like %s) from {table}", (f"%{pg.password}%",)
            )
            rows, leaking = cur.fetchone()
            assert rows > 0 and leaking == 0, f"{table}.{column}: {leaking} of {rows} rows hold the password"
    finally:
        con.close()
    events = instance.all_logs(result.run_id)
    assert events and not [e for e in events if pg.password in (e.message or "") or pg.password in str(e.dagster_event)]
    # nor the step's stdout/stderr, which prod.yaml keeps in the bucket
    bucket = gcs_client(log_bucket["STORAGE_EMULATOR_HOST"]).bucket(log_bucket["BATIVISION_GCS_BUCKET"])
    logs = [b for b in bucket.list_blobs(prefix=log_bucket["BATIVISION_COMPUTE_LOG_PREFIX"]) if result.run_id in b.name]
    assert logs and not [b.name for b in logs if pg.password.encode() in b.download_as_bytes()]
