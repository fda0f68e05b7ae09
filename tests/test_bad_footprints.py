"""Bad footprint files: each one is read with every feature accounted for, or refused naming the culprit.

The accounting invariant starts here: every feature of the source is one row of ``buildings``
(with a ``geometry_status`` when its shape is not usable), or the step fails before writing a
row, with a message that names the file and what is wrong in it (rows, ids, column, extent).
Inputs are small files written by each test; feature counts come from GDAL/pyarrow
(:func:`count_features`), not from the reader under test.
"""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
import shapely
from shapely.geometry import GeometryCollection, LineString, MultiPolygon, Point, Polygon, box

from ops.geo.footprints import (
    FootprintError,
    FootprintStats,
    count_features,
    iter_building_batches,
    write_buildings_geoparquet,
)

pytestmark = pytest.mark.reliability

X, Y = 700_000.0, 6_600_000.0  # Aveyron (département 12), Lambert-93


def _read(path: Path, dep: str = "12", epsg: int = 2154, **kw) -> tuple[dict[str, dict], FootprintStats, Path]:
    """Rows by building id, the stats, and the GeoParquet written."""
    stats = FootprintStats()
    out = path.parent / "out" / "buildings.parquet"
    write_buildings_geoparquet(iter_building_batches(path, dep, epsg, stats=stats, **kw), out, epsg)
    rows = pq.read_table(out).to_pylist()
    return {r["building_id"]: r for r in rows}, stats, out


def _refused(path: Path, match: str, **kw) -> FootprintError:
    """The read fails with ``match`` in the message, and leaves no output (not even a temporary file)."""
    with pytest.raises(FootprintError, match=match) as err:
        _read(path, **kw)
    assert str(path) in str(err.value)
    assert not (path.parent / "out").exists() or not any((path.parent / "out").iterdir())
    return err.value


def _squares(n: int, x: float = X, y: float = Y) -> list[Polygon]:
    return [box(x + 20 * k, y, x + 20 * k + 10, y + 10) for k in range(n)]


# 1. a layer with no feature


@pytest.mark.parametrize("suffix", [".gpkg", ".shp", ".geojson", ".parquet"])
def test_a_file_with_no_feature_is_an_error_naming_it(tmp_path, suffix):
    path = tmp_path / f"vide{suffix}"
    gdf = gpd.GeoDataFrame({"cleabs": []}, geometry=[], crs=2154)
    gdf.to_parquet(path) if suffix == ".parquet" else gdf.to_file(path)
    assert count_features(path) == 0
    _refused(path, r"vide\.\w+: .*no features.*wrong input.*not an empty partition")


def test_an_empty_first_layer_names_the_layers_the_file_has(tmp_path):
    path = tmp_path / "bdtopo.gpkg"
    gpd.GeoDataFrame({"cleabs": []}, geometry=[], crs=2154).to_file(path, layer="a_vide")
    gpd.GeoDataFrame({"cleabs": ["A"]}, geometry=_squares(1), crs=2154).to_file(path, layer="batiment")
    _refused(path, r"bdtopo\.gpkg: its first layer has no features; the file's layers are \['a_vide', 'batiment'\]")
    rows, stats, _ = _read(path, layer="batiment")  # the config's `layer`, as the message says
    assert list(rows) == ["A"] and stats.rows == 1


# 2. self-intersecting polygons, 3. Z, 4. points, lines and collections, 5. null and empty geometries


def _defects() -> dict[str, object]:
    bowtie = Polygon([(X, Y), (X + 10, Y + 10), (X + 10, Y), (X, Y + 10)])
    return {
        "ok": box(X, Y, X + 10, Y + 10),
        "bowtie": bowtie,  # self-intersecting: split into its two triangles
        "flat": Polygon([(X + 100, Y), (X + 105, Y), (X + 110, Y)]),  # zero area: nothing to repair
        "point": Point(X + 200, Y),
        "line": LineString([(X + 300, Y), (X + 310, Y + 10)]),
        "gc_poly_point": GeometryCollection([box(X + 400, Y, X + 410, Y + 10), Point(X + 420, Y)]),
        "gc_bowtie": GeometryCollection([shapely.affinity.translate(bowtie, 500)]),
        "gc_points": GeometryCollection([Point(X + 600, Y), LineString([(X + 600, Y), (X + 610, Y)])]),
        "multi_overlap": MultiPolygon([box(X + 700, Y, X + 710, Y + 10), box(X + 705, Y, X + 715, Y + 10)]),
        "none": None,
        "empty": Polygon(),
    }


