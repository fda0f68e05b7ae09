"""Cut one fixed-size image chip around each building, cell by cell.

Why this shape:
- A chip is a square window around the building's bounding box plus a margin,
  snapped to the mosaic's pixel grid (so its georeference is exact and stored
  in the index), then resampled to the model's input size with an
  anti-aliased bilinear filter.
- Every building of the partition gets exactly one index row, chip or not:
  ``invalid_geometry`` (empty or unrepairable footprint), ``no_imagery`` (its
  window touches no tile), ``nodata`` (inside the mosaic but less than
  ``min_valid_fraction`` of the window has pixels), ``error`` (the read
  failed; the message names the tile), ``ok``. Nothing is dropped.
- Chips are stored per cell as one ``.npy`` array (N, 3, S, S) uint8, which
  inference memory-maps and streams in batches, beside a parquet index. They
  are streamed to disk as they are cut (``ops.npystream``), so a crop process
  holds a few megabytes of chips whatever a unit's size.
  A cell's shard is written atomically (index last), so a cell is the unit of
  resumption.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import json
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import rasterio
import shapely
import torch

from ops import arrow
from ops.blocks import BlockReader
from ops.mosaic import MosaicInfo
from ops.npystream import NpyStream, NpyWriter, scratch_writer
from ops.resample import resample_batch
from ops.schedule import Schedule, part_number

STATUSES = ("ok", "no_imagery", "nodata", "invalid_geometry", "error")

INDEX_SCHEMA = pa.schema(
    [
        pa.field("building_id", pa.string(), nullable=False),
        pa.field("cell_id", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("row", pa.int32(), nullable=False),  # position in the shard's array, -1 if no chip
        pa.field("minx", pa.float64()),  # chip window in the mosaic's CRS
        pa.field("miny", pa.float64()),
        pa.field("maxx", pa.float64()),
        pa.field("maxy", pa.float64()),
        pa.field("valid_fraction", pa.float32()),
        pa.field("message", pa.string()),
    ]
)


CROP_VERSION = 2  # bump when the chip geometry or pixels change, so stored shards are recut


@dataclass(frozen=True)
class ChipSpec:
    """How chips are cut. Its fingerprint decides whether a stored shard can be reused."""

    size: int = 64
    margin_m: float = 2.0
    margin_ratio: float = 0.15
    min_valid_fraction: float = 0.5

    def fingerprint(self, imagery_id: str, buildings_fingerprint: str) -> str:
        payload = json.dumps([asdict(self), CROP_VERSION, imagery_id, buildings_fingerprint], sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class CellTask:
    """The buildings of one cell (or of one part of a big cell), as plain arrays cheap to send to a worker."""

    cell_id: str
    building_ids: list[str]
    geometry_status: list[str]
    bounds: np.ndarray  # (N, 4) minx, miny, maxx, maxy; NaN when no geometry
    shard_id: str = ""  # the cell id, or "<cell>.pNNN" when a big cell is cut into parts
    # tile index -> local copy to read instead of the mosaic's tile (set by a prefetch of remote imagery)
    tile_paths: dict[int, str] | None = None

    def __post_init__(self) -> None:
        self.shard_id = self.shard_id or self.cell_id


@dataclass
class CellResult:
    shard_id: str  # the cell, or "<cell>.pNNN" for a part of a big cell
    counts: dict[str, int]
    chips: int
    seconds: float
    reused: bool = False
    blocks: int = 0  # raster blocks decoded to cut it


def chip_windows(
    bounds: np.ndarray, spec: ChipSpec, res: float, origin: tuple[float, float], step: int = 1
) -> np.ndarray:
    """Square windows (minx, miny, maxx, maxy) around each bbox, snapped to the pixel grid.

    ``origin`` is the mosaic's (left, top) corner: snapping to it makes every
    window start and end on pixel edges.
    """
    b = np.asarray(bounds, dtype="float64").reshape(-1, 4)
    w = b[:, 2] - b[:, 0]
    h = b[:, 3] - b[:, 1]
    side = np.maximum(w, h)
    side = side + 2 * np.maximum(spec.margin_m, spec.margin_ratio * side)
    npx = np.maximum(np.ceil(side / res - 1e-6), 1)  # real rasters have resolutions like 0.19999999999963
    npx = np.ceil(npx / step) * step  # few distinct sizes: chips are resampled in batches of one size
    cx = (b[:, 0] + b[:, 2]) / 2
    cy = (b[:, 1] + b[:, 3]) / 2
    left = origin[0] + np.round((cx - npx * res / 2 - origin[0]) / res) * res
    top = origin[1] - np.round((origin[1] - (cy + npx * res / 2)) / res) * res
    return np.column_stack([left, top - npx * res, left + npx * res, top])


def to_chip_bands(arr: np.ndarray, info: MosaicInfo) -> np.ndarray:
    """Apply the mosaic's band rule: (..., h, w, bands) source → (..., h, w, 3) uint8 (bands last, as decoded)."""
    a = np.repeat(arr[..., :1], 3, axis=-1) if info.band_rule.startswith("replicate") else arr[..., :3]
    if info.scale is not None:
        lo, hi = info.scale
        a = np.clip((a.astype(np.float32) - lo) * (255.0 / (hi - lo)), 0, 255).round()
    return a.astype(np.uint8, copy=False)


