"""The prefetch of remote imagery: a crop through it is the local crop, it fetches exactly the blocks
the crop decodes, it retries throttling and names what it cannot fetch, and it keeps disk bounded.

Remote tiles are served over HTTP with Range requests (``standins/range_server.py``), read by GDAL
as ``/vsicurl/`` URLs, as COGs on a web server would be; Cloud Storage is covered in ``test_prod``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from dagster import DagsterInstance, materialize
from shapely.geometry import box

from ops.crop.cut import crop_cell
from ops.crop.partition import crop_partition
from ops.crop.prefetch import Prefetcher
from ops.crop.spec import ChipSpec
from ops.crop.tiles import TileSet
from ops.crop.units import cell_tasks
from ops.geo.footprints import iter_building_batches, write_buildings_geoparquet
from ops.imagery.mosaic import build_mosaic, find_tiles
from ops.imagery.remote import FetchError, HttpRangeReader, RetryPolicy, read_layout
from ops.shards import list_shards, open_chips, read_index
from tests.realdata import IGN_ORTHO, SPACENET_LABELS, SPACENET_TIF
from tests.standins.range_server import range_server

FAST_RETRY = RetryPolicy(attempts=4, base_s=0.01, cap_s=0.05)


@pytest.fixture(scope="module")
def served(small_dep, tmp_path_factory):
    """The small département's buildings, its local mosaic, and the same tiles behind an HTTP server."""
    work = tmp_path_factory.mktemp("prefetch")
    parquet = work / "b.parquet"
    write_buildings_geoparquet(iter_building_batches(small_dep.footprints, "12", small_dep.epsg), parquet, 2154)
    local = build_mosaic(find_tiles(small_dep.ortho_dir), work / "local.vrt", name="local")
    with range_server(small_dep.ortho_dir) as (url, how):
        remote_tiles = [f"/vsicurl/{url}/{Path(t.path).name}" for t in local.tiles]
        remote = build_mosaic(remote_tiles, work / "remote.vrt", name="remote")
        yield work, parquet, local, remote, how


def _shards(folder: Path) -> dict[str, tuple[np.ndarray, object]]:
    return {s: (np.array(open_chips(folder, s)), read_index(folder, s)) for s in list_shards(folder)}


def _same_shards(a: Path, b: Path) -> None:
    left, right = _shards(a), _shards(b)
    assert sorted(left) == sorted(right)
    for s in left:
        assert np.array_equal(left[s][0], right[s][0]), s
        assert left[s][1].equals(right[s][1]), s


@pytest.mark.parametrize("workers", [1, 2])
def test_a_crop_through_the_prefetch_is_the_local_crop_despite_throttling(served, tmp_path, workers):
    work, parquet, local, remote, how = served
    spec = ChipSpec()
    list(crop_partition(parquet, local, tmp_path / "local", spec, buildings_fingerprint="x", part_size=100))
    how.set(fail_first=1)  # every range request is answered 503 the first time
    try:
        with Prefetcher(remote, spec, HttpRangeReader(), tmp_path, threads=4, retry=FAST_RETRY) as p:
            scratch = p.scratch
            results = list(
                crop_partition(
                    parquet,
                    remote,
                    tmp_path / "remote",
                    spec,
                    buildings_fingerprint="x",
                    part_size=100,
                    prefetch=p,
                    workers=workers,
                )
            )
            stats = p.stats
    finally:
        how.set(fail_first=0)
    _same_shards(tmp_path / "local", tmp_path / "remote")
    assert sum(r.counts["ok"] for r in results) > 300
    assert sum(r.counts["error"] for r in results) == 0
    assert 0 < stats.retries <= stats.requests  # a range is retried after its 503 (once: ranges shared by units pass)
    assert stats.units == len(results)
    assert not scratch.exists()  # the local copies are gone with the step


