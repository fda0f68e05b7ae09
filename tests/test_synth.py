"""The sample generator: deterministic, BD TOPO-shaped, with the defects it promises."""

import filecmp
from pathlib import Path

import geopandas as gpd
import pandas as pd
import pytest
import rasterio

from ops.imagery.mosaic import find_tiles
from synthetic import generate_departement


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
    assert {"manifest.json", "labels.csv", "footprints/batiment.gpkg", "solar_panels.gpkg"} <= set(names)
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
