"""The embedded environment of a pipeline test: local resources on a temporary data folder, and its warehouse.

Tests that materialize the pipeline on a synthetic département all need the
same three things — the environment variables pointed at their folders, the
local resources and an ephemeral instance — and read the DuckDB warehouse the
same way; they are spelled once here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pandas as pd
import pytest
from dagster import DagsterInstance

from resources.warehouse import spatial_extension_path


@contextmanager
def local_env(sources: Path, data: Path) -> Iterator[tuple[dict, DagsterInstance]]:
    """(local resources, an ephemeral instance) with data under ``data`` and the département folders under ``sources``."""
    mp = pytest.MonkeyPatch()
    mp.setenv("BATIVISION_DATA_DIR", str(data))
    mp.setenv("BATIVISION_SOURCE_DIR", str(sources))
    try:
        from orchestration.environment import local_resources

        yield local_resources(), DagsterInstance.ephemeral()
    finally:
        mp.undo()


def query_warehouse(data: Path, sql: str) -> pd.DataFrame:
    """``sql`` on the DuckDB warehouse of the data folder, read-only, with the spatial functions."""
    con = duckdb.connect(str(data / "warehouse.duckdb"), read_only=True)
    try:
        con.load_extension(spatial_extension_path())
        return con.execute(sql).df()
    finally:
        con.close()
