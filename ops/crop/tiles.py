"""The crop's block cache: a mosaic's tiles read block by block, each block decoded once per unit of work."""

from __future__ import annotations

import heapq
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor, wait

import numpy as np

from ops.crop.units import CellTask, part_number
from ops.imagery.blocks import Area, BlockReader
from ops.imagery.mosaic import MosaicInfo
from ops.imagery.openjpeg import covers, plan_areas
from ops.imagery.wms import CachedBlockReader, is_cache_folder

#: JPEG 2000 blocks decoded ahead of the sweep and not yet used, per decode thread
AHEAD_PER_THREAD = 2
#: source tiles one crop process keeps open. Why a bound: a worker cuts cells all over its partition,
#: and a département of BD ORTHO is 6,000-10,000 tiles of 1 km²; each open tile holds two file
#: descriptors and about 60 KiB (a GDAL dataset, the JPEG 2000 tile-part index), so keeping every
#: tile it met open would end in "too many open files" on a laptop, and in memory that grows with the
#: partition. A unit of work touches a few neighbouring tiles: the least recently used is closed.
MAX_OPEN_TILES = 32


class TileSet:
    """The mosaic's source tiles, read block by block with each block decoded once.

    Buildings are processed in the order of their window's top row; a block
    is decoded the first time a window needs it and dropped once the sweep
    has passed below it, so memory holds about one band of blocks, and no
    block is decompressed twice within a unit of work. Blocks are read from
    the tiles themselves (not through the VRT) by :class:`ops.imagery.blocks.BlockReader`,
    bands last; GDAL's own block cache is kept small since it would only
    duplicate ours.

    With more than one decode thread (a worker that has several CPUs to itself), the JPEG 2000
    blocks of a unit of work are decoded *ahead*, in the order the sweep will need them, several at
    once on a pool of ``decode_threads`` threads, each block on one thread: OpenJPEG's own threads
    split one 1,024 px block 1.7x on two cores, two blocks at once go 2.0x, and the pool decodes
    while the sweep resamples and writes. At most :data:`AHEAD_PER_THREAD` blocks per thread are
    decoded and not yet used, so memory stays flat.
    """

    def __init__(self, info: MosaicInfo, decode_threads: int = 1) -> None:
        self.info = info
        self.decode_threads = decode_threads  # threads one block may be decoded with (JPEG 2000, see BlockReader)
        res, left, top = info.resolution, info.bounds[0], info.bounds[3]
        t = info.tiles
        self.col0 = np.array([round((x.bounds[0] - left) / res) for x in t], dtype=np.int64)
        self.row0 = np.array([round((top - x.bounds[3]) / res) for x in t], dtype=np.int64)
        self.width = np.array([x.width for x in t], dtype=np.int64)
        self.height = np.array([x.height for x in t], dtype=np.int64)
        self.block = [(int(x.block[0]), int(x.block[1])) for x in t]
        self.paths = [x.path for x in t]
        self.decoded: list[tuple[int, int, int]] | None = None  # set to a list to record every block decoded
        self.decodes = 0  # blocks decoded so far
        self.last: tuple[str, int] | None = None  # (cell, part) cut last: its blocks are kept for the next part
        self._readers: OrderedDict[int, BlockReader | CachedBlockReader] = OrderedDict()  # least recent first
        self._cache: dict[tuple[int, int, int], np.ndarray] = {}
        self._bottoms: list[tuple[int, tuple[int, int, int]]] = []  # heap of (last row + 1, block key)
        # JPEG 2000 blocks of which only some areas are decoded (see :meth:`plan`): the plan, and what the cache holds
        self._areas: dict[tuple[int, int, int], list[Area]] = {}
        self._partial: dict[tuple[int, int, int], list[Area]] = {}
        self.area_decodes = 0  # blocks decoded by areas so far (counted in `decodes` too)
        # decoding ahead (see the class doc): blocks still to submit, in sweep order, and those submitted
        self._queue: deque[tuple[int, int, int]] = deque()
        self._queued: set[tuple[int, int, int]] = set()
        self._ahead: dict[tuple[int, int, int], Future] = {}
        self._pool: ThreadPoolExecutor | None = None
        self.decoded_ahead = 0  # blocks that came from the pool (counted in `decodes` too)

    def _reader(self, i: int) -> BlockReader:
        r = self._readers.get(i)
        if r is not None:
            self._readers.move_to_end(i)
            return r
        path = self.paths[i]  # a prefetched WMS layer is read from its GetMap cache
        r = CachedBlockReader(path) if is_cache_folder(path) else BlockReader(path, self.decode_threads)
        self._readers[i] = r
        self._trim()
        return r

    def _trim(self) -> None:
        """Close the least recently used tiles beyond :data:`MAX_OPEN_TILES`, but those a decode thread may be reading."""
        extra = len(self._readers) - MAX_OPEN_TILES
        if extra > 0:
            busy = {key[0] for key in self._ahead}
            last = next(reversed(self._readers))  # the tile just asked for
            for j in [j for j in self._readers if j != last and j not in busy][:extra]:
                self._readers.pop(j).close()

    def use_paths(self, overrides: dict[int, str] | None) -> None:
        """Read tile ``i`` from ``overrides[i]`` (a local copy), the others from the mosaic's own paths."""
        self._drain()  # nothing may still be decoding from a reader closed below
        for i, tile in enumerate(self.info.tiles):
            path = (overrides or {}).get(i, tile.path)
            if path != self.paths[i]:
                r = self._readers.pop(i, None)
                if r is not None:
                    r.close()
                self.paths[i] = path

    def touching(self, cols: np.ndarray, rows: np.ndarray, npxs: np.ndarray) -> np.ndarray:
        """(windows, tiles) bool: which tiles each square window (mosaic pixels) overlaps."""
        return (
            (self.col0[None] < (cols + npxs)[:, None])
            & ((self.col0 + self.width)[None] > cols[:, None])
            & (self.row0[None] < (rows + npxs)[:, None])
            & ((self.row0 + self.height)[None] > rows[:, None])
        )

    def holding(self, cols: np.ndarray, rows: np.ndarray, npxs: np.ndarray) -> np.ndarray:
        """(windows,) int: the first tile that holds the whole window (no nodata fill needed), -1 for none.

        The crop reads a held window from that tile alone. It must be the holding tile, not merely the
        first one the window touches: with overlapping tiles (a mosaic built before they were refused),
        a touching tile that does not hold the window would leave part of the chip's buffer unwritten,
        i.e. another chip's pixels.
        """
        held = (
            (self.col0[None] <= cols[:, None])
            & ((self.col0 + self.width)[None] >= (cols + npxs)[:, None])
            & (self.row0[None] <= rows[:, None])
            & ((self.row0 + self.height)[None] >= (rows + npxs)[:, None])
        )
        return np.where(held.any(axis=1), held.argmax(axis=1), -1)

    def _clipped(self, i: int, cols: np.ndarray, rows: np.ndarray, npxs: np.ndarray) -> tuple[np.ndarray, ...]:
        """(row0, row1, col0, col1, hit): the windows clipped to tile ``i``, in its pixels; ``hit``: non-empty."""
        c0 = np.clip(cols - self.col0[i], 0, self.width[i])
        c1 = np.clip(cols + npxs - self.col0[i], 0, self.width[i])
        r0 = np.clip(rows - self.row0[i], 0, self.height[i])
        r1 = np.clip(rows + npxs - self.row0[i], 0, self.height[i])
        return r0, r1, c0, c1, (c1 > c0) & (r1 > r0)

    def blocks(self, cols: np.ndarray, rows: np.ndarray, npxs: np.ndarray) -> dict[int, set[tuple[int, int]]]:
        """{tile: {(block row, block col)}} of every block the windows touch.

        The same clipping as :meth:`read`: the crop decodes exactly these blocks,
        and a prefetch of remote imagery fetches exactly these (tested).
        """
        out: dict[int, set[tuple[int, int]]] = {}
        for i in range(len(self.paths)):
            bh, bw = self.block[i]
            r0, r1, c0, c1, hit = self._clipped(i, cols, rows, npxs)
            if not hit.any():
                continue
            found = out.setdefault(i, set())
            for a, b, c, d in zip(
                (r0[hit] // bh).tolist(), ((r1[hit] - 1) // bh).tolist(),
                (c0[hit] // bw).tolist(), ((c1[hit] - 1) // bw).tolist(), strict=True,
            ):  # fmt: skip
                found.update((br, bc) for br in range(a, b + 1) for bc in range(c, d + 1))
        return out

    def plan(self, cols: np.ndarray, rows: np.ndarray, npxs: np.ndarray, touch: np.ndarray, order: np.ndarray) -> None:
        """Decide, for the JPEG 2000 blocks these windows need, which are decoded by areas rather than whole.

        Why: a codestream tile costs the same to decode whoever asks, and a rural block that two
        chips touch needs a few per cent of it; OpenJPEG decodes an area from only its own
        code-blocks (``ops.imagery.openjpeg``). The windows of the unit of work are all known before
        its sweep, so each block's areas (window ∩ block) are too: a block is decoded by areas when
        the cost model says that is cheaper, and whole otherwise (towns). A cached block of a
        previous part decoded by areas that do not cover this part's is dropped and decoded again.
        ``touch`` is :meth:`touching`'s answer for these windows: only the tiles they touch are looked at;
        ``order``: the windows in the order the sweep will read them (blocks are decoded ahead in that order).
        """
        self._areas = {}
        needed: dict[tuple[int, int, int], list[Area]] = {}
        # each block's first window in the sweep's order: the order to decode them ahead
        rank = np.empty(len(cols), dtype=np.int64)
        rank[order] = np.arange(len(cols))
        first: dict[tuple[int, int, int], int] = {}
        for i in np.flatnonzero(touch.any(axis=0)).tolist():  # the tiles these windows touch (see touching)
            if not self._decodes_areas(i):
                continue
            r0, r1, c0, c1, hit = self._clipped(i, cols, rows, npxs)
            bh, bw = self.block[i]
            for k, a, b, c, d in zip(
                rank[hit].tolist(), r0[hit].tolist(), r1[hit].tolist(), c0[hit].tolist(), c1[hit].tolist(), strict=True
            ):
                for br in range(a // bh, (b - 1) // bh + 1):
                    for bc in range(c // bw, (d - 1) // bw + 1):
                        y0, x0 = br * bh, bc * bw
                        area = (max(a, y0) - y0, min(b, y0 + bh) - y0, max(c, x0) - x0, min(d, x0 + bw) - x0)
                        needed.setdefault((i, br, bc), []).append(area)
                        first[(i, br, bc)] = min(first.get((i, br, bc), k), k)
        for key, areas in needed.items():
            i, br, bc = key
            bh, bw = self.block[i]
            h, w = min(bh, int(self.height[i]) - br * bh), min(bw, int(self.width[i]) - bc * bw)
            planned = plan_areas(areas, h, w)
            if planned is not None:
                self._areas[key] = planned
            held = self._partial.get(key)
            if held is not None and key in self._cache and not all(covers(held, a) for a in areas):
                del self._cache[key]  # its heap entry is dropped harmlessly when the sweep passes it
        self._schedule(sorted((k for k in first if k not in self._cache), key=first.__getitem__))

    def _schedule(self, keys: list[tuple[int, int, int]]) -> None:
        """Decode ``keys`` (JPEG 2000 blocks, in the order the sweep needs them) ahead, on the pool."""
        self._drain()
        if self.decode_threads < 2 or len(keys) < 2:  # one block: OpenJPEG's own threads split it
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.decode_threads, thread_name_prefix="decode")
        self._queue.extend(keys)
        self._queued.update(keys)
        self._top_up()

    def _top_up(self) -> None:
        """Submit queued blocks until :data:`AHEAD_PER_THREAD` per thread are decoding or decoded and unused."""
        assert self._pool is not None
        while self._queue and len(self._ahead) < AHEAD_PER_THREAD * self.decode_threads:
            key = self._queue.popleft()
            if key not in self._queued:  # read by the sweep before its turn came
                continue
            self._queued.discard(key)
            i, br, bc = key
            try:
                reader = self._reader(i)  # opened here, on the sweep's thread (GDAL objects stay on it)
            except Exception:  # a tile that can't be opened: the sweep's own read fails and quarantines its windows
                continue
            self._ahead[key] = self._pool.submit(reader.decode_direct, br, bc, self._areas.get(key), 1)
        self._trim()  # tiles whose blocks were decoded ahead and used may be closed now

    def _drain(self) -> None:
        """Forget the blocks decoded ahead and not used; wait for those being decoded (their file may close next)."""
        self._queue.clear()
        self._queued.clear()
        running = [f for f in self._ahead.values() if not f.cancel()]
        self._ahead.clear()
        wait(running)
        self._trim()

    def _decodes_areas(self, i: int) -> bool:
        try:
            return self._reader(i).decodes_areas
        except Exception:  # a tile that can't be opened: its windows' reads fail and quarantine them, as before
            return False

    def _block(self, i: int, br: int, bc: int) -> np.ndarray:
        key = (i, br, bc)
        blk = self._cache.get(key)
        if blk is None:
            areas = self._areas.get(key)
            reader = self._reader(i)
            self._queued.discard(key)
            ahead = self._ahead.pop(key, None)
            if ahead is not None:
                try:
                    blk = ahead.result()  # a decoding error is raised here, as the sweep's own read would raise it
                finally:
                    self._top_up()
                if blk is None:  # the direct decoder could not: GDAL, here on the sweep's thread
                    blk = self._reader(i).read_gdal(br, bc)  # asked again: the top-up may have closed it
                else:
                    self.decoded_ahead += 1
            else:
                blk = reader.read(br, bc, areas) if areas else reader.read(br, bc)  # a WMS cache reads whole blocks
            if areas:
                self._partial[key] = areas
                self.area_decodes += 1
            else:
                self._partial.pop(key, None)
            self.decodes += 1
            if self.decoded is not None:
                self.decoded.append(key)
            self._cache[key] = blk
            heapq.heappush(self._bottoms, (int(self.row0[i]) + br * self.block[i][0] + blk.shape[0], key))
        return blk

    def continues(self, task: CellTask) -> bool:
        """Whether ``task`` is the next part (north to south) of the cell cut last, whose blocks it can reuse.

        Parts of a big cell share the band of blocks along their seam; keeping
        the cache from one part to the next decodes those blocks once.
        """
        # part 0 (a whole cell, or a first part) follows nothing
        return self.last == (task.cell_id, part_number(task) - 1)

    def evict_above(self, row: int) -> None:
        """Forget blocks that end above mosaic row ``row`` (the sweep has passed them)."""
        heap = self._bottoms
        while heap and heap[0][0] <= row:
            key = heapq.heappop(heap)[1]
            self._cache.pop(key, None)
            self._partial.pop(key, None)

    def clear(self) -> None:
        self._drain()
        self._cache.clear()
        self._bottoms.clear()
        self._partial.clear()

    def read(self, col: int, row: int, npx: int, out: np.ndarray, hit: list[int]) -> None:
        """Fill ``out`` (npx, npx, bands), pre-filled with nodata, with the mosaic's pixels.

        ``hit``: indices of the tiles the window touches (see :meth:`touching`).
        """
        for i in hit:
            tc0, tr0 = int(self.col0[i]), int(self.row0[i])
            # the window in the tile's pixel coordinates, clipped to the tile
            c0, r0 = max(col - tc0, 0), max(row - tr0, 0)
            c1, r1 = min(col + npx - tc0, int(self.width[i])), min(row + npx - tr0, int(self.height[i]))
            bh, bw = self.block[i]
            cache = self._cache
            for br in range(r0 // bh, (r1 - 1) // bh + 1):
                for bc in range(c0 // bw, (c1 - 1) // bw + 1):
                    blk = cache.get((i, br, bc))
                    if blk is None:
                        blk = self._block(i, br, bc)
                    # intersection of the block and the window, in tile pixels
                    y0, y1 = max(r0, br * bh), min(r1, br * bh + blk.shape[0])
                    x0, x1 = max(c0, bc * bw), min(c1, bc * bw + blk.shape[1])
                    out[y0 + tr0 - row : y1 + tr0 - row, x0 + tc0 - col : x1 + tc0 - col] = blk[
                        y0 - br * bh : y1 - br * bh, x0 - bc * bw : x1 - bc * bw
                    ]

    def close(self) -> None:
        self._drain()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        for r in self._readers.values():
            r.close()
        self._readers.clear()
        self.clear()
        self.use_paths(None)
