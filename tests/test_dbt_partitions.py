"""dbt per partition: a département's run rebuilds and tests that département only.

Two départements go through the pipeline; one is then broken (a prediction row lost). The other's
dbt run still passes and leaves the broken one's mart rows as they were; the broken one's run
fails on the accounting invariant; once repaired it passes. The marts hold both départements.
"""

from __future__ import annotations

import duckdb
import pandas as pd
import pytest
from dagster import DagsterInstance, materialize

from ops.ml.attributes import load_attributes
from orchestration.definitions import all_assets
from resources.warehouse import spatial_extension_path

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("dbt_partitions")]

PIPELINE = ["buildings", "ortho_mosaic", "chips", "predictions"]
DBT_MODELS = ["stg_buildings", "stg_predictions", "building_attributes", "departement_summary"]


@pytest.fixture(scope="module")
def env(small_dep, synth_root, tmp_path_factory):
    from synthetic import generate_departement

    other = generate_departement(synth_root, "2A", 300, seed=4, tile_px=1000)
    data = tmp_path_factory.mktemp("data")
    mp = pytest.MonkeyPatch()
    mp.setenv("BATIVISION_DATA_DIR", str(data))
    mp.setenv("BATIVISION_SOURCE_DIR", str(synth_root))
    from orchestration.environment import local_resources

    env = local_resources(), data, DagsterInstance.ephemeral()
    for dep in ("12", "2A"):
        assert run(env, PIPELINE + DBT_MODELS, dep).success
    yield env, {"12": small_dep.n_buildings, "2A": other.n_buildings}
    mp.undo()


def run(env, selection, dep):
    resources, _, instance = env
    return materialize(
        all_assets, selection=selection, partition_key=dep, resources=resources, instance=instance, raise_on_error=False
    )


def query(env, sql: str) -> pd.DataFrame:
    _, data, _ = env
    con = duckdb.connect(str(data / "warehouse.duckdb"))
    try:
        con.load_extension(spatial_extension_path())
        return con.execute(sql).df()
    finally:
        con.close()


def mart_rows(env, dep: str) -> dict[str, pd.DataFrame]:
    return {
        "attributes": query(
            env,
            f"""select building_id, roof_type_label, roof_type_score, solar_panels_label, roof_type_predicted_at
                from building_attributes where departement = '{dep}' order by building_id""",
        ),
        "summary": query(env, f"select * from departement_summary where departement = '{dep}' order by model_name"),
    }


def test_marts_hold_every_departement_built_partition_by_partition(env):
    env, n = env
    got = query(env, "select departement, count(*) n from building_attributes group by 1 order by 1")
    assert dict(zip(got.departement, got.n, strict=True)) == n
    summary = query(env, "select departement, model_name, buildings, predicted from departement_summary")
    # one row per département and declared attribute's model version
    assert len(summary) == 2 * len(load_attributes()) and (summary.buildings == summary.predicted).all()
    assert set(summary.departement) == {"12", "2A"}


def test_a_broken_departement_fails_its_own_run_only_and_keeps_its_rows(env):
    env, _ = env
    before_12, before_2a = mart_rows(env, "12"), mart_rows(env, "2A")
    query(env, "create table _lost as select * from predictions where departement = '2A' limit 1")
    query(
        env,
        "delete from predictions p using _lost l where p.building_id = l.building_id and p.model_name = l.model_name",
    )
    try:
        other = run(env, DBT_MODELS, "12")
        assert other.success, "a broken 2A failed 12's dbt run"
        after_2a = mart_rows(env, "2A")
        for k in before_2a:  # 12's rebuild did not touch 2A's rows
            pd.testing.assert_frame_equal(before_2a[k], after_2a[k])
        rebuilt_12 = mart_rows(env, "12")
        assert len(rebuilt_12["attributes"]) == len(before_12["attributes"])
        broken = run(env, DBT_MODELS, "2A")
        assert not broken.success
        failures = "\n".join(str(e.event_specific_data) for e in broken.all_events if e.is_failure)
        assert "assert_predictions_account_for_every_building" in failures, failures[-3000:]
    finally:
        query(env, "insert into predictions select * from _lost")
        query(env, "drop table _lost")
    assert run(env, DBT_MODELS, "2A").success
