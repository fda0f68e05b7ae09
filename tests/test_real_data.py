"""The real IGN and SpaceNet files: messier than anything we generate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
from rasterio.windows import Window

from ops.crop.partition import crop_partition
from ops.crop.spec import ChipSpec
from ops.geo.crs import recognise_epsg
from ops.geo.footprints import FootprintStats, iter_building_batches, write_buildings_geoparquet
from ops.imagery.mosaic import MosaicError, build_mosaic
from ops.shards import list_shards, open_chips, read_index
from tests.realdata import IGN_ORTHO, OLEMPS, SPACENET_LABELS, SPACENET_TIF


def _crop(footprints: Path, tiles: list[Path], epsg: int, tmp: Path, spec: ChipSpec | None = None):
    parquet = tmp / "buildings.parquet"
    write_buildings_geoparquet(iter_building_batches(footprints, "12", epsg), parquet, epsg)
    info = build_mosaic([str(t.resolve()) for t in tiles], tmp / "mosaic.vrt", name="t")
    out = tmp / "chips"
    list(crop_partition(parquet, info, out, spec or ChipSpec(), buildings_fingerprint="x"))
    index = {c: read_index(out, c).to_pandas() for c in list_shards(out)}
    return info, out, index


def test_all_olemps_buildings_are_read_with_their_ids(tmp_path):
    stats = FootprintStats()
    out = tmp_path / "b.parquet"
    n = write_buildings_geoparquet(iter_building_batches(OLEMPS, "12", 2154, stats=stats), out, 2154)
    import geopandas as gpd

    got = gpd.read_parquet(out)
    source_ids = pyogrio.read_dataframe(OLEMPS, columns=["ID"], read_geometry=False)["ID"]
    assert n == 2273 and len(got) == 2273
    assert list(got["building_id"]) == list(source_ids)  # the source's ids, in order, none invented
    assert got["building_id"].is_unique and stats.generated_ids == 0
    assert stats.statuses["ok"] + stats.statuses["repaired"] == 2273
    # The shapefile has no .cpg but is UTF-8: accents must survive.
    assert "Résidentiel" in set(got["usage"])
    assert got.crs.to_epsg() == 2154 and not got.has_z.any()
    assert (got.geom_type == "MultiPolygon").sum() == 1


def test_ign_ortho_crs_without_authority_is_lambert93():
    with rasterio.open(IGN_ORTHO) as ds:
        assert ds.crs.to_epsg() is None  # the file really lacks the authority
        assert recognise_epsg(ds.crs, what=str(IGN_ORTHO)) == 2154


def test_chip_from_ign_ortho_has_the_expected_pixels(tmp_path):
    """A chip whose window is exactly its size in pixels must equal the raw pixels of that window."""
    import geopandas as gpd
    from shapely.geometry import box

    # A 7.2 m × 7.2 m building; margin 2 m → an 11.2 m = 56 px window (a multiple of the 8 px size step).
    x0, y0 = 770570.0, 6277570.0
    fp = tmp_path / "one.gpkg"
    gpd.GeoDataFrame({"cleabs": ["B1"]}, geometry=[box(x0, y0, x0 + 7.2, y0 + 7.2)], crs=2154).to_file(
        fp, layer="batiment"
    )
    spec = ChipSpec(size=56, margin_m=2.0, margin_ratio=0.0)
    info, out, index = _crop(fp, [IGN_ORTHO], 2154, tmp_path, spec)
    assert info.epsg == 2154
    ((cell, idx),) = index.items()
    row = idx.iloc[0]
    assert row.status == "ok"
    assert (row.minx, row.maxy, row.maxx - row.minx) == pytest.approx((x0 - 2, y0 + 9.2, 11.2), abs=1e-6)
    with rasterio.open(IGN_ORTHO) as ds:
        col, r = ~ds.transform @ (row.minx, row.maxy)
        ref = ds.read(window=Window(round(col), round(r), 56, 56))
    chip = open_chips(out, cell)[row.row]
    assert chip.shape == (3, 56, 56)
    np.testing.assert_array_equal(chip, ref)


def test_olemps_has_no_imagery_in_the_ign_sample(tmp_path):
    _, _, index = _crop(OLEMPS, [IGN_ORTHO], 2154, tmp_path)
    statuses = np.concatenate([i["status"].to_numpy() for i in index.values()])
    assert len(statuses) == 2273
    assert set(statuses) == {"no_imagery"}


def test_spacenet_single_band_uint16_is_replicated_and_stretched(tmp_path):
    info, out, index = _crop(SPACENET_LABELS, [SPACENET_TIF], 32616, tmp_path)
    assert info.band_rule == "replicate+stretch" and info.epsg == 32616
    rows = [r for i in index.values() for r in i.itertuples()]
    assert len(rows) == 43 and {r.status for r in rows} == {"ok"}
    chips = np.concatenate([open_chips(out, c) for c in index])
    assert chips.shape == (43, 3, 64, 64) and chips.dtype == np.uint8
    assert np.array_equal(chips[:, 0], chips[:, 1]) and np.array_equal(chips[:, 0], chips[:, 2])
    assert chips.std() > 10  # stretched into the 8-bit range, not crushed to black


def test_two_band_raster_is_rejected_naming_the_band_count(tmp_path):
    bad = tmp_path / "two_bands.tif"
    with rasterio.open(SPACENET_TIF) as src:
        profile = src.profile | {"count": 2}
        data = src.read(1)
    with rasterio.open(bad, "w", **profile) as dst:
        dst.write(np.stack([data, data]))
    with pytest.raises(MosaicError, match=r"two_bands\.tif: 2 band\(s\)"):
        build_mosaic([str(bad)], tmp_path / "m.vrt", name="t")
