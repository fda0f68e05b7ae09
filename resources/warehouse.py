"""The analytical warehouse: one table per contract (DESIGN.md), written by partition.

:class:`Warehouse` is what assets depend on; :class:`DuckDBWarehouse` (here, the
embedded default) and ``resources.bigquery.BigQueryWarehouse`` (production)
implement it. Publishing a partition is one transaction over its tables
(delete the partition's rows, insert the new ones, for its buildings and its
predictions together), so readers never see a half-written partition nor a
partition's buildings out of step with its predictions, and a re-run replaces
rows instead of duplicating them.
DuckDB allows one writer process at a time: connections are short-lived and
retried while another process holds the file, and the assets that write here
share a Dagster concurrency pool.
"""

from __future__ import annotations

import os
import time
from abc import abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
from dagster import ConfigurableResource, get_dagster_logger
from pydantic import Field

WAREHOUSE_POOL = "warehouse"

# The warehouse tables (docs/DESIGN.md), once for every engine: column → (type, required), in order.
# Types are logical: "string", "float", "geometry", "timestamp"; each engine maps them to its own.
TABLE_COLUMNS: dict[str, list[tuple[str, str, bool]]] = {
    "buildings": [
        ("building_id", "string", True),
        ("departement", "string", True),
        ("cell_id", "string", True),
        ("geometry", "geometry", False),
        ("area_m2", "float", False),
        ("height_m", "float", False),
        ("usage", "string", False),
        ("geometry_status", "string", True),
        ("source", "string", True),
    ],
    "predictions": [
        ("building_id", "string", True),
        ("departement", "string", True),
        ("model_name", "string", True),
        ("model_version", "string", True),
        ("task", "string", True),
        ("label", "string", False),
        ("score", "float", False),
        ("value", "float", False),  # regression attributes (added after the first release: see added_columns)
        ("probabilities", "string", False),
        ("geometry", "geometry", False),
        ("status", "string", True),
        ("imagery_id", "string", False),
        ("run_id", "string", False),
        ("predicted_at", "timestamp", False),
    ],
}
_DUCKDB_TYPES = {"string": "VARCHAR", "float": "DOUBLE", "geometry": "GEOMETRY", "timestamp": "TIMESTAMP"}


def added_columns(table: str, existing: Iterable[str]) -> list[tuple[str, str]]:
    """Nullable columns of the contract that an existing table lacks: added in place, rows kept (NULL there).

    A warehouse created by an earlier release (before ``predictions.value``) is
    brought up to the contract instead of failing the publish; a missing
    required column is not something a migration can invent, so it is left to fail.
    """
    have = {c.lower() for c in existing}
    return [(name, typ) for name, typ, req in TABLE_COLUMNS[table] if not req and name not in have]


def duckdb_ddl(table: str) -> str:
    cols = ", ".join(
        f"{name} {_DUCKDB_TYPES[typ]}{' NOT NULL' if req else ''}" for name, typ, req in TABLE_COLUMNS[table]
    )
    return f"CREATE TABLE IF NOT EXISTS {table} ({cols})"


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


@dataclass(frozen=True)
class PartitionRows:
    """The new rows of one table for a partition: those matching ``where`` (besides the partition) are replaced."""

    table: str
    batches: Iterable[pa.RecordBatch]
    where: dict[str, str] | None = None


class Warehouse(ConfigurableResource):
    """What assets need from a warehouse, whichever engine is behind it.

    Assets annotate their resource with this base so that the environment
    switch can hand them DuckDB locally or BigQuery in production.
    """

    @property
    @abstractmethod
    def kind(self) -> str:
        """The dbt adapter type of the engine (``duckdb``, ``bigquery``)."""

    @staticmethod
    def partition_filters(table: str, departement: str, where: dict[str, str] | None) -> dict[str, str]:
        """The column equalities that select a partition's rows, checked against the table's columns."""
        if table not in TABLE_COLUMNS:
            raise ValueError(f"unknown warehouse table {table!r}")
        filters = {"departement": departement, **(where or {})}
        columns = {name for name, _, _ in TABLE_COLUMNS[table]}
        for key in filters:
            if key not in columns:
                raise ValueError(f"{table}: no column {key!r} to filter on")
        return filters

    @abstractmethod
    def publish(self, departement: str, parts: Sequence[PartitionRows]) -> list[int]:
        """Replace each part's rows of ``departement``, all parts in one transaction; returns rows written per part.

        Readers see every part's old rows or every part's new ones, never a mix:
        a partition's buildings and its predictions are published together.
        """

    def replace_partition(
        self,
        table: str,
        departement: str,
        batches: Iterable[pa.RecordBatch],
        *,
        where: dict[str, str] | None = None,
    ) -> int:
        """Atomically replace the rows of ``table`` for ``departement`` (and ``where``); returns rows written."""
        return self.publish(departement, [PartitionRows(table, batches, where)])[0]

    @abstractmethod
    def query(self, sql: str, params: list | None = None) -> pd.DataFrame:
        """Run a read-only query (``?`` positional parameters) and return its rows."""

    @abstractmethod
    def dbt_env(self) -> dict[str, str]:
        """Environment variables dbt's profile reads to reach this warehouse."""


