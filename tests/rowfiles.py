"""Small buildings GeoParquet files for the warehouse tests: a row of 10 m squares in Lambert-93."""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
from shapely.geometry import box

from ops.geo.footprints import iter_building_batches, write_buildings_geoparquet


def buildings_parquet(folder: Path, dep: str, n: int, prefix: str | None = None) -> Path:
    """A `buildings` GeoParquet of ``n`` buildings of ``dep`` with ids ``<prefix>-<k>`` (prefix: the département)."""
    prefix = prefix or dep
    src = folder / f"{prefix}.gpkg"
    ids = [f"{prefix}-{k}" for k in range(n)]
    geoms = [box(700000 + 20 * k, 6600000, 700010 + 20 * k, 6600010) for k in range(n)]
    gpd.GeoDataFrame({"cleabs": ids}, geometry=geoms, crs=2154).to_file(src, layer="batiment")
    out = folder / f"{prefix}.parquet"
    write_buildings_geoparquet(iter_building_batches(src, dep, 2154), out, 2154)
    return out
