"""One switch, ``BATIVISION_ENV``, picks where everything runs.

``local`` (the default) is the embedded stack: a DuckDB file, a local folder
as object store, SQLite Dagster storage (``dagster.yaml`` under
``DAGSTER_HOME``) and the multiprocess executor. Paths can be moved with
``BATIVISION_DATA_DIR`` (default ``./data``) and ``BATIVISION_SOURCE_DIR``
(default ``<data>/sample``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from dagster import multiprocess_executor
from dagster_dbt import DbtCliResource

from assets.dbt import DBT_DIR
from resources.imagery import FootprintSource, OrthoImagery
from resources.model_store import ModelStore
from resources.object_store import LocalObjectStore
from resources.warehouse import DuckDBWarehouse

REPO_ROOT = Path(__file__).resolve().parent.parent
ENVIRONMENTS = ("local", "prod")


def current_env() -> str:
    env = os.environ.get("BATIVISION_ENV", "local")
    if env not in ENVIRONMENTS:
        raise ValueError(f"BATIVISION_ENV={env!r}: expected one of {ENVIRONMENTS}")
    return env


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
        "imagery": OrthoImagery(root=str(sources)),
        "footprints": FootprintSource(root=str(sources)),
        "models": ModelStore(root=str(data / "store" / "models"), shipped=str(REPO_ROOT / "models")),
        "dbt": DbtCliResource(
            project_dir=str(DBT_DIR),
            profiles_dir=str(DBT_DIR),
            target="local",
            dbt_executable=str(Path(sys.executable).parent / "dbt"),
        ),
    }


def resources_for(env: str | None = None) -> dict:
    env = env or current_env()
    if env == "local":
        return local_resources()
    raise NotImplementedError(
        "BATIVISION_ENV=prod (BigQuery, GCS, Postgres, k8s) is not available in this version; use BATIVISION_ENV=local"
    )


def executor_for(env: str | None = None):
    """Multiprocess locally: each step in its own process, like a pod per step in prod."""
    return multiprocess_executor.configured({"max_concurrent": 2})
