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
  inference memory-maps and streams in batches, beside a parquet index.
  A cell's shard is written atomically (index last), so a cell is the unit of
  resumption.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import rasterio
import shapely
import torch
import torch.nn.functional as F
from rasterio.windows import Window

from ops.mosaic import MosaicInfo

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


@dataclass(frozen=True)
class ChipSpec:
    """How chips are cut. Its fingerprint decides whether a stored shard can be reused."""

    size: int = 64
    margin_m: float = 2.0
    margin_ratio: float = 0.15
    min_valid_fraction: float = 0.5

    def fingerprint(self, imagery_id: str, buildings_fingerprint: str) -> str:
        payload = json.dumps([asdict(self), imagery_id, buildings_fingerprint], sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class CellTask:
    """The buildings of one cell, as plain arrays (cheap to send to a worker)."""

    cell_id: str
    building_ids: list[str]
    geometry_status: list[str]
    bounds: np.ndarray  # (N, 4) minx, miny, maxx, maxy; NaN when no geometry


@dataclass
class CellResult:
    cell_id: str
    counts: dict[str, int]
    chips: int
    seconds: float
    reused: bool = False


def chip_windows(bounds: np.ndarray, spec: ChipSpec, res: float, origin: tuple[float, float]) -> np.ndarray:
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
    cx = (b[:, 0] + b[:, 2]) / 2
    cy = (b[:, 1] + b[:, 3]) / 2
    left = origin[0] + np.round((cx - npx * res / 2 - origin[0]) / res) * res
    top = origin[1] - np.round((origin[1] - (cy + npx * res / 2)) / res) * res
    return np.column_stack([left, top - npx * res, left + npx * res, top])


def to_chip_bands(arr: np.ndarray, info: MosaicInfo) -> np.ndarray:
    """Apply the mosaic's band rule: (bands, h, w) source → (3, h, w) float32 in 0..255."""
    if info.band_rule.startswith("replicate"):
        a = np.repeat(arr[:1], 3, axis=0)
    else:
        a = arr[:3]
    a = a.astype("float32")
    if info.scale is not None:
        lo, hi = info.scale
        a = np.clip((a - lo) * (255.0 / (hi - lo)), 0, 255)
    return a


def resample(chip: np.ndarray, size: int) -> np.ndarray:
    """(3, n, n) float → (3, size, size) uint8, anti-aliased bilinear."""
    if chip.shape[1] == size and chip.shape[2] == size:
        out = chip
    else:
        t = torch.from_numpy(np.ascontiguousarray(chip))[None]
        out = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0].numpy()
    return np.clip(np.rint(out), 0, 255).astype("uint8")


def _intersects_any(windows: np.ndarray, tiles: np.ndarray) -> np.ndarray:
    if len(tiles) == 0:
        return np.zeros(len(windows), dtype=bool)
    w = windows[:, None, :]
    t = tiles[None, :, :]
    hit = (w[..., 0] < t[..., 2]) & (w[..., 2] > t[..., 0]) & (w[..., 1] < t[..., 3]) & (w[..., 3] > t[..., 1])
    return hit.any(axis=1)


