"""Byte ranges of remote imagery: readers (HTTP, files), retries with backoff, GeoTIFF block tables, sparse copies.

Why: read through GDAL's ``/vsigs/`` or ``/vsicurl/``, a crop would wait for
one HTTP round trip per block it decodes (tens of milliseconds each, one at a
time). This module holds what fetching blocks ahead needs, whoever drives it
(``ops.crop.prefetch``):

- a :class:`RangeReader` per kind of store (HTTP here; Cloud Storage in
  ``resources.gcs``), routed by path prefix (:class:`ByPrefixReader`);
- a :class:`RetryPolicy`: exponential backoff with jitter on transient
  failures, a clear :class:`FetchError` naming the file and range otherwise;
- a GeoTIFF's :class:`TileLayout`: where every block's bytes sit, read once per
  tile from its header, and the "header" bytes that are not block data;
- :func:`write_sparse`: a local sparse copy of a tile (same size, its header and
  the fetched blocks at their own offsets, holes elsewhere), which GDAL opens
  as the original file.
"""

from __future__ import annotations

import http.client
import os
import random
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np
import rasterio

from ops.imagery.blocks import block_range

T = TypeVar("T")
GDAL_RETRIES = 5  # GDAL's own retries when it reads a remote header (it backs off between them)
REMOTE_PREFIXES = ("/vsigs/", "/vsicurl/", "/vsis3/", "/vsiaz/", "gs://", "http://", "https://")


def is_remote(path: str) -> bool:
    return path.startswith(REMOTE_PREFIXES)


class TransientFetchError(OSError):
    """A failure worth retrying (timeout, connection reset, HTTP 408/429/5xx, short read)."""


class FetchError(OSError):
    """A range that could not be fetched: names the file, the range and the last cause."""


class GaveUpError(FetchError):
    """A range still failing after every retry (HTTP 5xx, timeouts, broken bodies): the tile, not the request, is bad.

    Why a class of its own: unlike a refusal (403, 404: a configuration error,
    the same for every tile), it may be one damaged or unlucky object among
    good ones; the prefetch quarantines that tile's buildings rather than fail
    the partition (``ops.crop.prefetch``).
    """


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

    def call(self, what: str, fn: Callable[[], T], on_retry: Callable[[], None] | None = None) -> T:
        for attempt in range(self.attempts):
            try:
                return fn()
            except TransientFetchError as exc:
                if attempt == self.attempts - 1:
                    raise GaveUpError(f"{what}: still failing after {self.attempts} attempts: {exc}") from exc
                if on_retry:
                    on_retry()
                time.sleep(random.uniform(0, min(self.cap_s, self.base_s * 2**attempt)))
        raise AssertionError("unreachable")


DEFAULT_RETRY = RetryPolicy()


def gdal_http_options(timeout_s: float | None = None) -> dict[str, str]:
    """GDAL's settings for its own remote reads (tile headers, ``/vsigs/``, ``/vsicurl/``): retries and a stall limit.

    Why: GDAL's defaults are no retry and no timeout at all, so a server that accepts a connection
    and then sends nothing hangs the step for ever. A request is dropped (and retried, up to
    :data:`GDAL_RETRIES` times) once it has received less than a byte a second for ``timeout_s``
    seconds; a slow but steady transfer is never cut.
    """
    t = str(max(1, round(timeout_s if timeout_s is not None else HTTP_TIMEOUT_S)))
    return {
        "GDAL_HTTP_MAX_RETRY": str(GDAL_RETRIES),
        "GDAL_HTTP_RETRY_DELAY": "1",
        "GDAL_HTTP_CONNECTTIMEOUT": t,
        "GDAL_HTTP_LOW_SPEED_TIME": t,
        "GDAL_HTTP_LOW_SPEED_LIMIT": "1",
    }


HTTP_TIMEOUT_S = 60.0  # a connection that sends nothing for this long is dropped and the request retried


