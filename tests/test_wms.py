"""A WMS as the imagery: the pipeline runs from a real OGC server, and its chips are the local tiles' chips.

The server is Debian's MapServer (``tests/standins/mapserver.py``) serving the
small synthetic département's tiles as layer ``ORTHO`` in EPSG:2154, the way
IGN's Géoplateforme serves ``ORTHOIMAGERY.ORTHOPHOTOS``.

Tolerance, stated: GetMap blocks are asked on the layer's own pixel grid at
its resolution, and MapServer answers them with nearest-neighbour sampling,
so in PNG the chips are *identical* to those cut from the tiles on disk. In
JPEG (MapServer's quality 90) each chip differs by its compression only:
measured here (289 chips), mean |Δ| per chip 1.29 grey levels (0-255) on
average and 2.62 at worst, 99th percentile of |Δ| 6 (median chip) and 14 at
worst; bounds: per chip mean ≤ 4, 99th percentile ≤ 20 (as for JPEG COG tiles,
tests/test_formats.py), and every building the same status.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from urllib.parse import parse_qs

import numpy as np
import pytest
from dagster import DagsterInstance, materialize

from ops.crop.partition import crop_partition
from ops.crop.service_prefetch import ServicePrefetcher, service_grid
from ops.crop.spec import ChipSpec, place
from ops.crop.tiles import TileSet
from ops.crop.units import cell_tasks
from ops.geo.footprints import iter_building_batches, write_buildings_geoparquet
from ops.imagery.mosaic import build_mosaic, find_tiles
from ops.imagery.remote import HttpRangeReader, RetryPolicy
from ops.imagery.wms import WmsError, WmsLayer, cache_bytes, gdal_wms_xml, open_layer, write_service_tile
from ops.shards import list_shards, open_chips, read_index
from resources.imagery import OrthoImagery
from tests.standins.mapserver import LAYER, wms_server

pytestmark = [pytest.mark.slow, pytest.mark.reliability]

FAST_RETRY = RetryPolicy(attempts=6, base_s=0.01, cap_s=0.05)
BLOCK = 512


@pytest.fixture(scope="module")
def served(small_dep, tmp_path_factory):
    """The small département's buildings, its local mosaic and chips, and the same tiles behind MapServer."""
    work = tmp_path_factory.mktemp("wms")
    parquet = work / "b.parquet"
    write_buildings_geoparquet(iter_building_batches(small_dep.footprints, "12", small_dep.epsg), parquet, 2154)
    local = build_mosaic(find_tiles(small_dep.ortho_dir), work / "local.vrt", name="local")
    list(crop_partition(parquet, local, work / "local", ChipSpec(), buildings_fingerprint="b", resume=False))
    with wms_server(work / "local.vrt", local.bounds) as (url, control):
        yield work, parquet, _chips(work / "local"), url, control


def _chips(folder: Path) -> dict[str, tuple[str, np.ndarray | None]]:
    """Status and chip of every building (by id) of a chips folder."""
    out = {}
    for s in list_shards(folder):
        arr = open_chips(folder, s)
        for r in read_index(folder, s).to_pylist():
            out[r["building_id"]] = (r["status"], np.asarray(arr[r["row"]]) if r["row"] >= 0 else None)
    return out


def _service_mosaic(url: str, work: Path, fmt: str = "image/png", layer: str = LAYER):
    wms = WmsLayer(url, layer, format=fmt, block_px=BLOCK)
    xml = write_service_tile(gdal_wms_xml(wms, open_layer(wms, HttpRangeReader())), work / "service.xml")
    return wms, build_mosaic([str(xml)], work / "service.vrt", name="wms")


def _crop_from_service(served, work: Path, fmt: str = "image/png", **prefetch) -> tuple[dict, ServicePrefetcher]:
    _, parquet, _, url, _ = served
    work.mkdir(exist_ok=True)
    wms, info = _service_mosaic(url, work, fmt)
    args = {"rate_per_s": None, "retry": FAST_RETRY, **prefetch}
    with ServicePrefetcher(info, ChipSpec(), wms, HttpRangeReader(), work / "cache", **args) as p:
        p.fetched = []
        list(crop_partition(parquet, info, work / "chips", ChipSpec(), buildings_fingerprint="b", resume=False,
                            prefetch=p))  # fmt: skip
    return _chips(work / "chips"), p