def test_the_prefetch_fetches_exactly_the_blocks_the_crop_decodes(served, tmp_path):
    work, parquet, local, remote, _ = served
    spec = ChipSpec()
    total_blocks = sum(-(-t.width // t.block[1]) * -(-t.height // t.block[0]) for t in local.tiles)
    with Prefetcher(remote, spec, HttpRangeReader(), tmp_path, threads=4) as p:
        p.fetched = []
        for task in cell_tasks(parquet, part_size=100):
            tiles = TileSet(local)  # a fresh one: a prefetch is per unit of work
            tiles.decoded = []
            crop_cell(tiles, local, task, spec)
            before = len(p.fetched)
            ready = p.prepare(task)
            assert set(p.fetched[before:]) == set(tiles.decoded), task.shard_id
            # the copy holds those blocks byte for byte, and nothing else of the image
            for i, path in (ready.tile_paths or {}).items():
                layout = read_layout(remote.tiles[i].path, Path(path).stat().st_size)
                with open(local.tiles[i].path, "rb") as src, open(path, "rb") as copy:
                    original, fetched = src.read(), copy.read()
                wanted = {(br, bc) for t, br, bc in tiles.decoded if t == i}
                for br in range(layout.offsets.shape[1]):
                    for bc in range(layout.offsets.shape[2]):
                        a, n = int(layout.offsets[0, br, bc]), int(layout.lengths[0, br, bc])
                        if (br, bc) in wanted:
                            assert fetched[a : a + n] == original[a : a + n]
            p.release(ready)
        assert 0 < p.stats.blocks < total_blocks  # only what the buildings need


def test_disk_holds_only_the_cells_in_flight(served, tmp_path):
    work, parquet, _, remote, _ = served
    depth, seen = 1, []
    with Prefetcher(remote, ChipSpec(), HttpRangeReader(), tmp_path, threads=2) as p:
        prepare = p.prepare

        def counting(task):
            ready = prepare(task)
            seen.append(sum(1 for d in p.scratch.iterdir() if d.is_dir()))
            return ready

        p.prepare = counting
        results = list(
            crop_partition(
                parquet,
                remote,
                tmp_path / "out",
                ChipSpec(),
                buildings_fingerprint="x",
                part_size=50,
                prefetch=p,
                prefetch_depth=depth,
            )  # fmt: skip
        )
    assert len(results) > 4
    assert max(seen) <= depth + 1  # the unit being cut and those fetched ahead, never the whole partition


@pytest.mark.reliability
def test_a_denied_tile_fails_at_once_naming_it(served, tmp_path):
    _, parquet, _, remote, how = served
    name = Path(remote.tiles[0].path).name
    how.set(deny=[name])
    before = len(how.log())
    try:
        with Prefetcher(remote, ChipSpec(), HttpRangeReader(), tmp_path, retry=FAST_RETRY) as p:
            with pytest.raises(FetchError, match=f"HTTP 403 .*{name}"):
                list(crop_partition(parquet, remote, tmp_path / "out", ChipSpec(), buildings_fingerprint="x",
                                    prefetch=p))  # fmt: skip
            assert p.stats.retries == 0  # a refusal is not retried
    finally:
        how.set(deny=[])
    assert any(c == "fetch" and name in path for c, _, path, _ in how.log()[before:])


@pytest.mark.reliability
def test_a_store_that_keeps_failing_is_given_up_naming_the_file_and_range(served, tmp_path):
    _, parquet, _, remote, how = served
    how.set(fail_every=1)
    try:
        with Prefetcher(remote, ChipSpec(), HttpRangeReader(), tmp_path, retry=FAST_RETRY) as p:
            with pytest.raises(FetchError, match=r"\.tif bytes \d+-\d+: still failing after 4 attempts: HTTP 503"):
                list(crop_partition(parquet, remote, tmp_path / "out", ChipSpec(), buildings_fingerprint="x",
                                    prefetch=p))  # fmt: skip
            assert p.stats.retries >= 3
    finally:
        how.set(fail_every=0)


@pytest.mark.parametrize("raster", ["ign", "spacenet"])
def test_real_stripped_rasters_through_the_prefetch(raster, tmp_path):
    """IGN's sample is pixel-interleaved strips, SpaceNet's a band-interleaved uint16: blocks are not tiles."""
    if raster == "ign":
        src = IGN_ORTHO
        with rasterio.open(src) as ds:
            b = ds.bounds
        step = (b.right - b.left) / 6
        geoms = [box(b.left + k * step, b.bottom + k * step, b.left + k * step + 6, b.bottom + k * step + 5)
                 for k in range(1, 5)]  # fmt: skip
        footprints = tmp_path / "ign.gpkg"
        gpd.GeoDataFrame({"cleabs": [f"b{k}" for k in range(4)]}, geometry=geoms, crs=2154).to_file(footprints)
        epsg = 2154
    else:
        src, footprints = SPACENET_TIF, SPACENET_LABELS
        with rasterio.open(src) as ds:
            epsg = ds.crs.to_epsg()
    served_dir = tmp_path / "www"
    served_dir.mkdir()
    shutil.copy(src, served_dir / src.name)
    parquet = tmp_path / "b.parquet"
    write_buildings_geoparquet(iter_building_batches(footprints, "12", epsg), parquet, epsg)
    local = build_mosaic([str(served_dir / src.name)], tmp_path / "l.vrt", name="l")
    spec = ChipSpec()
    list(crop_partition(parquet, local, tmp_path / "local", spec, buildings_fingerprint="x"))
    with range_server(served_dir) as (url, _):
        remote = build_mosaic([f"/vsicurl/{url}/{src.name}"], tmp_path / "r.vrt", name="r")
        with Prefetcher(remote, spec, HttpRangeReader(), tmp_path, threads=2) as p:
            results = list(crop_partition(parquet, remote, tmp_path / "remote", spec, buildings_fingerprint="x",
                                          prefetch=p))  # fmt: skip
    _same_shards(tmp_path / "local", tmp_path / "remote")
    assert sum(r.counts["ok"] for r in results) >= 4


@pytest.mark.slow
def test_the_chips_asset_reports_its_prefetch(small_dep, tmp_path, monkeypatch):
    """`prefetch: always` on local tiles (a slow network mount) goes through the same copies as gs:// would."""
    from orchestration.definitions import all_assets
    from orchestration.environment import local_resources

    monkeypatch.setenv("BATIVISION_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("BATIVISION_SOURCE_DIR", str(small_dep.root.parent))
    resources = local_resources()
    crop = ["buildings", "ortho_mosaic", "chips"]
    dep = small_dep.departement
    direct = materialize(all_assets, selection=crop, partition_key=dep, resources=resources,
                         instance=DagsterInstance.ephemeral())  # fmt: skip
    chips_dir = tmp_path / "store" / "chips" / dep
    shutil.copytree(chips_dir, tmp_path / "direct")
    config = {"ops": {"chips": {"config": {"prefetch": "always", "resume": False, "prefetch_dir": str(tmp_path)}}}}
    fetched = materialize(all_assets, selection=["chips"], partition_key=dep, resources=resources,
                          instance=DagsterInstance.ephemeral(), run_config=config)  # fmt: skip
    assert direct.asset_materializations_for_node("chips")[0].metadata["prefetch"].value == "off"
    md = fetched.asset_materializations_for_node("chips")[0].metadata
    assert md["prefetch"].value == "on"
    assert md["prefetch_blocks"].value > 0 and md["prefetch_mib"].value > 0
    _same_shards(tmp_path / "direct", chips_dir)
    assert [p.name for p in tmp_path.glob("prefetch-*")] == []