class HttpRangeReader:
    """``/vsicurl/http(s)://...`` (or a bare URL) read with HTTP Range requests (standard library only).

    ``timeout_s`` bounds every wait on the socket (connecting, the response's
    headers, each read of its body): a server that accepts and then stalls
    costs one timeout and a retry, never a hung step. It is a bound on
    silence, not on the whole transfer (a large range that keeps arriving is
    not cut short).
    """

    TRANSIENT_STATUS = (408, 425, 429, 500, 502, 503, 504)

    def __init__(self, timeout_s: float = HTTP_TIMEOUT_S) -> None:
        if timeout_s is None or not timeout_s > 0:  # None would wait forever on a stalled server, 0 not at all
            raise ValueError(f"HttpRangeReader: timeout_s must be a positive number of seconds, got {timeout_s!r}")
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
        except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as exc:
            # HTTPException: a garbled or cut status line, which would otherwise escape naming no URL
            raise TransientFetchError(f"{req.full_url}: {type(exc).__name__}: {exc}") from exc

    def size(self, path: str) -> int:
        with self._open(urllib.request.Request(self.url(path), method="HEAD")) as r:
            n = r.headers.get("Content-Length")
        if n is None:
            raise FetchError(f"{self.url(path)}: the server gives no Content-Length")
        return int(n)

    def get(self, url: str) -> bytes:
        """The whole body of ``url`` (a WMS request): transient failures raise :class:`TransientFetchError`.

        A body cut short (fewer bytes than the Content-Length) is transient too.
        """
        with self._open(urllib.request.Request(url)) as r:
            try:
                data = r.read()
            except (http.client.HTTPException, OSError) as exc:  # reset or timed out mid-body
                raise TransientFetchError(f"{url}: {exc}") from exc
            expected = r.headers.get("Content-Length")
        if expected is not None and len(data) != int(expected):
            raise TransientFetchError(f"{url}: short read, {len(data)} of {expected} bytes")
        return data

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
    with rasterio.Env(**gdal_http_options()), rasterio.open(path) as ds:
        if ds.driver != "GTiff" or ds.get_tag_item("BLOCK_OFFSET_0_0", "TIFF", bidx=1) is None:
            return None
        planes = ds.count if ds.tags(ns="IMAGE_STRUCTURE").get("INTERLEAVE") == "BAND" else 1
        off, n = _block_table(ds, planes)
        levels = len(ds.overviews(1))
    data = [(int(a), int(a + b)) for a, b in zip(off.ravel(), n.ravel(), strict=True) if b > 0]
    for k in range(levels):
        with rasterio.Env(**gdal_http_options()), rasterio.open(path, overview_level=k) as ov:
            o, m = _block_table(ov, planes)
        data += [(int(a), int(a + b)) for a, b in zip(o.ravel(), m.ravel(), strict=True) if b > 0]
    return TileLayout(path, size, off, n, header_ranges=complement(data, size))


def write_sparse(path: Path, size: int, pieces: list[tuple[int, bytes]]) -> None:
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


def download(
    reader: RangeReader, path: str, folder: Path, *, chunk: int = 16 << 20, policy: RetryPolicy = DEFAULT_RETRY
) -> Path:
    """A whole remote file copied to ``folder`` / its name, in ``chunk``-byte ranges each retried with backoff.

    For what is read whole anyway (a JPEG 2000 tile being converted): a failure names the file and
    range (:class:`FetchError`), and nothing is left behind.
    """
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{os.getpid()}-{Path(path).name}"
    size = policy.call(f"{path}: size", lambda: reader.size(path))
    try:
        with open(out, "wb") as fh:
            for start in range(0, size, chunk):
                stop = min(size, start + chunk)
                fh.write(policy.call(f"{path} bytes {start}-{stop}", lambda a=start, b=stop: reader.read(path, a, b)))
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    return out


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