def _bbox_of(query: str) -> tuple[float, ...]:
    return tuple(round(float(v), 1) for v in parse_qs(query)["BBOX"][0].split(","))


def test_png_chips_from_the_service_are_the_local_chips_and_each_block_is_asked_once(served, tmp_path):
    work, parquet, local, url, control = served
    before = control.log()["getmaps"]
    got, p = _crop_from_service(served, tmp_path / "png")
    assert got.keys() == local.keys()
    for bid, (status, chip) in local.items():
        assert got[bid][0] == status, bid
        if chip is not None:
            np.testing.assert_array_equal(got[bid][1], chip, err_msg=bid)
    assert sum(s == "ok" for s, _ in local.values()) > 100
    # exactly the blocks the crop's own enumeration needs, each requested once
    info = p.info
    tiles, spec = TileSet(info), ChipSpec()
    needed = set()
    for t in cell_tasks(parquet):
        pl = place(t, info, spec)
        needed |= tiles.blocks(pl.cols, pl.rows, pl.npxs).get(0, set())
    assert sorted(p.fetched) == sorted(needed)
    log = control.log()["log"][before:]
    grid = service_grid(info)
    assert sorted(_bbox_of(q) for _, q in log) == sorted(
        tuple(round(v, 1) for v in grid.block_bbox(*k)) for k in needed
    )
    assert p.stats.requests == len(needed) and p.stats.retries == 0


def test_jpeg_chips_are_the_local_chips_within_the_compression_tolerance(served, tmp_path):
    local = served[2]
    got, _ = _crop_from_service(served, tmp_path / "jpeg", fmt="image/jpeg")
    means, p99s = [], []
    for bid, (status, chip) in local.items():
        assert got[bid][0] == status, bid
        if chip is not None:
            d = np.abs(got[bid][1].astype(np.int16) - chip.astype(np.int16))
            means.append(d.mean())
            p99s.append(np.percentile(d, 99))
    print(f"JPEG: per-chip mean |Δ| {np.mean(means):.2f} on average, {max(means):.2f} at worst; "
          f"99th percentile {np.median(p99s):.0f} (median chip), {max(p99s):.0f} at worst")  # fmt: skip
    assert max(means) <= 4.0 and max(p99s) <= 20, (max(means), max(p99s))
    assert np.mean(means) > 0.05  # really JPEG: the service did not hand back lossless pixels


def test_a_service_failing_every_third_request_still_yields_every_chip(served, tmp_path):
    local, control = served[2], served[4]
    control.set(fail_every=3)
    try:
        got, p = _crop_from_service(served, tmp_path / "flaky")
        failed = control.log()["failed"]
    finally:
        control.set(fail_every=0)
    assert failed > 0 and p.stats.retries >= failed
    assert {b: s for b, (s, _) in got.items()} == {b: s for b, (s, _) in local.items()}
    for bid, (_, chip) in local.items():
        if chip is not None:
            np.testing.assert_array_equal(got[bid][1], chip, err_msg=bid)


def test_the_cache_stays_within_its_bound_and_a_second_run_asks_nothing(served, tmp_path):
    local, control = served[2], served[4]
    bound = 3 * BLOCK * BLOCK  # a few PNG blocks: smaller than the partition's blocks, larger than one unit's pins
    got, p = _crop_from_service(served, tmp_path / "bounded", cache_max_bytes=bound)
    assert cache_bytes(p.cache.folder) <= bound
    assert {b: s for b, (s, _) in got.items()} == {b: s for b, (s, _) in local.items()}
    # an unbounded cache: the second run of the same layer fetches nothing
    _crop_from_service(served, tmp_path / "warm")
    before = control.log()["getmaps"]
    again, p2 = _crop_from_service(served, tmp_path / "warm")
    assert control.log()["getmaps"] == before and p2.stats.requests == 0 and p2.stats.cached > 0
    assert {b: s for b, (s, _) in again.items()} == {b: s for b, (s, _) in local.items()}


