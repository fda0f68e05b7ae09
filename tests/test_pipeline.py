"""The whole pipeline on a small synthetic partition, through Dagster's `materialize`.

What a user checks: every building of the partition has exactly one
prediction row per model, defects carry the right status, panels come back
where they were drawn, a re-run replaces rows, dbt's models build with their
tests passing, a new model marks predictions stale, and a model that cannot
read the chips fails before writing anything. Predictions come from the
shipped models (what a fresh install runs).
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pandas as pd
import pytest
from dagster import materialize

from ops.ml.attributes import load_attributes
from orchestration.definitions import all_assets
from resources.warehouse import DuckDBWarehouse, spatial_extension_path
from tests.localenv import local_env, query_warehouse

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("pipeline")]

CROP = ["buildings", "ortho_mosaic", "chips"]
PREDICT = ["predictions", "stg_buildings", "stg_predictions", "building_attributes", "departement_summary"]
MODELS = tuple(load_attributes())  # every declared attribute has a shipped model
QUICK_TRAINING = {"ops": {"roof_model": {"config": {"epochs": 1}}, "solar_model": {"config": {"epochs": 1}}}}
#: A drawn panel must come back within this distance (metres, centroid to centroid); chips are ~0.3 m/px.
PANEL_TOLERANCE_M = 1.0


@pytest.fixture(scope="module")
def env(small_dep, tmp_path_factory):
    """Local resources pointed at a temporary data folder and the synthetic sources."""
    data = tmp_path_factory.mktemp("data")
    with local_env(small_dep.root.parent, data) as (resources, instance):
        yield resources, data, small_dep, instance


def _run(env, selection, partition=None, run_config=None, raise_on_error=True):
    resources, _, _, instance = env
    result = materialize(
        all_assets,
        selection=selection,
        partition_key=partition,
        resources=resources,
        instance=instance,
        run_config=run_config,
        raise_on_error=raise_on_error,
    )
    assert result.success or not raise_on_error
    return result


_query = query_warehouse


@pytest.fixture(scope="module")
def materialized(env):
    _run(env, CROP, "12")
    _run(env, PREDICT, "12")
    return env


def test_every_building_has_exactly_one_prediction_per_model(materialized):
    _, data, dep, _ = materialized
    b = _query(data, "select building_id from buildings where departement = '12'")
    assert len(b) == dep.n_buildings
    for model in MODELS:
        p = _query(data, f"select building_id from predictions where departement = '12' and model_name = '{model}'")
        assert len(p) == len(b) and p["building_id"].is_unique, model
        assert set(p["building_id"]) == set(b["building_id"]), model


def test_defects_carry_the_right_statuses(materialized):
    _, data, dep, _ = materialized
    g = _query(data, "select geometry_status s, count(*) n from buildings group by 1").set_index("s")["n"]
    p = _query(data, "select status s, count(*) n from predictions where model_name = 'roof_type' group by 1")
    p = p.set_index("s")["n"]
    c = dep.counts
    assert g.get("repaired", 0) == c["invalid_repairable"]
    assert g.get("invalid", 0) == c["invalid_unrepairable"]
    assert g.get("empty", 0) == c["empty"]
    assert p.get("invalid_geometry", 0) == c["invalid_unrepairable"] + c["empty"]
    assert p.get("no_imagery", 0) == c["outside_imagery"]
    assert p.get("nodata", 0) >= c["nodata_area"] > 0
    assert p.get("ok", 0) > 0.8 * dep.n_buildings
    assert p.get("error", 0) == 0
    ok = _query(data, "select label, score from predictions where status = 'ok' and model_name = 'roof_type'")
    assert ok["label"].isin(["flat", "gable", "hip"]).all() and ok["score"].between(0, 1).all()
    seg = _query(data, "select status, count(*) n from predictions where model_name = 'solar_panels' group by 1")
    assert seg.set_index("status")["n"].to_dict() == p.to_dict()  # same chips, same statuses


def test_drawn_panels_come_back_as_polygons_at_the_right_place(materialized):
    """Each ground-truth array on an imaged building against the building's predicted polygons (Lambert-93)."""
    import geopandas as gpd
    import shapely

    _, data, dep, _ = materialized
    pred = _query(
        data,
        """select building_id, label, score, probabilities, ST_AsWKB(geometry) wkb from predictions
           where model_name = 'solar_panels' and status = 'ok'""",
    )
    truth = gpd.read_file(dep.panels).set_index("cleabs")
    imaged = truth[truth.index.isin(pred["building_id"])]
    assert len(imaged) >= 50
    found = pred[pred["label"] == "solar_panel"].set_index("building_id")
    assert found["wkb"].notna().all() and pred.loc[pred["label"] == "none", "wkb"].isna().all()
    polys = gpd.GeoSeries(shapely.from_wkb(found["wkb"].map(bytes)), index=found.index, crs=4326).to_crs(2154)
    hits = polys.index.intersection(imaged.index)
    recall = len(hits) / len(imaged)
    precision = len(hits) / len(polys)
    assert recall >= 0.85 and precision >= 0.85, (recall, precision)
    dist = polys.loc[hits].centroid.distance(imaged.geometry.loc[hits].centroid)
    iou = (
        polys.loc[hits].intersection(imaged.geometry.loc[hits]).area
        / polys.loc[hits].union(imaged.geometry.loc[hits]).area
    )
    assert (dist <= PANEL_TOLERANCE_M).mean() >= 0.9, dist.describe()
    assert iou.median() >= 0.6, iou.describe()
    # the polygons stay on their own building: within the footprint (plus the 0.5 m clip buffer)
    b = _query(
        data,
        "select building_id, ST_AsWKB(geometry) wkb from buildings where departement = '12' and geometry is not null",
    )
    fp = gpd.GeoSeries(shapely.from_wkb(b["wkb"].map(bytes)), index=b["building_id"], crs=4326).to_crs(2154)
    assert (polys.difference(fp.loc[polys.index].buffer(0.6)).area < 0.05).all()
    assert found["score"].between(0.5, 1).all()