EXPECTED_STATUS = {
    "ok": "ok",
    "bowtie": "repaired",
    "flat": "invalid",
    "point": "invalid",
    "line": "invalid",
    "gc_poly_point": "repaired",
    "gc_bowtie": "repaired",
    "gc_points": "invalid",
    "multi_overlap": "repaired",
    "none": "empty",
    "empty": "empty",
}


@pytest.mark.parametrize("suffix", [".gpkg", ".geojson", ".parquet"])
def test_every_defective_geometry_keeps_its_row_with_a_status_and_is_counted(tmp_path, suffix):
    defects = _defects()
    path = tmp_path / f"defauts{suffix}"
    gdf = gpd.GeoDataFrame({"cleabs": list(defects)}, geometry=list(defects.values()), crs=2154)
    gdf.to_parquet(path) if suffix == ".parquet" else gdf.to_file(path)
    before = count_features(path)

    rows, stats, _ = _read(path)

    assert before == len(defects) == len(rows) == stats.rows  # 11 features → 11 rows
    assert {i: r["geometry_status"] for i, r in rows.items()} == EXPECTED_STATUS
    counts = {s: list(EXPECTED_STATUS.values()).count(s) for s in ("ok", "repaired", "invalid", "empty")}
    assert stats.statuses == counts == {"ok": 1, "repaired": 4, "invalid": 4, "empty": 2}
    geoms = {i: shapely.from_wkb(r["geometry"]) if r["geometry"] else None for i, r in rows.items()}
    for i, r in rows.items():
        if r["geometry_status"] in ("ok", "repaired"):  # usable: a valid polygon with an area and a cell
            assert geoms[i].geom_type in ("Polygon", "MultiPolygon") and geoms[i].is_valid, i
            assert r["area_m2"] > 0 and r["cell_id"].startswith("E"), i
    assert geoms["bowtie"].area == pytest.approx(50)  # the two triangles of the bow-tie
    assert geoms["gc_poly_point"].equals(box(X + 400, Y, X + 410, Y + 10))  # the collection's polygon, no point
    assert geoms["multi_overlap"].area == pytest.approx(150)  # overlapping parts merged, not counted twice
    assert geoms["point"].geom_type == "Point"  # invalid rows keep the source shape for an analyst
    assert rows["none"]["cell_id"] == rows["empty"]["cell_id"] == "none"
    assert rows["empty"]["area_m2"] is None and rows["none"]["geometry"] is None


@pytest.mark.parametrize("suffix", [".gpkg", ".shp", ".parquet"])
def test_3d_polygons_are_read_as_2d_with_the_same_rows(tmp_path, suffix):
    flat = _squares(3)
    with_z = [shapely.force_3d(p, z=100.0 + k) for k, p in enumerate(flat)]
    path = tmp_path / f"bati_z{suffix}"
    gdf = gpd.GeoDataFrame({"cleabs": ["a", "b", "c"]}, geometry=with_z, crs=2154)
    gdf.to_parquet(path) if suffix == ".parquet" else gdf.to_file(path)
    assert (gpd.read_parquet(path) if suffix == ".parquet" else gpd.read_file(path)).has_z.all()

    rows, stats, _ = _read(path)

    assert list(rows) == ["a", "b", "c"] and stats.statuses["ok"] == 3
    for r, p in zip(rows.values(), flat, strict=True):
        g = shapely.from_wkb(r["geometry"])
        assert not g.has_z and g.equals(p) and r["area_m2"] == pytest.approx(100)


# 6. null ids


