"""Imagery over HTTP that fails: transient faults are retried into the local crop's exact chips, a tile that
keeps failing costs only its buildings (status ``error``, a message naming its URL, counted), and a refusal
or an outage fails the step at once naming the tile.

The tiles are served by a misbehaving variant of ``standins/range_server.py`` (500/503 every Nth request,
stalls longer than the read timeout, a tile that always fails, a body cut short, bytes garbled in transit,
a missing tile), steered through ``PUT /__faults``; it counts the faults it sent (``GET /__faults``) so each
test checks that its fault really happened.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from shapely.geometry import box

from ops.crop.partition import crop_partition
from ops.crop.prefetch import Prefetcher
from ops.crop.spec import ChipSpec
from ops.geo.footprints import iter_building_batches, write_buildings_geoparquet
from ops.imagery.blocks import block_range
from ops.imagery.mosaic import MosaicError, MosaicInfo, build_mosaic, find_tiles
from ops.imagery.remote import HTTP_TIMEOUT_S, FetchError, HttpRangeReader, RetryPolicy
from ops.shards import list_shards, open_chips, read_index
from resources.imagery import OrthoImagery
from tests.standins.servers import free_port, wait_http

pytestmark = pytest.mark.reliability

REPO = Path(__file__).resolve().parent.parent
FAST_RETRY = RetryPolicy(attempts=4, base_s=0.01, cap_s=0.05)
RES, PX, BLOCK = 0.2, 256, 64  # four 256 px tiles of 64 px blocks: 51.2 m a side
X0, Y0 = 700_000.0, 6_600_400.0
SPEC = ChipSpec()

# The range server's handler, with faults on top. Faults hit the prefetch's own requests ("fetch" client);
# a `failing` tile also answers 500 to GDAL. Each "every Nth" fault hits a given range at most once, so a
# retry is never failed again by the same rule: the tests are deterministic.
SERVER = r"""
import json, sys, threading, time
from http.server import ThreadingHTTPServer
from pathlib import Path
from tests.standins.range_server import Behaviour, _handler

root, port = Path(sys.argv[1]), int(sys.argv[2])
lock = threading.Lock()
faults, state = {}, {"n": 0, "hit": set(), "sent": {}}
Base = _handler(root, Behaviour())


