"""The analytical warehouse: one table per contract (DESIGN.md), written by partition.

:class:`Warehouse` is what assets depend on; :class:`DuckDBWarehouse` (here, the
embedded default) and ``resources.bigquery.BigQueryWarehouse`` (production)
implement it. For DuckDB: Writing a partition is one transaction
(delete the partition's rows, insert the new ones), so readers never see a
half-written partition and a re-run replaces rows instead of duplicating them.
DuckDB allows one writer process at a time: connections are short-lived and
retried while another process holds the file, and the assets that write here
share a Dagster concurrency pool.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
from dagster import ConfigurableResource, get_dagster_logger
from pydantic import Field

WAREHOUSE_POOL = "warehouse"

TABLE_DDL = {
    "buildings": """
        CREATE TABLE IF NOT EXISTS buildings (
            building_id VARCHAR NOT NULL,
            departement VARCHAR NOT NULL,
            cell_id VARCHAR NOT NULL,
            geometry GEOMETRY,
            area_m2 DOUBLE,
            height_m DOUBLE,
            usage VARCHAR,
            geometry_status VARCHAR NOT NULL,
            source VARCHAR NOT NULL
        )""",
    "predictions": """
        CREATE TABLE IF NOT EXISTS predictions (
            building_id VARCHAR NOT NULL,
            departement VARCHAR NOT NULL,
            model_name VARCHAR NOT NULL,
            model_version VARCHAR NOT NULL,
            task VARCHAR NOT NULL,
            label VARCHAR,
            score DOUBLE,
            probabilities VARCHAR,
            geometry GEOMETRY,
            status VARCHAR NOT NULL,
            imagery_id VARCHAR,
            run_id VARCHAR,
            predicted_at TIMESTAMP
        )""",
}
GEOMETRY_COLUMNS = {"geometry"}


def spatial_extension_path() -> str:
    """The spatial extension file shipped in the ``duckdb-extension-spatial`` wheel.

    DuckDB would otherwise download it at run time, which this project must
    never need.
    """
    import duckdb_extension_spatial

    root = Path(duckdb_extension_spatial.__file__).parent / "extensions"
    found = sorted(root.glob(f"v{duckdb.__version__}/*.duckdb_extension"))
    if not found:
        raise RuntimeError(f"no spatial extension for DuckDB {duckdb.__version__} under {root}")
    return str(found[0])


class Warehouse(ConfigurableResource):
    """What assets need from a warehouse, whichever engine is behind it.

    Assets annotate their resource with this base so that the environment
    switch can hand them DuckDB locally or BigQuery in production.
    """

    @property
    @abstractmethod
    def kind(self) -> str:
        """The dbt adapter type of the engine (``duckdb``, ``bigquery``)."""

    @abstractmethod
    def replace_partition(
        self,
        table: str,
        departement: str,
        batches: Iterable[pa.RecordBatch],
        *,
        where: dict[str, str] | None = None,
    ) -> int:
        """Atomically replace the rows of ``table`` for ``departement`` (and ``where``); returns rows written."""

    @abstractmethod
    def query(self, sql: str, params: list | None = None) -> pd.DataFrame:
        """Run a read-only query (``?`` positional parameters) and return its rows."""

    @abstractmethod
    def dbt_env(self) -> dict[str, str]:
        """Environment variables dbt's profile reads to reach this warehouse."""


class DuckDBWarehouse(Warehouse):
    """A DuckDB file as the warehouse (the embedded default)."""

    path: str = Field(default="data/warehouse.duckdb", description="DuckDB database file")
    lock_timeout_s: float = Field(default=300.0, description="How long to wait for another writer to release the file")

    @property
    def kind(self) -> str:
        return "duckdb"

    @contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection with the spatial extension loaded, retried while the file is locked."""
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.lock_timeout_s
        delay = 0.2
        while True:
            try:
                con = duckdb.connect(self.path, read_only=read_only, config={"autoinstall_known_extensions": False})
                break
            except duckdb.IOException as exc:
                if "lock" not in str(exc).lower() or time.monotonic() > deadline:
                    raise
                get_dagster_logger().info(f"{self.path} is locked by another process; retrying in {delay:.1f} s")
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        try:
            con.load_extension(spatial_extension_path())
            yield con
        finally:
            con.close()

    def ensure_tables(self, con: duckdb.DuckDBPyConnection) -> None:
        for ddl in TABLE_DDL.values():
            con.execute(ddl)

    def replace_partition(
        self,
        table: str,
        departement: str,
        batches: Iterable[pa.RecordBatch],
        *,
        where: dict[str, str] | None = None,
    ) -> int:
        """Replace the rows of ``table`` for ``departement`` (and ``where`` equalities) in one transaction.

        Batches carry geometry as WGS84 WKB. Returns the number of rows written.
        """
        if table not in TABLE_DDL:
            raise ValueError(f"unknown warehouse table {table!r}")
        filters = {"departement": departement, **(where or {})}
        cond = " AND ".join(f"{k} = ?" for k in filters)
        with self.connect() as con:
            self.ensure_tables(con)
            cols = [r[0] for r in con.execute(f"DESCRIBE {table}").fetchall()]
            select = ", ".join(f"ST_GeomFromWKB({c})" if c in GEOMETRY_COLUMNS else c for c in cols)
            con.execute("BEGIN TRANSACTION")
            try:
                con.execute(f"DELETE FROM {table} WHERE {cond}", list(filters.values()))
                n = 0
                for batch in batches:
                    con.register("_incoming", pa.Table.from_batches([batch]))
                    con.execute(f"INSERT INTO {table} SELECT {select} FROM _incoming")
                    con.unregister("_incoming")
                    n += batch.num_rows
                written = con.execute(f"SELECT count(*) FROM {table} WHERE {cond}", list(filters.values())).fetchone()[
                    0
                ]
                if written != n:
                    raise RuntimeError(f"{table}[{departement}]: wrote {n} rows but {written} are there; rolled back")
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        return n

    def query(self, sql: str, params: list | None = None) -> pd.DataFrame:
        with self.connect(read_only=Path(self.path).exists()) as con:
            return con.execute(sql, params or []).df()

    def dbt_env(self) -> dict[str, str]:
        return {
            "BATIVISION_DUCKDB_PATH": str(Path(self.path).resolve()),
            "BATIVISION_SPATIAL_EXTENSION": spatial_extension_path(),
        }
