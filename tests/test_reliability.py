"""Faults: whatever happens, every building of a partition is in the warehouse exactly once.

Started with the cases of the warehouse itself; the README's fault matrix (issue 16) grows here.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import pytest
from shapely.geometry import box

from ops.geo.footprints import iter_building_batches, write_buildings_geoparquet
from resources.warehouse import DuckDBWarehouse

pytestmark = pytest.mark.reliability

REPO = Path(__file__).resolve().parent.parent

WRITER = """
import logging, sys, time
logging.basicConfig(level=logging.INFO)
from pathlib import Path
from ops.geo.reproject import wgs84_batches
from resources.warehouse import DuckDBWarehouse

db, dep, parquet, rounds = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
wh = DuckDBWarehouse(path=db, lock_timeout_s=120)
for _ in range(rounds):
    wh.replace_partition("buildings", dep, wgs84_batches(parquet, 2154))
print("done", dep)
"""


def _parquet(tmp_path: Path, dep: str, n: int) -> Path:
    src = tmp_path / f"{dep}.gpkg"
    ids = [f"{dep}-{k}" for k in range(n)]
    geoms = [box(700000 + 20 * k, 6600000, 700010 + 20 * k, 6600010) for k in range(n)]
    gpd.GeoDataFrame({"cleabs": ids}, geometry=geoms, crs=2154).to_file(src, layer="batiment")
    out = tmp_path / f"{dep}.parquet"
    write_buildings_geoparquet(iter_building_batches(src, dep, 2154), out, 2154)
    return out


@pytest.mark.slow
def test_two_partitions_written_at_once_by_two_processes_both_land_whole(tmp_path):
    """DuckDB lets one process write a file at a time: the other waits for the lock, none loses rows."""
    db = tmp_path / "w.duckdb"
    sizes = {"12": 2000, "81": 1500}  # 20 rewrites each: the two writers overlap (the log shows lock waits)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(db), dep, str(_parquet(tmp_path, dep, n)), "20"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for dep, n in sizes.items()
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    wh = DuckDBWarehouse(path=str(db))
    rows = wh.query(
        "select departement, count(*) as n, count(distinct building_id) as d from buildings group by departement"
    )
    got = {r.departement: (r.n, r.d) for r in rows.itertuples()}
    assert got == {dep: (n, n) for dep, n in sizes.items()}