def crop_cell(
    ds: rasterio.io.DatasetReader, info: MosaicInfo, task: CellTask, spec: ChipSpec
) -> tuple[np.ndarray, pa.Table]:
    """Chips and index rows for one cell's buildings (one index row per building)."""
    n = len(task.building_ids)
    status = np.array(["ok"] * n, dtype=object)
    message: list[str | None] = [None] * n
    valid_frac = np.full(n, np.nan, dtype="float32")
    rows = np.full(n, -1, dtype="int32")
    has_geom = np.isfinite(task.bounds).all(axis=1) & np.isin(task.geometry_status, ("ok", "repaired"))
    status[~has_geom] = "invalid_geometry"
    windows = np.full((n, 4), np.nan)
    left, top = info.bounds[0], info.bounds[3]
    if has_geom.any():
        windows[has_geom] = chip_windows(task.bounds[has_geom], spec, info.resolution, (left, top))
    covered = has_geom.copy()
    covered[has_geom] = _intersects_any(windows[has_geom], info.tile_bounds_array())
    status[has_geom & ~covered] = "no_imagery"
    chips: list[np.ndarray] = []
    res = info.resolution
    for i in np.flatnonzero(covered):
        x0, y0, x1, y1 = windows[i]
        col = int(round((x0 - left) / res))
        row = int(round((top - y1) / res))
        npx = int(round((x1 - x0) / res))
        c0, r0 = max(col, 0), max(row, 0)
        c1, r1 = min(col + npx, info.width), min(row + npx, info.height)
        buf = np.full((info.count, npx, npx), info.nodata, dtype=info.dtype)
        try:
            if c1 > c0 and r1 > r0:
                buf[:, r0 - row : r1 - row, c0 - col : c1 - col] = ds.read(window=Window(c0, r0, c1 - c0, r1 - r0))
        except Exception as exc:  # a corrupt or unreachable tile: quarantine, don't crash the partition
            status[i] = "error"
            message[i] = f"read failed for window {tuple(np.round(windows[i], 2))}: {exc}"
            continue
        valid = (buf != info.nodata).any(axis=0)
        valid_frac[i] = float(valid.mean())
        if valid_frac[i] < spec.min_valid_fraction:
            status[i] = "nodata"
            continue
        chip = to_chip_bands(buf, info)
        chip[:, ~valid] = 0.0
        rows[i] = len(chips)
        chips.append(resample(chip, spec.size))
    arr = np.stack(chips) if chips else np.zeros((0, 3, spec.size, spec.size), dtype="uint8")
    index = pa.table(
        {
            "building_id": pa.array(task.building_ids, pa.string()),
            "cell_id": pa.array([task.cell_id] * n, pa.string()),
            "status": pa.array(status.tolist(), pa.string()),
            "row": pa.array(rows, pa.int32()),
            "minx": pa.array(windows[:, 0], pa.float64(), from_pandas=True),
            "miny": pa.array(windows[:, 1], pa.float64(), from_pandas=True),
            "maxx": pa.array(windows[:, 2], pa.float64(), from_pandas=True),
            "maxy": pa.array(windows[:, 3], pa.float64(), from_pandas=True),
            "valid_fraction": pa.array(valid_frac, pa.float32(), from_pandas=True),
            "message": pa.array(message, pa.string()),
        },
        schema=INDEX_SCHEMA,
    )
    return arr, index


# --- shards ------------------------------------------------------------------


def shard_paths(folder: Path, cell_id: str) -> tuple[Path, Path]:
    return folder / f"{cell_id}.chips.npy", folder / f"{cell_id}.index.parquet"


def write_shard(folder: Path, cell_id: str, chips: np.ndarray, index: pa.Table, meta: dict[str, str]) -> None:
    """Write a cell's chips then its index; the index's presence marks a complete shard."""
    folder.mkdir(parents=True, exist_ok=True)
    npy, idx = shard_paths(folder, cell_id)
    tmp_npy = npy.with_name(npy.name + ".tmp")
    with open(tmp_npy, "wb") as fh:
        np.save(fh, chips, allow_pickle=False)
    tmp_npy.replace(npy)
    table = index.replace_schema_metadata(
        {**(index.schema.metadata or {}), **{k.encode(): v.encode() for k, v in meta.items()}}
    )
    tmp_idx = idx.with_name(idx.name + ".tmp")
    pq.write_table(table, tmp_idx)
    tmp_idx.replace(idx)


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


