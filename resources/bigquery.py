"""BigQuery as the production warehouse (same interface as :class:`DuckDBWarehouse`).

Writing a partition never leaves it half-written for readers and a re-run
never duplicates rows:

1. the batches are written to a local Parquet file (geometry as WGS84 WKB);
2. one load job puts that file into a fresh staging table (it expires by itself
   if this process dies before dropping it);
3. one multi-statement transaction deletes the partition's rows, inserts the
   staged ones (``ST_GEOGFROMWKB`` → GEOGRAPHY), asserts the partition now
   holds exactly the staged count and commits; any error rolls it back;
4. the staging table is dropped.

Tables are created on first use, clustered by ``departement``, so reading a
partition scans only its blocks. Concurrent writers to one table would abort
each other's transactions: ``buildings`` and the dbt models share the ``warehouse``
Dagster pool, limited to one in ``orchestration/instance/prod.yaml``; ``predictions``,
whose steps hold GPUs and run side by side, retries a transaction that BigQuery
aborted for a concurrent update of the same table (:func:`run_transaction`): the
script replaces only its own partition, so running it again is safe.
"""

from __future__ import annotations

import datetime as dt
import random
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from dagster import get_dagster_logger
from dagster_gcp import BigQueryResource
from google.api_core.exceptions import GoogleAPICallError
from google.cloud import bigquery
from pydantic import Field, PrivateAttr

from resources.gcp import client_options, credentials_for
from resources.warehouse import TABLE_COLUMNS, PartitionRows, Warehouse, added_columns

T = TypeVar("T")

_BQ_TYPES = {"string": "STRING", "float": "FLOAT64", "geometry": "GEOGRAPHY", "timestamp": "TIMESTAMP"}
# Column name → (BigQuery type, required), from the one description of the tables.
TABLE_SCHEMAS: dict[str, list[tuple[str, str, bool]]] = {
    table: [(name, _BQ_TYPES[typ], req) for name, typ, req in cols] for table, cols in TABLE_COLUMNS.items()
}

# How staged WKB becomes GEOGRAPHY. BigQuery cannot hold an invalid geography: a building
# whose geometry_status is `invalid` (could not be repaired) gets a NULL geography (its
# source shape stays in the GeoParquet); any other unparsable geometry fails the write.
GEOGRAPHY_EXPR = {
    "buildings": "IF(geometry_status = 'invalid', SAFE.ST_GEOGFROMWKB(geometry), ST_GEOGFROMWKB(geometry))",
    "predictions": "ST_GEOGFROMWKB(geometry)",
}

STAGING_TTL = dt.timedelta(hours=24)

_PARAM_TYPES = {bool: "BOOL", int: "INT64", float: "FLOAT64", str: "STRING"}


def table_ddl(table_id: str, table: str) -> str:
    cols = ",\n  ".join(f"{name} {typ}{' NOT NULL' if req else ''}" for name, typ, req in TABLE_SCHEMAS[table])
    return f"CREATE TABLE IF NOT EXISTS `{table_id}` (\n  {cols}\n)\nCLUSTER BY departement"


def staging_schema(table: str) -> list[bigquery.SchemaField]:
    """The staging table's columns: the target's, nullable, with geometry as WKB bytes."""
    return [
        bigquery.SchemaField(name, "BYTES" if typ == "GEOGRAPHY" else typ, mode="NULLABLE")
        for name, typ, _ in TABLE_SCHEMAS[table]
    ]


def query_parameter(name: str | None, value) -> bigquery.ScalarQueryParameter:
    typ = _PARAM_TYPES.get(type(value))
    if typ is None:
        raise TypeError(f"query parameter {name or ''} = {value!r}: unsupported type {type(value).__name__}")
    return bigquery.ScalarQueryParameter(name, typ, value)


#: BigQuery's message when two transactions on one table collide: the later one is aborted, not queued.
CONCURRENT_UPDATE = "concurrent update"
TRANSACTION_ATTEMPTS = 8