def _intersects_any(windows: np.ndarray, tiles: np.ndarray) -> np.ndarray:
    if len(tiles) == 0:
        return np.zeros(len(windows), dtype=bool)
    w = windows[:, None, :]
    t = tiles[None, :, :]
    hit = (w[..., 0] < t[..., 2]) & (w[..., 2] > t[..., 0]) & (w[..., 1] < t[..., 3]) & (w[..., 3] > t[..., 1])
    return hit.any(axis=1)


class TileSet:
    """The mosaic's source tiles, read block by block with each block decoded once.

    Buildings are processed in the order of their window's top row; a block
    is decoded the first time a window needs it and dropped once the sweep
    has passed below it, so memory holds about one band of blocks, and no
    block is decompressed twice within a unit of work. Blocks are read from
    the tiles themselves (not through the VRT) by :class:`ops.blocks.BlockReader`,
    bands last; GDAL's own block cache is kept small since it would only
    duplicate ours.
    """

    def __init__(self, info: MosaicInfo) -> None:
        self.info = info
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
        self._readers: dict[int, BlockReader] = {}
        self._cache: dict[tuple[int, int, int], np.ndarray] = {}
        self._bottoms: list[tuple[int, tuple[int, int, int]]] = []  # heap of (last row + 1, block key)

    def _reader(self, i: int) -> BlockReader:
        r = self._readers.get(i)
        if r is None:
            r = self._readers[i] = BlockReader(self.paths[i])
        return r

    def use_paths(self, overrides: dict[int, str] | None) -> None:
        """Read tile ``i`` from ``overrides[i]`` (a local copy), the others from the mosaic's own paths."""
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
        """(windows,) bool: whether one tile holds the whole window (no nodata fill needed)."""
        return (
            (self.col0[None] <= cols[:, None])
            & ((self.col0 + self.width)[None] >= (cols + npxs)[:, None])
            & (self.row0[None] <= rows[:, None])
            & ((self.row0 + self.height)[None] >= (rows + npxs)[:, None])
        ).any(axis=1)

    def blocks(self, cols: np.ndarray, rows: np.ndarray, npxs: np.ndarray) -> dict[int, set[tuple[int, int]]]:
        """{tile: {(block row, block col)}} of every block the windows touch.

        The same clipping as :meth:`read`: the crop decodes exactly these blocks,
        and a prefetch of remote imagery fetches exactly these (tested).
        """
        out: dict[int, set[tuple[int, int]]] = {}
        for i in range(len(self.paths)):
            bh, bw = self.block[i]
            c0 = np.clip(cols - self.col0[i], 0, self.width[i])
            c1 = np.clip(cols + npxs - self.col0[i], 0, self.width[i])
            r0 = np.clip(rows - self.row0[i], 0, self.height[i])
            r1 = np.clip(rows + npxs - self.row0[i], 0, self.height[i])
            hit = (c1 > c0) & (r1 > r0)
            if not hit.any():
                continue
            found = out.setdefault(i, set())
            for a, b, c, d in zip(
                (r0[hit] // bh).tolist(), ((r1[hit] - 1) // bh).tolist(),
                (c0[hit] // bw).tolist(), ((c1[hit] - 1) // bw).tolist(), strict=True,
            ):  # fmt: skip
                found.update((br, bc) for br in range(a, b + 1) for bc in range(c, d + 1))
        return out

    def _block(self, i: int, br: int, bc: int) -> np.ndarray:
        key = (i, br, bc)
        blk = self._cache.get(key)
        if blk is None:
            blk = self._reader(i).read(br, bc)
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
            self._cache.pop(heapq.heappop(heap)[1], None)

    def clear(self) -> None:
        self._cache.clear()
        self._bottoms.clear()

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
        for r in self._readers.values():
            r.close()
        self._readers.clear()
        self.clear()
        self.use_paths(None)


SIZE_STEP = 8  # window sides are rounded up to a multiple of this many pixels
BATCH_BYTES = 2 << 20  # source bytes buffered per window size before resampling


class _Batch:
    """Chips of one window size, read straight into a preallocated buffer (bands last, as decoded)."""

    def __init__(self, count: int, npx: int, dtype: str) -> None:
        self.cap = max(4, min(256, BATCH_BYTES // (count * npx * npx * np.dtype(dtype).itemsize)))
        self.arr = np.empty((self.cap, npx, npx, count), dtype=dtype)
        self.ids: list[int] = []


@dataclass
class Placement:
    """Where a unit of work's chips sit in the mosaic: its geometry statuses and pixel windows."""

    has_geom: np.ndarray  # (N,) bool: a usable footprint
    windows: np.ndarray  # (N, 4) chip window in the mosaic's CRS, NaN without geometry
    idx: np.ndarray  # buildings whose window touches a tile
    cols: np.ndarray  # their window's first column, row and side, in mosaic pixels
    rows: np.ndarray
    npxs: np.ndarray


def place(task: CellTask, info: MosaicInfo, spec: ChipSpec) -> Placement:
    """The chip windows of a unit of work (shared by the crop and the prefetch of its blocks)."""
    n = len(task.building_ids)
    has_geom = np.isfinite(task.bounds).all(axis=1) & np.isin(task.geometry_status, ("ok", "repaired"))
    windows = np.full((n, 4), np.nan)
    left, top, res = info.bounds[0], info.bounds[3], info.resolution
    if has_geom.any():
        windows[has_geom] = chip_windows(task.bounds[has_geom], spec, res, (left, top), step=SIZE_STEP)
    covered = has_geom.copy()
    covered[has_geom] = _intersects_any(windows[has_geom], info.tile_bounds_array())
    idx = np.flatnonzero(covered)
    cols = np.rint((windows[idx, 0] - left) / res).astype(np.int64)
    rows = np.rint((top - windows[idx, 3]) / res).astype(np.int64)
    npxs = np.rint((windows[idx, 2] - windows[idx, 0]) / res).astype(np.int64)
    return Placement(has_geom, windows, idx, cols, rows, npxs)


class ChipSink(Protocol):
    """Where :func:`cut_cell` puts chips: room for the next rows, then a commit (rows land in commit order)."""

    def rows(self, n: int) -> np.ndarray: ...

    def commit(self, n: int) -> None: ...


class ArraySink:
    """Chips kept in memory, in the order they are committed."""

    def __init__(self, row_shape: tuple[int, ...]) -> None:
        self.row_shape = row_shape
        self._parts: list[np.ndarray] = []
        self._next: np.ndarray | None = None

    def rows(self, n: int) -> np.ndarray:
        self._next = np.empty((n, *self.row_shape), dtype=np.uint8)
        return self._next

    def commit(self, n: int) -> None:
        assert self._next is not None
        self._parts.append(self._next[:n])
        self._next = None

    def array(self) -> np.ndarray:
        return np.concatenate(self._parts) if self._parts else np.empty((0, *self.row_shape), dtype=np.uint8)


def crop_cell(tiles: TileSet, info: MosaicInfo, task: CellTask, spec: ChipSpec) -> tuple[np.ndarray, pa.Table]:
    """Chips (in memory) and index rows for one unit of work: :func:`cut_cell` into an :class:`ArraySink`."""
    sink = ArraySink((3, spec.size, spec.size))
    _, index = cut_cell(tiles, info, task, spec, sink)
    return sink.array(), index


def cut_cell(tiles: TileSet, info: MosaicInfo, task: CellTask, spec: ChipSpec, sink: ChipSink) -> tuple[int, pa.Table]:
    """Cut one unit of work's chips into ``sink``; (chips cut, index rows: one per building).

    Buildings are visited north to south so each block is decoded once; each
    window is read directly into a batch of same-sized windows, and validity,
    the band rule and resampling run once per batch. Chips are resampled
    straight into the sink's memory (for the crop, the chunk of the shard
    file being written: no intermediate copy); an index row's ``row`` is its
    chip's position in commit order.
    """
    n = len(task.building_ids)
    status = np.array(["ok"] * n, dtype=object)
    message: list[str | None] = [None] * n
    valid_frac = np.full(n, np.nan, dtype="float32")
    rows = np.full(n, -1, dtype="int32")
    if not tiles.continues(task):
        tiles.clear()
    tiles.use_paths(task.tile_paths)
    p = place(task, info, spec)
    windows, idx, cols, rws, npxs = p.windows, p.idx, p.cols, p.rows, p.npxs
    status[~p.has_geom] = "invalid_geometry"
    no_imagery = p.has_geom.copy()
    no_imagery[idx] = False
    status[no_imagery] = "no_imagery"
    # which tiles each window touches, and whether one tile holds it whole (no nodata fill needed)
    touch = tiles.touching(cols, rws, npxs)
    inside = tiles.holding(cols, rws, npxs)
    order = np.lexsort((cols, rws))  # sweep top to bottom: each block decoded once
    # a block is dropped one window side after the sweep has passed it: the next part of a big cell (cut by
    # footprint top, not window top) may start that far above where this one ends
    lag = int(npxs.max()) if len(npxs) else 0
    # chips land in the shard array in the order batches complete; `rows` maps buildings to them
    n_out = 0
    batches: dict[int, _Batch] = {}
    nodata = info.nodata

    def flush(npx: int) -> None:
        nonlocal n_out
        b = batches[npx]
        m = len(b.ids)
        if m == 0:
            return
        a = b.arr[:m]
        ids = np.array(b.ids)
        b.ids = []
        # one cheap pass finds the chips holding the nodata value; only those get a pixel mask
        if nodata is None:
            suspect = np.zeros(m, bool)
        elif nodata == 0 and a.dtype.kind == "u":
            suspect = a.reshape(m, -1).min(axis=1) == 0
        else:
            suspect = (a == nodata).reshape(m, -1).any(axis=1)
        frac = np.ones(m, dtype=np.float32)
        masks = {}
        for j in np.flatnonzero(suspect).tolist():
            valid = (a[j] != nodata).any(axis=-1)
            frac[j] = valid.mean()
            if frac[j] < 1:
                masks[j] = valid
        valid_frac[ids] = frac
        keep = frac >= spec.min_valid_fraction
        status[ids[~keep]] = "nodata"
        if not keep.any():
            return
        chips = to_chip_bands(a[keep] if not keep.all() else a, info)
        if masks:  # blank the nodata pixels of partly covered windows
            chips = chips.copy() if np.shares_memory(chips, a) else chips
            pos = np.cumsum(keep) - 1
            for j, valid in masks.items():
                if keep[j]:
                    chips[pos[j]] *= valid.astype(np.uint8)[:, :, None]
        kept = ids[keep]
        resample_batch(chips, spec.size, out=sink.rows(len(kept)))
        sink.commit(len(kept))
        rows[kept] = np.arange(n_out, n_out + len(kept), dtype="int32")
        n_out += len(kept)

    first_tile = touch.argmax(axis=1)  # a window inside one tile (most) touches only that one
    sweep = zip(order.tolist(), *(a[order].tolist() for a in (idx, cols, rws, npxs, inside, first_tile)), strict=True)
    for k, i, col, row, npx, whole, first in sweep:
        tiles.evict_above(row - lag)
        b = batches.get(npx)
        if b is None:
            b = batches[npx] = _Batch(info.count, npx, info.dtype)
        slot = b.arr[len(b.ids)]
        if not whole:
            slot.fill(nodata if nodata is not None else 0)
        try:
            tiles.read(col, row, npx, slot, [first] if whole else np.flatnonzero(touch[k]).tolist())
        except Exception as exc:  # a corrupt or unreachable tile: quarantine, don't crash the partition
            status[i] = "error"
            message[i] = f"read failed for window {[round(float(v), 2) for v in windows[i]]}: {exc}"
            continue
        b.ids.append(i)
        if len(b.ids) == b.cap:
            flush(npx)
    for npx in list(batches):
        flush(npx)
    tiles.last = (task.cell_id, part_number(task))
    if task.tile_paths:
        tiles.clear()
        tiles.use_paths(None)  # a prefetched copy is deleted once its cell is cut
    # built from buffers: pa.array would import pandas in every worker (see ops.arrow)
    index = pa.Table.from_arrays(
        [
            arrow.strings(task.building_ids),
            arrow.strings([task.cell_id] * n),
            arrow.strings(status.tolist()),
            arrow.numbers(rows, pa.int32()),
            *(arrow.numbers(windows[:, k], pa.float64(), nan_is_null=True) for k in range(4)),
            arrow.numbers(valid_frac, pa.float32(), nan_is_null=True),
            arrow.strings(message),
        ],
        schema=INDEX_SCHEMA,
    )
    return n_out, index


# --- shards ------------------------------------------------------------------


def shard_paths(folder: Path, cell_id: str) -> tuple[Path, Path]:
    return folder / f"{cell_id}.chips.npy", folder / f"{cell_id}.index.parquet"


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def write_shard(folder: Path, cell_id: str, chips: np.ndarray, index: pa.Table, meta: dict[str, str]) -> None:
    """Write a cell's chips (any array: copied through this thread's stream writer) then its index."""
    folder.mkdir(parents=True, exist_ok=True)
    scratch_writer(chips.shape[1:], chips.dtype).write(_tmp(shard_paths(folder, cell_id)[0]), chips)
    publish_shard(folder, cell_id, index, meta)


def publish_shard(folder: Path, cell_id: str, index: pa.Table, meta: dict[str, str]) -> None:
    """Move a shard's written chips into place, then write its index: the index's presence marks a complete shard."""
    npy, idx = shard_paths(folder, cell_id)
    _tmp(npy).replace(npy)
    table = index.replace_schema_metadata(
        {**(index.schema.metadata or {}), **{k.encode(): v.encode() for k, v in meta.items()}}
    )
    pq.write_table(table, _tmp(idx))
    _tmp(idx).replace(idx)


def shard_meta(index_path: Path) -> dict[str, str]:
    md = pq.read_schema(index_path).metadata or {}
    return {k.decode(): v.decode() for k, v in md.items() if not k.startswith(b"ARROW")}


def list_shards(folder: Path) -> list[str]:
    """Cell ids of the complete shards in ``folder``, sorted."""
    if not folder.exists():
        return []
    return sorted(p.name[: -len(".index.parquet")] for p in folder.glob("*.index.parquet"))


def read_index(folder: Path, cell_id: str) -> pa.Table:
    return pq.read_table(shard_paths(folder, cell_id)[1])


def open_chips(folder: Path, cell_id: str) -> np.ndarray:
    """The shard's chips as a read-only memory map (nothing is loaded until sliced)."""
    return np.load(shard_paths(folder, cell_id)[0], mmap_mode="r")


# --- the partition -----------------------------------------------------------


def cell_tasks(buildings_parquet: Path, part_size: int = 4096, batch_size: int = 16_384) -> list[CellTask]:
    """Group a partition's buildings by cell, keeping only ids, statuses and bounds.

    A cell with more than ``part_size`` buildings is cut into parts, north to
    south: a unit of work's size bounds its task, its index and its shard, and
    parts are what workers share at the end of a partition.
    """
    pf = pq.ParquetFile(buildings_parquet)
    has_bbox = "bbox" in pf.schema_arrow.names  # GeoParquet 1.1 covering column: no WKB to parse
    columns = ["building_id", "cell_id", "geometry_status", "bbox" if has_bbox else "geometry"]
    chunks: dict[str, list[pa.Array]] = {"building_id": [], "cell_id": [], "geometry_status": []}
    bounds: list[np.ndarray] = []
    for batch in pf.iter_batches(batch_size=batch_size, columns=columns):
        for name, got in chunks.items():
            got.append(batch.column(name))
        if has_bbox:
            # struct_field honours a null bbox (a building without geometry): NaN bounds
            bbox = batch.column("bbox")
            fields = [arrow.to_numpy(pc.struct_field(bbox, [k]), "float64") for k in range(4)]
            bounds.append(np.column_stack(fields))  # xmin, ymin, xmax, ymax
        else:
            geoms = shapely.from_wkb(batch.column("geometry").to_numpy(zero_copy_only=False))
            bounds.append(shapely.bounds(geoms))
    b = np.concatenate(bounds) if bounds else np.zeros((0, 4))
    ids = pa.chunked_array(chunks["building_id"], pa.string()).to_pylist()
    gstat = pa.chunked_array(chunks["geometry_status"], pa.string()).to_pylist()
    # cells as integer codes ranked like their names: sorting ints, not strings, is what keeps this step short
    cell_codes = pc.dictionary_encode(pa.chunked_array(chunks["cell_id"], pa.string()).combine_chunks())
    names = cell_codes.dictionary
    rank = np.empty(len(names), dtype=np.int64)
    rank[arrow.to_numpy(pc.array_sort_indices(names), "int64")] = np.arange(len(names))
    cell_index = arrow.to_numpy(cell_codes.indices, "int64")
    code = rank[cell_index] if len(names) else np.zeros(0, np.int64)
    # within a cell, north to south (the crop's sweep order); no-geometry rows last
    top = np.where(np.isfinite(b[:, 3]), -b[:, 3], np.inf) if len(b) else np.zeros(0)
    order = np.lexsort((top, code))
    tasks = []
    sorted_codes = code[order]
    starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]]) if len(order) else []
    ends = list(starts[1:]) + [len(order)]
    for a, z in zip(starts, ends, strict=True):
        sel = order[a:z]
        cell = names[int(cell_index[sel[0]])].as_py()
        parts = max(1, -(-len(sel) // part_size))
        for k in range(parts):
            part = sel[k * part_size : (k + 1) * part_size]
            shard = cell if parts == 1 else f"{cell}.p{k:03d}"
            tasks.append(CellTask(cell, [ids[i] for i in part], [gstat[i] for i in part], b[part], shard))
    return tasks


_WORKER: dict = {}


class ShardWriter:
    """Streams a crop process's shards to disk as their chips are cut, on one background thread.

    Each crop process, the step's own or a worker, has its own: chips go
    straight from the resampler into the chunk of the file being written
    (see ``ops.npystream``), so a process holds a few megabytes of chips
    whatever a unit's size. :meth:`submit` queues a unit's header and index
    once its chips are cut, then waits for the unit before it to be complete
    (re-raising its error); :meth:`drain` waits for the last.
    """

    def __init__(self, row_shape: tuple[int, ...] = (3, 64, 64)) -> None:
        self._writer = NpyWriter(row_shape)
        self._pending: Future | None = None

    def open(self, folder: Path, shard_id: str, max_rows: int) -> NpyStream:
        """The stream to cut a unit of at most ``max_rows`` chips into (``folder`` exists: see crop_partition)."""
        return self._writer.open(_tmp(shard_paths(folder, shard_id)[0]), max_rows)

    def submit(self, stream: NpyStream, folder: Path, shard_id: str, index: pa.Table, meta: dict[str, str]) -> None:
        """Queue the end of ``stream`` (its last rows and header), then the shard's index; raise the unit before's error."""
        previous = self._pending
        self._pending = stream.close(then=functools.partial(publish_shard, folder, shard_id, index, meta))
        if previous is not None:
            previous.result()

    def drain(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        self._writer.close()


# GDAL's own block cache (5 % of RAM by default) would keep every block we decode:
# TileSet already holds the ones still needed, so GDAL gets a small one.
GDAL_CACHE_MB = 64
PER_LANE = 2  # units in flight per crop worker: one cut, one queued behind it


def _init_worker(info_json: str, spec: ChipSpec) -> None:
    """Set up a crop process: one torch thread (the workers are the parallelism), a small GDAL cache, a writer."""
    torch.set_num_threads(1)
    os.environ["GDAL_CACHEMAX"] = str(GDAL_CACHE_MB)
    info = MosaicInfo.from_json(info_json)
    writer = ShardWriter(row_shape=(3, spec.size, spec.size))
    _WORKER.update(tiles=TileSet(info), info=info, spec=spec, writer=writer)


def _run_task(task: CellTask, folder: Path, meta: dict[str, str]) -> CellResult:
    """Cut one unit of work, its chips streamed to its shard's file, and queue the shard's end (see :class:`ShardWriter`)."""
    t0 = time.perf_counter()
    w = _WORKER
    tiles, writer = w["tiles"], w["writer"]
    decodes = tiles.decodes
    stream = writer.open(folder, task.shard_id, len(task.building_ids))
    try:
        chips, index = cut_cell(tiles, w["info"], task, w["spec"], stream)
    except BaseException:
        stream.abort()
        raise
    status = index.column("status").to_pylist()
    counts = {s: status.count(s) for s in STATUSES}
    result = CellResult(task.shard_id, counts, chips, time.perf_counter() - t0, blocks=tiles.decodes - decodes)
    writer.submit(stream, folder, task.shard_id, index, meta)
    return result


def _finish_worker() -> None:
    """Wait for this process's last shards to be written (raising a failed write), then let its memory go."""
    w = _WORKER
    try:
        if "writer" in w:
            w["writer"].drain()
    finally:
        if "writer" in w:
            w["writer"].close()
        if "tiles" in w:
            w["tiles"].close()
        _WORKER.clear()


class Prefetch(Protocol):
    """Makes a unit of work's remote blocks local before it is cut (see ``ops.prefetch``)."""

    def warm(self, tasks: list[CellTask]) -> None: ...

    def prepare(self, task: CellTask) -> CellTask: ...

    def release(self, task: CellTask) -> None: ...


def _prefetched(todo: list[CellTask], prefetch: Prefetch | None, depth: int) -> Iterator[CellTask]:
    """``todo`` in order, each task yielded once its blocks are local, with ``depth`` tasks fetched ahead."""
    if prefetch is None:
        yield from todo
        return
    prefetch.warm(todo)  # tile headers first, one at a time, before blocks are fetched in parallel
    ahead: deque[Future] = deque()
    rest = iter(todo)
    with ThreadPoolExecutor(max_workers=max(1, depth), thread_name_prefix="prefetch") as pool:
        try:
            for t in rest:
                ahead.append(pool.submit(prefetch.prepare, t))
                if len(ahead) >= depth:
                    break
            while ahead:
                ready = ahead.popleft().result()
                nxt = next(rest, None)
                if nxt is not None:
                    ahead.append(pool.submit(prefetch.prepare, nxt))
                yield ready
        finally:
            for f in ahead:
                f.cancel()


def _cut_in_lanes(
    lanes: list[ProcessPoolExecutor], ready: Iterator[CellTask], folder: Path, meta: dict[str, str], prefetched: bool
) -> Iterator[CellResult]:
    """Units cut by worker processes (one pool of one process per lane), a big cell's parts on one worker.

    Each lane has up to ``PER_LANE`` units in flight, so its worker never
    waits for the main process between units. Without prefetch every unit is
    ready at once and :class:`ops.schedule.Schedule` picks among them; with
    prefetch, units are taken one at a time in prefetch order, as they become
    local (bounded disk), by whichever lane has room. Each worker writes its
    own shards; once every unit is cut, each is asked to finish its writes.
    """
    schedule = Schedule(len(lanes))
    if not prefetched:  # every unit is local already: the schedule chooses among all of them
        for t in ready:
            schedule.add(t)
    load = [0] * len(lanes)
    running: dict[Future, int] = {}  # future -> lane

    def fill() -> None:
        for lane in sorted(range(len(lanes)), key=lambda k: load[k]):
            while load[lane] < PER_LANE:
                if not len(schedule):
                    nxt = next(ready, None)
                    if nxt is None:
                        return
                    schedule.add(nxt)
                running[lanes[lane].submit(_run_task, schedule.pick(lane), folder, meta)] = lane
                load[lane] += 1

    try:
        while True:
            fill()
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in done:
                load[running.pop(f)] -= 1
                yield f.result()
    finally:  # stopped early (an error, or the consumer gave up): queued units are not started
        for f in running:
            f.cancel()
    for f in [lane.submit(_finish_worker) for lane in lanes]:
        f.result()


def crop_partition(
    buildings_parquet: Path,
    info: MosaicInfo,
    out_dir: Path,
    spec: ChipSpec,
    *,
    buildings_fingerprint: str,
    workers: int = 1,
    resume: bool = True,
    part_size: int = 4096,
    progress: Callable[[CellResult, int, int], None] | None = None,
    prefetch: Prefetch | None = None,
    prefetch_depth: int = 2,
) -> Iterator[CellResult]:
    """Crop every cell of a partition into ``out_dir``, yielding one result per shard (cell or part of a cell).

    Chips are read from the tiles listed in ``info`` (the VRT is for people
    and other tools; the crop reads blocks from the tiles themselves).

    With ``resume``, a cell whose complete shard carries the same fingerprint
    (same chip spec, imagery and buildings) is reused rather than recut. Shards
    of cells that no longer exist are removed, so the folder always describes
    exactly the current buildings.

    With ``prefetch`` (remote imagery), the blocks of the next ``prefetch_depth``
    units of work are fetched while the current ones are cut, and each unit's
    local copy is released once its shard is written: disk use stays bounded.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = cell_tasks(buildings_parquet, part_size)
    fp = spec.fingerprint(info.imagery_id, buildings_fingerprint)
    meta = {"fingerprint": fp, "imagery_id": info.imagery_id, "chip_size": str(spec.size), "epsg": str(info.epsg)}
    wanted = {t.shard_id for t in tasks}
    for stale in set(list_shards(out_dir)) - wanted:
        for p in shard_paths(out_dir, stale):
            p.unlink(missing_ok=True)
    todo: list[CellTask] = []
    done = 0
    for t in tasks:
        idx = shard_paths(out_dir, t.shard_id)[1]
        if resume and idx.exists() and shard_meta(idx).get("fingerprint") == fp:
            status = pq.read_table(idx, columns=["status"]).column("status").to_pylist()
            r = CellResult(t.shard_id, {s: status.count(s) for s in STATUSES}, status.count("ok"), 0.0, reused=True)
            done += 1
            if progress:
                progress(r, done, len(tasks))
            yield r
        else:
            todo.append(t)
    # big cells first (better load balance), each cell's parts together and in order (see ops.schedule)
    size: dict[str, int] = {}
    for t in todo:
        size[t.cell_id] = size.get(t.cell_id, 0) + len(t.building_ids)
    todo.sort(key=lambda t: -size[t.cell_id])  # stable: cells come from cell_tasks grouped, parts in order
    by_shard = {t.shard_id: t for t in todo}
    single = workers <= 1 or len(todo) <= 1
    n = 1 if single else min(workers, len(todo), os.cpu_count() or 1)
    init_args = (info.to_json(), spec)
    ready = _prefetched(todo, prefetch, prefetch_depth)
    # in-process, the worker set-up must not outlive the crop (a later step in the same process, or a
    # caller, would run torch on one thread)
    saved = (torch.get_num_threads(), os.environ.get("GDAL_CACHEMAX"))
    if single:
        _init_worker(*init_args)
        cut = (_run_task(t, out_dir, meta) for t in ready)
    else:
        # forked: a spawned worker would import torch, rasterio and pyarrow again (seconds each)
        ctx = multiprocessing.get_context("fork")
        lanes = [
            ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=_init_worker, initargs=init_args)
            for _ in range(n)
        ]
        cut = _cut_in_lanes(lanes, ready, out_dir, meta, prefetched=prefetch is not None)
    try:
        with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB):
            for r in cut:
                if prefetch is not None:
                    prefetch.release(by_shard[r.shard_id])
                done += 1
                if progress:
                    progress(r, done, len(tasks))
                yield r
    finally:
        try:
            if single:
                _finish_worker()  # every shard is on disk (or its error raised) before we return
            else:
                for lane in lanes:
                    lane.shutdown(cancel_futures=True)
        finally:
            ready.close()
            if single:
                torch.set_num_threads(saved[0])
                if saved[1] is None:
                    os.environ.pop("GDAL_CACHEMAX", None)
                else:
                    os.environ["GDAL_CACHEMAX"] = saved[1]
