"""Footprints from the formats users have, with the defects they have."""

from __future__ import annotations

import tempfile
from pathlib import Path

import geopandas as gpd
import pyarrow.parquet as pq
import pytest
from shapely.geometry import MultiPolygon, Polygon, box

from ops.geo.footprints import FootprintError, FootprintStats, iter_building_batches, write_buildings_geoparquet
from tests.realdata import OLEMPS, SPACENET_LABELS


def _read(path, epsg=2154, **kw):
    stats = FootprintStats()
    table = pq.read_table(_write(path, epsg, stats, **kw))
    return table.to_pandas(), stats


def _write(path, epsg, stats, **kw):
    out = Path(tempfile.mkdtemp(prefix="footprints-")) / (path.stem + "_out.parquet")  # never beside a repo file
    write_buildings_geoparquet(iter_building_batches(path, "12", epsg, stats=stats, **kw), out, epsg)
    return out


@pytest.mark.parametrize("driver,suffix", [("GPKG", ".gpkg"), ("GeoJSON", ".geojson"), (None, ".parquet")])
def test_olemps_reads_the_same_in_every_format(tmp_path, driver, suffix):
    src = gpd.read_file(OLEMPS, columns=["ID", "USAGE1", "HAUTEUR"], encoding="utf-8").rename(
        columns={"ID": "cleabs", "USAGE1": "usage_1", "HAUTEUR": "hauteur"}
    )
    path = tmp_path / f"batiment{suffix}"
    if driver is None:
        src.to_parquet(path)
    else:
        src.to_file(path, driver=driver)
    got, stats = _read(path)
    assert list(got["building_id"]) == list(src["cleabs"])
    assert got["height_m"].tolist() == pytest.approx(src["hauteur"].tolist(), nan_ok=True)
    assert stats.rows == 2273 and stats.statuses["empty"] == 0


def test_geojson_in_another_crs_is_reprojected(tmp_path):
    """Atlanta's UTM 16N labels, read into Web Mercator: every building, moved to where Atlanta is."""
    got, stats = _read(SPACENET_LABELS, epsg=3857)
    assert stats.source_epsg == 32616 and len(got) == 43
    x0, y0, x1, y1 = gpd.GeoSeries.from_wkb(got["geometry"], crs=3857).to_crs(4326).total_bounds
    assert -84.6 < x0 < x1 < -84.2 and 33.6 < y0 < y1 < 33.9  # Atlanta, in lon/lat


@pytest.mark.reliability
def test_a_file_of_another_country_is_refused_naming_it(tmp_path):
    """Atlanta given as département 12: nowhere near where Lambert-93 is valid, an error, not nonsense rows."""
    with pytest.raises(FootprintError, match=rf"{SPACENET_LABELS.name}.*outside the area where EPSG:2154 is valid"):
        _read(SPACENET_LABELS, epsg=2154)


@pytest.mark.reliability
def test_defects_get_statuses_and_no_row_is_dropped(tmp_path):
    bowtie = Polygon([(0, 0), (10, 10), (10, 0), (0, 10)])  # self-intersecting: repairable
    line = Polygon([(0, 0), (5, 0), (10, 0)])  # zero area: not repairable into a polygon
    rows = {
        "a": MultiPolygon([box(700000, 6600000, 700010, 6600010)]),
        "b": Polygon([(x + 700100, y + 6600000) for x, y in bowtie.exterior.coords]),
        "c": Polygon([(x + 700200, y + 6600000) for x, y in line.exterior.coords]),
        "d": Polygon(),
        "e": None,
    }
    gdf = gpd.GeoDataFrame({"cleabs": list(rows)}, geometry=list(rows.values()), crs=2154)
    path = tmp_path / "defects.gpkg"
    gdf.to_file(path, layer="batiment")
    got, stats = _read(path)
    status = dict(zip(got["building_id"], got["geometry_status"], strict=True))
    assert status == {"a": "ok", "b": "repaired", "c": "invalid", "d": "empty", "e": "empty"}
    cells = dict(zip(got["building_id"], got["cell_id"], strict=True))
    assert cells["a"] == "E0700000_N6600000" and cells["d"] == "none"


@pytest.mark.reliability
def test_duplicate_ids_are_an_error_naming_file_and_ids(tmp_path):
    gdf = gpd.GeoDataFrame({"cleabs": ["x1", "x2", "x1"]}, geometry=[box(0, 0, 1, 1)] * 3, crs=2154)
    path = tmp_path / "dups.gpkg"
    gdf.to_file(path)
    with pytest.raises(FootprintError, match=r"dups\.gpkg: 1 duplicate building id\(s\).*'x1'"):
        _read(path)


@pytest.mark.reliability
def test_missing_crs_is_an_error_naming_the_file(tmp_path):
    gdf = gpd.GeoDataFrame({"cleabs": ["x1"]}, geometry=[box(0, 0, 1, 1)])
    path = tmp_path / "nocrs.shp"  # a shapefile without .prj (GeoJSON is WGS84 by definition)
    gdf.to_file(path)
    assert not path.with_suffix(".prj").exists()
    with pytest.raises(FootprintError, match=r"nocrs\.shp: layer has no CRS"):
        _read(path)
