"""Fetch the blocks a unit of work needs from remote imagery, before it is cut.

Why: read through GDAL's ``/vsigs/`` or ``/vsicurl/``, the crop would wait
for one HTTP round trip per block it decodes (tens of milliseconds each,
one at a time), and its CPU would idle — the trap a reference team fell into
with GPUs idle while imagery was fetched. Instead, for each unit of work:

1. the blocks its chips touch are enumerated by the crop's own code
   (:func:`ops.crop.spec.place` then :meth:`ops.crop.tiles.TileSet.blocks`), so the
   prefetch fetches exactly the blocks the crop will decode;
2. each remote GeoTIFF's layout (``ops.imagery.remote.TileLayout``, read once
   per tile) turns them into byte ranges, nearby ranges are merged, and the
   ranges are fetched by a pool of threads, each request retried with
   exponential backoff and jitter on transient failures;
3. a local *sparse copy* of each tile is written: same size, its header and
   the needed blocks at their own offsets, holes elsewhere. GDAL opens it as
   the original file, and the crop reads it like any local tile.

While one unit is cut, the next ones are fetched (``ops.crop.partition.crop_partition``),
and a unit's copies are deleted once its shard is written, so local disk
holds a few units' blocks, never a département's imagery.

Non-TIFF tiles (JPEG 2000, VRT) have no block table: they are fetched whole,
once, in ranges, and kept until the end of the step.

A tile whose ranges still fail after every retry (:class:`ops.imagery.remote.GaveUpError`:
HTTP 5xx, timeouts, broken bodies) is *unavailable*: like a corrupt block, it
costs its buildings, not the partition. A unit's task then points that tile at
a path that does not exist, so the crop quarantines every building whose window
touches it (status ``error``), and :func:`name_remote_tiles` gives those index
rows the fetch's own message (the URL, the range, the cause); the shard is
marked incomplete so that a resumed run cuts it again. A refusal (403, 404) is
a configuration error and still fails the step at once, and so does an outage:
more than ``max_unavailable_share`` of the tiles touched given up.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import pyarrow as pa

from ops.crop import arrow
from ops.crop.spec import ChipSpec, place
from ops.crop.tiles import TileSet
from ops.crop.units import CellTask
from ops.imagery.mosaic import MosaicInfo
from ops.imagery.remote import (
    DEFAULT_RETRY,
    FetchError,
    GaveUpError,
    RangeReader,
    RetryPolicy,
    TileLayout,
    merge_ranges,
    read_layout,
    write_sparse,
)


@dataclass
class PrefetchStats:
    units: int = 0
    blocks: int = 0
    requests: int = 0
    retries: int = 0
    bytes: int = 0
    seconds: float = 0.0  # summed over units (they overlap the crop)
    whole_files: int = 0
    unavailable_tiles: int = 0  # given up after every retry: their buildings are quarantined (status error)
    cached: int = 0  # blocks a WMS prefetch found in its local cache (ops.crop.service_prefetch)
    unavailable_blocks: int = 0  # GetMap blocks given up after every retry (their buildings: status error)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **kw: float) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)

    def as_dict(self) -> dict[str, float]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


INCOMPLETE = "incomplete"  # appended to a shard's fingerprint when a tile was unavailable: resumption recuts it


@dataclass
class FetchedTask(CellTask):
    """A unit of work whose blocks are local; ``unavailable``: tile index → why it could not be fetched."""

    unavailable: dict[int, str] = field(default_factory=dict)

    @classmethod
    def of(cls, task: CellTask, tile_paths: dict[int, str], unavailable: dict[int, str]) -> FetchedTask:
        """``task`` with its tiles read from ``tile_paths`` (what a prefetch made local)."""
        base = {f.name: getattr(task, f.name) for f in fields(CellTask)}
        return cls(**{**base, "tile_paths": tile_paths}, unavailable=unavailable)


def name_remote_tiles(index: pa.Table, task: CellTask, info: MosaicInfo) -> pa.Table:
    """``index`` with its messages naming the remote tiles rather than the local copies the crop read.

    Why: the crop names the file it read, which for a prefetched unit is a
    scratch copy deleted once the shard is written; the user needs the tile's
    URL. Rows over an unavailable tile get the fetch's message (URL, range, cause).
    """
    if not task.tile_paths:
        return index
    unavailable = task.unavailable if isinstance(task, FetchedTask) else {}
    messages = index.column("message").to_pylist()
    changed = False
    for k, msg in enumerate(messages):
        if not msg:
            continue
        for i, local in task.tile_paths.items():
            if local not in msg:
                continue
            if i in unavailable:
                msg = f"tile not fetched, building not cropped: {unavailable[i]}"
                break
            msg = msg.replace(local, info.tiles[i].path)
        changed |= msg != messages[k]
        messages[k] = msg
    if not changed:
        return index
    at = index.schema.get_field_index("message")
    return index.set_column(at, index.schema.field(at), arrow.strings(messages))


def is_complete(task: CellTask) -> bool:
    """False when a tile the unit needs could not be fetched: its shard must not be reused on resumption."""
    return not (isinstance(task, FetchedTask) and task.unavailable)


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
        retry: RetryPolicy = DEFAULT_RETRY,
        max_unavailable_share: float = 0.5,
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
        self._fetched_lock = threading.Lock()
        self.max_unavailable_share = max_unavailable_share
        self.unavailable: dict[int, GaveUpError] = {}  # tiles given up, for the rest of the step
        self._touched: set[int] = set()  # tiles the step's units touch (known once `warm` has run)
        self._unavailable_lock = threading.Lock()

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
                write_sparse(Path(local), size, self._fetch(path, [(0, size)]))
                self._whole[i] = local
                self.stats.add(whole_files=1)
            return local

    def _give_up(self, i: int, exc: GaveUpError) -> None:
        """Tile ``i`` is unavailable for the rest of the step (no unit retries it), unless the store itself is down."""
        with self._unavailable_lock:
            if i in self.unavailable:
                return
            self.unavailable[i] = exc
            self.stats.add(unavailable_tiles=1)
        self.log(f"tile {self.info.tiles[i].path} unavailable, its buildings get status error: {exc}")

    def _check_outage(self) -> None:
        """Raise the first tile's error when more than ``max_unavailable_share`` of the touched tiles are given up.

        Why: one bad tile among good ones costs its buildings; most tiles
        failing is the store (an outage, a wrong endpoint), and a partition of
        `error` rows would be worse than a failed step that Dagster retries.
        """
        with self._unavailable_lock:
            touched = len(self._touched) or len(self.info.tiles)
            if self.unavailable and len(self.unavailable) > self.max_unavailable_share * touched:
                first = min(self.unavailable)
                raise FetchError(
                    f"{len(self.unavailable)} of the {touched} tiles touched are unavailable (more than "
                    f"{self.max_unavailable_share:.0%}: the store, not a tile, is failing); first: "
                    f"{self.unavailable[first]}"
                ) from self.unavailable[first]

    def _local_blocks(self, i: int) -> None:
        """Tile ``i``'s layout (and header), or its whole file if it has no block table; gives the tile up on failure."""
        try:
            if self.layout(i) is None:
                self._whole_file(i)
        except GaveUpError as exc:
            self._give_up(i, exc)

    def warm(self, tasks: list[CellTask]) -> None:
        """Read the layout of every tile the tasks touch, one at a time, before any unit is fetched.

        GDAL keeps Python's GIL while it opens a remote file: opened while
        fetch threads are mid-request to a server that answers one connection
        at a time, it would wait for them and they for it (seen with the
        Cloud Storage emulator). Headers first, alone, then the blocks.
        A tile given up is unavailable; every tile given up is an outage (see :meth:`_check_outage`).
        """
        touched: set[int] = set()
        for t in tasks:  # which tiles, not which blocks: `prepare` enumerates a unit's blocks when it fetches them
            p = place(t, self.info, self.spec)
            touched.update(np.flatnonzero(self.tiles.touching(p.cols, p.rows, p.npxs).any(axis=0)).tolist())
        with self._unavailable_lock:
            self._touched |= touched
        for i in sorted(touched):
            self._local_blocks(i)
        self._check_outage()

    def prepare(self, task: CellTask) -> FetchedTask:
        """The task, with ``tile_paths`` pointing at local copies holding every block its chips touch.

        An unavailable tile points at a path that does not exist (the crop
        quarantines the buildings over it) and is named in ``unavailable``.
        """
        t0 = time.perf_counter()
        p = place(task, self.info, self.spec)
        needed = self.tiles.blocks(p.cols, p.rows, p.npxs)  # the crop's own enumeration
        folder = self.scratch / task.shard_id
        paths: dict[int, str] = {}
        unavailable: dict[int, str] = {}
        n_blocks = 0
        for i, blocks in sorted(needed.items()):
            if i not in self.unavailable:
                try:
                    paths[i] = self._local_copy(i, blocks, folder)
                except GaveUpError as exc:
                    self._give_up(i, exc)
                    self._check_outage()
            if i in self.unavailable:
                paths[i] = str(folder / f"{i:05d}.unavailable.tif")  # never written: reading it fails at once
                unavailable[i] = str(self.unavailable[i])
            elif self._layouts.get(i) is not None:  # a whole file counts as one, in `whole_files`
                n_blocks += len(blocks)
        seconds = time.perf_counter() - t0
        self.stats.add(units=1, blocks=n_blocks, seconds=seconds)
        self.log(f"prefetched {task.shard_id}: {n_blocks} blocks of {len(needed)} tile(s) in {seconds:.1f} s")
        return FetchedTask.of(task, paths, unavailable)

    def _local_copy(self, i: int, blocks: set[tuple[int, int]], folder: Path) -> str:
        """Tile ``i``'s local copy holding ``blocks`` (its whole file when it has no block table)."""
        layout = self.layout(i)
        if layout is None:
            return self._whole_file(i)
        got = self._fetch(layout.path, merge_ranges(layout.ranges(blocks), self.merge_gap))
        local = folder / f"{i:05d}.tif"
        write_sparse(local, layout.size, layout.header + got)
        if self.fetched is not None:
            with self._fetched_lock:
                self.fetched.extend((i, br, bc) for br, bc in blocks)
        return str(local)

    def release(self, task: CellTask) -> None:
        shutil.rmtree(self.scratch / task.shard_id, ignore_errors=True)