def test_the_request_rate_is_respected(served, tmp_path):
    control = served[4]
    before = control.log()["getmaps"]
    _crop_from_service(served, tmp_path / "rate", rate_per_s=8.0)
    times = sorted(t for t, _ in control.log()["log"][before:])
    assert len(times) >= 10
    # starts are spaced by the client; arrivals may bunch by a few ms
    assert times[-1] - times[0] >= (len(times) - 1) / 8.0 * 0.95, (len(times), times[-1] - times[0])


def test_a_missing_layer_or_a_refused_request_fails_at_once_naming_the_url_and_layer(served, tmp_path):
    url = served[3]
    t0 = time.monotonic()
    with pytest.raises(WmsError, match=rf"{url}.*no layer 'ORTHOIMAGERY.NOPE'.*layers: .*{LAYER}"):
        OrthoImagery(wms_url=url, wms_layer="ORTHOIMAGERY.NOPE").service_tile("12", tmp_path / "s.xml")
    with pytest.raises(WmsError, match=rf"{url}.*block_px 4096 exceeds the configured maximum GetMap size \(2048\)"):
        OrthoImagery(wms_url=url, wms_layer=LAYER, wms_block_px=4096).service_tile("12", tmp_path / "s.xml")
    assert time.monotonic() - t0 < 10  # no retries on a configuration error
    # a style the layer does not have: MapServer answers the GetMap with an exception document
    _, parquet, _, url, _ = served
    wms, info = _service_mosaic(url, tmp_path)
    bad = WmsLayer(url, LAYER, style="no-such-style", block_px=BLOCK)
    with (
        ServicePrefetcher(info, ChipSpec(), bad, HttpRangeReader(), tmp_path / "cache", retry=FAST_RETRY) as p,
        pytest.raises(WmsError, match=r"STYLES=no-such-style.*exception instead of an image"),
    ):
        list(crop_partition(parquet, info, tmp_path / "c", ChipSpec(), buildings_fingerprint="b", prefetch=p))


