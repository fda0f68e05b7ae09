"""Start the ``local-bigquery`` emulator with one fix (run by the emulator's own Python ≥ 3.13).

This file is test harness, not production code. local-bigquery 0.4.0 base64-decodes
every BYTES column of a load job, which is right for CSV/JSON (where BigQuery
carries bytes as base64 text) but wrong for Parquet, whose BYTES column is already
binary: ``from_base64(BLOB)`` fails. Real BigQuery loads Parquet BYTES as they are,
so the warehouse stages WKB geometry that way; here the emulator is taught to do
the same for binary (typed) formats before it starts.

Usage: ``python bigquery_emulator.py serve --host 127.0.0.1 --port P --grpc-port G --data-dir D``
"""

from __future__ import annotations

import sys


def _patch_typed_bytes() -> None:
    from local_bigquery.engine import types
    from local_bigquery.engine.database import quote
    from local_bigquery.jobs import load

    original = load._projection

    def projection(config, fields, columns):
        if (config.sourceFormat or "CSV") in load.TEXT_FORMATS or not fields:
            return original(config, fields, columns)
        casts = []
        for field in fields:
            column = quote(field.name)
            source = column if field.type == "BYTES" else load._decoded(column, field)
            casts.append(f"CAST({source} AS {types.duckdb_type(field)}) AS {column}")
        if config.hivePartitioningOptions:
            declared = {field.name.casefold() for field in fields}
            casts += [quote(c) for c in columns if c.casefold() not in declared]
        return ", ".join(casts), "false"

    load._projection = projection


if __name__ == "__main__":
    _patch_typed_bytes()
    from local_bigquery.cli import main

    main(sys.argv[1:])