@pytest.mark.parametrize("generate_ids", [False, True])
def test_features_without_an_id_are_an_error_naming_the_file_and_their_positions(tmp_path, generate_ids):
    """A position is not an id: neither silently nor when `generate_ids` is set (it is for files with no id column)."""
    path = tmp_path / "trous.gpkg"
    ids = ["A", None, "C", "", "   ", "F"]
    gpd.GeoDataFrame({"cleabs": ids}, geometry=_squares(6), crs=2154).to_file(path)
    err = _refused(path, r"trous\.gpkg: 3 feature\(s\) have no id", generate_ids=generate_ids)
    assert "'cleabs'" in str(err) and "[1, 3, 4]" in str(err)


def test_features_without_an_id_are_all_listed_even_across_batches(tmp_path):
    path = tmp_path / "trous.parquet"
    ids = [None if k in (2, 7, 13) else f"B{k}" for k in range(15)]
    gpd.GeoDataFrame({"cleabs": ids}, geometry=_squares(15), crs=2154).to_parquet(path)
    err = _refused(path, r"trous\.parquet: 3 feature\(s\) have no id", batch_size=4)
    assert "[2, 7, 13]" in str(err)


# 7. coordinates not in the declared CRS, 8. lat/lon swapped


def test_degrees_under_a_lambert93_tag_are_an_error_giving_the_extent(tmp_path):
    path = tmp_path / "degres.gpkg"
    geoms = [box(2.57 + k * 1e-4, 44.35, 2.57 + k * 1e-4 + 5e-5, 44.35005) for k in range(3)]
    gpd.GeoDataFrame({"cleabs": ["a", "b", "c"]}, geometry=geoms, crs=2154).to_file(path)
    err = _refused(path, r"degres\.gpkg: 3 shape\(s\) lie outside the area where EPSG:2154 is valid")
    msg = str(err)
    assert "x 2.57..2.57025" in msg and "y 44.35..44.3501" in msg  # where the file's buildings are
    assert "x -378306..1320650" in msg  # where Lambert-93 is valid
    assert "look like degrees" in msg and "['a', 'b', 'c']" in msg


def test_a_few_misplaced_buildings_are_named_among_good_ones(tmp_path):
    path = tmp_path / "melange.gpkg"
    geoms = [*_squares(3), box(0, 0, 10, 10)]  # the last one at Lambert-93's false origin, in the Atlantic
    gpd.GeoDataFrame({"cleabs": ["a", "b", "c", "zero"]}, geometry=geoms, crs=2154).to_file(path)
    err = _refused(path, r"melange\.gpkg: 1 shape\(s\) lie outside")
    assert "['zero']" in str(err)


def test_lat_lon_swapped_geojson_is_an_error_saying_so(tmp_path):
    path = tmp_path / "inverse.geojson"
    ring = [[44.35, 2.57], [44.35, 2.571], [44.351, 2.571], [44.351, 2.57], [44.35, 2.57]]  # lat, lon: wrong
    doc = {
        "type": "FeatureCollection",
        "features": [
            {"type": "Feature", "properties": {"id": "r1"}, "geometry": {"type": "Polygon", "coordinates": [ring]}}
        ],
    }
    path.write_text(json.dumps(doc))
    err = _refused(path, r"inverse\.geojson: 1 shape\(s\) lie outside the area where EPSG:2154 is valid")
    assert "EPSG:4326" in str(err) and "lat,lon order" in str(err)


def test_a_lon_lat_geojson_of_the_departement_is_reprojected_not_refused(tmp_path):
    """The area check's other side: the same building in the right order is read, in Lambert-93."""
    path = tmp_path / "rodez.geojson"
    gpd.GeoDataFrame({"id": ["r1"]}, geometry=[box(2.57, 44.35, 2.571, 44.351)], crs=4326).to_file(path)
    rows, stats, _ = _read(path)
    assert stats.source_epsg == 4326 and list(rows) == ["r1"]
    x, y = shapely.from_wkb(rows["r1"]["geometry"]).centroid.coords[0]
    assert 660_000 < x < 680_000 and 6_350_000 < y < 6_370_000  # Rodez in Lambert-93
    assert rows["r1"]["area_m2"] == pytest.approx(80 * 111, rel=0.2)


