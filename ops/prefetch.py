"""Fetch the blocks a unit of work needs from remote imagery, before it is cut.

Why: read through GDAL's ``/vsigs/`` or ``/vsicurl/``, the crop would wait
for one HTTP round trip per block it decodes (tens of milliseconds each,
one at a time), and its CPU would idle — the trap a reference team fell into
with GPUs idle while imagery was fetched. Instead, for each unit of work:

1. the blocks its chips touch are enumerated by the crop's own code
   (:func:`ops.chips.place` then :meth:`ops.chips.TileSet.blocks`), so the
   prefetch fetches exactly the blocks the crop will decode;
2. each remote GeoTIFF's layout (where every block's bytes sit, read once per
   tile from its header) turns them into byte ranges, nearby ranges are
   merged, and the ranges are fetched by a pool of threads, each request
   retried with exponential backoff and jitter on transient failures;
3. a local *sparse copy* of each tile is written: same size, its header and
   the needed blocks at their own offsets, holes elsewhere. GDAL opens it as
   the original file, and the crop reads it like any local tile.

While one unit is cut, the next ones are fetched (``ops.chips.crop_partition``),
and a unit's copies are deleted once its shard is written, so local disk
holds a few units' blocks, never a département's imagery.

Non-TIFF tiles (JPEG 2000, VRT) have no block table: they are fetched whole,
once, in ranges, and kept until the end of the step.

Framework-free: the byte source is a :class:`RangeReader` (HTTP here; Cloud
Storage in ``resources.gcs``).
"""

from __future__ import annotations

import http.client
import os
import random
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import rasterio

from ops.blocks import block_range
from ops.chips import CellTask, ChipSpec, TileSet, place
from ops.mosaic import MosaicInfo

GDAL_RETRIES = 5  # GDAL's own retries when it reads a remote header (it backs off between them)
REMOTE_PREFIXES = ("/vsigs/", "/vsicurl/", "/vsis3/", "/vsiaz/", "gs://", "http://", "https://")


def is_remote(path: str) -> bool:
    return path.startswith(REMOTE_PREFIXES)


class TransientFetchError(OSError):
    """A failure worth retrying (timeout, connection reset, HTTP 408/429/5xx, short read)."""


class FetchError(OSError):
    """A range that could not be fetched: names the file, the range and the last cause."""


class RangeReader(Protocol):
    """Byte ranges of remote files, addressed by their GDAL path (``/vsigs/...``, ``/vsicurl/...``).

    Raise :class:`TransientFetchError` for failures worth retrying; any other
    exception fails the fetch at once (missing object, no permission).
    """

    def size(self, path: str) -> int: ...

    def read(self, path: str, start: int, stop: int) -> bytes: ...


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter: attempt k waits uniform(0, min(cap, base * 2**k)) seconds."""

    attempts: int = 6
    base_s: float = 0.25
    cap_s: float = 20.0

    def call(self, what: str, fn: Callable[[], bytes], on_retry: Callable[[], None] | None = None) -> bytes:
        for attempt in range(self.attempts):
            try:
                return fn()
            except TransientFetchError as exc:
                if attempt == self.attempts - 1:
                    raise FetchError(f"{what}: still failing after {self.attempts} attempts: {exc}") from exc
                if on_retry:
                    on_retry()
                time.sleep(random.uniform(0, min(self.cap_s, self.base_s * 2**attempt)))
        raise AssertionError("unreachable")


class HttpRangeReader:
    """``/vsicurl/http(s)://...`` (or a bare URL) read with HTTP Range requests (standard library only)."""

    TRANSIENT_STATUS = (408, 425, 429, 500, 502, 503, 504)

    def __init__(self, timeout_s: float = 60.0) -> None:
        self.timeout_s = timeout_s

    @staticmethod
    def url(path: str) -> str:
        return path.removeprefix("/vsicurl/")

    def _open(self, req: urllib.request.Request):
        try:
            return urllib.request.urlopen(req, timeout=self.timeout_s)
        except urllib.error.HTTPError as exc:
            if exc.code in self.TRANSIENT_STATUS:
                raise TransientFetchError(f"HTTP {exc.code} from {req.full_url}") from exc
            raise FetchError(f"HTTP {exc.code} from {req.full_url}") from exc
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            raise TransientFetchError(f"{req.full_url}: {exc}") from exc

    def size(self, path: str) -> int:
        with self._open(urllib.request.Request(self.url(path), method="HEAD")) as r:
            n = r.headers.get("Content-Length")
        if n is None:
            raise FetchError(f"{self.url(path)}: the server gives no Content-Length")
        return int(n)

    def read(self, path: str, start: int, stop: int) -> bytes:
        req = urllib.request.Request(self.url(path), headers={"Range": f"bytes={start}-{stop - 1}"})
        with self._open(req) as r:
            if r.status != 206 and not (start == 0 and r.status == 200):
                raise FetchError(f"{req.full_url}: range requests not supported (HTTP {r.status})")
            try:
                data = r.read()
            except (http.client.HTTPException, OSError) as exc:  # reset or timed out mid-body
                raise TransientFetchError(f"{req.full_url}: {exc}") from exc
        if len(data) != stop - start:
            raise TransientFetchError(f"{req.full_url}: short read, {len(data)} of {stop - start} bytes")
        return data


