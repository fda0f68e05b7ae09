"""Cut one unit of work's chips: sweep its windows north to south, read, apply the band rule, resample.

Every building gets exactly one index row, chip or not: ``invalid_geometry``
(empty or unrepairable footprint), ``no_imagery`` (its window touches no
tile), ``nodata`` (inside the mosaic but less than ``min_valid_fraction`` of
the window has pixels), ``error`` (the read failed; the message names the
tile), ``ok``. Nothing is dropped. Chips go into a :class:`ChipSink`: the
crop's is the shard file being streamed to disk (``ops.crop.npystream``),
tests and tools keep them in memory (:class:`ArraySink`).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import pyarrow as pa

from ops.crop import arrow
from ops.crop.spec import ChipSpec, place
from ops.crop.tiles import TileSet
from ops.crop.units import CellTask, part_number
from ops.imagery.mosaic import MosaicInfo
from ops.imagery.resample import resample_batch
from ops.shards import INDEX_SCHEMA

BATCH_BYTES = 2 << 20  # source bytes buffered per window size before resampling


def to_chip_bands(arr: np.ndarray, info: MosaicInfo) -> np.ndarray:
    """Apply the mosaic's band rule: (..., h, w, bands) source → (..., h, w, 3) uint8 (bands last, as decoded)."""
    a = np.repeat(arr[..., :1], 3, axis=-1) if info.band_rule.startswith("replicate") else arr[..., :3]
    if info.scale is not None:
        lo, hi = info.scale
        a = np.clip((a.astype(np.float32) - lo) * (255.0 / (hi - lo)), 0, 255).round()
    return a.astype(np.uint8, copy=False)


class _Batch:
    """Chips of one window size, read straight into a preallocated buffer (bands last, as decoded)."""

    def __init__(self, count: int, npx: int, dtype: str) -> None:
        self.cap = max(4, min(256, BATCH_BYTES // (count * npx * npx * np.dtype(dtype).itemsize)))
        self.arr = np.empty((self.cap, npx, npx, count), dtype=dtype)
        self.ids: list[int] = []


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
    holder = tiles.holding(cols, rws, npxs)
    order = np.lexsort((cols, rws))  # sweep top to bottom: each block decoded once
    tiles.plan(cols, rws, npxs, touch, order)  # JPEG 2000 blocks: which by areas, in what order ahead
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

    # a window held whole by one tile (most) is read from that tile alone
    sweep = zip(order.tolist(), *(a[order].tolist() for a in (idx, cols, rws, npxs, holder)), strict=True)
    for k, i, col, row, npx, first in sweep:
        whole = first >= 0
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
    # built from buffers: pa.array would import pandas in every worker (see ops.crop.arrow)
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