# 9. text that is not UTF-8


def _latin1_shapefile(tmp_path: Path, cpg: str | None) -> Path:
    """A BD TOPO-like shapefile whose DBF holds 'Résidentiel' in Latin-1 (one byte for é)."""
    path = tmp_path / "batiment.shp"
    gdf = gpd.GeoDataFrame(
        {"ID": ["BATI1", "BATI2"], "USAGE1": ["Résidentiel", "Agricole"]}, geometry=_squares(2), crs=2154
    )
    gdf.to_file(path, encoding="UTF-8")
    dbf = path.with_suffix(".dbf")
    raw = dbf.read_bytes()
    assert raw.count("Résidentiel".encode()) == 1
    dbf.write_bytes(raw.replace("Résidentiel".encode(), "Résidentiel ".encode("latin-1")))  # same field width
    path.with_suffix(".cpg").unlink(missing_ok=True)
    if cpg is not None:
        path.with_suffix(".cpg").write_text(cpg)
    return path


def test_a_latin1_shapefile_without_cpg_is_read_correctly(tmp_path):
    rows, _, _ = _read(_latin1_shapefile(tmp_path, cpg=None))
    assert {i: r["usage"] for i, r in rows.items()} == {"BATI1": "Résidentiel", "BATI2": "Agricole"}


def test_a_latin1_shapefile_whose_cpg_says_utf8_is_an_error_naming_the_column(tmp_path):
    path = _latin1_shapefile(tmp_path, cpg="UTF-8")
    err = _refused(path, r"batiment\.shp: column 'USAGE1' holds text that is not UTF-8 at feature index 0")
    assert ".cpg" in str(err)


def _gpkg_with_raw_text(path: Path, column: str, row_id: str, raw: bytes) -> None:
    """Put bytes that are not UTF-8 into a GeoPackage text column (as a misbehaving writer would)."""
    gdf = gpd.GeoDataFrame(
        {"cleabs": ["A", "B"], "usage_1": ["Agricole", "Commercial"]}, geometry=_squares(2), crs=2154
    )
    gdf.to_file(path, layer="batiment")
    with sqlite3.connect(path) as con:  # GeoPackage triggers call SpatiaLite functions sqlite3 lacks
        for (name,) in con.execute("select name from sqlite_master where type = 'trigger'").fetchall():
            con.execute(f'drop trigger "{name}"')
        con.execute(f"update batiment set {column} = cast(? as text) where cleabs = ?", (raw, row_id))


@pytest.mark.parametrize("column", ["usage_1", "cleabs"])
def test_a_geopackage_with_bytes_that_are_not_utf8_is_an_error_naming_the_column_and_feature(tmp_path, column):
    path = tmp_path / "latin.gpkg"
    _gpkg_with_raw_text(path, column, "B", "Résidentiel".encode("latin-1"))
    _refused(path, rf"latin\.gpkg: column '{column}' holds text that is not UTF-8 at feature index 1 \(b'R\\xe9sid")


def test_a_geojson_with_bytes_that_are_not_utf8_is_an_error_naming_the_column(tmp_path):
    path = tmp_path / "latin.geojson"
    gpd.GeoDataFrame({"cleabs": ["A"], "usage_1": ["XX"]}, geometry=_squares(1), crs=2154).to_file(path)
    path.write_bytes(path.read_bytes().replace(b'"XX"', '"Église"'.encode("latin-1")))
    _refused(path, r"latin\.geojson: column 'usage_1' holds text that is not UTF-8 at feature index 0")


def test_a_height_that_is_not_a_number_is_an_error_naming_the_column(tmp_path):
    path = tmp_path / "hauteurs.gpkg"
    gdf = gpd.GeoDataFrame({"cleabs": ["A", "B"], "hauteur": ["7.5", "n/a"]}, geometry=_squares(2), crs=2154)
    gdf.to_file(path)
    _refused(path, r"hauteurs\.gpkg: column 'hauteur' cannot be read as double")


# 10. not a vector file