class LocalRangeReader:
    """Plain files (a slow network mount, tests): the same sparse copies, no retries needed."""

    def size(self, path: str) -> int:
        return os.path.getsize(path)

    def read(self, path: str, start: int, stop: int) -> bytes:
        with open(path, "rb") as fh:
            fh.seek(start)
            return fh.read(stop - start)


# --- where a tile's blocks are -----------------------------------------------


@dataclass
class TileLayout:
    """Byte ranges of one GeoTIFF's full-resolution blocks, and its header bytes (all that is not block data)."""

    path: str
    size: int
    offsets: np.ndarray  # (planes, block rows, block cols): 1 plane when pixel-interleaved
    lengths: np.ndarray
    header_ranges: list[tuple[int, int]] = field(default_factory=list)  # every byte that is not block data
    header: list[tuple[int, bytes]] = field(default_factory=list)  # those bytes, fetched once for every copy

    def ranges(self, blocks: set[tuple[int, int]]) -> list[tuple[int, int]]:
        out = []
        for br, bc in blocks:
            for plane in range(self.offsets.shape[0]):
                off, n = int(self.offsets[plane, br, bc]), int(self.lengths[plane, br, bc])
                if n > 0:  # an empty block (sparse TIFF) has no bytes: GDAL fills it with nodata
                    out.append((off, off + n))
        return out


