"""The code location as the UI and the scheduler see it."""

import datetime

from dagster import AssetKey, DagsterInstance, build_schedule_context, build_sensor_context

from orchestration.definitions import defs
from orchestration.schedules import monthly_reprocessing
from orchestration.sensors import new_imagery_sensor
from resources.imagery import OrthoImagery


def test_asset_graph_runs_from_footprints_to_dbt_marts():
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert {"buildings", "ortho_mosaic", "chips", "roof_model", "predictions", "building_attributes"} <= keys
    assert {"stg_buildings", "stg_predictions", "departement_summary"} <= keys
    # lineage: building_attributes ← stg_* ← buildings / predictions ← chips ← buildings, ortho_mosaic
    assert AssetKey("stg_buildings") in graph.get(AssetKey("building_attributes")).parent_keys
    assert AssetKey("buildings") in graph.get(AssetKey("stg_buildings")).parent_keys
    assert AssetKey("predictions") in graph.get(AssetKey("stg_predictions")).parent_keys
    parents = graph.get(AssetKey("predictions")).parent_keys
    assert {AssetKey("chips"), AssetKey("roof_model"), AssetKey("solar_model")} <= parents
    for key in keys - {"roof_model", "solar_model"}:
        assert graph.get(AssetKey(key)).partitions_def is not None, key
    assert graph.get(AssetKey("roof_model")).partitions_def is None
    assert graph.get(AssetKey("solar_model")).partitions_def is None


def test_monthly_schedule_requests_every_departement_once():
    ctx = build_schedule_context(
        instance=DagsterInstance.ephemeral(), scheduled_execution_time=datetime.datetime(2026, 12, 1, 2, 0)
    )
    requests = list(monthly_reprocessing(ctx))
    assert len(requests) == 101 and len({r.partition_key for r in requests}) == 101
    assert len({r.run_key for r in requests}) == 101 and requests[0].run_key == "2026-12-01"[:7] + "-01"


def test_imagery_sensor_fires_once_per_changed_departement(tmp_path):
    (tmp_path / "12" / "ortho").mkdir(parents=True)
    (tmp_path / "12" / "ortho" / "a.tif").write_bytes(b"x")
    imagery = OrthoImagery(root=str(tmp_path))
    ctx = build_sensor_context(instance=DagsterInstance.ephemeral(), resources={"imagery": imagery})
    first = list(new_imagery_sensor(ctx))
    assert [r.partition_key for r in first] == ["12"]
    ctx2 = build_sensor_context(instance=DagsterInstance.ephemeral(), cursor=ctx.cursor, resources={"imagery": imagery})
    assert not [r for r in (new_imagery_sensor(ctx2) or []) if hasattr(r, "partition_key")]
    (tmp_path / "12" / "ortho" / "b.tif").write_bytes(b"y")
    ctx3 = build_sensor_context(
        instance=DagsterInstance.ephemeral(), cursor=ctx2.cursor, resources={"imagery": imagery}
    )
    assert [r.partition_key for r in new_imagery_sensor(ctx3)] == ["12"]
