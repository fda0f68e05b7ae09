"""SQL built from inputs is parameterised or checked against an allow-list: injections change nothing.

Partition keys, table names, filter columns and the dbt var that selects a partition all reach SQL.
Each is tried with an injection on the real DuckDB warehouse (BigQuery's writer goes through the
same allow-list, :meth:`Warehouse.partition_filters`, and query parameters), and the tables must be
intact afterwards. Partition keys that are not départements are refused by name everywhere.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ops.geo.departements import UnknownDepartementError, check_departement
from ops.geo.reproject import wgs84_batches
from resources.warehouse import DuckDBWarehouse
from tests.rowfiles import buildings_parquet

pytestmark = pytest.mark.reliability

NOT_DEPARTEMENTS = ["20", "2a", "../x", "75; DROP TABLE buildings", "12' OR '1'='1", "", "075", "971 "]
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def warehouse(tmp_path) -> DuckDBWarehouse:
    wh = DuckDBWarehouse(path=str(tmp_path / "w.duckdb"))
    for dep in ("12", "81"):
        wh.replace_partition("buildings", dep, wgs84_batches(buildings_parquet(tmp_path, dep, 3), 2154))
    return wh


def _counts(wh: DuckDBWarehouse) -> dict[str, int]:
    rows = wh.query("select departement, count(*) as n from buildings group by departement")
    return dict(zip(rows.departement, rows.n, strict=True))


@pytest.mark.parametrize("key", NOT_DEPARTEMENTS)
def test_a_partition_key_that_is_not_a_departement_is_refused_by_name(key):
    with pytest.raises(UnknownDepartementError, match="unknown département partition key"):
        check_departement(key)


def test_an_injection_through_the_departement_value_touches_no_row(warehouse):
    before = _counts(warehouse)
    assert before == {"12": 3, "81": 3}
    # a value is a parameter: the quote is part of the value, which matches no row
    assert warehouse.replace_partition("buildings", "12' OR '1'='1", []) == 0
    assert warehouse.replace_partition("buildings", "81; DROP TABLE buildings", []) == 0
    assert _counts(warehouse) == before
    n = warehouse.query("select count(*) as n from buildings where departement = ?", ["12' OR '1'='1"]).n[0]
    assert n == 0


@pytest.mark.parametrize(
    ("table", "where", "culprit"),
    [
        ("buildings; DROP TABLE buildings", None, "unknown warehouse table"),
        ("predictions --", None, "unknown warehouse table"),
        ("buildings", {"1=1 OR departement": "x"}, "no column"),
        ("buildings", {"departement = departement --": "x"}, "no column"),
    ],
)
def test_an_injection_through_a_table_or_column_name_is_refused_naming_it(warehouse, table, where, culprit):
    before = _counts(warehouse)
    with pytest.raises(ValueError, match=culprit):
        warehouse.replace_partition(table, "12", [], where=where)
    assert _counts(warehouse) == before


@pytest.mark.slow
def test_the_dbt_partition_var_only_takes_a_departement_code(tmp_path):
    """dbt would paste var('departement') into SQL: its macro refuses anything but an INSEE code."""
    dbt = Path(sys.executable).parent / "dbt"
    env_target = tmp_path / "target"
    for value, ok in (("12", True), ("12' or '1'='1", False), ("75; drop table buildings", False)):
        out = subprocess.run(
            [str(dbt), "compile", "--quiet", "--project-dir", str(REPO / "dbt"), "--profiles-dir", str(REPO / "dbt")]
            + ["--target-path", str(env_target), "--log-path", str(tmp_path), "--select", "building_attributes"]
            + ["--vars", f'{{"departement": "{value}"}}'],
            capture_output=True,
            text=True,
            env={"PATH": "/usr/bin:/bin", "DBT_SEND_ANONYMOUS_USAGE_STATS": "false", "HOME": str(tmp_path)}
            | DuckDBWarehouse(path=str(tmp_path / "w.duckdb")).dbt_env(),
            timeout=300,
        )
        if ok:
            assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        else:
            assert out.returncode != 0 and "is not a département code" in out.stdout + out.stderr, value
