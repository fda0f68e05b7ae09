"""The environment switch: what BATIVISION_ENV=prod builds, without any cloud."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from orchestration.environment import REPO_ROOT, executor_for, prod_resources, resources_for
from resources.bigquery import BigQueryWarehouse, table_ddl
from resources.gcs import GcsObjectStore
from tests.prodenv import PROD, prod_env


def test_prod_needs_its_variables_and_names_the_missing_one(monkeypatch):
    for k in PROD:
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ValueError, match="BATIVISION_GCS_BUCKET"):
        prod_resources()


def test_prod_resources_point_at_bigquery_gcs_and_dbt_bigquery(monkeypatch):
    for k, v in PROD.items():
        monkeypatch.setenv(k, v)
    r = resources_for("prod")
    assert isinstance(r["warehouse"], BigQueryWarehouse)
    assert (r["warehouse"].project, r["warehouse"].dataset, r["warehouse"].location) == ("acme-geo", "bativision", "EU")
    assert r["warehouse"].api_endpoint is None  # Google's endpoint, application default credentials
    assert isinstance(r["store"], GcsObjectStore) and r["store"].uri("a/b") == "gs://acme-bv/bativision/a/b"
    assert isinstance(r["models"].store, GcsObjectStore)
    assert r["imagery"].root == "gs://acme-bv/sources"
    assert r["dbt"].target == "bigquery"
    assert executor_for("prod").name == "bativision_k8s"


def test_tables_are_clustered_by_departement():
    ddl = table_ddl("p.d.buildings", "buildings")
    assert "geometry GEOGRAPHY" in ddl and ddl.rstrip().endswith("CLUSTER BY departement")


@pytest.mark.slow
def test_the_code_location_loads_in_prod():
    """What the user-code deployment does at start: import the definitions with BATIVISION_ENV=prod."""
    env = prod_env()
    code = (
        "from orchestration.definitions import defs; "
        "j = defs.resolve_implicit_global_asset_job_def(); "
        "print(type(defs.resources['warehouse']).__name__, j.executor_def.name)"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["BigQueryWarehouse", "bativision_k8s"]


KINDS_CODE = (
    "import json; from orchestration.definitions import defs; g = defs.resolve_asset_graph(); "
    "print(json.dumps({k.to_user_string(): sorted(g.get(k).kinds) for k in g.get_all_asset_keys()}))"
)


@pytest.mark.slow
@pytest.mark.parametrize(
    "env,engines,absent",
    [("local", {"duckdb"}, {"bigquery", "gcs"}), ("prod", {"bigquery", "gcs"}, {"duckdb"})],
)
def test_kinds_name_the_engines_of_the_environment(env, engines, absent):
    """What the UI shows: the warehouse and object store this environment really writes to."""
    import json

    out = subprocess.run(
        [sys.executable, "-c", KINDS_CODE],
        env={**os.environ, **PROD, "BATIVISION_ENV": env},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    kinds = json.loads(out.stdout.strip().splitlines()[-1])
    warehouse = "duckdb" if env == "local" else "bigquery"
    for key in ("predictions", "building_attributes", "departement_summary"):
        assert warehouse in kinds[key], (key, kinds[key])
    assert warehouse not in kinds["buildings"]  # its GeoParquet only: `predictions` publishes its rows
    assert engines <= set().union(*kinds.values())
    assert not absent & set().union(*kinds.values())
    if env == "prod":
        assert "gcs" in kinds["chips"] and "gcs" in kinds["roof_model"]
