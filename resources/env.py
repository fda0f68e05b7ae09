"""Which environment this process runs in (``BATIVISION_ENV``), and the engines that implies.

The switch itself — which resources and executor each environment gets — is
``orchestration/environment.py``. What lives here is what must be known
where definitions are built, below the orchestration layer: the assets
declare as their ``kinds`` the engines they really write to (DuckDB or
BigQuery, a folder or Cloud Storage), so the UI says the truth in each
environment.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

ENVIRONMENTS = ("local", "prod")

#: Each environment's engines: the warehouse (a dbt adapter name) and the object store.
ENGINES = {
    "local": {"warehouse": "duckdb", "store": "filesystem"},
    "prod": {"warehouse": "bigquery", "store": "gcs"},
}


def current_env() -> str:
    """``BATIVISION_ENV`` (default ``local``); anything else is an error naming the variable."""
    env = os.environ.get("BATIVISION_ENV", "local")
    if env not in ENVIRONMENTS:
        raise ValueError(f"BATIVISION_ENV={env!r}: expected one of {ENVIRONMENTS}")
    return env


def kinds(*own: str, warehouse: bool = False, store: bool = True) -> set[str]:
    """An asset's ``kinds``: its own (``pytorch``, ``parquet``...) plus the engines it writes to here."""
    engines = ENGINES[current_env()]
    out = set(own)
    if warehouse:
        out.add(engines["warehouse"])
    if store and engines["store"] != "filesystem":
        out.add(engines["store"])
    return out


#: The Dagster pool of the steps that hold a GPU (training, inference): its limit is the GPUs there are.
GPU_POOL = "gpu"


def inference_pool() -> str:
    """The pool of ``predictions``, which both holds a GPU and writes the warehouse.

    Locally it writes DuckDB, which one process at a time may open for writing: the ``warehouse``
    pool, with ``buildings`` and the dbt models. In production the GPU is what is scarce, and
    BigQuery takes writes of different partitions at once (a transaction aborted by a concurrent
    one is retried: ``resources/bigquery.py``): the ``gpu`` pool.
    """
    from resources.warehouse import WAREHOUSE_POOL

    return GPU_POOL if current_env() == "prod" else WAREHOUSE_POOL


def scratch_dir() -> Path:
    """This process's writable scratch folder: ``$BATIVISION_CACHE_DIR/bativision``, else the temp dir's.

    The production image's root filesystem is read-only: its pods mount a scratch volume and point
    ``BATIVISION_CACHE_DIR`` (and ``TMPDIR``) at it. Object-store caches, BigQuery staging files and
    dbt's run targets all live under this folder.
    """
    return Path(os.environ.get("BATIVISION_CACHE_DIR") or tempfile.gettempdir()) / "bativision"
