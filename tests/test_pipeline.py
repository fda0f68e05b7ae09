"""The whole pipeline on a small synthetic partition, through Dagster's `materialize`.

What a user checks: every building of the partition has exactly one
prediction row, defects carry the right status, a re-run replaces rows, and
dbt's models build with their tests passing.
"""

from __future__ import annotations

import duckdb
import pandas as pd
import pytest
from dagster import DagsterInstance, materialize

from orchestration.definitions import all_assets
from resources.warehouse import spatial_extension_path

pytestmark = pytest.mark.xdist_group("pipeline")

CROP = ["buildings", "ortho_mosaic", "chips"]
PREDICT = ["predictions", "stg_buildings", "stg_predictions", "building_attributes", "departement_summary"]
QUICK_TRAINING = {"ops": {"roof_model": {"config": {"epochs": 2}}}}


@pytest.fixture(scope="module")
def env(small_dep, tmp_path_factory):
    """Local resources pointed at a temporary data folder and the synthetic sources."""
    data = tmp_path_factory.mktemp("data")
    mp = pytest.MonkeyPatch()
    mp.setenv("BATIVISION_DATA_DIR", str(data))
    mp.setenv("BATIVISION_SOURCE_DIR", str(small_dep.root.parent))
    from orchestration.environment import local_resources

    yield local_resources(), data, small_dep
    mp.undo()


def _run(resources, selection, partition=None, run_config=None):
    result = materialize(
        all_assets,
        selection=selection,
        partition_key=partition,
        resources=resources,
        instance=DagsterInstance.ephemeral(),
        run_config=run_config,
        raise_on_error=True,
    )
    assert result.success
    return result


def _query(data, sql) -> pd.DataFrame:
    con = duckdb.connect(str(data / "warehouse.duckdb"), read_only=True)
    try:
        con.load_extension(spatial_extension_path())
        return con.execute(sql).df()
    finally:
        con.close()


@pytest.fixture(scope="module")
def materialized(env):
    resources, data, dep = env
    _run(resources, CROP, "12")
    _run(resources, ["roof_model"], run_config=QUICK_TRAINING)
    _run(resources, PREDICT, "12")
    return resources, data, dep


def test_every_building_has_exactly_one_prediction(materialized):
    _, data, dep = materialized
    b = _query(data, "select building_id from buildings where departement = '12'")
    p = _query(data, "select building_id, model_version from predictions where departement = '12'")
    assert len(b) == dep.n_buildings
    assert len(p) == len(b) and p["building_id"].is_unique
    assert set(p["building_id"]) == set(b["building_id"])


def test_defects_carry_the_right_statuses(materialized):
    _, data, dep = materialized
    g = _query(data, "select geometry_status s, count(*) n from buildings group by 1").set_index("s")["n"]
    p = _query(data, "select status s, count(*) n from predictions group by 1").set_index("s")["n"]
    c = dep.counts
    assert g.get("repaired", 0) == c["invalid_repairable"]
    assert g.get("invalid", 0) == c["invalid_unrepairable"]
    assert g.get("empty", 0) == c["empty"]
    assert p.get("invalid_geometry", 0) == c["invalid_unrepairable"] + c["empty"]
    assert p.get("no_imagery", 0) == c["outside_imagery"]
    assert p.get("nodata", 0) >= c["nodata_area"] > 0
    assert p.get("ok", 0) > 0.8 * dep.n_buildings
    assert p.get("error", 0) == 0
    ok = _query(data, "select label, score from predictions where status = 'ok'")
    assert ok["label"].isin(["flat", "gable", "hip"]).all() and ok["score"].between(0, 1).all()


def test_dbt_models_are_built_and_tested(materialized):
    _, data, dep = materialized
    attrs = _query(data, "select * from building_attributes")
    assert len(attrs) == dep.n_buildings and attrs["building_id"].is_unique
    assert {"roof_type_label", "roof_type_score", "roof_type_status"} <= set(attrs.columns)
    summary = _query(data, "select * from departement_summary where departement = '12'")
    assert len(summary) == 1
    row = summary.iloc[0]
    assert row.buildings == row.predicted == dep.n_buildings


def test_rerunning_a_partition_replaces_its_rows(materialized):
    resources, data, dep = materialized
    before = _query(data, "select count(*) n, count(distinct building_id) d from predictions").iloc[0]
    _run(resources, CROP + PREDICT, "12")
    after = _query(data, "select count(*) n, count(distinct building_id) d from predictions").iloc[0]
    b = _query(data, "select count(*) n, count(distinct building_id) d from buildings").iloc[0]
    assert before.n == after.n == after.d == dep.n_buildings
    assert b.n == b.d == dep.n_buildings


def test_dbt_invariant_test_fails_when_a_prediction_is_missing(materialized):
    """The accounting-invariant test must catch a lost row (then the row is put back)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from assets.dbt import DBT_DIR, dbt_env

    _, data, _ = materialized
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
    env = {**os.environ, **dbt_env(str(db))}
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
