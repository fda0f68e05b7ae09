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
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ops.crop.spec import ChipSpec, place
from ops.crop.tiles import TileSet
from ops.crop.units import CellTask
from ops.imagery.mosaic import MosaicInfo
from ops.imagery.remote import (
    DEFAULT_RETRY,
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
        retry: RetryPolicy = DEFAULT_RETRY,
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
            write_sparse(local, layout.size, layout.header + got)
            paths[i] = str(local)
            n_blocks += len(blocks)
            if self.fetched is not None:
                with self._fetched_lock:
                    self.fetched.extend((i, br, bc) for br, bc in blocks)
        seconds = time.perf_counter() - t0
        self.stats.add(units=1, blocks=n_blocks, seconds=seconds)
        self.log(f"prefetched {task.shard_id}: {n_blocks} blocks of {len(needed)} tile(s) in {seconds:.1f} s")
        return replace(task, tile_paths=paths)

    def release(self, task: CellTask) -> None:
        shutil.rmtree(self.scratch / task.shard_id, ignore_errors=True)
