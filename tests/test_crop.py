"""The chip engine's correctness: reference crops, tile seams, statuses, determinism across workers."""

from __future__ import annotations

import re
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import torch
import torch.nn.functional as F
from rasterio.transform import from_origin
from rasterio.windows import Window
from shapely.geometry import box

from ops.crop.partition import crop_partition
from ops.crop.spec import ChipSpec
from ops.geo.footprints import iter_building_batches, write_buildings_geoparquet
from ops.imagery.blocks import block_range
from ops.imagery.mosaic import build_mosaic, find_tiles
from ops.shards import list_shards, open_chips, read_index, shard_paths

RES = 0.2
X0, Y0 = 700_000.0, 6_600_400.0  # upper-left corner of the test raster


def _texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth random RGB in 1..255 (0 is nodata), like an orthophoto's low frequencies plus noise."""
    rng = np.random.default_rng(seed)
    small = rng.uniform(1, 255, (3, h // 16 + 2, w // 16 + 2)).astype("float32")
    big = F.interpolate(torch.from_numpy(small)[None], size=(h, w), mode="bilinear", align_corners=False)[0].numpy()
    return np.clip(big + rng.normal(0, 6, big.shape), 1, 255).astype("uint8")


def _write(path: Path, data: np.ndarray, x0: float, y0: float, block: int = 128) -> None:
    with rasterio.open(
        path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=3, dtype="uint8",
        crs="EPSG:2154", transform=from_origin(x0, y0, RES, RES), nodata=0, tiled=True,
        blockxsize=block, blockysize=block, compress="deflate",
    ) as dst:  # fmt: skip
        dst.write(data)


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """One 1000×1000 px raster, the same cut into four 500×500 tiles, and buildings across the seams."""
    root = tmp_path_factory.mktemp("crop")
    data = _texture(1000, 1000)
    data[:, 800:, 800:] = 0  # a nodata corner
    (root / "merged").mkdir()
    (root / "tiles").mkdir()
    _write(root / "merged" / "all.tif", data, X0, Y0)
    for r in range(2):
        for c in range(2):
            part = data[:, r * 500 : (r + 1) * 500, c * 500 : (c + 1) * 500]
            _write(root / "tiles" / f"t{r}{c}.tif", part, X0 + c * 100, Y0 - r * 100, block=64)
    rng = np.random.default_rng(1)
    geoms, ids = [], []
    for k in range(300):  # buildings all over, many across the seams at x=+100 m and y=-100 m
        cx, cy = X0 + rng.uniform(5, 195), Y0 - rng.uniform(5, 195)
        w, h = rng.uniform(4, 25, 2)
        geoms.append(box(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
        ids.append(f"b{k:03d}")
    geoms += [box(X0 + 300, Y0 - 50, X0 + 310, Y0 - 40), box(X0 + 180, Y0 - 190, X0 + 190, Y0 - 180)]
    ids += ["outside", "in_nodata"]
    gpd.GeoDataFrame({"cleabs": ids}, geometry=geoms, crs=2154).to_file(root / "b.gpkg", layer="batiment")
    write_buildings_geoparquet(iter_building_batches(root / "b.gpkg", "12", 2154), root / "b.parquet", 2154)
    return root


def _crop(scene: Path, which: str, out: str, workers: int = 1, part_size: int = 4096):
    info = build_mosaic(find_tiles(scene / which), scene / f"{which}.vrt", name=which)
    folder = scene / out
    list(crop_partition(scene / "b.parquet", info, folder, ChipSpec(), buildings_fingerprint="x", workers=workers,
                        resume=False, part_size=part_size))  # fmt: skip
    chips, index = {}, {}
    for shard in list_shards(folder):
        idx = read_index(folder, shard).to_pandas()
        arr = open_chips(folder, shard)
        for r in idx.itertuples():
            index[r.building_id] = r
            if r.row >= 0:
                chips[r.building_id] = np.array(arr[r.row])
    return chips, index


def test_a_chip_equals_a_reference_crop_of_its_window(scene):
    """Reference: read the window with rasterio, resize with torch's anti-aliased bilinear. Tolerance: ±1 DN."""
    chips, index = _crop(scene, "merged", "ref_out")
    with rasterio.open(scene / "merged" / "all.tif") as ds:
        checked = 0
        for bid, chip in chips.items():
            r = index[bid]
            col, row = ~ds.transform @ (r.minx, r.maxy)
            n = round((r.maxx - r.minx) / RES)
            win = ds.read(window=Window(round(col), round(row), n, n), boundless=True, fill_value=0).astype("float32")
            ref = F.interpolate(torch.from_numpy(win)[None], size=(64, 64), mode="bilinear", antialias=True)[0]
            ref = ref.round().clamp(0, 255).numpy()
            assert np.abs(ref - chip).max() <= 1, bid
            checked += 1
    assert checked > 250


def test_a_chip_across_tile_seams_equals_the_chip_from_the_merged_raster(scene):
    merged, _ = _crop(scene, "merged", "merged_out")
    tiled, index = _crop(scene, "tiles", "tiled_out")
    across = [b for b, r in index.items() if b in tiled and (r.minx < X0 + 100 < r.maxx or r.miny < Y0 - 100 < r.maxy)]
    assert len(across) > 20
    assert set(tiled) == set(merged)
    for b in tiled:
        np.testing.assert_array_equal(tiled[b], merged[b], err_msg=b)


@pytest.mark.reliability
def test_outside_and_nodata_buildings_get_statuses(scene):
    _, index = _crop(scene, "tiles", "status_out")
    assert index["outside"].status == "no_imagery" and index["outside"].row == -1
    assert index["in_nodata"].status == "nodata" and index["in_nodata"].valid_fraction == 0
    assert len(index) == 302  # every building has its row


def test_crop_is_the_same_with_one_and_two_workers(scene):
    one, i1 = _crop(scene, "tiles", "w1", workers=1, part_size=50)
    two, i2 = _crop(scene, "tiles", "w2", workers=2, part_size=50)
    assert set(one) == set(two) and len(one) > 250
    for b in one:
        np.testing.assert_array_equal(one[b], two[b])
    assert {b: r.status for b, r in i1.items()} == {b: r.status for b, r in i2.items()}
    shards = list_shards(scene / "w1")
    assert len(shards) > 1 and shards == list_shards(scene / "w2")
    for s in shards:  # byte-identical shards, whatever the worker count
        assert shard_paths(scene / "w1", s)[0].read_bytes() == shard_paths(scene / "w2", s)[0].read_bytes()


@pytest.mark.reliability
@pytest.mark.parametrize("workers", [1, 2])
def test_a_shard_that_cannot_be_written_fails_the_crop_naming_it(scene, workers):
    """Shards are written on a background thread of each crop process: its errors are not lost."""
    _crop(scene, "tiles", f"probe{workers}", part_size=50)
    shards = list_shards(scene / f"probe{workers}")
    bad = shards[len(shards) // 2]
    folder = scene / f"unwritable{workers}"
    npy = shard_paths(folder, bad)[0]
    npy.with_name(npy.name + ".tmp").mkdir(parents=True)  # where its chips would be written: a directory
    info = build_mosaic(find_tiles(scene / "tiles"), scene / "tiles.vrt", name="tiles")
    with pytest.raises(OSError, match=re.escape(bad)):
        list(crop_partition(scene / "b.parquet", info, folder, ChipSpec(), buildings_fingerprint="x",
                            workers=workers, resume=False, part_size=50))  # fmt: skip
    assert bad not in list_shards(folder), "a shard whose chips were not written must not look complete"


def test_parts_of_a_big_cell_decode_their_shared_blocks_once(scene):
    """Cut into parts north to south, a cell decodes each block once, and cuts the chips it cuts whole."""
    from ops.crop.cut import crop_cell
    from ops.crop.tiles import TileSet
    from ops.crop.units import cell_tasks

    info = build_mosaic(find_tiles(scene / "tiles"), scene / "parts.vrt", name="parts")
    whole, parts = TileSet(info), TileSet(info)
    whole.decoded, parts.decoded = [], []

    def by_building(tiles: TileSet, tasks) -> dict[str, np.ndarray]:
        out = {}
        for t in tasks:
            arr, index = crop_cell(tiles, info, t, ChipSpec())
            for b, row in zip(index.column("building_id").to_pylist(), index.column("row").to_pylist(), strict=True):
                if row >= 0:
                    out[b] = arr[row]
        return out

    chips_whole = by_building(whole, cell_tasks(scene / "b.parquet"))
    tasks = cell_tasks(scene / "b.parquet", part_size=40)
    assert any(".p" in t.shard_id for t in tasks)
    chips_parts = by_building(parts, tasks)
    assert sorted(parts.decoded) == sorted(whole.decoded)  # no block decoded twice at a seam between parts
    assert chips_parts.keys() == chips_whole.keys() and len(chips_whole) > 250
    for b, chip in chips_whole.items():
        np.testing.assert_array_equal(chips_parts[b], chip)


def test_resumed_cells_are_reused_and_stale_ones_removed(scene):
    info = build_mosaic(find_tiles(scene / "tiles"), scene / "r.vrt", name="r")
    folder = scene / "resume"
    first = list(crop_partition(scene / "b.parquet", info, folder, ChipSpec(), buildings_fingerprint="a"))
    (folder / "E0000000_N0000000.index.parquet").write_bytes(b"stale")
    again = list(crop_partition(scene / "b.parquet", info, folder, ChipSpec(), buildings_fingerprint="a"))
    assert all(r.reused for r in again) and len(again) == len(first)
    assert not (folder / "E0000000_N0000000.index.parquet").exists()
    changed = list(crop_partition(scene / "b.parquet", info, folder, ChipSpec(), buildings_fingerprint="b"))
    assert not any(r.reused for r in changed)


def test_vrt_is_georeferenced_like_its_tiles(scene):
    build_mosaic(find_tiles(scene / "tiles"), scene / "geo.vrt", name="geo")
    with rasterio.open(scene / "geo.vrt") as vrt, rasterio.open(scene / "merged" / "all.tif") as ref:
        assert vrt.crs.to_epsg() == 2154
        assert vrt.transform.almost_equals(ref.transform) and vrt.bounds == pytest.approx(ref.bounds)
        win = Window(450, 450, 100, 100)  # across all four tiles
        np.testing.assert_array_equal(vrt.read(window=win), ref.read(window=win))


def test_work_units_are_the_same_from_the_bbox_column_or_from_the_geometries(scene, tmp_path):
    """Buildings files written before the GeoParquet covering column still crop the same."""
    import pyarrow.parquet as pq

    from ops.crop.units import cell_tasks

    old = tmp_path / "no_bbox.parquet"
    pq.write_table(pq.read_table(scene / "b.parquet").drop_columns(["bbox"]), old)
    new_tasks, old_tasks = cell_tasks(scene / "b.parquet", part_size=40), cell_tasks(old, part_size=40)
    assert [t.shard_id for t in new_tasks] == [t.shard_id for t in old_tasks] and len(new_tasks) > 3
    for a, b in zip(new_tasks, old_tasks, strict=True):
        assert a.building_ids == b.building_ids
        np.testing.assert_array_equal(a.bounds, b.bounds)


@pytest.mark.reliability
def test_a_corrupt_block_quarantines_the_buildings_over_it_naming_the_tile(scene):
    """A damaged block gives its buildings the `error` status, a message naming the tile; the rest is cut as usual."""
    import shutil

    shutil.copytree(scene / "tiles", scene / "damaged")
    tile = scene / "damaged" / "t00.tif"
    with rasterio.open(tile) as ds:
        offset, size = block_range(ds, 1, 1)
    with open(tile, "r+b") as fh:  # the compressed bytes of block (1, 1) become noise
        fh.seek(offset)
        fh.write(np.random.default_rng(3).integers(0, 256, size, dtype=np.uint8).tobytes())
    good, good_index = _crop(scene, "tiles", "undamaged_out")
    chips, index = _crop(scene, "damaged", "damaged_out")
    hit = {b for b, r in index.items() if r.status == "error"}
    # block (1, 1) of t00 covers x 12.8-25.6 m and y -12.8 to -25.6 m from the corner
    over = {
        b for b, r in good_index.items()
        if r.status == "ok" and r.minx < X0 + 25.6 and r.maxx > X0 + 12.8 and r.maxy > Y0 - 25.6 and r.miny < Y0 - 12.8
    }  # fmt: skip
    assert hit == over and len(hit) >= 1
    assert all("t00.tif" in index[b].message and index[b].row == -1 for b in hit)
    for b in set(good) - hit:  # every other building is cut exactly as from the undamaged tiles
        np.testing.assert_array_equal(chips[b], good[b])
