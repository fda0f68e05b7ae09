"""One switch, ``BATIVISION_ENV``, picks where everything runs.

``local`` (the default) is the embedded stack: a DuckDB file, a local folder
as object store, SQLite Dagster storage (``dagster.yaml`` under
``DAGSTER_HOME``) and the multiprocess executor. Paths can be moved with
``BATIVISION_DATA_DIR`` (default ``./data``) and ``BATIVISION_SOURCE_DIR``
(default ``<data>/sample``).

``prod`` runs the same assets on Google Cloud: BigQuery as warehouse, a
Cloud Storage bucket as object store, model store and imagery source, dbt's
``bigquery`` target, and one Kubernetes pod per step (Postgres-backed Dagster
storage comes from ``orchestration/instance/prod.yaml``). Everything it needs
is read from environment variables (:data:`PROD_ENV`), none of it from the
repository; credentials are application default credentials (workload
identity on GKE).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from dagster import EnvVar, multiprocess_executor
from dagster_dbt import DbtCliResource
from dagster_gcp import BigQueryResource, GCSResource
from dagster_k8s import k8s_job_executor

from assets.dbt import DBT_DIR
from orchestration.pods import POD_ENV, k8s_executor_config
from resources.bigquery import BigQueryWarehouse
from resources.env import current_env, scratch_dir
from resources.gcs import GcsObjectStore
from resources.imagery import FootprintSource, OrthoImagery
from resources.model_store import ModelStore
from resources.object_store import LocalObjectStore
from resources.warehouse import DuckDBWarehouse

REPO_ROOT = Path(__file__).resolve().parent.parent

# BATIVISION_ENV=prod: variable → what it sets (required ones have no default).
PROD_ENV = {
    "BATIVISION_BQ_PROJECT": "GCP project of the BigQuery dataset (required)",
    "BATIVISION_BQ_DATASET": "BigQuery dataset of `buildings`, `predictions` and the dbt models (required)",
    "BATIVISION_BQ_LOCATION": "BigQuery location (default EU)",
    "BATIVISION_GCP_CREDENTIALS": "base64 service-account key for BigQuery (unset: workload identity / ADC)",
    "BATIVISION_GCS_BUCKET": "bucket of the object store and the model store (required)",
    "BATIVISION_GCS_PREFIX": "key prefix of the artefacts in the bucket (default bativision)",
    "BATIVISION_COMPUTE_LOG_PREFIX": "key prefix of the steps' stdout/stderr in the bucket (the instance's compute_logs)",
    "BATIVISION_SOURCE_URI": "gs:// folder with one sub-folder per département (default gs://<bucket>/sources)",
    "BATIVISION_CACHE_DIR": "local scratch folder of a step's pod (default: the temp dir)",
    "BATIVISION_BQ_API_ENDPOINT": "BigQuery endpoint override (unset in production; tests: the emulator)",
    "BATIVISION_GCS_API_ENDPOINT": "Cloud Storage endpoint override (unset in production; tests: the emulator)",
    "BATIVISION_EXECUTOR": "k8s (default) or multiprocess (prod resources without a cluster)",
    **POD_ENV,
}

# Either environment: imagery read from an OGC WMS instead of tile files (see README, "Imagery from a WMS").
WMS_ENV = {
    "BATIVISION_WMS_URL": "WMS endpoint, e.g. https://data.geopf.fr/wms-r (unset: tile files under the sources)",
    "BATIVISION_WMS_LAYER": "WMS layer (default ORTHOIMAGERY.ORTHOPHOTOS, IGN's BD ORTHO)",
    "BATIVISION_WMS_STYLE": "WMS style (default: the layer's own)",
    "BATIVISION_WMS_FORMAT": "GetMap format, image/jpeg (default) or image/png",
    "BATIVISION_WMS_REQUESTS_PER_S": "most GetMap requests started per second (default 10)",
}


def wms_settings(cache: Path) -> dict:
    """``OrthoImagery``'s WMS fields from :data:`WMS_ENV` (none when ``BATIVISION_WMS_URL`` is unset)."""
    url = os.environ.get("BATIVISION_WMS_URL", "").strip()
    if not url:
        return {}
    fields = {"wms_url": url, "wms_cache_dir": str(cache / "wms")}
    for var, field in (("LAYER", "wms_layer"), ("STYLE", "wms_style"), ("FORMAT", "wms_format")):
        if f"BATIVISION_WMS_{var}" in os.environ:
            fields[field] = os.environ[f"BATIVISION_WMS_{var}"]
    if os.environ.get("BATIVISION_WMS_REQUESTS_PER_S"):
        fields["wms_requests_per_s"] = float(os.environ["BATIVISION_WMS_REQUESTS_PER_S"])
    return fields


