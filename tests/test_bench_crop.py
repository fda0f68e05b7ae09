"""`make bench-crop` runs for every imagery format: its own contenders measure what they say.

The crop benchmark's floor and its plain-rasterio baseline are code of ours that no other test runs,
and `make test` does not install rio-tiler (the benchmark's other baseline). A floor that silently
decoded fewer blocks, or none for one format, would make every ratio printed against it a lie: this
runs the floor, the rasterio baseline and our crop, as the benchmark calls them, on a small
synthetic département in each format, and checks what they report against the crop's own counts.
"""

from __future__ import annotations

import numpy as np
import pytest

from bench.crop import SPEC, baseline, decode_floor, ours, windows_in_source_order
from ops.crop.tiles import TileSet
from ops.geo.footprints import iter_building_batches, write_buildings_geoparquet
from ops.imagery.mosaic import build_mosaic, find_tiles
from synthetic import generate_departement

pytestmark = pytest.mark.reliability

DECODERS = {"deflate": "libdeflate", "jpeg": "libjpeg-turbo", "jp2": "openjpeg"}


@pytest.mark.parametrize("imagery_format", sorted(DECODERS))
def test_the_crop_benchmarks_floor_decodes_every_needed_block_once_with_the_formats_fastest_decoder(
    tmp_path, imagery_format
):
    m = generate_departement(tmp_path / "data", "33", 120, seed=5, tile_px=1000, imagery_format=imagery_format)
    parquet = tmp_path / "buildings.parquet"
    write_buildings_geoparquet(iter_building_batches(m.footprints, "33", m.epsg), parquet, m.epsg)
    info = build_mosaic(find_tiles(m.ortho_dir), tmp_path / "mosaic.vrt", name="bench")
    windows = windows_in_source_order(parquet, info)
    assert len(windows) > 50

    seconds, blocks, nbytes, decoder = decode_floor(info, windows)
    # the blocks the crop's own enumeration says these windows touch, and their decoded size
    res, left, top = info.resolution, info.bounds[0], info.bounds[3]
    cols = np.rint((windows[:, 0] - left) / res).astype(np.int64)
    rows = np.rint((top - windows[:, 3]) / res).astype(np.int64)
    npx = np.rint((windows[:, 2] - windows[:, 0]) / res).astype(np.int64)
    needed = TileSet(info).blocks(cols, rows, npx)
    expected = 0
    for i, keys in needed.items():
        t, (bh, bw) = info.tiles[i], info.tiles[i].block
        expected += sum(min(bh, t.height - br * bh) * min(bw, t.width - bc * bw) * info.count for br, bc in keys)
    assert decoder == DECODERS[imagery_format] and seconds > 0
    assert blocks == sum(len(k) for k in needed.values()) and nbytes == expected

    chips_per_s = baseline("rasterio", tmp_path / "mosaic.vrt", windows, tmp_path / "baseline")
    assert chips_per_s > 0 and len(list((tmp_path / "baseline").glob("*.chips.npy"))) == 1

    seconds, chips, bytes_per_chip, decoded, _ = ours(parquet, info, tmp_path / "ours", workers=1)
    # a chip for each window with imagery, but for the few over the sample's nodata hole
    assert 0.9 * len(windows) <= chips <= len(windows)
    assert bytes_per_chip >= 3 * SPEC.size**2 and decoded >= blocks


@pytest.mark.parametrize("imagery_format", ["jp2", "deflate"])
def test_each_crop_contender_runs_on_the_cpus_it_is_compared_on(tmp_path, imagery_format):
    """The ratios compare like with like: ours with 1 worker (and the baselines and the floor) on one
    CPU, ours with 2 workers on two. Before, "1 worker" decoded JPEG 2000 on every CPU of the machine
    and JP2OpenJPEG gave rio-tiler all of them too, so the 1-worker figures measured no one CPU; and
    a contender pinned to one CPU must not keep torch's threads for two (the DEFLATE floor ran 15x
    slower, its predictor being undone by torch)."""
    from bench.crop import run_child
    from ops.cpus import available_cpus

    m = generate_departement(tmp_path / "data", "33", 60, seed=3, tile_px=1000, imagery_format=imagery_format)
    parquet = tmp_path / "buildings.parquet"
    write_buildings_geoparquet(iter_building_batches(m.footprints, "33", m.epsg), parquet, m.epsg)
    work = tmp_path / "work"
    work.mkdir()
    (work / "mosaic.json").write_text(build_mosaic(find_tiles(m.ortho_dir), work / "mosaic.vrt", name="b").to_json())
    one, two, floor = (run_child(kind, work, parquet) for kind in ("ours1", "ours2", "floor"))
    assert one["cpus"] == 1 and floor["cpus"] == 1 and two["cpus"] == min(2, available_cpus())
    assert (one["torch_threads"], floor["torch_threads"], two["torch_threads"]) == (1, 1, two["cpus"])
    assert one["chips"] == two["chips"] > 30 and one["blocks"] == two["blocks"] and floor["blocks"] > 0