def _png(path: Path) -> None:
    with rasterio.open(path.with_suffix(".png"), "w", driver="PNG", width=8, height=8, count=1, dtype="uint8") as d:
        d.write(np.zeros((1, 8, 8), "uint8"))
    path.with_suffix(".png").rename(path)


@pytest.mark.parametrize(
    "name,make",
    [
        ("notes.gpkg", lambda p: p.write_text("cleabs;geometry\nA;POLYGON((0 0,1 0,1 1,0 0))\n")),
        ("photo.gpkg", _png),
        ("vide.gpkg", lambda p: p.write_bytes(b"")),
        ("texte.geojson", lambda p: p.write_text("not json")),
        ("texte.shp", lambda p: p.write_text("not a shapefile")),
        ("texte.parquet", lambda p: p.write_text("not parquet")),
        ("dossier.gpkg", lambda p: p.mkdir()),
    ],
)
def test_a_file_that_is_not_a_vector_file_is_an_error_naming_it(tmp_path, name, make):
    path = tmp_path / name
    make(path)
    _refused(path, re.escape(name) + r": cannot be read as (a vector layer|GeoParquet)")


def test_a_parquet_without_geoparquet_metadata_is_an_error_naming_it(tmp_path):
    path = tmp_path / "plain.parquet"
    gpd.GeoDataFrame({"cleabs": ["A"]}, geometry=_squares(1), crs=2154).to_wkb().to_parquet(path)
    _refused(path, r"plain\.parquet: Parquet file without GeoParquet 'geo' metadata")


# the same rows through the warehouse, and through the `buildings` step


def test_defective_geometries_reach_the_warehouse_one_row_each(tmp_path):
    import duckdb

    from ops.geo.reproject import wgs84_batches
    from resources.warehouse import DuckDBWarehouse

    defects = _defects()
    path = tmp_path / "defauts.gpkg"
    gpd.GeoDataFrame({"cleabs": list(defects)}, geometry=list(defects.values()), crs=2154).to_file(path)
    _, _, out = _read(path)
    db = tmp_path / "w.duckdb"
    loaded = DuckDBWarehouse(path=str(db)).replace_partition("buildings", "12", wgs84_batches(out, 2154))
    assert loaded == count_features(path) == 11
    with duckdb.connect(str(db), read_only=True) as con:
        got = dict(
            con.execute("select building_id, geometry_status from buildings where departement = '12'").fetchall()
        )
    assert got == EXPECTED_STATUS


@pytest.mark.slow  # materializes the asset
def test_the_buildings_step_fails_once_naming_the_file_and_rows_and_writes_nothing(tmp_path, monkeypatch):
    import duckdb
    from dagster import DagsterInstance, materialize

    from orchestration.definitions import all_assets

    folder = tmp_path / "src" / "12" / "footprints"
    folder.mkdir(parents=True)
    ids = ["A", None, "C"]
    gpd.GeoDataFrame({"cleabs": ids}, geometry=_squares(3), crs=2154).to_file(folder / "trous.gpkg", layer="batiment")
    monkeypatch.setenv("BATIVISION_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("BATIVISION_SOURCE_DIR", str(tmp_path / "src"))
    from orchestration.environment import local_resources

    result = materialize(
        all_assets,
        selection=["buildings"],
        partition_key="12",
        resources=local_resources(),
        instance=DagsterInstance.ephemeral(),
        raise_on_error=False,
    )
    assert not result.success
    events = [e.event_type_value for e in result.all_events]
    assert "STEP_UP_FOR_RETRY" not in events and events.count("STEP_FAILURE") == 1
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    message = failure.step_failure_data.error.message
    assert "trous.gpkg" in message and "1 feature(s) have no id" in message and "[1]" in message
    db = tmp_path / "data" / "warehouse.duckdb"
    if db.exists():
        with duckdb.connect(str(db), read_only=True) as con:
            tables = {r[0] for r in con.execute("select table_name from information_schema.tables").fetchall()}
            if "buildings" in tables:
                assert con.execute("select count(*) from buildings where departement = '12'").fetchone() == (0,)
