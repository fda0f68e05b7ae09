"""Fetch the GetMap blocks a unit of work needs from a WMS, before it is cut.

Why: read through GDAL's WMS driver, the crop waits for one GetMap at a time,
when it asks for each block (tens to hundreds of milliseconds each on a
public service), and its CPU idles. For each unit of work, this:

1. enumerates the blocks its chips touch with the crop's own code
   (:func:`ops.crop.spec.place` then :meth:`ops.crop.tiles.TileSet.blocks`): the
   requests made are exactly those the crop would make, each block once;
2. fetches those not already in the local cache (:class:`ops.imagery.wms.BlockCache`)
   with a pool of threads, at most ``rate_per_s`` requests started per second
   (a public service's fair use), each retried with exponential backoff and
   jitter on 429, 5xx, timeouts and cut bodies;
3. points the unit's task at the cache folder, which the crop reads through
   :class:`ops.imagery.wms.CachedBlockReader`.

The cache is bounded (least recently used blocks go first) but a block is
pinned while a unit that needs it is queued or being cut. A block still
failing after every retry costs the buildings over it (status ``error``, the
message names the GetMap request and the cause) and marks the unit's shard
incomplete, so a resumed run fetches and cuts it again; an answer that is a
WMS exception (a wrong layer or style, a refused size) fails the step at once,
and so does an outage (more than ``max_unavailable_share`` of the blocks
tried given up).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from ops.crop.prefetch import FetchedTask, PrefetchStats
from ops.crop.spec import ChipSpec, place
from ops.crop.tiles import TileSet
from ops.crop.units import CellTask
from ops.imagery.mosaic import MosaicInfo
from ops.imagery.remote import DEFAULT_RETRY, FetchError, GaveUpError, HttpRangeReader, RetryPolicy
from ops.imagery.wms import BlockCache, CacheGrid, LayerGrid, RequestRate, WmsError, WmsLayer, cache_folder
from ops.imagery.wmts import WmtsLayer

Key = tuple[int, int]


def service_grid(info: MosaicInfo) -> LayerGrid:
    """The GetMap grid of a mosaic whose only tile is a WMS layer (as :func:`ops.imagery.wms.write_service_tile` wrote it)."""
    if len(info.tiles) != 1:
        raise ValueError(f"{info.imagery_id}: a WMS mosaic has one tile (the service), this one has {len(info.tiles)}")
    t = info.tiles[0]
    return LayerGrid(tuple(t.bounds), t.width, t.height, int(t.block[1]), info.resolution)


class ServicePrefetcher:
    """Makes the GetMap blocks of a unit of work local (see module doc); a context manager, as ``Prefetcher``."""

    def __init__(
        self,
        info: MosaicInfo,
        spec: ChipSpec,
        wms: WmsLayer | WmtsLayer,
        http: HttpRangeReader,
        cache_root: Path,
        *,
        threads: int = 8,
        rate_per_s: float | None = 10.0,
        cache_max_bytes: int = 2 << 30,
        retry: RetryPolicy = DEFAULT_RETRY,
        max_unavailable_share: float = 0.5,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.info, self.spec, self.wms, self.http, self.retry = info, spec, wms, http, retry
        self.grid = service_grid(info)
        self.tiles = TileSet(info)  # geometry only: nothing is opened
        grid = CacheGrid(self.grid.width, self.grid.height, self.grid.block_px, info.count, wms.ext)
        self.cache = BlockCache(cache_folder(cache_root, wms, self.grid), grid, cache_max_bytes)
        self.rate = RequestRate(rate_per_s)
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="getmap")
        self.stats = PrefetchStats()
        self.log = log or (lambda _msg: None)
        self.max_unavailable_share = max_unavailable_share
        self.fetched: list[Key] | None = None  # set to a list to record every block fetched
        self.planned = 0  # distinct blocks the step's units need (known once `warm` has run)
        self._lock = threading.Lock()
        self._inflight: dict[Key, Future] = {}
        self._pinned: dict[str, set[Key]] = {}
        self._tried = 0
        self._failed: dict[Key, str] = {}

    def __enter__(self) -> ServicePrefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            pinned = set().union(*self._pinned.values()) if self._pinned else set()
            self._pinned.clear()
        self.cache.unpin(pinned)

    def _needed(self, task: CellTask) -> set[Key]:
        p = place(task, self.info, self.spec)
        return self.tiles.blocks(p.cols, p.rows, p.npxs).get(0, set())

    def warm(self, tasks: list[CellTask]) -> None:
        """Count the GetMap requests the step needs, and how many the cache already holds (logged)."""
        needed: set[Key] = set()
        for t in tasks:
            needed |= self._needed(t)
        self.planned = len(needed)
        cached = sum(self.cache.holds(k) for k in needed)
        self.log(
            f"{self.wms.url} layer {self.wms.layer}: {len(needed)} GetMap blocks of {self.grid.block_px} px "
            f"for {len(tasks)} units, {cached} already in the cache {self.cache.folder}"
        )

    def _get(self, url: str) -> bytes:
        self.rate.wait()
        data = self.http.get(url)
        self.stats.add(requests=1, bytes=len(data))
        if data.lstrip()[:1] == b"<":  # a ServiceException document (HTTP 200): a wrong layer, style or size
            text = data.decode("utf-8", "replace")
            raise WmsError(f"{url}: the service answered with an exception instead of an image: {text[:400]}")
        return data

    def _fetch(self, key: Key) -> str | None:
        """Fetch block ``key`` into the cache; the error message if it was given up."""
        url = self.wms.block_url(self.grid, *key)
        try:
            data = self.retry.call(url, lambda: self._get(url), on_retry=lambda: self.stats.add(retries=1))
        except GaveUpError as exc:
            self.cache.put_error(key, str(exc))
            return str(exc)
        self.cache.put(key, data)
        if self.fetched is not None:
            with self._lock:
                self.fetched.append(key)
        return None

    def _claim(self, key: Key) -> tuple[Future, bool]:
        """The future of block ``key``'s fetch, and whether this caller must run it (no other unit is fetching it)."""
        with self._lock:
            fut = self._inflight.get(key)
            if fut is not None:
                return fut, False
            fut = self._inflight[key] = Future()
            return fut, True

    def _one(self, key: Key) -> str | None:
        """Block ``key`` in the cache, fetched by this call or by another unit's; the error message if given up."""
        fut, mine = self._claim(key)
        if not mine:
            return fut.result()
        try:
            # another unit may have fetched it between this unit's look at the cache and the claim
            why = None if self.cache.has(key) else self._fetch(key)
        except BaseException as exc:
            fut.set_exception(exc)
            raise
        finally:
            with self._lock:
                self._inflight.pop(key, None)
        fut.set_result(why)
        return why

    def prepare(self, task: CellTask) -> FetchedTask:
        """The task, with its tile pointing at the cache folder holding every block its chips touch."""
        t0 = time.perf_counter()
        needed = self._needed(task)
        self.cache.pin(needed)
        with self._lock:
            self._pinned[task.shard_id] = needed
        missing = [k for k in sorted(needed) if not self.cache.has(k)]
        whys = list(self.pool.map(self._one, missing))
        failed = {k: w for k, w in zip(missing, whys, strict=True) if w}
        with self._lock:
            self._tried += len(missing)
            self._failed.update(failed)
            tried, n_failed = self._tried, len(self._failed)
        if n_failed and n_failed > self.max_unavailable_share * max(tried, 4):
            first = self._failed[min(self._failed)]
            raise FetchError(
                f"{self.wms.url} layer {self.wms.layer}: {n_failed} of the {tried} GetMap blocks tried are "
                f"unavailable (more than {self.max_unavailable_share:.0%}: the service, not a block, is failing); "
                f"first: {first}"
            )
        seconds = time.perf_counter() - t0
        self.stats.add(
            units=1, blocks=len(missing) - len(failed), cached=len(needed) - len(missing), seconds=seconds,
            unavailable_blocks=len(failed),
        )  # fmt: skip
        self.log(
            f"prefetched {task.shard_id}: {len(needed)} GetMap blocks, {len(needed) - len(missing)} of them "
            f"already cached, {len(failed)} given up, in {seconds:.1f} s"
        )
        unavailable = {0: f"{len(failed)} GetMap block(s) given up, first: {failed[min(failed)]}"} if failed else {}
        return FetchedTask.of(task, {0: str(self.cache.folder)}, unavailable)

    def release(self, task: CellTask) -> None:
        with self._lock:
            keys = self._pinned.pop(task.shard_id, set())
        self.cache.unpin(keys)