def data_dir() -> Path:
    return Path(os.environ.get("BATIVISION_DATA_DIR", REPO_ROOT / "data")).resolve()


def source_dir() -> Path:
    return Path(os.environ.get("BATIVISION_SOURCE_DIR", data_dir() / "sample")).resolve()


def local_resources() -> dict:
    data = data_dir()
    sources = source_dir()
    return {
        "warehouse": DuckDBWarehouse(path=str(data / "warehouse.duckdb")),
        "store": LocalObjectStore(root=str(data / "store")),
        "imagery": OrthoImagery(root=str(sources), **wms_settings(data / "cache")),
        "footprints": FootprintSource(root=str(sources)),
        "models": ModelStore(root=str(data / "store" / "models"), shipped=str(REPO_ROOT / "models")),
        "dbt": DbtCliResource(
            project_dir=str(DBT_DIR),
            profiles_dir=str(DBT_DIR),
            target="local",
            dbt_executable=str(Path(sys.executable).parent / "dbt"),
        ),
    }


def _required(name: str) -> str:
    value = os.environ.get(name, "").strip()
    if not value:
        raise ValueError(f"BATIVISION_ENV=prod needs {name}: {PROD_ENV[name]}")
    return value


def prod_resources() -> dict:
    """BigQuery, Cloud Storage and dbt's `bigquery` target, configured from the environment."""
    bucket = _required("BATIVISION_GCS_BUCKET")
    prefix = os.environ.get("BATIVISION_GCS_PREFIX", "bativision").strip("/")
    gcs_endpoint = os.environ.get("BATIVISION_GCS_API_ENDPOINT") or None
    sources = os.environ.get("BATIVISION_SOURCE_URI") or f"gs://{bucket}/sources"
    cache = scratch_dir()
    project = _required("BATIVISION_BQ_PROJECT")
    gcs = GCSResource(project=project)

    def store() -> GcsObjectStore:
        return GcsObjectStore(
            root=str(cache / "store"), gcs=gcs, bucket=bucket, prefix=prefix, api_endpoint=gcs_endpoint
        )

    return {
        "warehouse": BigQueryWarehouse(
            bigquery=BigQueryResource(
                project=project,
                location=os.environ.get("BATIVISION_BQ_LOCATION", "EU"),
                # by reference: the UI and the run records show the variable's name, never the key
                gcp_credentials=EnvVar("BATIVISION_GCP_CREDENTIALS")
                if os.environ.get("BATIVISION_GCP_CREDENTIALS")
                else None,
            ),
            dataset=_required("BATIVISION_BQ_DATASET"),
            api_endpoint=os.environ.get("BATIVISION_BQ_API_ENDPOINT") or None,
            staging_dir=str(cache),
        ),
        "store": store(),
        "imagery": OrthoImagery(root=sources, api_endpoint=gcs_endpoint, **wms_settings(cache)),
        "footprints": FootprintSource(root=sources, api_endpoint=gcs_endpoint, cache_dir=str(cache / "sources")),
        "models": ModelStore(store=store(), shipped=str(REPO_ROOT / "models")),
        "dbt": DbtCliResource(
            project_dir=str(DBT_DIR),
            profiles_dir=str(DBT_DIR),
            target="bigquery",
            dbt_executable=str(Path(sys.executable).parent / "dbt"),
        ),
    }


def resources_for(env: str | None = None) -> dict:
    env = env or current_env()
    return local_resources() if env == "local" else prod_resources()


def executor_for(env: str | None = None):
    """Locally, multiprocess: each step in its own process. In prod, one Kubernetes pod per step.

    The pods take the image, namespace and environment of the run launcher
    (``k8s/values.yaml``); what each pod asks for, where it runs and as whom is in
    :mod:`orchestration.pods`.
    ``BATIVISION_EXECUTOR=multiprocess`` keeps prod's resources on one machine (a VM, no cluster).
    """
    if (env or current_env()) == "prod" and os.environ.get("BATIVISION_EXECUTOR", "k8s") != "multiprocess":
        return k8s_job_executor.configured(k8s_executor_config(), name="bativision_k8s")
    return multiprocess_executor.configured({"max_concurrent": 2})