def test_the_pipeline_runs_from_the_wms(served, small_dep, tmp_path, monkeypatch):
    """buildings → ortho_mosaic (the service) → chips (prefetched GetMaps) → predictions, with their checks."""
    from orchestration.definitions import all_assets
    from orchestration.environment import local_resources

    local, url = served[2], served[3]
    monkeypatch.setenv("BATIVISION_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("BATIVISION_SOURCE_DIR", str(small_dep.root.parent))
    resources = local_resources()
    resources["imagery"] = OrthoImagery(
        root=str(small_dep.root.parent), wms_url=url, wms_layer=LAYER, wms_format="image/png", wms_block_px=BLOCK,
        wms_cache_dir=str(tmp_path / "wms-cache"),
    )  # fmt: skip
    dep = small_dep.departement
    result = materialize(all_assets, selection=["buildings", "ortho_mosaic", "chips", "predictions"],
                         partition_key=dep, resources=resources, instance=DagsterInstance.ephemeral())  # fmt: skip
    assert result.success
    assert all(c.passed for c in result.get_asset_check_evaluations())
    mosaic_md = result.asset_materializations_for_node("ortho_mosaic")[0].metadata
    assert mosaic_md["source"].value == f"WMS {url} layer {LAYER}"
    md = result.asset_materializations_for_node("chips")[0].metadata
    assert md["prefetch"].value == "on" and md["prefetch_requests"].value > 0
    info = json.loads((tmp_path / "store" / "mosaic" / dep / "mosaic.json").read_text())
    assert [Path(t["path"]).name for t in info["tiles"]] == ["service.xml"]
    got = _chips(tmp_path / "store" / "chips" / dep)
    assert {b: s for b, (s, _) in got.items()} == {b: s for b, (s, _) in local.items()}
    for bid, (_, chip) in local.items():
        if chip is not None:
            np.testing.assert_array_equal(got[bid][1], chip, err_msg=bid)


def test_the_chips_step_runs_from_a_wmts_and_cuts_the_local_chips(served, small_dep, tmp_path, monkeypatch):
    """MapCache's WMTS (tile matrix set LA93, 256 px tiles) in front of the same map: the GetTiles are prefetched.

    The tile matrix reaches a little past the tiles (whole 256 px tiles): a service cannot tell "no imagery"
    from its background colour, so a building there that the local tiles call `no_imagery` may be `nodata`.
    """
    from orchestration.definitions import all_assets
    from orchestration.environment import local_resources

    local, control = served[2], served[4]
    monkeypatch.setenv("BATIVISION_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("BATIVISION_SOURCE_DIR", str(small_dep.root.parent))
    resources = local_resources()
    resources["imagery"] = OrthoImagery(
        root=str(small_dep.root.parent), wms_url=control.wmts_url, wms_protocol="WMTS", wms_layer=LAYER,
        wms_style="default", wms_format="image/png", wmts_tile_matrix_set="LA93",
        wms_cache_dir=str(tmp_path / "wms-cache"),
    )  # fmt: skip
    dep = small_dep.departement
    before = control.log()["getmaps"]
    result = materialize(all_assets, selection=["buildings", "ortho_mosaic", "chips"], partition_key=dep,
                         resources=resources, instance=DagsterInstance.ephemeral())  # fmt: skip
    assert result.success and all(c.passed for c in result.get_asset_check_evaluations())
    gettiles = [q for _, q in control.log()["log"][before:] if "GetTile" in q]
    md = result.asset_materializations_for_node("chips")[0].metadata
    assert md["prefetch"].value == "on" and md["prefetch_requests"].value == len(gettiles) > 0
    assert all("TILEMATRIXSET=LA93" in q for q in gettiles)
    got = _chips(tmp_path / "store" / "chips" / dep)
    assert got.keys() == local.keys()
    for bid, (status, chip) in local.items():
        assert got[bid][0] == status or (status, got[bid][0]) == ("no_imagery", "nodata"), bid
        if chip is not None:
            np.testing.assert_array_equal(got[bid][1], chip, err_msg=bid)
    assert sum(s == "ok" for s, _ in got.values()) == sum(s == "ok" for s, _ in local.values())


def test_a_wmts_layer_or_tile_matrix_set_that_does_not_exist_fails_at_once_naming_them(served, tmp_path):
    url = served[4].wmts_url

    def tile(**kw) -> None:
        args = {"wms_url": url, "wms_protocol": "WMTS", "wms_layer": LAYER, "wmts_tile_matrix_set": "LA93", **kw}
        OrthoImagery(**args).service_tile("12", tmp_path / "s.xml")

    with pytest.raises(WmsError, match=rf"{url}: no layer 'NOPE' in the WMTS capabilities \(layers: {LAYER}\)"):
        tile(wms_layer="NOPE")
    with pytest.raises(WmsError, match=rf"{url}: layer '{LAYER}' has no tile matrix set 'PM' \(sets: LA93\)"):
        tile(wmts_tile_matrix_set="PM")
    with pytest.raises(WmsError, match=r"'LA93' has no matrix at 0.5 m \(0: 0.2 m\)"):
        tile(wms_resolution_m=0.5)


def test_prefetch_never_with_a_wms_is_refused_naming_the_setting(small_dep, tmp_path, monkeypatch):
    """Without the prefetch, GDAL would read the service on its own: no rate limit, no cache. Refused before any request."""
    from orchestration.definitions import all_assets
    from orchestration.environment import local_resources

    monkeypatch.setenv("BATIVISION_DATA_DIR", str(tmp_path))
    resources = local_resources()
    url = "http://127.0.0.1:9/wms"  # nothing listens there: the refusal must come before any request
    resources["imagery"] = OrthoImagery(root=str(small_dep.root.parent), wms_url=url, wms_requests_per_s=4)
    with pytest.raises(Exception, match=re.escape(f"prefetch: never with a WMS source ({url}, layer ")):
        materialize(all_assets, selection=["chips"], partition_key=small_dep.departement, resources=resources,
                    instance=DagsterInstance.ephemeral(),
                    run_config={"ops": {"chips": {"config": {"prefetch": "never"}}}})  # fmt: skip
