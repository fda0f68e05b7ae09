"""Faults: whatever happens, every building of a partition is in the warehouse exactly once.

Started with the cases of the warehouse itself; the README's fault matrix (issue 16) grows here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import duckdb
import geopandas as gpd
import pyogrio
import pytest

from ops.ml.attributes import load_attributes
from resources.warehouse import DuckDBWarehouse
from tests.rowfiles import buildings_parquet

pytestmark = pytest.mark.reliability

REPO = Path(__file__).resolve().parent.parent

WRITER = """
import logging, sys, time
logging.basicConfig(level=logging.INFO)
from pathlib import Path
from ops.geo.reproject import wgs84_batches
from resources.warehouse import DuckDBWarehouse
from tests.rowfiles import buildings_parquet

db, dep, parquet, rounds = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
wh = DuckDBWarehouse(path=db, lock_timeout_s=120)
for _ in range(rounds):
    wh.replace_partition("buildings", dep, wgs84_batches(parquet, 2154))
print("done", dep)
"""


@pytest.mark.slow
def test_two_partitions_written_at_once_by_two_processes_both_land_whole(tmp_path):
    """DuckDB lets one process write a file at a time: the other waits for the lock, none loses rows."""
    db = tmp_path / "w.duckdb"
    sizes = {"12": 2000, "81": 1500}  # 20 rewrites each: the two writers overlap (the log shows lock waits)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(db), dep, str(buildings_parquet(tmp_path, dep, n)), "20"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for dep, n in sizes.items()
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    wh = DuckDBWarehouse(path=str(db))
    rows = wh.query(
        "select departement, count(*) as n, count(distinct building_id) as d from buildings group by departement"
    )
    got = {r.departement: (r.n, r.d) for r in rows.itertuples()}
    assert got == {dep: (n, n) for dep, n in sizes.items()}


def test_a_warehouse_file_another_writer_is_creating_is_waited_for_and_a_bad_one_named(tmp_path):
    """Two first writers create the file at once: the one that finds it without its headers waits.

    Seen once under load: the second process opened the file the first had just created and got
    "not a valid DuckDB database file". A file that stays headerless, or a big non-DuckDB file, fails at once.
    """
    db = tmp_path / "w.duckdb"
    db.touch()  # created, headers not yet written: what the second writer finds
    done = tmp_path / "done.duckdb"
    duckdb.connect(str(done)).close()

    def finish_creation() -> None:
        time.sleep(0.6)
        os.replace(done, db)

    writer = threading.Thread(target=finish_creation)
    writer.start()
    t0 = time.monotonic()
    with DuckDBWarehouse(path=str(db), lock_timeout_s=30).connect() as con:
        assert con.execute("select 42").fetchone() == (42,)
    writer.join()
    assert time.monotonic() - t0 >= 0.5  # it waited for the creation rather than failing

    stale = tmp_path / "stale.duckdb"
    stale.touch()
    os.utime(stale, (time.time() - 120, time.time() - 120))  # headerless for two minutes: not a creation
    big = tmp_path / "notes.duckdb"
    big.write_text("not a database\n" * 2000)
    for bad in (stale, big):
        t0 = time.monotonic()
        with (
            pytest.raises(duckdb.IOException, match="not a valid DuckDB database file"),
            DuckDBWarehouse(path=str(bad), lock_timeout_s=30).connect(),
        ):
            pass
        assert time.monotonic() - t0 < 5


def _published(warehouse: DuckDBWarehouse, dep: str) -> dict[str, list[str]]:
    """What readers of the warehouse see of a partition: its building ids, and each model version's."""
    out = {
        "buildings": sorted(
            warehouse.query("select building_id from buildings where departement = ?", [dep]).building_id
        )
    }
    rows = warehouse.query(
        "select model_name || '@' || model_version as m, building_id from predictions where departement = ?", [dep]
    )
    for model, ids in rows.groupby("m").building_id:
        out[model] = sorted(ids)
    return out