def _block_table(ds, planes: int) -> tuple[np.ndarray, np.ndarray]:
    bh, bw = ds.block_shapes[0]
    nr, nc = -(-ds.height // bh), -(-ds.width // bw)
    off = np.zeros((planes, nr, nc), dtype=np.int64)
    size = np.zeros((planes, nr, nc), dtype=np.int64)
    for p in range(planes):
        for br in range(nr):
            for bc in range(nc):
                off[p, br, bc], size[p, br, bc] = block_range(ds, br, bc, band=p + 1)
    return off, size


def merge_ranges(ranges: list[tuple[int, int]], gap: int) -> list[tuple[int, int]]:
    """Sorted ranges with those less than ``gap`` bytes apart joined (fewer requests, a few extra bytes)."""
    out: list[list[int]] = []
    for a, b in sorted(ranges):
        if out and a - out[-1][1] <= gap:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def complement(ranges: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """The parts of ``[0, size)`` that ``ranges`` do not cover."""
    out, pos = [], 0
    for a, b in merge_ranges(ranges, 0):
        if a > pos:
            out.append((pos, a))
        pos = max(pos, b)
    if pos < size:
        out.append((pos, size))
    return out


def read_layout(path: str, size: int) -> TileLayout | None:
    """The block table of a tiled GeoTIFF (opened in place through GDAL), or None if it has none (JP2, VRT...).

    Every block of every resolution level is listed; whatever the file holds
    besides them (header, directories, tag arrays, masks) is "header" and is
    copied whole, so nothing GDAL may read when opening the copy is missing.
    """
    with rasterio.Env(GDAL_HTTP_MAX_RETRY=GDAL_RETRIES, GDAL_HTTP_RETRY_DELAY=1), rasterio.open(path) as ds:
        if ds.driver != "GTiff" or ds.get_tag_item("BLOCK_OFFSET_0_0", "TIFF", bidx=1) is None:
            return None
        planes = ds.count if ds.tags(ns="IMAGE_STRUCTURE").get("INTERLEAVE") == "BAND" else 1
        off, n = _block_table(ds, planes)
        levels = len(ds.overviews(1))
    data = [(int(a), int(a + b)) for a, b in zip(off.ravel(), n.ravel(), strict=True) if b > 0]
    for k in range(levels):
        with rasterio.Env(GDAL_HTTP_MAX_RETRY=GDAL_RETRIES), rasterio.open(path, overview_level=k) as ov:
            o, m = _block_table(ov, planes)
        data += [(int(a), int(a + b)) for a, b in zip(o.ravel(), m.ravel(), strict=True) if b > 0]
    return TileLayout(path, size, off, n, header_ranges=complement(data, size))


# --- the prefetcher ----------------------------------------------------------


@dataclass
class PrefetchStats:
    units: int = 0
    blocks: int = 0
    requests: int = 0
    retries: int = 0
    bytes: int = 0
    seconds: float = 0.0  # summed over units (they overlap the crop)
    whole_files: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **kw: float) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)

    def as_dict(self) -> dict[str, float]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