#: A new DuckDB file's headers (one main, two database headers of 4 KiB): smaller, it is still being written.
DUCKDB_HEADERS_BYTES = 3 * 4096
#: How long a file without its headers may be another process's creation rather than a bad file.
CREATION_WINDOW_S = 30.0


def _locked(exc: duckdb.IOException) -> bool:
    return "lock" in str(exc).lower()


def _being_created(path: str, exc: duckdb.IOException) -> bool:
    """Another process is creating the file: DuckDB found it before its headers were written.

    Two steps that write a warehouse nobody has written yet (a backfill's first
    partitions) both create it; the second must wait like for a lock, not fail.
    A file that stays without headers, or a big file that is not DuckDB, is an error.
    """
    if "not a valid duckdb database file" not in str(exc).lower():
        return False
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return True
    return st.st_size < DUCKDB_HEADERS_BYTES and time.time() - st.st_mtime < CREATION_WINDOW_S


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
                if not (_locked(exc) or _being_created(self.path, exc)) or time.monotonic() > deadline:
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
        for table in TABLE_COLUMNS:
            con.execute(duckdb_ddl(table))
            existing = [r[0] for r in con.execute(f"DESCRIBE {table}").fetchall()]
            for name, typ in added_columns(table, existing):
                con.execute(f"ALTER TABLE {table} ADD COLUMN {name} {_DUCKDB_TYPES[typ]}")

    def publish(self, departement: str, parts: Sequence[PartitionRows]) -> list[int]:
        """Replace each part's rows (``departement`` and its ``where`` equalities) in one transaction.

        Batches carry geometry as WGS84 WKB. Returns the number of rows written per part.
        """
        filters = [self.partition_filters(p.table, departement, p.where) for p in parts]
        written: list[int] = []
        with self.connect() as con:
            self.ensure_tables(con)
            con.execute("BEGIN TRANSACTION")
            try:
                for part, where in zip(parts, filters, strict=True):
                    written.append(self._replace(con, part, where, departement))
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        return written

    @staticmethod
    def _replace(con: duckdb.DuckDBPyConnection, part: PartitionRows, filters: dict[str, str], dep: str) -> int:
        """Delete then insert one part's rows inside the caller's transaction, checking the count."""
        table = part.table
        cond = " AND ".join(f"{k} = ?" for k in filters)
        cols = [r[0] for r in con.execute(f"DESCRIBE {table}").fetchall()]
        select = ", ".join(f"ST_GeomFromWKB({c})" if c in GEOMETRY_COLUMNS else c for c in cols)
        con.execute(f"DELETE FROM {table} WHERE {cond}", list(filters.values()))
        n = 0
        for batch in part.batches:
            con.register("_incoming", pa.Table.from_batches([batch]))
            con.execute(f"INSERT INTO {table} SELECT {select} FROM _incoming")
            con.unregister("_incoming")
            n += batch.num_rows
        written = con.execute(f"SELECT count(*) FROM {table} WHERE {cond}", list(filters.values())).fetchone()[0]
        if written != n:
            raise RuntimeError(f"{table}[{dep}]: wrote {n} rows but {written} are there; rolled back")
        return n

    def query(self, sql: str, params: list | None = None) -> pd.DataFrame:
        with self.connect(read_only=Path(self.path).exists()) as con:
            return con.execute(sql, params or []).df()

    def dbt_env(self) -> dict[str, str]:
        return {
            "BATIVISION_DUCKDB_PATH": str(Path(self.path).resolve()),
            "BATIVISION_SPATIAL_EXTENSION": spatial_extension_path(),
        }