@pytest.mark.slow
def test_a_rerun_failing_after_new_footprints_leaves_the_last_published_partition(tmp_path, monkeypatch):
    """New footprints, then a failure before predictions: the warehouse keeps the old partition, in step.

    `buildings` only stages the new footprints (GeoParquet); `predictions` publishes
    buildings and predictions in one transaction. Until a run gets that far, readers
    keep what the last successful run published; then they get the new partition whole.
    """
    from dagster import DagsterInstance, materialize

    from orchestration.definitions import all_assets
    from orchestration.environment import local_resources
    from synthetic import generate_departement

    sample = generate_departement(tmp_path / "src", "12", 300, seed=5, tile_px=1000)
    monkeypatch.setenv("BATIVISION_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("BATIVISION_SOURCE_DIR", str(tmp_path / "src"))
    resources, instance = local_resources(), DagsterInstance.ephemeral()
    warehouse = resources["warehouse"]

    def run(config=None):
        return materialize(
            all_assets,
            selection=["buildings", "ortho_mosaic", "chips", "predictions"],
            partition_key="12",
            resources=resources,
            instance=instance,
            run_config=config,
            raise_on_error=False,
        )

    assert run().success
    before = _published(warehouse, "12")
    # the buildings and one set per declared attribute's model
    assert len(before) == 1 + len(load_attributes()) and all(ids == before["buildings"] for ids in before.values())

    footprints = sample.root / "footprints" / "batiment.gpkg"
    gdf = gpd.read_file(footprints)
    gdf.iloc[40:].to_file(footprints, layer=pyogrio.list_layers(footprints)[0][0])  # 40 buildings demolished
    failed = run({"ops": {"predictions": {"config": {"model_versions": {"roof_type": "0000deadbeef"}}}}})
    assert not failed.success
    (failure,) = [e for e in failed.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failure.step_key == "predictions" and "0000deadbeef" in failure.step_failure_data.error.message
    materialized = {e.asset_key.to_user_string() for e in failed.get_asset_materialization_events()}
    assert materialized == {"buildings", "ortho_mosaic", "chips"}  # the new footprints went that far
    assert _published(warehouse, "12") == before, "readers see the new buildings beside the old predictions"

    assert run().success
    after = _published(warehouse, "12")
    assert len(after["buildings"]) == len(before["buildings"]) - 40
    assert after.keys() == before.keys() and all(ids == after["buildings"] for ids in after.values())


@pytest.mark.slow
def test_a_second_run_of_a_partition_being_written_fails_at_once_naming_it(small_dep, tmp_path, monkeypatch):
    """Outside the run queue (which holds one run per partition), a second writer meets the partition's lock."""
    from dagster import DagsterInstance, materialize

    from ops.locks import partition_lock
    from orchestration.definitions import all_assets
    from orchestration.environment import local_resources
    from resources import keys

    monkeypatch.setenv("BATIVISION_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("BATIVISION_SOURCE_DIR", str(small_dep.root.parent))
    resources = local_resources()

    def run(*selection):
        return materialize(
            all_assets,
            selection=list(selection),
            partition_key="12",
            resources=resources,
            instance=DagsterInstance.ephemeral(),
            raise_on_error=False,
        )

    assert run("buildings", "ortho_mosaic").success
    store = resources["store"]
    for step, folder in [("chips", store.folder(keys.chips("12"))), ("predictions", None)]:
        folder = folder or store.path(keys.staged_predictions("12", "roof_type", "x")).parent
        with partition_lock(folder, "the first run"):  # a first run of partition 12 is writing
            busy = run(step)
        assert not busy.success
        assert not [e for e in busy.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
        (failure,) = [e for e in busy.all_events if e.event_type_value == "STEP_FAILURE"]
        message = failure.step_failure_data.error.message
        assert f"partition 12: {step}: another run is writing" in message and str(os.getpid()) in message
        assert run(step).success  # once the first run is done
    rows = resources["warehouse"].query("select model_name, count(*) as n from predictions group by 1")
    assert sorted(rows.n) == [small_dep.n_buildings] * len(load_attributes())  # one set of rows per model
