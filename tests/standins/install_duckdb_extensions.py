"""INSTALL the DuckDB extensions shipped as PyPI wheels (run by the BigQuery emulator's Python).

This file is test harness. local-bigquery loads icu, ducklake and spatial; DuckDB
would download them at first use, which these machines cannot do, so the
extension files from the ``duckdb-extension-*`` wheels are installed into
DuckDB's extension directory instead.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import duckdb

for name in ("icu", "ducklake", "spatial"):
    package = importlib.import_module(f"duckdb_extension_{name}")
    found = sorted(Path(package.__file__).parent.glob(f"extensions/v{duckdb.__version__}/*.duckdb_extension"))
    if not found:
        raise SystemExit(f"no {name} extension for DuckDB {duckdb.__version__} in {package.__file__}")
    con = duckdb.connect()
    con.install_extension(str(found[0]), force_install=True)
    con.close()
    print(f"installed {found[0].name}")
