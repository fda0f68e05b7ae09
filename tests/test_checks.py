"""Asset checks on a small synthetic partition: they pass on a sound run, fail when their invariant is broken on
purpose, and a failing blocking check keeps the partition's downstream assets (predictions, the dbt models)
from being built."""

from __future__ import annotations

import duckdb
import pyarrow.parquet as pq
import pytest
from dagster import (
    AssetCheckKey,
    AssetCheckSeverity,
    AssetKey,
    AssetSelection,
    Definitions,
    define_asset_job,
)

from assets.partitions import departements_partitions
from orchestration.definitions import all_assets, all_checks
from resources import keys
from resources.warehouse import spatial_extension_path
from tests.localenv import local_env

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("checks")]

DEP = "12"
CROP = ["buildings", "ortho_mosaic", "chips"]
DBT_MODELS = ["stg_buildings", "stg_predictions", "building_attributes", "departement_summary"]
CHECKS = {
    "buildings": ["match_source"],
    "chips": ["index_has_every_building", "status_shares"],
    "predictions": ["account_for_every_building", "scores_are_probabilities"],
}


@pytest.fixture(scope="module")
def env(small_dep, tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    with local_env(small_dep.root.parent, data) as (resources, instance):
        yield resources, data, instance


def run(env, selection: AssetSelection, run_config=None):
    """One run of the partition over ``selection`` (assets and/or checks), as a job of the code location would."""
    resources, _, instance = env
    job = define_asset_job("under_test", selection=selection, partitions_def=departements_partitions)
    defs = Definitions(assets=all_assets, asset_checks=all_checks, jobs=[job], resources=resources)
    # the partition as a run tag: a run of checks alone has no asset to take a partitions definition from
    return defs.resolve_job_def("under_test").execute_in_process(
        tags={"dagster/partition": DEP}, instance=instance, run_config=run_config, raise_on_error=False
    )


def checks_only(*names: str) -> AssetSelection:
    keyed = [AssetCheckKey(AssetKey(asset), n) for asset, ns in CHECKS.items() for n in ns if n in names]
    return AssetSelection.checks(*keyed)


def evaluations(result) -> dict[str, object]:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def materialized(result) -> set[str]:
    return {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}


def sql(env, statement: str) -> None:
    _, data, _ = env
    con = duckdb.connect(str(data / "warehouse.duckdb"))
    try:
        con.load_extension(spatial_extension_path())
        con.execute(statement)
    finally:
        con.close()


@pytest.fixture(scope="module")
def sound(env):
    result = run(env, AssetSelection.assets(*CROP, "predictions", *DBT_MODELS))
    assert result.success
    return result


def test_every_check_passes_on_a_sound_partition(sound):
    got = evaluations(sound)
    assert set(got) >= {n for ns in CHECKS.values() for n in ns}
    failed = {n: e.description for n, e in got.items() if not e.passed}
    assert not failed
    assert got["account_for_every_building"].metadata["buildings"].value > 0


def test_a_lost_building_row_fails_the_source_and_index_checks(env, sound):
    """A building lost from the `buildings` GeoParquet (what chips and predictions read) is caught by both."""
    _, data, _ = env
    path = data / "store" / keys.buildings(DEP)
    kept = pq.read_table(path)
    pq.write_table(kept.slice(1), path)
    try:
        got = evaluations(run(env, checks_only("match_source", "index_has_every_building")))
        assert not got["match_source"].passed
        assert "features" in got["match_source"].description
        assert not got["index_has_every_building"].passed
    finally:
        pq.write_table(kept, path)
    got = evaluations(run(env, checks_only("match_source", "index_has_every_building")))
    assert got["match_source"].passed and got["index_has_every_building"].passed


def test_a_building_row_lost_from_the_warehouse_fails_the_accounting_check(env, sound):
    name = "account_for_every_building"
    sql(env, f"create table _kept_b as select * from buildings where departement = '{DEP}' limit 1")
    sql(env, "delete from buildings where building_id in (select building_id from _kept_b)")
    try:
        check = evaluations(run(env, checks_only(name)))[name]
        assert not check.passed and "1 unknown" in check.description
    finally:
        sql(env, "insert into buildings select * from _kept_b")
        sql(env, "drop table _kept_b")
    assert evaluations(run(env, checks_only(name)))[name].passed


def test_a_missing_shard_fails_the_index_check(env, sound):
    from ops.shards import list_shards, shard_paths

    resources, _, _ = env
    folder = resources["store"].folder(keys.chips(DEP))
    shard = list_shards(folder)[0]
    index = shard_paths(folder, shard)[1]
    kept = index.read_bytes()
    index.unlink()
    try:
        got = evaluations(run(env, checks_only("index_has_every_building")))
        assert not got["index_has_every_building"].passed
    finally:
        index.write_bytes(kept)
    assert evaluations(run(env, checks_only("index_has_every_building")))["index_has_every_building"].passed


def test_status_shares_warn_and_fail_at_their_configured_thresholds(env, sound):
    cfg = {"ops": {"chips_status_shares": {"config": {"warn_above": {"nodata": 0.0}, "fail_above": {}}}}}
    warned = evaluations(run(env, checks_only("status_shares"), cfg))["status_shares"]
    assert not warned.passed and warned.severity == AssetCheckSeverity.WARN and "nodata" in warned.description
    cfg = {"ops": {"chips_status_shares": {"config": {"fail_above": {"no_imagery": 0.0}}}}}
    failed = evaluations(run(env, checks_only("status_shares"), cfg))["status_shares"]
    assert not failed.passed and failed.severity == AssetCheckSeverity.ERROR and "no_imagery" in failed.description


def test_a_failing_blocking_chips_check_stops_predictions_and_dbt(env, sound):
    cfg = {"ops": {"chips_status_shares": {"config": {"fail_above": {"no_imagery": 0.0}}}}}
    result = run(env, AssetSelection.assets("chips", "predictions", *DBT_MODELS), cfg)
    assert not evaluations(result)["status_shares"].passed
    assert "chips" in materialized(result)
    assert not materialized(result) & {"predictions", *DBT_MODELS}


def test_a_lost_or_duplicated_prediction_fails_the_accounting_check_and_blocks_dbt(env, sound):
    name = "account_for_every_building"
    sql(
        env,
        "create table _kept_p as select * from predictions where building_id = (select min(building_id) from predictions)",
    )
    sql(env, "delete from predictions where building_id in (select building_id from _kept_p)")
    try:
        result = run(env, checks_only(name) | AssetSelection.assets(*DBT_MODELS))
        check = evaluations(result)[name]
        assert not check.passed and "rows" in check.description
        assert not materialized(result) & set(DBT_MODELS), "dbt models were rebuilt over a broken partition"
    finally:
        sql(env, "insert into predictions select * from _kept_p")
    sql(env, "insert into predictions select * from _kept_p where model_name = 'roof_type'")  # one building twice
    try:
        assert not evaluations(run(env, checks_only(name)))[name].passed
    finally:
        sql(env, "delete from predictions where building_id in (select building_id from _kept_p)")
        sql(env, "insert into predictions select * from _kept_p")
        sql(env, "drop table _kept_p")
    result = run(env, checks_only(name) | AssetSelection.assets(*DBT_MODELS))
    assert evaluations(result)[name].passed
    assert set(DBT_MODELS) <= materialized(result), "with the check passing, the same run rebuilds the dbt models"


def test_a_score_outside_zero_one_fails_the_score_check(env, sound):
    name = "scores_are_probabilities"
    sql(
        env,
        "update predictions set score = score + 1 where building_id = (select min(building_id) from predictions where score is not null)",
    )
    try:
        check = evaluations(run(env, checks_only(name)))[name]
        assert not check.passed and check.metadata["outside"].value >= 1
    finally:
        sql(env, "update predictions set score = score - 1 where score > 1")
    assert evaluations(run(env, checks_only(name)))[name].passed


def test_predictions_show_a_map_and_example_chips_of_each_label(sound):
    """What a user opens in the UI: per model, a map (labels, panel polygons, tiles) and example chips per label."""
    pred = next(e for e in sound.get_asset_materialization_events() if e.asset_key.to_user_string() == "predictions")
    md = pred.step_materialization_data.materialization.metadata
    for model in ("roof_type", "solar_panels"):
        for key in (f"{model}_map", f"{model}_examples"):
            assert str(md[key].value).startswith("![preview](data:image/png;base64,"), key