def cell_tasks(buildings_parquet: Path, batch_size: int = 100_000) -> list[CellTask]:
    """Group a partition's buildings by cell, keeping only ids, statuses and bounds."""
    ids: list[str] = []
    cells: list[str] = []
    gstat: list[str] = []
    bounds: list[np.ndarray] = []
    pf = pq.ParquetFile(buildings_parquet)
    for batch in pf.iter_batches(
        batch_size=batch_size, columns=["building_id", "cell_id", "geometry_status", "geometry"]
    ):
        ids += batch.column("building_id").to_pylist()
        cells += batch.column("cell_id").to_pylist()
        gstat += batch.column("geometry_status").to_pylist()
        geoms = shapely.from_wkb(batch.column("geometry").to_numpy(zero_copy_only=False))
        bounds.append(shapely.bounds(geoms))
    b = np.concatenate(bounds) if bounds else np.zeros((0, 4))
    cell_arr = np.array(cells, dtype=object)
    order = np.argsort(cell_arr, kind="stable")
    tasks = []
    for cell in sorted(set(cells)):
        sel = order[cell_arr[order] == cell]
        tasks.append(CellTask(cell, [ids[i] for i in sel], [gstat[i] for i in sel], b[sel]))
    return tasks


_WORKER: dict = {}


def _init_worker(vrt: str, info_json: str, spec: ChipSpec, out_dir: str, meta: dict[str, str]) -> None:
    torch.set_num_threads(1)
    _WORKER.update(ds=rasterio.open(vrt), info=MosaicInfo.from_json(info_json), spec=spec, out=Path(out_dir), meta=meta)


def _run_task(task: CellTask) -> CellResult:
    import time

    t0 = time.perf_counter()
    w = _WORKER
    chips, index = crop_cell(w["ds"], w["info"], task, w["spec"])
    write_shard(w["out"], task.cell_id, chips, index, w["meta"])
    status = index.column("status").to_pylist()
    counts = {s: status.count(s) for s in STATUSES}
    return CellResult(task.cell_id, counts, len(chips), time.perf_counter() - t0)


def crop_partition(
    buildings_parquet: Path,
    vrt_path: Path,
    info: MosaicInfo,
    out_dir: Path,
    spec: ChipSpec,
    *,
    buildings_fingerprint: str,
    workers: int = 1,
    resume: bool = True,
    progress: Callable[[CellResult, int, int], None] | None = None,
) -> Iterator[CellResult]:
    """Crop every cell of a partition into ``out_dir``, yielding one result per cell.

    With ``resume``, a cell whose complete shard carries the same fingerprint
    (same chip spec, imagery and buildings) is reused rather than recut. Shards
    of cells that no longer exist are removed, so the folder always describes
    exactly the current buildings.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = cell_tasks(buildings_parquet)
    fp = spec.fingerprint(info.imagery_id, buildings_fingerprint)
    meta = {"fingerprint": fp, "imagery_id": info.imagery_id, "chip_size": str(spec.size), "epsg": str(info.epsg)}
    wanted = {t.cell_id for t in tasks}
    for stale in set(list_shards(out_dir)) - wanted:
        for p in shard_paths(out_dir, stale):
            p.unlink(missing_ok=True)
    todo: list[CellTask] = []
    done = 0
    for t in tasks:
        idx = shard_paths(out_dir, t.cell_id)[1]
        if resume and idx.exists() and shard_meta(idx).get("fingerprint") == fp:
            status = pq.read_table(idx, columns=["status"]).column("status").to_pylist()
            r = CellResult(t.cell_id, {s: status.count(s) for s in STATUSES}, status.count("ok"), 0.0, reused=True)
            done += 1
            if progress:
                progress(r, done, len(tasks))
            yield r
        else:
            todo.append(t)
    todo.sort(key=lambda t: -len(t.building_ids))  # big cells first: better load balance
    init_args = (str(vrt_path), info.to_json(), spec, str(out_dir), meta)
    if workers <= 1 or len(todo) <= 1:
        _init_worker(*init_args)
        results: Iterator[CellResult] = map(_run_task, todo)
    else:
        pool = ProcessPoolExecutor(
            max_workers=min(workers, len(todo), os.cpu_count() or 1), initializer=_init_worker, initargs=init_args
        )
        results = pool.map(_run_task, todo)
    try:
        for r in results:
            done += 1
            if progress:
                progress(r, done, len(tasks))
            yield r
    finally:
        if workers > 1 and len(todo) > 1:
            pool.shutdown(cancel_futures=True)
        else:
            _WORKER.get("ds") and _WORKER["ds"].close()