class Prefetcher:
    """Makes the blocks of a unit of work local (a sparse copy of each tile it touches), then deletes them.

    Used as a context manager: the scratch folder is removed on exit, whatever
    happened. ``prepare`` and ``release`` are called by ``crop_partition``.
    """

    def __init__(
        self,
        info: MosaicInfo,
        spec: ChipSpec,
        reader: RangeReader,
        scratch: Path | None = None,
        *,
        threads: int = 16,
        merge_gap: int = 64 << 10,
        max_request: int = 16 << 20,
        retry: RetryPolicy = RetryPolicy(),
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.info, self.spec, self.reader = info, spec, reader
        self.tiles = TileSet(info)  # geometry only: no dataset is opened
        self.scratch = Path(tempfile.mkdtemp(prefix="prefetch-", dir=scratch))
        self.merge_gap, self.max_request, self.retry = merge_gap, max_request, retry
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fetch")
        self.stats = PrefetchStats()
        self.log = log or (lambda _msg: None)
        self._layouts: dict[int, TileLayout | None] = {}
        self._whole: dict[int, str] = {}
        self._locks = {i: threading.Lock() for i in range(len(info.tiles))}
        self.fetched: list[tuple[int, int, int]] | None = None  # set to a list to record (tile, row, col) fetched

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self.scratch, ignore_errors=True)

    def _fetch(self, path: str, ranges: list[tuple[int, int]]) -> list[tuple[int, bytes]]:
        """Fetch ``ranges`` of ``path`` in parallel, large ranges split so no request is huge."""
        step = self.max_request
        pieces = [(a, min(a + step, stop)) for start, stop in ranges for a in range(start, stop, step)]

        def one(rng: tuple[int, int]) -> tuple[int, bytes]:
            a, b = rng
            data = self.retry.call(
                f"{path} bytes {a}-{b - 1}",
                lambda: self.reader.read(path, a, b),
                on_retry=lambda: self.stats.add(retries=1),
            )
            self.stats.add(requests=1, bytes=len(data))
            return a, data

        return list(self.pool.map(one, pieces))

    def layout(self, i: int) -> TileLayout | None:
        """Tile ``i``'s block table and header bytes, read once (None: fetched whole instead)."""
        with self._locks[i]:
            if i not in self._layouts:
                path = self.info.tiles[i].path
                size = self.retry.call(f"{path} size", lambda: self.reader.size(path))
                layout = read_layout(path, size)
                if layout is not None:
                    layout.header = self._fetch(path, layout.header_ranges)
                self._layouts[i] = layout
            return self._layouts[i]

    def _whole_file(self, i: int) -> str:
        with self._locks[i]:
            local = self._whole.get(i)
            if local is None:
                path = self.info.tiles[i].path
                size = self.retry.call(f"{path} size", lambda: self.reader.size(path))
                local = str(self.scratch / "whole" / f"{i:05d}{Path(path).suffix}")
                _write_sparse(Path(local), size, self._fetch(path, [(0, size)]))
                self._whole[i] = local
                self.stats.add(whole_files=1)
            return local

    def warm(self, tasks: list[CellTask]) -> None:
        """Read the layout of every tile the tasks touch, one at a time, before any unit is fetched.

        GDAL keeps Python's GIL while it opens a remote file: opened while
        fetch threads are mid-request to a server that answers one connection
        at a time, it would wait for them and they for it (seen with the
        Cloud Storage emulator). Headers first, alone, then the blocks.
        """
        touched: set[int] = set()
        for t in tasks:  # which tiles, not which blocks: `prepare` enumerates a unit's blocks when it fetches them
            p = place(t, self.info, self.spec)
            touched.update(np.flatnonzero(self.tiles.touching(p.cols, p.rows, p.npxs).any(axis=0)).tolist())
        for i in sorted(touched):
            if self.layout(i) is None:
                self._whole_file(i)

    def prepare(self, task: CellTask) -> CellTask:
        """The task, with ``tile_paths`` pointing at local copies holding every block its chips touch."""
        t0 = time.perf_counter()
        p = place(task, self.info, self.spec)
        needed = self.tiles.blocks(p.cols, p.rows, p.npxs)  # the crop's own enumeration
        folder = self.scratch / task.shard_id
        paths: dict[int, str] = {}
        n_blocks = 0
        for i, blocks in sorted(needed.items()):
            layout = self.layout(i)
            if layout is None:
                paths[i] = self._whole_file(i)
                continue
            got = self._fetch(layout.path, merge_ranges(layout.ranges(blocks), self.merge_gap))
            local = folder / f"{i:05d}.tif"
            _write_sparse(local, layout.size, layout.header + got)
            paths[i] = str(local)
            n_blocks += len(blocks)
            if self.fetched is not None:
                with self.stats._lock:
                    self.fetched.extend((i, br, bc) for br, bc in blocks)
        seconds = time.perf_counter() - t0
        self.stats.add(units=1, blocks=n_blocks, seconds=seconds)
        self.log(f"prefetched {task.shard_id}: {n_blocks} blocks of {len(needed)} tile(s) in {seconds:.1f} s")
        return replace(task, tile_paths=paths)

    def release(self, task: CellTask) -> None:
        shutil.rmtree(self.scratch / task.shard_id, ignore_errors=True)


def _write_sparse(path: Path, size: int, pieces: list[tuple[int, bytes]]) -> None:
    """A file of ``size`` bytes holding ``pieces`` at their offsets; holes elsewhere take no disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        for off, data in pieces:
            os.pwrite(fd, data, off)
    finally:
        os.close(fd)
    tmp.replace(path)


class ByPrefixReader:
    """Routes each path to the reader of its prefix (``/vsigs/`` → Cloud Storage, ``/vsicurl/`` → HTTP...)."""

    def __init__(self, readers: dict[str, RangeReader], default: RangeReader | None = None) -> None:
        self.readers, self.default = readers, default or LocalRangeReader()

    def _pick(self, path: str) -> RangeReader:
        for prefix, reader in self.readers.items():
            if path.startswith(prefix):
                return reader
        return self.default

    def size(self, path: str) -> int:
        return self._pick(path).size(path)

    def read(self, path: str, start: int, stop: int) -> bytes:
        return self._pick(path).read(path, start, stop)
