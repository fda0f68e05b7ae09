"""Bad imagery: every faulty tile is named in the error, or its buildings get a status and are counted.

Issue 16's imagery rows. Each test writes a small Lambert-93 scene into ``tmp_path`` (a 2 × 2 grid of
50 m tiles at 20 cm, and 8 × 8 buildings), spoils it the way real deliveries get spoiled (a tile cut
short, in another CRS, delivered twice, missing, empty, with odd bands, or not a raster at all) and
runs the real mosaic and crop. What a user checks: the message names the file; otherwise one index
row per input building, with the status that says what happened.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import rasterio.shutil
import torch
import torch.nn.functional as F
from rasterio.transform import from_origin
from rasterio.windows import Window
from shapely.geometry import box

from ops.crop.partition import crop_partition
from ops.crop.spec import ChipSpec
from ops.geo.footprints import iter_building_batches, write_buildings_geoparquet
from ops.imagery.blocks import block_range
from ops.imagery.mosaic import MosaicError, MosaicInfo, build_mosaic, find_tiles

pytestmark = pytest.mark.reliability

RES = 0.2
X0, Y0 = 700_000.0, 6_600_400.0  # upper-left corner of the grid
TILE_PX = 250  # 50 m
TILE_M = TILE_PX * RES


def _pixels(bands: int, seed: int, lo: float = 1, hi: float = 255, dtype: str = "uint8") -> np.ndarray:
    """Smooth random pixels in [lo, hi] (0 stays free for nodata), like an orthophoto's low frequencies."""
    rng = np.random.default_rng(seed)
    small = torch.from_numpy(rng.uniform(0, 1, (bands, TILE_PX // 16 + 2, TILE_PX // 16 + 2)).astype("float32"))
    smooth = F.interpolate(small[None], size=(TILE_PX, TILE_PX), mode="bilinear", align_corners=False)[0].numpy()
    return np.clip(lo + (hi - lo) * smooth, lo, hi).round().astype(dtype)


def _write(
    path: Path, data: np.ndarray, x0: float, y0: float, *, crs: str | None = "EPSG:2154", nodata: float | None = 0,
    res: float = RES, driver: str = "GTiff",
) -> Path:  # fmt: skip
    profile = dict(
        driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0], dtype=data.dtype.name,
        transform=from_origin(x0, y0, res, res), nodata=nodata, tiled=True, blockxsize=64, blockysize=64,
        compress="deflate",
    )  # fmt: skip
    if crs is not None:
        profile["crs"] = crs
    tmp = path.with_name(path.name + ".src.tif") if driver != "GTiff" else path
    with rasterio.open(tmp, "w", **profile) as dst:
        dst.write(data)
    if driver != "GTiff":
        rasterio.shutil.copy(tmp, path, driver=driver, blocksize=64, compress="deflate")
        tmp.unlink()
    return path


def _grid(folder: Path, *, bands: int = 3, dtype: str = "uint8", lo: float = 1, hi: float = 255,
          skip: tuple[str, ...] = (), blank: tuple[str, ...] = (), nodata: float | None = 0) -> dict[str, np.ndarray]:  # fmt: skip
    """The 2 × 2 tiles t00, t01, t10, t11 (row, column) in ``folder``; ``skip`` left out, ``blank`` all nodata."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for r in range(2):
        for c in range(2):
            name = f"t{r}{c}"
            if name in skip:
                continue
            data = _pixels(bands, seed=10 * r + c, lo=lo, hi=hi, dtype=dtype)
            if name in blank:
                data[:] = 0
            _write(folder / f"{name}.tif", data, X0 + c * TILE_M, Y0 - r * TILE_M, nodata=nodata)
            written[name] = data
    return written


def _buildings(root: Path, extra: dict[str, tuple[float, float, float, float]] | None = None) -> tuple[Path, list[str]]:
    """8 × 8 buildings of 6 × 6 m over the grid (windows 11.2 m, none across a seam), plus ``extra`` boxes."""
    geoms, ids = [], []
    for i in range(8):
        for j in range(8):
            cx, cy = X0 + 6.25 + 12.5 * j, Y0 - 6.25 - 12.5 * i
            geoms.append(box(cx - 3, cy - 3, cx + 3, cy + 3))
            ids.append(f"b{i}{j}")
    for bid, (x0, y0, x1, y1) in (extra or {}).items():
        geoms.append(box(X0 + x0, Y0 - y1, X0 + x1, Y0 - y0))  # offsets east and south of the corner
        ids.append(bid)
    gpd.GeoDataFrame({"cleabs": ids}, geometry=geoms, crs=2154).to_file(root / "b.gpkg", layer="batiment")
    parquet = root / "b.parquet"
    write_buildings_geoparquet(iter_building_batches(root / "b.gpkg", "12", 2154), parquet, 2154)
    return parquet, ids


def _mosaic(folder: Path) -> MosaicInfo:
    return build_mosaic(find_tiles(folder), folder.parent / f"{folder.name}.vrt", name=folder.name, target_epsg=2154)


def _crop(info: MosaicInfo, parquet: Path, out: Path) -> tuple[dict[str, np.ndarray], dict[str, object]]:
    """Crop the partition like the chips step; ({building: chip}, {building: index row})."""
    from ops.shards import list_shards, open_chips, read_index

    list(crop_partition(parquet, info, out, ChipSpec(), buildings_fingerprint="x", resume=False))
    chips, index = {}, {}
    for shard in list_shards(out):
        arr = open_chips(out, shard)
        for r in read_index(out, shard).to_pandas().itertuples():
            assert r.building_id not in index, f"{r.building_id} has two index rows"
            index[r.building_id] = r
            if r.row >= 0:
                chips[r.building_id] = np.array(arr[r.row])
    return chips, index


def _statuses(index: dict[str, object]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in index.values():
        out[r.status] = out.get(r.status, 0) + 1
    return out


def _in_tile(r, name: str) -> bool:
    """Whether the chip window of index row ``r`` lies inside grid tile ``name`` (``tRC``)."""
    row, col = int(name[1]), int(name[2])
    tx0, ty1 = X0 + col * TILE_M, Y0 - row * TILE_M
    return r.minx >= tx0 and r.maxx <= tx0 + TILE_M and r.maxy <= ty1 and r.miny >= ty1 - TILE_M


# --- 1. a tile cut short ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("driver", ["GTiff", "COG"])
def test_a_tile_cut_in_half_fails_the_mosaic_naming_it(tmp_path, driver):
    """An interrupted download still opens (its header is whole): the mosaic checks the blocks are all there."""
    folder = tmp_path / "ortho"
    _grid(folder, skip=("t01",))
    tile = _write(folder / "t01.tif", _pixels(3, seed=1), X0 + TILE_M, Y0, driver=driver)
    whole = tile.read_bytes()
    tile.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(MosaicError, match=re.escape(str(tile)) + r": truncated: the file has \d+ bytes"):
        _mosaic(folder)
    tile.write_bytes(whole)  # the same folder, the tile whole again: it builds
    assert len(_mosaic(folder).tiles) == 4


def test_a_tile_cut_inside_its_header_fails_the_mosaic_naming_it(tmp_path):
    folder = tmp_path / "ortho"
    _grid(folder)
    tile = folder / "t10.tif"
    tile.write_bytes(tile.read_bytes()[:300])
    with pytest.raises(MosaicError, match=re.escape(str(tile)) + ": cannot be opened as a raster"):
        _mosaic(folder)


def test_a_tile_cut_short_after_the_mosaic_was_built_quarantines_the_buildings_over_its_lost_blocks(tmp_path):
    """Damage the mosaic cannot see (a tile overwritten later): buildings over lost blocks get `error`, naming it."""
    folder = tmp_path / "ortho"
    _grid(folder)
    parquet, ids = _buildings(tmp_path)
    info = _mosaic(folder)
    good_chips, good = _crop(info, parquet, tmp_path / "good")
    tile = folder / "t01.tif"
    size = tile.stat().st_size // 2
    with rasterio.open(tile) as ds:  # the blocks whose bytes are past the cut
        lost = [(br, bc) for br in range(4) for bc in range(4) if sum(block_range(ds, br, bc)) > size]
    tile.write_bytes(tile.read_bytes()[:size])
    chips, index = _crop(info, parquet, tmp_path / "cut")

    def over_lost(r) -> bool:  # window in t01 pixels (t01's upper-left corner is at X0 + 50 m, Y0)
        c0, c1 = (r.minx - X0 - TILE_M) / RES, (r.maxx - X0 - TILE_M) / RES
        r0, r1 = (Y0 - r.maxy) / RES, (Y0 - r.miny) / RES
        return any(c0 < (bc + 1) * 64 and c1 > bc * 64 and r0 < (br + 1) * 64 and r1 > br * 64 for br, bc in lost)

    expected = {b for b, r in good.items() if _in_tile(r, "t01") and over_lost(r)}
    errors = {b for b, r in index.items() if r.status == "error"}
    assert len(lost) >= 4 and len(expected) >= 4
    assert errors == expected
    assert all("t01.tif" in index[b].message and index[b].row == -1 for b in errors)
    assert sorted(index) == sorted(ids)  # 64 buildings → 64 rows
    assert _statuses(index) == {"ok": len(ids) - len(errors), "error": len(errors)}
    for b in chips:  # every other building is cut exactly as from the whole tile
        np.testing.assert_array_equal(chips[b], good_chips[b], err_msg=b)


# --- 2. a tile in another CRS ----------------------------------------------------------------------------------


FOREIGN = {
    "EPSG:4326": (2.5, 44.35, 2e-6),  # WGS84 degrees over Aveyron
    "EPSG:32631": (500_000.0, 4_910_000.0, RES),  # UTM 31N metres, same pixel size
}


@pytest.mark.parametrize("crs", FOREIGN)
def test_a_tile_in_another_crs_fails_the_mosaic_naming_it_and_both_crs(tmp_path, crs):
    folder = tmp_path / "ortho"
    _grid(folder, skip=("t01",))
    x0, y0, res = FOREIGN[crs]
    tile = _write(folder / "t01.tif", _pixels(3, seed=1), x0, y0, crs=crs, res=res)
    code = crs.split(":")[1]
    with pytest.raises(MosaicError, match=re.escape(f"{tile}: CRS is EPSG:{code}, the département's is EPSG:2154")):
        _mosaic(folder)
    # without the département's CRS to compare with, the odd one out is still named
    with pytest.raises(MosaicError, match=re.escape(f"{tile}: epsg is {code}, other tiles have 2154")):
        build_mosaic(find_tiles(folder), tmp_path / "any.vrt", name="any")


def test_a_tile_without_a_crs_fails_the_mosaic_naming_it(tmp_path):
    folder = tmp_path / "ortho"
    _grid(folder, skip=("t11",))
    tile = _write(folder / "t11.tif", _pixels(3, seed=11), X0 + TILE_M, Y0 - TILE_M, crs=None)
    with pytest.raises(ValueError, match=re.escape(f"{tile}: no CRS is defined")):
        _mosaic(folder)


# --- 3. two vintages of the same place -------------------------------------------------------------------------


@pytest.mark.parametrize(("dx", "dy"), [(0.0, 0.0), (10.0, -20.0)], ids=["same_slab", "partial_overlap"])
def test_two_vintages_of_one_place_fail_the_mosaic_naming_both(tmp_path, dx, dy):
    """Which vintage a chip shows must not depend on file order: the mosaic refuses, naming both files."""
    folder = tmp_path / "ortho"
    _grid(folder)
    newer = _write(folder / "t11_2024.tif", _pixels(3, seed=99), X0 + TILE_M + dx, Y0 - TILE_M + dy)
    older = folder / "t11.tif"
    for order in (find_tiles(folder), find_tiles(folder)[::-1]):
        with pytest.raises(MosaicError) as err:
            build_mosaic(order, tmp_path / "m.vrt", name="m", target_epsg=2154)
        assert str(older) in str(err.value) and str(newer) in str(err.value) and "overlap" in str(err.value)


def test_tiles_that_only_share_an_edge_are_not_an_overlap(tmp_path):
    folder = tmp_path / "ortho"
    _grid(folder)
    info = _mosaic(folder)
    assert len(info.tiles) == 4 and (info.width, info.height) == (2 * TILE_PX, 2 * TILE_PX)


def test_a_mosaic_recorded_with_overlapping_tiles_crops_no_stale_pixels(tmp_path):
    """A ``mosaic.json`` written before overlaps were refused: each window is read from a tile that holds it.

    The crop used to read a window held by one tile from the first tile it *touched*: with overlaps, part
    of the chip's buffer kept another chip's pixels.
    """
    grid, patch = tmp_path / "ortho", tmp_path / "patch"
    _grid(grid)
    patch.mkdir()
    # a 20 m patch of another vintage astride column 2 and 3 of the buildings, listed first
    _write(patch / "a_patch.tif", _pixels(3, seed=5)[:, :100, :100], X0 + 20.0, Y0 - 20.0)
    parquet, ids = _buildings(tmp_path)
    info = _mosaic(grid)
    ref_chips, ref = _crop(info, parquet, tmp_path / "ref")
    old = MosaicInfo.from_json(info.to_json())
    old.tiles = _mosaic(patch).tiles + old.tiles
    chips, index = _crop(old, parquet, tmp_path / "old")
    assert sorted(index) == sorted(ids) and _statuses(index) == {"ok": len(ids)}

    def touches_patch(r) -> bool:
        return r.minx < X0 + 40 and r.maxx > X0 + 20 and r.miny < Y0 - 20 and r.maxy > Y0 - 40

    beside = [b for b, r in index.items() if touches_patch(r) and not (r.minx >= X0 + 20 and r.maxx <= X0 + 40
                                                                          and r.maxy <= Y0 - 20 and r.miny >= Y0 - 40)]  # fmt: skip
    assert len(beside) >= 4
    for b in beside:  # touched by the patch, held by a grid tile only: read from that grid tile alone
        np.testing.assert_array_equal(chips[b], ref_chips[b], err_msg=b)


# --- 4. and 5. a gap in the coverage, an empty tile -------------------------------------------------------------


def test_buildings_in_a_gap_of_the_coverage_get_no_imagery_and_are_counted(tmp_path):
    folder = tmp_path / "ortho"
    _grid(folder, skip=("t11",))
    # astride the gap's edges: 6 of 11.2 m inside (valid ≈ 54 %), 2 of 11.2 m (≈ 18 %)
    parquet, ids = _buildings(tmp_path, {"edge_ok": (46.0, 60.0, 52.0, 66.0), "edge_nodata": (50.0, 54.0, 56.0, 60.0)})
    chips, index = _crop(_mosaic(folder), parquet, tmp_path / "out")
    assert sorted(index) == sorted(ids)  # 66 buildings → 66 rows
    in_gap = {b for b, r in index.items() if _in_tile(r, "t11")}
    assert len(in_gap) == 16
    assert {b for b, r in index.items() if r.status == "no_imagery"} == in_gap
    assert all(index[b].row == -1 and b not in chips for b in in_gap)
    assert index["edge_ok"].status == "ok" and 0.5 <= index["edge_ok"].valid_fraction < 0.6
    assert index["edge_nodata"].status == "nodata" and 0.1 < index["edge_nodata"].valid_fraction < 0.25
    assert _statuses(index) == {"ok": 49, "no_imagery": 16, "nodata": 1}
    # the kept chip astride the edge is blank (0) where the gap is, not stretched from the neighbour's pixels
    assert (chips["edge_ok"][:, 40:, 40:] == 0).all() and (chips["edge_ok"][:, :20, :20] > 0).all()


def test_buildings_over_an_all_nodata_tile_get_nodata_and_are_counted(tmp_path):
    folder = tmp_path / "ortho"
    _grid(folder, blank=("t10",))
    parquet, ids = _buildings(tmp_path)
    chips, index = _crop(_mosaic(folder), parquet, tmp_path / "out")
    blank = {b for b, r in index.items() if _in_tile(r, "t10")}
    assert len(blank) == 16 and sorted(index) == sorted(ids)
    assert {b for b, r in index.items() if r.status == "nodata"} == blank
    assert all(index[b].valid_fraction == 0 and index[b].row == -1 for b in blank)
    assert _statuses(index) == {"ok": 48, "nodata": 16} and len(chips) == 48


def test_tiles_declaring_different_nodata_values_fail_the_mosaic_naming_one(tmp_path):
    """0 in one tile, 255 in another: a white roof would be nodata here and a black hole valid there."""
    folder = tmp_path / "ortho"
    _grid(folder, skip=("t10",))
    tile = _write(folder / "t10.tif", _pixels(3, seed=10), X0, Y0 - TILE_M, nodata=255)
    with pytest.raises(MosaicError, match=re.escape(f"{tile}: nodata value is 255, other tiles have 0")):
        _mosaic(folder)


# --- 6. the band rule, end to end through the crop ---------------------------------------------------------------


def _same_crop_as(tmp_path: Path, folder: Path, reference: Path) -> tuple[MosaicInfo, dict[str, np.ndarray]]:
    """Crop ``folder`` and ``reference`` (3-band uint8) and check they give the same chips, building by building."""
    parquet, ids = _buildings(tmp_path)
    info = _mosaic(folder)
    chips, index = _crop(info, parquet, tmp_path / "out")
    ref_chips, _ = _crop(_mosaic(reference), parquet, tmp_path / "ref_out")
    assert sorted(index) == sorted(ids) and _statuses(index) == {"ok": len(ids)}
    assert chips.keys() == ref_chips.keys()
    for b, chip in chips.items():
        np.testing.assert_array_equal(chip, ref_chips[b], err_msg=b)
    return info, chips


def test_a_one_band_mosaic_is_replicated_to_rgb(tmp_path):
    one = _grid(tmp_path / "gray", bands=1)
    (tmp_path / "rgb").mkdir()
    for name, data in one.items():
        r, c = int(name[1]), int(name[2])
        _write(tmp_path / "rgb" / f"{name}.tif", np.repeat(data, 3, axis=0), X0 + c * TILE_M, Y0 - r * TILE_M)
    info, chips = _same_crop_as(tmp_path, tmp_path / "gray", tmp_path / "rgb")
    assert info.band_rule == "replicate"
    assert all((c[0] == c[1]).all() and (c[0] == c[2]).all() and c.std() > 5 for c in chips.values())


def test_a_four_band_mosaic_uses_its_first_three_bands(tmp_path):
    four = _grid(tmp_path / "rgbi", bands=4)
    (tmp_path / "rgb").mkdir()
    for name, data in four.items():
        r, c = int(name[1]), int(name[2])
        data[3] = 255 - data[0]  # an infrared band unlike the others: taking it would change the chips
        _write(tmp_path / "rgbi" / f"{name}.tif", data, X0 + c * TILE_M, Y0 - r * TILE_M)
        _write(tmp_path / "rgb" / f"{name}.tif", data[:3], X0 + c * TILE_M, Y0 - r * TILE_M)
    info, _ = _same_crop_as(tmp_path, tmp_path / "rgbi", tmp_path / "rgb")
    assert info.band_rule == "first3"


def test_a_two_band_mosaic_fails_naming_the_file(tmp_path):
    folder = tmp_path / "ortho"
    _grid(folder, bands=2)
    with pytest.raises(MosaicError, match=re.escape(f"{folder / 't00.tif'}: 2 band(s)")):
        _mosaic(folder)


def test_a_two_band_tile_among_rgb_tiles_fails_naming_it(tmp_path):
    folder = tmp_path / "ortho"
    _grid(folder, skip=("t01",))
    tile = _write(folder / "t01.tif", _pixels(2, seed=1), X0 + TILE_M, Y0)
    with pytest.raises(MosaicError, match=re.escape(f"{tile}: count is 2, other tiles have 3")):
        _mosaic(folder)


def _stretched_reference(info: MosaicInfo, tile: Path, r) -> np.ndarray:
    """The DESIGN rule by hand: the window read with rasterio, stretched over ``info.scale``, resized by torch."""
    lo, hi = info.scale
    with rasterio.open(tile) as ds:
        col, row = ~ds.transform @ (r.minx, r.maxy)
        n = round((r.maxx - r.minx) / RES)
        win = ds.read(window=Window(round(col), round(row), n, n)).astype("float32")
    u8 = torch.from_numpy(np.clip((win - lo) * (255.0 / (hi - lo)), 0, 255).round().astype("uint8"))
    return F.interpolate(u8[None], size=(64, 64), mode="bilinear", antialias=True)[0].numpy()


def test_a_sixteen_bit_mosaic_is_stretched_from_its_2nd_to_98th_percentile(tmp_path):
    folder = tmp_path / "ortho"
    data = _grid(folder, dtype="uint16", lo=800, hi=12_000)
    parquet, ids = _buildings(tmp_path)
    info = _mosaic(folder)
    chips, index = _crop(info, parquet, tmp_path / "out")
    every = np.concatenate([d.ravel() for d in data.values()]).astype("float64")
    assert info.band_rule == "rgb+stretch"
    assert info.scale == pytest.approx(tuple(np.percentile(every, [2, 98])), rel=1e-6)
    assert sorted(index) == sorted(ids) and _statuses(index) == {"ok": len(ids)}
    for b, r in index.items():
        tile = next(n for n in data if _in_tile(r, n))
        ref = _stretched_reference(info, folder / f"{tile}.tif", r)
        assert np.abs(ref.astype(int) - chips[b].astype(int)).max() <= 1, b
    stacked = np.stack(list(chips.values()))
    assert stacked.min() <= 10 and stacked.max() >= 245  # the 8-bit range is used, not crushed or saturated


def test_the_sixteen_bit_stretch_comes_from_the_whole_mosaic_not_its_first_tile(tmp_path):
    """First tile (by name) all nodata: its stretch would be (0, 1), and every chip of the others pure white."""
    folder = tmp_path / "ortho"
    data = _grid(folder, dtype="uint16", lo=800, hi=12_000, blank=("t00",))
    parquet, ids = _buildings(tmp_path)
    info = _mosaic(folder)
    chips, index = _crop(info, parquet, tmp_path / "out")
    valid = np.concatenate([d.ravel() for n, d in data.items() if n != "t00"]).astype("float64")
    assert info.scale == pytest.approx(tuple(np.percentile(valid, [2, 98])), rel=1e-6)
    assert _statuses(index) == {"ok": 48, "nodata": 16} and sorted(index) == sorted(ids)
    stacked = np.stack(list(chips.values()))
    assert (stacked == 255).mean() < 0.05 and stacked.std() > 20


# --- 7. a file that is not a raster ------------------------------------------------------------------------------


NOT_RASTERS = {
    "readme.tif": b"These tiles were delivered by IGN on 2024-03-01.\n",
    "error_page.tif": b"<html><body><h1>403 Forbidden</h1></body></html>",  # a failed download saved as a tile
    "empty.tif": b"",
    "zeros.jp2": bytes(4096),
}


@pytest.mark.parametrize("name", NOT_RASTERS)
def test_a_file_that_is_not_a_raster_fails_the_mosaic_naming_it(tmp_path, name):
    folder = tmp_path / "ortho"
    _grid(folder)
    bad = folder / name
    bad.write_bytes(NOT_RASTERS[name])
    assert str(bad) in find_tiles(folder)  # it has a tile's name: it is taken for one
    with pytest.raises(MosaicError, match=re.escape(f"{bad}: cannot be opened as a raster")):
        _mosaic(folder)
    bad.unlink()
    assert len(_mosaic(folder).tiles) == 4


def test_the_scene_is_sound(tmp_path):
    """The unspoiled scene crops every building `ok`: what the tests above spoil is the only difference."""
    folder = tmp_path / "ortho"
    _grid(folder)
    parquet, ids = _buildings(tmp_path)
    chips, index = _crop(_mosaic(folder), parquet, tmp_path / "out")
    assert sorted(index) == sorted(ids) and _statuses(index) == {"ok": 64} and len(chips) == 64
    shutil.rmtree(tmp_path / "out")
