"""The environment switch: what BATIVISION_ENV=prod builds, without any cloud."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys

import pytest
from dagster import EnvVar
from dagster_gcp import BigQueryResource, GCSResource

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
    # dagster-gcp's own resources hold the clients' configuration (the UI shows them nested)
    assert isinstance(r["warehouse"].bigquery, BigQueryResource) and r["warehouse"].bigquery.gcp_credentials is None
    assert isinstance(r["store"].gcs, GCSResource) and r["store"].gcs.project == "acme-geo"
    assert isinstance(r["store"], GcsObjectStore) and r["store"].uri("a/b") == "gs://acme-bv/bativision/a/b"
    assert isinstance(r["models"].store, GcsObjectStore)
    assert r["imagery"].root == "gs://acme-bv/sources"
    assert r["dbt"].target == "bigquery"
    assert executor_for("prod").name == "bativision_k8s"


def _service_account_key() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    info = {
        "type": "service_account",
        "project_id": "acme-geo",
        "private_key_id": "1",
        "private_key": pem.decode(),
        "client_email": "bativision@acme-geo.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": "https://oauth2.googleapis.com/token",
    }
    return base64.b64encode(json.dumps(info).encode()).decode()


def test_a_service_account_key_is_passed_by_reference_and_used_by_the_client(monkeypatch):
    """dagster-gcp's gcp_credentials: the key stays in the environment; the client signs as that account."""
    for k, v in PROD.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("BATIVISION_GCP_CREDENTIALS", _service_account_key())
    wh = prod_resources()["warehouse"]
    assert wh.bigquery.gcp_credentials == EnvVar("BATIVISION_GCP_CREDENTIALS")  # a name, not the key
    resolved = BigQueryWarehouse(
        bigquery=BigQueryResource(project="acme-geo", gcp_credentials=wh.bigquery.gcp_credentials.get_value()),
        dataset="d",
    )
    assert resolved.client()._credentials.service_account_email == "bativision@acme-geo.iam.gserviceaccount.com"
    bad = BigQueryWarehouse(bigquery=BigQueryResource(project="acme-geo", gcp_credentials="not a key"), dataset="d")
    with pytest.raises(ValueError, match="gcp_credentials is not a base64-encoded service-account JSON key"):
        bad.client()


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