def test_dbt_models_are_built_and_tested(materialized):
    _, data, dep, _ = materialized
    attrs = _query(data, "select * from building_attributes")
    assert len(attrs) == dep.n_buildings and attrs["building_id"].is_unique
    for model, attr in load_attributes().items():
        own = {f"{model}_value"} if attr.task == "regression" else {f"{model}_label", f"{model}_score"}
        assert own | {f"{model}_status", f"{model}_model_version"} <= set(attrs.columns), model
    assert set(attrs["solar_panels_label"].dropna()) == {"none", "solar_panel"}
    summary = _query(data, "select * from departement_summary where departement = '12'")
    assert sorted(summary["model_name"]) == sorted(MODELS)
    assert (summary["buildings"] == dep.n_buildings).all() and (summary["predicted"] == dep.n_buildings).all()


def test_rerunning_a_partition_replaces_its_rows(materialized):
    _, data, dep, _ = materialized
    sql = "select count(*) n, count(distinct building_id || model_name) d from predictions"
    before = _query(data, sql).iloc[0]
    _run(materialized, CROP + PREDICT, "12")
    after = _query(data, sql).iloc[0]
    b = _query(data, "select count(*) n, count(distinct building_id) d from buildings").iloc[0]
    assert before.n == after.n == after.d == len(MODELS) * dep.n_buildings
    assert b.n == b.d == dep.n_buildings


