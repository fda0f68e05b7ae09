"""How a chip is cut: its spec, and the square window around each building, snapped to the pixel grid.

A chip is a square window around the building's bounding box plus a margin
(max of ``margin_m`` and ``margin_ratio`` of its side), rounded up to a
multiple of :data:`SIZE_STEP` pixels so chips come in few sizes (resampled in
batches of one size), snapped to the mosaic's pixel grid so its georeference
is exact and can be stored in the index. :func:`place` computes the windows of
a unit of work; the cutter and the prefetch of remote blocks share it, so the
prefetch fetches exactly what the cutter will decode.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ops.crop.units import CellTask
from ops.geo.footprints import USABLE_GEOMETRY
from ops.imagery.mosaic import MosaicInfo

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


SIZE_STEP = 8  # window sides are rounded up to a multiple of this many pixels


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


def intersects_any(windows: np.ndarray, tiles: np.ndarray) -> np.ndarray:
    """(N,) bool: whether each window (minx, miny, maxx, maxy) overlaps any of the tiles' bounds."""
    if len(tiles) == 0:
        return np.zeros(len(windows), dtype=bool)
    w = windows[:, None, :]
    t = tiles[None, :, :]
    hit = (w[..., 0] < t[..., 2]) & (w[..., 2] > t[..., 0]) & (w[..., 1] < t[..., 3]) & (w[..., 3] > t[..., 1])
    return hit.any(axis=1)


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
    has_geom = np.isfinite(task.bounds).all(axis=1) & np.isin(task.geometry_status, USABLE_GEOMETRY)
    windows = np.full((n, 4), np.nan)
    left, top, res = info.bounds[0], info.bounds[3], info.resolution
    if has_geom.any():
        windows[has_geom] = chip_windows(task.bounds[has_geom], spec, res, (left, top), step=SIZE_STEP)
    covered = has_geom.copy()
    covered[has_geom] = intersects_any(windows[has_geom], info.tile_bounds_array())
    idx = np.flatnonzero(covered)
    cols = np.rint((windows[idx, 0] - left) / res).astype(np.int64)
    rows = np.rint((top - windows[idx, 3]) / res).astype(np.int64)
    npxs = np.rint((windows[idx, 2] - windows[idx, 0]) / res).astype(np.int64)
    return Placement(has_geom, windows, idx, cols, rows, npxs)


def file_digest(path: Path) -> str:
    """A short SHA-256 of a file's bytes: the buildings' part of a shard's fingerprint."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]
