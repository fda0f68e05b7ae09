"""The sample generator: deterministic, BD TOPO-shaped, with the defects it promises."""

import filecmp
from pathlib import Path

import geopandas as gpd
import pandas as pd
import pytest
import rasterio

from ops.imagery.mosaic import find_tiles
from synthetic import MAT_CODES, ROOF_SLOPE_NAME, generate_departement, load_manifest

#: Categories whose footprint has no drawn roof (their labels.csv roof_type is random).
NO_ROOF = {"empty", "invalid_unrepairable"}
SMOOTH = {"slate_grey", "dark_grey"}  # the colours drawn with the smooth (slate / bitumen) texture


@pytest.mark.slow
def test_same_seed_same_data_and_ids_unique_across_departements(tmp_path):
    a = generate_departement(tmp_path / "a", "12", 300, seed=5, tile_px=1000)
    b = generate_departement(tmp_path / "b", "12", 300, seed=5, tile_px=1000)
    c = generate_departement(tmp_path / "a", "2A", 300, seed=5, tile_px=1000)
    assert filecmp.cmp(a.labels, b.labels, shallow=False)
    ga, gb = gpd.read_file(a.footprints, layer="batiment"), gpd.read_file(b.footprints, layer="batiment")
    assert ga.geometry.to_wkb().equals(gb.geometry.to_wkb())
    ids_c = set(pd.read_csv(c.labels, dtype=str)["cleabs"])
    assert not set(ga["cleabs"]) & ids_c


def _files(root: Path) -> list[str]:
    """Every file under ``root``, as sorted paths relative to it."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


@pytest.mark.slow
def test_same_seed_gives_byte_identical_files_another_seed_other_footprints(tmp_path):
    a = generate_departement(tmp_path / "a", "12", 300, seed=7, tile_px=1000)
    b = generate_departement(tmp_path / "b", "12", 300, seed=7, tile_px=1000)
    names = _files(a.root)
    assert names == _files(b.root)
    assert {"manifest.json", "labels.csv", ROOF_SLOPE_NAME, "footprints/batiment.gpkg", "solar_panels.gpkg"} <= set(
        names
    )
    assert any(n.startswith("ortho/") and n.endswith(".tif") for n in names)
    assert [n for n in names if not filecmp.cmp(a.root / n, b.root / n, shallow=False)] == []

    d = generate_departement(tmp_path / "d", "12", 300, seed=8, tile_px=1000)
    ga, gd = gpd.read_file(a.footprints, layer="batiment"), gpd.read_file(d.footprints, layer="batiment")
    assert not ga.geometry.to_wkb().equals(gd.geometry.to_wkb())
    assert not filecmp.cmp(a.footprints, d.footprints, shallow=False)


def test_footprints_look_like_bd_topo_with_counted_defects(small_dep):
    g = gpd.read_file(small_dep.footprints, layer="batiment")
    assert len(g) == small_dep.n_buildings == sum(small_dep.counts.values())
    assert {"cleabs", "nature", "usage_1", "hauteur"} <= set(g.columns)
    assert g.crs.to_epsg() == 2154 and g["cleabs"].is_unique
    present = ~(g.geometry.isna() | g.geometry.is_empty)
    assert (~present).sum() == small_dep.counts["empty"]
    invalid = present & ~g.geometry.is_valid
    c = small_dep.counts
    assert invalid.sum() == c["invalid_repairable"] + c["invalid_unrepairable"]
    labels = pd.read_csv(small_dep.labels, dtype=str)
    assert set(labels["cleabs"]) == set(g["cleabs"]) and set(labels["roof_type"]) == {"flat", "gable", "hip"}


def test_tiles_are_tiled_deflate_20cm_rgb(small_dep):
    tiles = find_tiles(small_dep.ortho_dir)
    assert tiles
    with rasterio.open(tiles[0]) as ds:
        assert ds.count == 3 and ds.dtypes[0] == "uint8" and ds.nodata == 0
        assert ds.profile["tiled"] and ds.compression.name.lower() == "deflate"
        assert abs(ds.res[0] - 0.2) < 1e-9 and ds.crs.to_epsg() == 2154


def test_mat_toits_is_the_drawn_material_and_missing_on_about_half_the_buildings(small_dep):
    """The roof-material label read from the footprints: BD TOPO codes that follow what the imagery shows."""
    g = gpd.read_file(small_dep.footprints, layer="batiment")
    labels = pd.read_csv(small_dep.labels, dtype=str)
    j = g[["cleabs", "mat_toits"]].merge(labels, on="cleabs", validate="1:1")
    code = j["mat_toits"]
    assert set(code.dropna()) == set(MAT_CODES)  # text codes: "00" read back as "00", not 0
    assert 0.35 < code.isna().mean() < 0.65  # like the real BD TOPO (48 % without MAT_TOITS)
    assert 0 < (code == "00").mean() < 0.06
    assert code[j["category"].isin(NO_ROOF)].isna().all()

    pitched, smooth = j["roof_type"] != "flat", j["roof_colour"].isin(SMOOTH)
    assert (pitched & smooth)[code == "20"].all()  # slate
    assert (pitched & ~smooth)[code == "10"].all()  # tiles
    assert (~pitched & ~smooth)[code == "40"].all()  # flat gravel: concrete
    assert (~pitched & smooth)[code == "90"].all()  # flat smooth (bitumen): other
    # and the other way round: a coded pitched smooth roof is always slate, a coded flat gravel one concrete
    known = code.notna() & (code != "00")
    assert set(code[known & pitched & smooth]) == {"20"} and set(code[known & ~pitched & ~smooth]) == {"40"}
    assert small_dep.material_counts == {c: int((code == c).sum()) for c in MAT_CODES}


def test_roof_slope_csv_has_one_row_per_drawn_roof_flat_ones_at_zero(small_dep):
    """The regression label delivered as a CSV of cleabs -> degrees, next to labels.csv."""
    assert small_dep.roof_slope == small_dep.labels.parent / ROOF_SLOPE_NAME
    raw = pd.read_csv(small_dep.roof_slope, dtype=str)
    assert list(raw.columns) == ["cleabs", "slope_deg"] and raw["cleabs"].is_unique
    assert raw["slope_deg"].str.fullmatch(r"\d+\.\d").all()  # degrees, one decimal
    labels = pd.read_csv(small_dep.labels, dtype=str)
    assert set(raw["cleabs"]) == set(labels.loc[~labels["category"].isin(NO_ROOF), "cleabs"])
    j = raw.astype({"slope_deg": float}).merge(labels, on="cleabs", validate="1:1")
    flat = j["roof_type"] == "flat"
    assert flat.any() and (j.loc[flat, "slope_deg"] == 0.0).all()
    pitched = j.loc[~flat, "slope_deg"]
    assert pitched.between(15.0, 42.0).all() and pitched.max() - pitched.min() > 10  # a spread to learn


def test_a_sample_missing_its_slope_file_is_regenerated(tmp_path):
    """A sample on disk is reused only with all its outputs: the slope file is one of them."""
    m = generate_departement(tmp_path, "12", 60, seed=2, tile_px=1000)
    before = m.roof_slope.read_bytes()
    m.roof_slope.unlink()
    again = generate_departement(tmp_path, "12", 60, seed=2, tile_px=1000)
    assert again.roof_slope.read_bytes() == before
    assert load_manifest(again.root).roof_slope == again.roof_slope