class Faulty(Base):
    def _sent(self, what):
        with lock:
            state["sent"][what] = state["sent"].get(what, 0) + 1

    def do_PUT(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with lock:
            faults.clear()
            faults.update(body)
            state.update(n=0, hit=set(), sent={})
        self._status(204)

    def do_HEAD(self):
        name = Path(self.path).name
        if name in faults.get("failing", []):
            self._sent("failing")
            return self._status(500)
        if name in faults.get("missing", []) and self._client() == "fetch":
            self._sent("missing")
            return self._status(404)
        super().do_HEAD()

    def do_GET(self):
        if self.path == "/__faults":
            data = json.dumps(state["sent"]).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        name, rng = Path(self.path).name, self.headers.get("Range", "")
        if name in faults.get("failing", []):
            self._sent("failing")
            return self._status(500)
        if name in faults.get("stall_gdal", []) and self._client() == "gdal":
            self._sent("stall_gdal")
            time.sleep(faults["stall_s"])  # GDAL reading a header: accepted, then silence
            self.close_connection = True
            return
        if self._client() != "fetch" or not rng:
            return super().do_GET()
        if name in faults.get("missing", []):
            self._sent("missing")
            return self._status(404)
        if name in faults.get("broken", []):
            self._sent("broken")
            return self._serve(rng, cut=True)
        with lock:
            state["n"] += 1
            n, key = state["n"], (self.path, rng)
            first = key not in state["hit"]
        every, stall_every = faults.get("every", 0), faults.get("stall_every", 0)
        if first and every and n % every == 0:
            state["hit"].add(key)
            self._sent(str(faults["status"]))
            return self._status(faults["status"])
        if first and stall_every and n % stall_every == 0:
            state["hit"].add(key)
            self._sent("stall")
            time.sleep(faults["stall_s"])  # accepted, then silence: the client must give up on its own
            self.close_connection = True
            return
        if name == faults.get("garble", [None])[0]:
            return self._serve(rng, garble=faults["garble"][1:])
        super().do_GET()

    def _serve(self, rng, cut=False, garble=None):
        path = Path(self.translate_path(self.path))
        size = path.stat().st_size
        a, _, b = rng.removeprefix("bytes=").partition("-")
        start, stop = int(a), min(int(b) + 1 if b else size, size)
        data = bytearray(path.read_bytes()[start:stop])
        if garble:  # bytes [g0, g1) of the file arrive flipped: right length, wrong content
            g0, g1 = max(garble[0], start), min(garble[1], stop)
            if g0 < g1:
                self._sent("garbled")
                for k in range(g0 - start, g1 - start):
                    data[k] ^= 0x5A
        self.send_response(206)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{size}")
        self.end_headers()
        self.wfile.write(bytes(data[: len(data) // 2]) if cut else bytes(data))
        if cut:  # the body stops halfway and the connection closes: the client sees a short body
            self.close_connection = True


server = ThreadingHTTPServer(("127.0.0.1", port), Faulty)
server.daemon_threads = True
server.serve_forever()
"""


class Faults:
    """The test's handle on the faulty server: set its faults, read how many it sent."""

    def __init__(self, url: str) -> None:
        self.url = url

    def set(self, **faults: object) -> None:
        req = urllib.request.Request(self.url + "/__faults", data=json.dumps(faults).encode(), method="PUT")
        urllib.request.urlopen(req, timeout=10).close()

    def sent(self) -> dict[str, int]:
        with urllib.request.urlopen(self.url + "/__faults", timeout=10) as r:
            return json.loads(r.read())


def _texture(seed: int) -> np.ndarray:
    """Smooth random RGB in 1..255 (0 is nodata) that compresses like imagery, different in every block."""
    rng = np.random.default_rng(seed)
    small = rng.uniform(1, 255, (3, PX // 16, PX // 16))
    big = np.repeat(np.repeat(small, 16, axis=1), 16, axis=2) + rng.normal(0, 6, (3, PX, PX))
    return np.clip(big, 1, 255).astype("uint8")


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Iterator[tuple[Path, Path, MosaicInfo, MosaicInfo, str, Faults, dict]]:
    """Four tiled GeoTIFFs (2 × 2), 160 buildings over them, the local crop, and the same tiles over HTTP."""
    root = tmp_path_factory.mktemp("http_faults")
    www = root / "www"
    www.mkdir()
    for r in range(2):
        for c in range(2):
            with rasterio.open(
                www / f"t{r}{c}.tif", "w", driver="GTiff", width=PX, height=PX, count=3, dtype="uint8",
                crs="EPSG:2154", transform=from_origin(X0 + c * PX * RES, Y0 - r * PX * RES, RES, RES), nodata=0,
                tiled=True, blockxsize=BLOCK, blockysize=BLOCK, compress="deflate",
            ) as dst:  # fmt: skip
                dst.write(_texture(10 * r + c))
    rng = np.random.default_rng(7)
    side = 2 * PX * RES
    geoms = []
    for _ in range(160):  # 12 m from the mosaic's edge: every window is inside it, every local chip `ok`
        cx, cy = X0 + rng.uniform(12, side - 12), Y0 - rng.uniform(12, side - 12)
        w, h = rng.uniform(3, 10, 2)
        geoms.append(box(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
    ids = [f"b{k:03d}" for k in range(len(geoms))]
    gpd.GeoDataFrame({"cleabs": ids}, geometry=geoms, crs=2154).to_file(root / "b.gpkg", layer="batiment")
    parquet = root / "b.parquet"
    write_buildings_geoparquet(iter_building_batches(root / "b.gpkg", "12", 2154), parquet, 2154)
    local = build_mosaic(find_tiles(www), root / "local.vrt", name="local")
    _crop(parquet, local, root / "local")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-c", SERVER, str(www), str(port)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = Path(tempfile.mkdtemp(prefix="faulty-server-")) / "server.log"
    with log.open("wb") as fh:
        server = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_http(url + "/__faults", server, log)
        remote = build_mosaic([f"/vsicurl/{url}/{Path(t.path).name}" for t in local.tiles], root / "r.vrt", name="r")
        yield root, parquet, local, remote, url, Faults(url), _shards(root / "local")
    finally:
        server.kill()  # its threads may be asleep in a stall: no need to wait for them
        server.wait()


@pytest.fixture
def faults(scene) -> Iterator[Faults]:
    """The server's faults, cleared after the test whatever happened."""
    control = scene[5]
    control.set()
    yield control
    control.set()


def _crop(parquet: Path, info: MosaicInfo, out: Path, prefetch: Prefetcher | None = None, **kw) -> list:
    kw.setdefault("resume", False)
    return list(
        crop_partition(parquet, info, out, SPEC, buildings_fingerprint="x", part_size=40, prefetch=prefetch, **kw)
    )


def _shards(folder: Path) -> dict[str, tuple[np.ndarray, dict]]:
    """Building id → (chip or None, its index row as a dict)."""
    out: dict[str, tuple[np.ndarray, dict]] = {}
    for s in list_shards(folder):
        chips = np.array(open_chips(folder, s))
        for row in read_index(folder, s).to_pylist():
            out[row["building_id"]] = (chips[row["row"]] if row["row"] >= 0 else None, row)
    return out


def _same_as_local(got: dict, local: dict, but: set[str] = frozenset()) -> None:
    """Every building but ``but`` has the local crop's status and the very same chip."""
    assert set(got) == set(local)  # one index row per building: nothing lost, nothing invented
    for b in set(local) - set(but):
        assert got[b][1]["status"] == local[b][1]["status"], b
        np.testing.assert_array_equal(got[b][0], local[b][0], err_msg=b)


def _over(local: dict, x0: float, y0: float, x1: float, y1: float) -> set[str]:
    """Buildings whose chip window overlaps the rectangle (native CRS), half a pixel of tolerance at the edges."""
    eps = RES / 2
    return {
        b for b, (_, r) in local.items()
        if r["minx"] < x1 - eps and r["maxx"] > x0 + eps and r["miny"] < y1 - eps and r["maxy"] > y0 + eps
    }  # fmt: skip


def _prefetcher(remote: MosaicInfo, tmp_path: Path, reader: HttpRangeReader | None = None, **kw) -> Prefetcher:
    return Prefetcher(remote, SPEC, reader or HttpRangeReader(), tmp_path, threads=4, retry=FAST_RETRY, **kw)


@pytest.mark.parametrize("status", [500, 503])
@pytest.mark.parametrize("workers", [1, 2])
def test_a_server_failing_every_third_request_gives_the_local_chips(scene, faults, tmp_path, status, workers):
    _, parquet, _, remote, _, _, local = scene
    faults.set(every=3, status=status)
    with _prefetcher(remote, tmp_path) as p:
        results = _crop(parquet, remote, tmp_path / "out", p, workers=workers)
    sent = faults.sent().get(str(status), 0)
    assert sent >= 3  # the fault happened...
    assert p.stats.retries == sent  # ...each failed request was retried once, and succeeded
    assert p.stats.unavailable_tiles == 0
    _same_as_local(_shards(tmp_path / "out"), local)
    assert sum(r.counts["ok"] for r in results) == len(local)


def test_a_server_that_stalls_costs_a_timeout_and_a_retry_not_a_hung_step(scene, faults, tmp_path):
    """Every 4th request is accepted and then left unanswered for 30 s; the reads give up after 0.5 s."""
    _, parquet, _, remote, _, _, local = scene
    reader = OrthoImagery(http_timeout_s=0.5).range_reader()  # the resource's setting reaches the HTTP reads
    faults.set(stall_every=4, stall_s=30)
    t0 = time.monotonic()
    with Prefetcher(remote, SPEC, reader, tmp_path, threads=4, retry=FAST_RETRY) as p:
        results = _crop(parquet, remote, tmp_path / "out", p)
    elapsed = time.monotonic() - t0
    stalls = faults.sent().get("stall", 0)
    assert stalls >= 2
    assert p.stats.retries == stalls
    assert elapsed < 15, f"{elapsed:.1f} s: the stalled requests were waited out"  # one stall alone is 30 s
    _same_as_local(_shards(tmp_path / "out"), local)
    assert sum(r.counts["ok"] for r in results) == len(local)


def test_http_reads_always_have_a_timeout():
    """Without one, a server that accepts and never answers would hang the chips step for good."""
    assert HttpRangeReader().timeout_s == HTTP_TIMEOUT_S == OrthoImagery().http_timeout_s
    for bad in (0, -1.0, None):
        with pytest.raises(ValueError, match="timeout_s must be a positive number of seconds"):
            HttpRangeReader(timeout_s=bad)  # type: ignore[arg-type]
    with pytest.raises(Exception, match="http_timeout_s"):
        OrthoImagery(http_timeout_s=0)


@pytest.mark.parametrize("fault", ["failing", "broken"])
@pytest.mark.parametrize("workers", [1, 2])
def test_a_tile_that_keeps_failing_quarantines_its_buildings_naming_its_url(scene, faults, tmp_path, fault, workers):
    """`failing`: every request for t00 answers 500; `broken`: every body of t00 stops halfway.

    The buildings whose window touches t00 get `error` and a message naming t00's URL and the cause; every
    other building is cut exactly as locally; a resumed run, the tile back, cuts only the incomplete shards.
    """
    _, parquet, _, remote, url, _, local = scene
    faults.set(**{fault: ["t00.tif"]})
    logged: list[str] = []
    with _prefetcher(remote, tmp_path, log=logged.append) as p:
        results = _crop(parquet, remote, tmp_path / "out", p, workers=workers)
    assert faults.sent().get(fault, 0) >= 4  # every attempt failed
    got = _shards(tmp_path / "out")
    side = PX * RES
    hit = _over(local, X0, Y0 - side, X0 + side, Y0)  # t00 is the north-west tile
    assert 10 < len(hit) < len(local) - 10
    assert {b for b, (_, r) in got.items() if r["status"] == "error"} == hit
    cause = "HTTP 500" if fault == "failing" else "IncompleteRead"
    for b in hit:
        msg = got[b][1]["message"]
        assert f"{url}/t00.tif" in msg and "still failing after 4 attempts" in msg and cause in msg, msg
        assert got[b][1]["row"] == -1 and got[b][0] is None
    _same_as_local(got, local, but=hit)
    assert sum(r.counts["error"] for r in results) == len(hit)  # counted in what the step reports
    assert sum(sum(r.counts.values()) for r in results) == len(local)
    assert p.stats.unavailable_tiles == 1
    assert any(f"{url}/t00.tif unavailable" in line for line in logged)

    faults.set()  # the tile is back: a resumed run recuts the incomplete shards only
    with _prefetcher(remote, tmp_path) as p:
        again = _crop(parquet, remote, tmp_path / "out", p, resume=True)
    recut = {r.shard_id for r in again if not r.reused}
    assert recut == {r.shard_id for r in results if r.counts["error"]}
    assert len(recut) < len(again)
    _same_as_local(_shards(tmp_path / "out"), local)


def test_a_missing_tile_fails_at_once_naming_it(scene, faults, tmp_path):
    """A 404 is a configuration error (wrong root, deleted tile), not a flaky tile: no retry, no quarantine."""
    _, parquet, _, remote, url, _, _ = scene
    faults.set(missing=["t10.tif"])
    with _prefetcher(remote, tmp_path) as p:
        with pytest.raises(FetchError, match=f"HTTP 404 from {url}/t10.tif"):
            _crop(parquet, remote, tmp_path / "out", p)
        assert p.stats.retries == 0
    assert faults.sent()["missing"] == 1
    assert list_shards(tmp_path / "out") == []  # failed before any shard was written


def test_an_outage_fails_the_step_naming_a_tile_rather_than_quarantining_everything(scene, faults, tmp_path):
    """Three tiles of four failing is the store, not a tile: the step fails (Dagster retries it later)."""
    _, parquet, _, remote, url, _, _ = scene
    faults.set(failing=["t00.tif", "t01.tif", "t11.tif"])
    outage = rf"3 of the 4 tiles touched are unavailable .*{url}/t00\.tif.*HTTP 500"
    with _prefetcher(remote, tmp_path) as p, pytest.raises(FetchError, match=outage):
        _crop(parquet, remote, tmp_path / "out", p)
    assert list_shards(tmp_path / "out") == []


def test_bytes_garbled_in_transit_quarantine_the_block_naming_the_url_not_the_local_copy(scene, faults, tmp_path):
    """A body of the right length but wrong bytes decodes as a corrupt block: its buildings get `error`."""
    root, parquet, _, remote, url, _, local = scene
    with rasterio.open(root / "www" / "t01.tif") as ds:
        start, size = block_range(ds, 1, 2)  # block (1, 2) of the north-east tile
    faults.set(garble=["t01.tif", start, start + size])
    with _prefetcher(remote, tmp_path) as p:
        _crop(parquet, remote, tmp_path / "out", p)
    assert faults.sent().get("garbled", 0) >= 1
    got = _shards(tmp_path / "out")
    x0, y0 = X0 + PX * RES + 2 * BLOCK * RES, Y0 - 2 * BLOCK * RES  # the block's corner, tile t01 at column 1
    hit = _over(local, x0, y0, x0 + BLOCK * RES, y0 + BLOCK * RES)
    assert {b for b, (_, r) in got.items() if r["status"] == "error"} == hit and hit
    for b in hit:
        msg = got[b][1]["message"]
        assert f"{url}/t01.tif" in msg and "block (1, 2)" in msg and "prefetch-" not in msg, msg
    _same_as_local(got, local, but=hit)


@pytest.mark.parametrize(("how", "cause"), [("cut", "IncompleteRead"), ("stall", "timed out")])
def test_a_cloud_storage_read_cut_short_or_stalled_is_retryable_and_names_the_object(tmp_path, how, cause):
    """A ranged read from Cloud Storage whose body stops halfway, or that stays silent past the reader's timeout,
    is a transient fault (the prefetch retries it), not a crash."""
    from ops.imagery.remote import TransientFetchError
    from resources.gcs import GcsRangeReader, gcs_client
    from tests.standins.faulty_proxy import faulty_proxy
    from tests.standins.servers import gcs_emulator

    data = bytes(range(256)) * 2048
    with gcs_emulator(tmp_path) as url:
        gcs_client(url).create_bucket("tiles").blob("t00.tif").upload_from_string(data)
        with faulty_proxy(url, every=2, how=how) as (proxy, faults):
            reader = GcsRangeReader(proxy, timeout_s=1.0)
            assert reader.read("/vsigs/tiles/t00.tif", 1000, 301000) == data[1000:301000]  # request 1: whole
            with pytest.raises(TransientFetchError, match=rf"/vsigs/tiles/t00.tif: .*{cause}"):
                reader.read("/vsigs/tiles/t00.tif", 1000, 301000)  # request 2: the fault
            assert reader.read("/vsigs/tiles/t00.tif", 5, 9) == data[5:9]
    assert faults.injected == 1


def test_a_tile_copied_whole_for_its_conversion_survives_503s_and_one_that_keeps_failing_is_named(
    scene, faults, tmp_path
):
    """A JPEG 2000 tile in a bucket is copied whole before its conversion to COG (``ops.imagery.convert``)."""
    from ops.imagery.remote import GaveUpError, download

    root, _, local, _, url, _, _ = scene
    name = Path(local.tiles[0].path).name
    faults.set(every=2, status=503)
    got = download(HttpRangeReader(), f"/vsicurl/{url}/{name}", tmp_path / "a", chunk=4096, policy=FAST_RETRY)
    assert got.read_bytes() == (root / "www" / name).read_bytes()
    assert faults.sent().get("503", 0) >= 2  # the copy really was hit, in several of its ranges
    faults.set(broken=[name])
    with pytest.raises(GaveUpError, match=rf"{url}/{name} bytes 0-4096: still failing after 4 attempts"):
        download(HttpRangeReader(), f"/vsicurl/{url}/{name}", tmp_path / "b", chunk=4096, policy=FAST_RETRY)
    assert list((tmp_path / "b").iterdir()) == []  # no partial copy left behind


def test_a_server_that_stalls_while_gdal_reads_a_tile_header_fails_the_mosaic_naming_the_tile(scene, faults, tmp_path):
    """GDAL's own remote reads (the mosaic opening a tile) give up on a silent server instead of hanging the step."""
    root, _, local, _, url, _, _ = scene
    name = "stalling.tif"  # a name GDAL has not read in this process: nothing of it is in GDAL's cache
    (root / "www" / name).write_bytes((root / "www" / Path(local.tiles[0].path).name).read_bytes())
    faults.set(stall_gdal=[name], stall_s=60)
    t0 = time.monotonic()
    with pytest.raises(MosaicError, match=rf"/vsicurl/{url}/{name}: cannot be opened"):
        build_mosaic([f"/vsicurl/{url}/{name}"], tmp_path / "m.vrt", name="m", http_timeout_s=1)
    assert time.monotonic() - t0 < 40  # 1 s stalls, retried: not the server's 60 s, nor for ever
    assert faults.sent().get("stall_gdal", 0) >= 1
