"""The code location as the UI and the scheduler see it."""

import datetime

from dagster import AssetKey, DagsterInstance, build_schedule_context, build_sensor_context

from ops.ml.attributes import load_attributes
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
    training = {AssetKey(a.asset) for a in load_attributes().values()}  # one training asset per declaration
    assert {AssetKey("roof_model"), AssetKey("solar_model"), AssetKey("roof_material_model")} <= training
    assert {AssetKey("chips")} | training <= parents
    for key in keys - {k.to_user_string() for k in training}:
        assert graph.get(AssetKey(key)).partitions_def is not None, key
    for key in training:
        assert graph.get(key).partitions_def is None and graph.get(key).group_name == "model", key


def test_monthly_schedule_requests_every_departement_once():
    ctx = build_schedule_context(
        instance=DagsterInstance.ephemeral(), scheduled_execution_time=datetime.datetime(2026, 12, 1, 2, 0)
    )
    requests = list(monthly_reprocessing(ctx))
    assert len(requests) == 101 and len({r.partition_key for r in requests}) == 101
    assert len({r.run_key for r in requests}) == 101 and requests[0].run_key == "2026-12-01"[:7] + "-01"
    # JPEG 2000 tiles converted once to COGs (README, "Benchmarks"): a config the job accepts
    from dagster import validate_run_config

    from orchestration.jobs import enrich_job

    assert requests[0].run_config["ops"]["ortho_mosaic"]["config"] == {"convert": "jpeg"}
    validate_run_config(defs.resolve_job_def(enrich_job.name), requests[0].run_config)


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


def test_a_new_model_version_rolls_out_to_every_departement_with_chips_and_crops_nothing():
    from dagster import AssetMaterialization

    from orchestration.jobs import PREDICT_JOB
    from orchestration.sensors import model_rollout_sensor

    instance = DagsterInstance.ephemeral()
    repo = defs.get_repository_def()

    def evaluate(cursor):
        ctx = build_sensor_context(instance=instance, cursor=cursor, repository_def=repo)
        return model_rollout_sensor.evaluate_tick(ctx)

    for dep in ("12", "2A", "33"):
        instance.report_runless_asset_event(AssetMaterialization("chips", partition=dep))
    first = evaluate(None)  # the sensor starts watching: nothing is rolled out
    assert not first.run_requests
    assert not evaluate(first.cursor).run_requests  # nothing new since
    instance.report_runless_asset_event(AssetMaterialization("roof_model"))
    tick = evaluate(first.cursor)
    assert sorted(r.partition_key for r in tick.run_requests) == ["12", "2A", "33"]
    assert len({r.run_key for r in tick.run_requests}) == 3
    job = defs.resolve_job_def(PREDICT_JOB)
    assert model_rollout_sensor.job_name == PREDICT_JOB
    selected = {k.to_user_string() for k in job.asset_layer.executable_asset_keys}
    assert {"predictions", "building_attributes", "departement_summary"} <= selected
    assert not selected & {"buildings", "ortho_mosaic", "chips", "roof_model", "solar_model"}
    assert not evaluate(tick.cursor).run_requests  # once per new version
    instance.report_runless_asset_event(AssetMaterialization("solar_model"))
    assert len(evaluate(tick.cursor).run_requests) == 3


def test_the_run_queue_limits_a_months_reprocessing_and_a_rollout(tmp_path):
    """The instance's run queue holds the 101 monthly runs and lets a few through, keyed on the tags they carry."""
    import shutil

    import yaml

    from orchestration.environment import REPO_ROOT
    from orchestration.sensors import ROLLOUT_TAG

    ctx = build_schedule_context(
        instance=DagsterInstance.ephemeral(), scheduled_execution_time=datetime.datetime(2026, 12, 1, 2, 0)
    )
    monthly_tags = {k for r in monthly_reprocessing(ctx) for k in r.tags}
    assert "bativision/reprocessing" in monthly_tags
    shutil.copy(REPO_ROOT / "orchestration" / "instance" / "local.yaml", tmp_path / "dagster.yaml")
    with DagsterInstance.from_config(str(tmp_path)) as instance:
        queue = instance.get_concurrency_config().run_queue_config
        limits = {t["key"]: t["limit"] for t in queue.tag_concurrency_limits}
        assert limits == {"bativision/reprocessing": 1, ROLLOUT_TAG: 1, "dagster/partition": 1}
        # one run per département at a time: the partition tag's limit applies to each value
        (per_partition,) = [t for t in queue.tag_concurrency_limits if t["key"] == "dagster/partition"]
        assert per_partition["value"] == {"applyLimitPerUniqueValue": True}
        assert queue.max_concurrent_runs > limits["bativision/reprocessing"]  # a slot stays free for users
    prod = yaml.safe_load((REPO_ROOT / "orchestration" / "instance" / "prod.yaml").read_text())
    runs = prod["concurrency"]["runs"]
    prod_limits = {t["key"]: t["limit"] for t in runs["tag_concurrency_limits"]}
    assert set(prod_limits) == {"bativision/reprocessing", ROLLOUT_TAG, "dagster/partition"}
    assert prod_limits["dagster/partition"] == 1
    assert max(prod_limits.values()) < runs["max_concurrent_runs"]
    assert prod["run_coordinator"]["class"] == "QueuedRunCoordinator"


def test_inputs_are_observed_assets_where_lineage_starts(tmp_path):
    """A new imagery vintage in one département is a new data version of that partition of `orthophoto_tiles`."""
    from dagster._core.definitions.observe import observe  # not exported by dagster 1.13

    from assets.inputs import footprint_files, orthophoto_tiles
    from resources.imagery import FootprintSource

    graph = defs.resolve_asset_graph()
    assert AssetKey("footprint_files") in graph.get(AssetKey("buildings")).parent_keys
    assert AssetKey("orthophoto_tiles") in graph.get(AssetKey("ortho_mosaic")).parent_keys
    for dep in ("12", "2A"):
        (tmp_path / dep / "ortho").mkdir(parents=True)
        (tmp_path / dep / "ortho" / f"{dep}-2021-0660-6360-LA93-0M20.tif").write_bytes(b"tile of 2021")
        (tmp_path / dep / "footprints").mkdir()
        (tmp_path / dep / "footprints" / "batiment.gpkg").write_bytes(b"footprints")
    instance = DagsterInstance.ephemeral()
    resources = {"imagery": OrthoImagery(root=str(tmp_path)), "footprints": FootprintSource(root=str(tmp_path))}

    def versions(key: str) -> dict[str, str]:
        observe([footprint_files, orthophoto_tiles], instance=instance, resources=resources)
        records = instance.fetch_observations(AssetKey(key), limit=1000).records
        out: dict[str, str] = {}
        for r in sorted(records, key=lambda r: r.storage_id):
            obs = r.asset_observation
            out[obs.partition] = obs.tags["dagster/data_version"]
        return out

    before = versions("orthophoto_tiles")
    assert set(before) == {"12", "2A"}  # départements without imagery have no version
    (tmp_path / "12" / "ortho" / "12-2024-0660-6360-LA93-0M20.tif").write_bytes(b"tile of 2024")  # a new vintage
    after = versions("orthophoto_tiles")
    assert after["12"] != before["12"] and after["2A"] == before["2A"]
    assert set(versions("footprint_files")) == {"12", "2A"}
