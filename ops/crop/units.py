"""Units of work of the crop: a partition's buildings grouped by grid cell, big cells cut into parts.

A unit of work (:class:`CellTask`) is a cell, or a part ``<cell>.pNNN`` of a
cell with more buildings than ``part_size``, cut north to south: its size
bounds a worker's task, index and shard, and its id is its shard's id, so a
unit is also the unit of resumption.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import shapely

from ops.crop import arrow


class Unit(Protocol):
    """What identifies a unit of work (a :class:`CellTask`, or anything shaped like one)."""

    cell_id: str
    shard_id: str  # the cell, or "<cell>.pNNN" for part NNN of a big cell


def shard_id(cell_id: str, part: int, parts: int) -> str:
    """The id of part ``part`` of ``parts`` of a cell: the cell itself when it is not cut."""
    return cell_id if parts == 1 else f"{cell_id}.p{part:03d}"


def part_number(unit: Unit) -> int:
    """Which part of its cell a unit is, north to south (0 for a whole cell)."""
    _, _, part = unit.shard_id.partition(".p")
    return int(part) if part else 0


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
    area_blocks: int = 0  # of which JPEG 2000 blocks decoded by areas only (``ops.crop.tiles.TileSet.plan``)
    ahead_blocks: int = 0  # of which JPEG 2000 blocks decoded ahead, on the worker's decode threads
    pid: int = 0  # the process that cut it (0 when reused)


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
            ids_k, status_k = [ids[i] for i in part], [gstat[i] for i in part]
            tasks.append(CellTask(cell, ids_k, status_k, b[part], shard_id(cell, k, parts)))
    return tasks