def test_dbt_invariant_test_fails_when_a_prediction_is_missing(materialized):
    """The accounting-invariant test must catch a lost row (then the row is put back)."""
    import os
    import subprocess
    import sys

    from assets.dbt import DBT_DIR

    _, data, _, _ = materialized
    db = data / "warehouse.duckdb"
    con = duckdb.connect(str(db))
    con.load_extension(spatial_extension_path())
    con.execute(
        "create table _kept as select * from predictions where building_id = (select min(building_id) from predictions)"
    )
    con.execute("delete from predictions where building_id in (select building_id from _kept)")
    con.close()
    dbt = [
        str(Path(sys.executable).parent / "dbt"),
        "test",
        "--project-dir",
        str(DBT_DIR),
        "--profiles-dir",
        str(DBT_DIR),
    ]
    env = {**os.environ, **DuckDBWarehouse(path=str(db)).dbt_env()}
    broken = subprocess.run(
        [*dbt, "--target-path", str(data / "dbt_target")], env=env, cwd=DBT_DIR, capture_output=True, text=True
    )
    assert broken.returncode != 0
    assert "assert_predictions_account_for_every_building" in broken.stdout
    con = duckdb.connect(str(db))
    con.load_extension(spatial_extension_path())
    con.execute("insert into predictions select * from _kept")
    con.execute("drop table _kept")
    con.close()
    fixed = subprocess.run(
        [*dbt, "--target-path", str(data / "dbt_target")], env=env, cwd=DBT_DIR, capture_output=True, text=True
    )
    assert fixed.returncode == 0, fixed.stdout[-2000:]


def _stale_status(instance, key: str, partition: str | None = None):
    from dagster import AssetKey
    from dagster._core.definitions.data_version import CachingStaleStatusResolver
    from dagster._core.loader import LoadingContextForTest

    from orchestration.definitions import defs

    resolver = CachingStaleStatusResolver(instance, defs.resolve_asset_graph(), LoadingContextForTest(instance))
    return resolver.get_status(AssetKey(key), partition)


def test_a_new_model_version_marks_predictions_stale(materialized):
    from dagster._core.definitions.data_version import StaleStatus

    resources, data, _, instance = materialized
    _run(materialized, ["roof_model", "solar_model"], run_config=QUICK_TRAINING)
    _run(materialized, ["predictions"], "12")
    assert _stale_status(instance, "predictions", "12") == StaleStatus.FRESH
    before = resources["models"].current_version("solar_panels")
    _run(materialized, ["solar_model"], run_config={"ops": {"solar_model": {"config": {"epochs": 1, "seed": 1}}}})
    assert resources["models"].current_version("solar_panels") != before
    assert _stale_status(instance, "predictions", "12") == StaleStatus.STALE
    _run(materialized, ["predictions"], "12")
    assert _stale_status(instance, "predictions", "12") == StaleStatus.FRESH


def test_a_model_that_cannot_read_the_chips_fails_before_writing(materialized):
    """A 48 px model made current: predictions fails naming model and shard; the table is untouched."""
    import torch

    from ops.ml.card import ModelCard
    from ops.ml.nets import RoofNet

    resources, data, _, _ = materialized
    store = resources["models"]
    good = store.current_version("roof_type")
    before = _query(data, "select model_name, model_version, count(*) n from predictions group by all order by all")
    torch.manual_seed(0)
    card = ModelCard(
        "roof_type", "classification", ["flat", "gable", "hip"], 48, 3, [0.5] * 3, [0.2] * 3, "RoofNet", [8]
    )
    bad = store.save(RoofNet(3, card.mean, card.std, [8]), card)
    try:
        result = _run(materialized, ["predictions"], "12", raise_on_error=False)
        assert not result.success
        (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
        err = failure.step_failure_data.error
        message = err.message + (err.cause.message if err.cause else "")
        assert f"roof_type@{bad} expects 48×48" in message and "partition 12" in message
        assert not [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
        after = _query(data, "select model_name, model_version, count(*) n from predictions group by all order by all")
        pd.testing.assert_frame_equal(before, after)
    finally:
        (Path(store.root) / "roof_type" / "CURRENT").write_text(good)
