"""Bad input fails once, with a message naming the culprit; it is not retried like flaky I/O."""

import geopandas as gpd
import pyarrow.parquet as pq
import pytest
from dagster import DagsterInstance, materialize
from shapely.geometry import box

from orchestration.definitions import all_assets
from resources import keys

pytestmark = [pytest.mark.slow, pytest.mark.reliability]  # materializes assets


def _run(tmp_path, monkeypatch, selection, buildings_config: dict | None = None):
    monkeypatch.setenv("BATIVISION_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("BATIVISION_SOURCE_DIR", str(tmp_path / "src"))
    from orchestration.environment import local_resources

    return materialize(
        all_assets,
        selection=selection,
        partition_key="12",
        resources=local_resources(),
        instance=DagsterInstance.ephemeral(),
        run_config={"ops": {"buildings": {"config": buildings_config}}} if buildings_config else None,
        raise_on_error=False,
    )


def _failure_messages(result) -> list[str]:
    return [
        e.step_failure_data.error.message + "".join(c.message for c in [e.step_failure_data.error.cause] if c)
        for e in result.all_events
        if e.event_type_value == "STEP_FAILURE"
    ]


def test_duplicate_ids_fail_once_naming_file_and_ids(tmp_path, monkeypatch):
    folder = tmp_path / "src" / "12" / "footprints"
    folder.mkdir(parents=True)
    gdf = gpd.GeoDataFrame({"cleabs": ["A", "B", "A"]}, geometry=[box(700000, 6600000, 700010, 6600010)] * 3, crs=2154)
    gdf.to_file(folder / "dups.gpkg", layer="batiment")
    result = _run(tmp_path, monkeypatch, ["buildings"])
    assert not result.success
    assert not [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    (message,) = _failure_messages(result)
    assert "dups.gpkg" in message and "'A'" in message


def test_missing_imagery_names_the_partition_and_the_folder(tmp_path, monkeypatch):
    result = _run(tmp_path, monkeypatch, ["ortho_mosaic"])
    assert not result.success
    assert not [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    (message,) = _failure_messages(result)
    assert "partition 12" in message and str(tmp_path / "src" / "12" / "ortho") in message


def _no_id_footprints(tmp_path):
    folder = tmp_path / "src" / "12" / "footprints"
    folder.mkdir(parents=True)
    gdf = gpd.GeoDataFrame(
        {"nom": ["mairie", "école"]},
        geometry=[box(700000, 6600000, 700010, 6600010), box(700020, 6600000, 700030, 6600010)],
        crs=2154,
    )
    gdf.to_file(folder / "sans_id.gpkg", layer="batiment")


def test_a_file_without_an_id_column_fails_listing_its_columns_and_ids_are_only_numbered_on_request(
    tmp_path, monkeypatch
):
    _no_id_footprints(tmp_path)
    result = _run(tmp_path, monkeypatch, ["buildings"])
    assert not result.success
    assert not [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    (message,) = _failure_messages(result)
    assert "sans_id.gpkg" in message and "'nom'" in message
    assert "id_column" in message and "generate_ids" in message

    asked = _run(tmp_path, monkeypatch, ["buildings"], {"generate_ids": True})
    assert asked.success
    ids = pq.read_table(tmp_path / "data" / "store" / keys.buildings("12"), columns=["building_id"])
    assert sorted(ids.column("building_id").to_pylist()) == ["sans_id#0", "sans_id#1"]


def test_an_internal_error_fails_once_naming_the_partition_and_the_exception(tmp_path, monkeypatch):
    """Not an input error the code knows, not I/O: retrying would only delay the same message."""
    _no_id_footprints(tmp_path)
    result = _run(tmp_path, monkeypatch, ["buildings"], {"generate_ids": True, "cell_size_m": 0})
    assert not result.success
    assert not [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    (message,) = _failure_messages(result)
    assert "partition 12" in message and "ValueError" in message and "cell_size_m" in message
