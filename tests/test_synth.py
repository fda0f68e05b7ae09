"""The sample generator: deterministic, BD TOPO-shaped, with the defects it promises."""

import filecmp

import geopandas as gpd
import pandas as pd
import rasterio

from ops.mosaic import find_tiles
from ops.synth import generate_departement


def test_same_seed_same_data_and_ids_unique_across_departements(tmp_path):
    a = generate_departement(tmp_path / "a", "12", 300, seed=5, tile_px=1000)
    b = generate_departement(tmp_path / "b", "12", 300, seed=5, tile_px=1000)
    c = generate_departement(tmp_path / "a", "2A", 300, seed=5, tile_px=1000)
    assert filecmp.cmp(a.labels, b.labels, shallow=False)
    ga, gb = gpd.read_file(a.footprints, layer="batiment"), gpd.read_file(b.footprints, layer="batiment")
    assert ga.geometry.to_wkb().equals(gb.geometry.to_wkb())
    ids_c = set(pd.read_csv(c.labels, dtype=str)["cleabs"])
    assert not set(ga["cleabs"]) & ids_c


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