def run_transaction(
    run: Callable[[], T], what: str, attempts: int = TRANSACTION_ATTEMPTS, first_wait_s: float = 2.0
) -> T:
    """Run a partition's replace-transaction, again with growing jittered waits while a concurrent one aborts it."""
    for attempt in range(1, attempts + 1):
        try:
            return run()
        except GoogleAPICallError as exc:
            if CONCURRENT_UPDATE not in str(exc).lower() or attempt == attempts:
                raise
            wait = first_wait_s * 2 ** (attempt - 1) * (0.5 + random.random())
            get_dagster_logger().warning(
                f"{what}: transaction aborted by a concurrent one (attempt {attempt}/{attempts}); again in {wait:.0f} s"
            )
            time.sleep(wait)
    raise AssertionError("unreachable")


class BigQueryWarehouse(Warehouse):
    """A BigQuery dataset as the warehouse (production).

    Where and as whom it works — project, location, credentials — is dagster-gcp's
    ``BigQueryResource``, nested here, so the UI shows the BigQuery configuration the
    client is really built from. The client itself is built here, not by that
    resource's ``get_client()``: it cannot point at another endpoint (the tests'
    emulator), and for a key it sets ``GOOGLE_APPLICATION_CREDENTIALS`` process-wide
    for the duration of a context, while a step's threads share one long-lived client.
    One construction serves production and the tests.
    """

    bigquery: BigQueryResource = Field(
        description="dagster-gcp's BigQuery resource: project of the dataset and of the jobs, location, credentials"
    )
    dataset: str = Field(description="Dataset holding `buildings` and `predictions`")
    api_endpoint: str | None = Field(
        default=None, description="BigQuery API endpoint; None = Google's. An http:// endpoint is an emulator (tests)"
    )
    staging_dir: str | None = Field(default=None, description="Where the Parquet file to load is written (temp dir)")

    _client: bigquery.Client | None = PrivateAttr(default=None)
    _ready: set[str] = PrivateAttr(default_factory=set)

    @property
    def kind(self) -> str:
        return "bigquery"

    @property
    def project(self) -> str:
        if not self.bigquery.project:
            raise ValueError("BigQueryWarehouse: bigquery.project is not set (BATIVISION_BQ_PROJECT)")
        return self.bigquery.project

    @property
    def location(self) -> str:
        return self.bigquery.location or "EU"

    def client(self) -> bigquery.Client:
        if self._client is None:
            scopes = ["https://www.googleapis.com/auth/bigquery"]
            self._client = bigquery.Client(
                project=self.project,
                credentials=credentials_for(self.api_endpoint, scopes, self.bigquery.gcp_credentials),
                location=self.location,
                client_options=client_options(self.api_endpoint),
            )
        return self._client

    def table_id(self, table: str) -> str:
        return f"{self.project}.{self.dataset}.{table}"

    def ensure_table(self, table: str) -> None:
        if table in self._ready:
            return
        client = self.client()
        ds = bigquery.Dataset(f"{self.project}.{self.dataset}")
        ds.location = self.location
        client.create_dataset(ds, exists_ok=True)
        client.query_and_wait(table_ddl(self.table_id(table), table))
        existing = [f.name for f in client.get_table(self.table_id(table)).schema]
        for name, typ in added_columns(table, existing):  # a table of an earlier release: brought up to the contract
            client.query_and_wait(f"ALTER TABLE `{self.table_id(table)}` ADD COLUMN {name} {_BQ_TYPES[typ]}")
        self._ready.add(table)

    def _stage(self, table: str, departement: str, batches: Iterable[pa.RecordBatch]) -> tuple[str | None, int]:
        """Load the batches into a new staging table; returns its id (None when there are no rows) and the count."""
        names = [name for name, _, _ in TABLE_SCHEMAS[table]]
        with tempfile.TemporaryDirectory(dir=self.staging_dir, prefix="bq-stage-") as tmp:
            path = Path(tmp) / f"{table}.parquet"
            n = 0
            writer: pq.ParquetWriter | None = None
            try:
                for batch in batches:
                    missing = set(names) - set(batch.schema.names)
                    if missing:
                        raise ValueError(f"{table}[{departement}]: batch lacks columns {sorted(missing)}")
                    # No schema metadata: a GeoParquet `geo` key (the buildings file has one, naming
                    # the native CRS) would make BigQuery read the WKB column as a geography itself.
                    t = pa.Table.from_batches([batch]).select(names).replace_schema_metadata(None)
                    if writer is None:
                        writer = pq.ParquetWriter(path, t.schema, compression="zstd")
                    writer.write_table(t)
                    n += t.num_rows
            finally:
                if writer is not None:
                    writer.close()
            if n == 0:
                return None, 0
            client = self.client()
            stage_id = self.table_id(f"_staging_{table}_{departement}_{uuid.uuid4().hex[:12]}")
            stage = bigquery.Table(stage_id, schema=staging_schema(table))
            stage.expires = dt.datetime.now(dt.UTC) + STAGING_TTL
            client.create_table(stage)
            config = bigquery.LoadJobConfig(
                source_format=bigquery.SourceFormat.PARQUET,
                schema=staging_schema(table),
                write_disposition=bigquery.WriteDisposition.WRITE_APPEND,
            )
            try:
                with path.open("rb") as fh:
                    client.load_table_from_file(fh, stage_id, job_config=config).result()
            except BaseException:
                client.delete_table(stage_id, not_found_ok=True)
                raise
        return stage_id, n

    def publish(self, departement: str, parts: Sequence[PartitionRows]) -> list[int]:
        """Replace each part's rows (``departement`` and its ``where`` equalities), all in one transaction.

        Each part's rows are loaded into a staging table first (load jobs are not
        transactional), then one multi-statement transaction deletes and inserts
        every part and asserts its count. Batches carry geometry as WGS84 WKB.
        Returns the number of rows written per part.
        """
        filters = [self.partition_filters(p.table, departement, p.where) for p in parts]
        staged: list[tuple[str | None, int]] = []
        client = self.client()
        try:
            statements, params = [], []
            for k, (part, where) in enumerate(zip(parts, filters, strict=True)):
                self.ensure_table(part.table)
                stage_id, n = self._stage(part.table, departement, part.batches)
                staged.append((stage_id, n))
                target = self.table_id(part.table)
                cond = " AND ".join(f"{c} = @p{k}_{c}" for c in where)
                names = [name for name, _, _ in TABLE_SCHEMAS[part.table]]
                select = ", ".join(GEOGRAPHY_EXPR[part.table] if c == "geometry" else c for c in names)
                statements.append(f"DELETE FROM `{target}` WHERE {cond};")
                if stage_id:
                    statements.append(
                        f"INSERT INTO `{target}` ({', '.join(names)})\n  SELECT {select} FROM `{stage_id}`;"
                    )
                statements.append(
                    f"ASSERT (SELECT COUNT(*) FROM `{target}` WHERE {cond}) = @p{k}_expected\n"
                    f"    AS '{part.table}[{departement}]: the partition does not hold the {n} staged rows; rolled back';"
                )
                params += [query_parameter(f"p{k}_{c}", v) for c, v in where.items()]
                params.append(query_parameter(f"p{k}_expected", n))
            body = "\n  ".join(statements)
            script = f"""BEGIN
  BEGIN TRANSACTION;
  {body}
  COMMIT TRANSACTION;
EXCEPTION WHEN ERROR THEN
  ROLLBACK TRANSACTION;
  RAISE USING MESSAGE = @@error.message;
END;"""
            what = "+".join(p.table for p in parts) + f"[{departement}]"
            run_transaction(
                lambda: client.query_and_wait(script, job_config=bigquery.QueryJobConfig(query_parameters=params)),
                what,
            )
        finally:
            for stage_id, _ in staged:
                if stage_id:
                    client.delete_table(stage_id, not_found_ok=True)
        for part, (_, n) in zip(parts, staged, strict=True):
            extra = f", {part.where}" if part.where else ""
            get_dagster_logger().info(f"{self.table_id(part.table)}[{departement}{extra}]: {n} rows replaced")
        return [n for _, n in staged]

    def query(self, sql: str, params: list | None = None) -> pd.DataFrame:
        """Run ``sql`` with the dataset as default (unqualified table names work) and ``?`` parameters."""
        config = bigquery.QueryJobConfig(
            default_dataset=f"{self.project}.{self.dataset}",
            query_parameters=[query_parameter(None, v) for v in params or []],
        )
        return self.client().query_and_wait(sql, job_config=config).to_arrow().to_pandas()

    def dbt_env(self) -> dict[str, str]:
        env = {
            "BATIVISION_BQ_PROJECT": self.project,
            "BATIVISION_BQ_DATASET": self.dataset,
            "BATIVISION_BQ_LOCATION": self.location,
        }
        if self.api_endpoint:
            env["BATIVISION_BQ_API_ENDPOINT"] = self.api_endpoint
        return env
