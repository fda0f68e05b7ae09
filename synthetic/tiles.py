"""The imagery grid: which tiles exist, their BD ORTHO names, what each one draws, and the nodata hole.

Tiles are cut on a regular grid from the imagery's origin; only those holding
an imaged building's chip window are kept (:func:`choose_tiles`). One tile gets a
rectangular nodata hole whose edges keep clear of every chip window
(:func:`choose_hole`). :func:`tile_jobs` buckets buildings, trees, roads and
settlements by the tiles their drawn extent touches, so a tile is rendered from
its own short lists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from synthetic.manifest import CAT_NODATA, CAT_NORMAL, CAT_REPAIRABLE, CHIP_MARGIN_M, ORTHO_YEAR
from synthetic.plan import Plan, defect_count

_CRS_TAGS: dict[int, str] = {
    2154: "LA93",
    5490: "RGAF09UTM20",
    2972: "UTM22RGFG95",
    2975: "RGR92UTM40S",
    4471: "RGM04UTM38S",
}


#: BD ORTHO's JPEG 2000 deliveries end their names with the product variant, e.g. ``...-LA93-0M20-E080.jp2``.
JP2_VARIANT = "E080"


def tile_name(
    dep: str,
    x_ul: float,
    y_ul: float,
    epsg: int,
    resolution: float,
    tile_m: float = 1000.0,
    imagery_format: str = "deflate",
) -> str:
    """BD ORTHO-style file name from the upper-left corner in km, e.g. ``12-2024-0660-6361-LA93-0M20.tif``.

    When tiles are not a whole number of kilometres (2,500 px at 20 cm is 500 m), every
    name of the département uses three decimals (``12-2024-0660.500-6360.000-...``) so
    names stay unique and sort the same way. ``imagery_format`` ``jp2`` gives IGN's
    JPEG 2000 name (``12-2024-0660-6361-LA93-0M20-E080.jp2``); ``deflate`` and ``jpeg``
    are GeoTIFFs (``.tif``).
    """
    whole_km = round(tile_m) % 1000 == 0

    def km(v: float) -> str:
        return f"{int(round(v)) // 1000:04d}" if whole_km else f"{v / 1000:08.3f}"

    whole = int(resolution)
    frac = int(round((resolution - whole) * 100))
    stem = f"{dep}-{ORTHO_YEAR}-{km(x_ul)}-{km(y_ul)}-{_CRS_TAGS.get(epsg, str(epsg))}-{whole}M{frac:02d}"
    return f"{stem}-{JP2_VARIANT}.jp2" if imagery_format == "jp2" else f"{stem}.tif"


def tile_path(plan: Plan, ortho: Path, ix: int, iy: int, imagery_format: str = "deflate") -> Path:
    """Where tile (ix, iy) is written."""
    x0, ytop = plan.tile_origin(ix, iy)
    return ortho / tile_name(plan.departement, x0, ytop, plan.epsg, plan.resolution, plan.tile_m, imagery_format)


def _chip_windows(plan: Plan) -> np.ndarray:
    """(N, 4) chip windows: footprint bbox plus the chip margin."""
    return plan.b["bbox"] + np.array([-CHIP_MARGIN_M, -CHIP_MARGIN_M, CHIP_MARGIN_M, CHIP_MARGIN_M])


def _tile_of(plan: Plan, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tile column / row (row 0 north) of map points, unclipped."""
    ix = np.floor((x - plan.origin_x) / plan.tile_m).astype(np.int64)
    iy = np.floor((plan.origin_y + plan.ny * plan.tile_m - y) / plan.tile_m).astype(np.int64)
    return ix, iy


def choose_hole(plan: Plan) -> None:
    """Cut a nodata hole in the busiest tile that swallows ~1 % of the buildings entirely.

    The hole's edges are placed so that no chip window sits within two pixels of
    them: a chip is then either all nodata or clearly has valid pixels, whatever
    rounding a reader applies to its window.
    """
    b = plan.b
    win = _chip_windows(plan)
    inside = b["category"] == CAT_NORMAL
    ix0, iy1 = _tile_of(plan, win[:, 0], win[:, 1])
    ix1, iy0 = _tile_of(plan, win[:, 2], win[:, 3])
    whole = inside & (ix0 == ix1) & (iy0 == iy1)
    if not whole.any():
        return
    key = ix0[whole] * plan.ny + iy0[whole]
    counts = np.bincount(key)
    best = int(np.argmax(counts))
    tix, tiy = divmod(best, plan.ny)
    x0, ytop = plan.tile_origin(tix, tiy)
    x1, ybot = x0 + plan.tile_m, ytop - plan.tile_m
    res = plan.resolution
    members = np.flatnonzero(whole & (ix0 == tix) & (iy0 == tiy))
    touching = np.flatnonzero(inside & (ix0 <= tix) & (ix1 >= tix) & (iy0 <= tiy) & (iy1 >= tiy))
    cxs = (win[members, 0] + win[members, 2]) / 2
    cys = (win[members, 1] + win[members, 3]) / 2
    edge = 0.18 * plan.tile_m
    ax = float(np.clip(np.median(cxs), x0 + edge, x1 - edge))
    ay = float(np.clip(np.median(cys), ybot + edge, ytop - edge))
    asp = 1.5  # the hole is wider than tall
    need = np.maximum.reduce(
        [(ax - win[members, 0]) / asp, (win[members, 2] - ax) / asp, ay - win[members, 1], win[members, 3] - ay]
    )
    need.sort()
    delta = 2 * res
    hy_max = min((ax - x0) / asp, (x1 - ax) / asp, ay - ybot, ytop - ay) - 2 * delta
    target = defect_count(0.01, plan.n)
    if target == 0:  # too small a sample to spare a building
        return
    target = min(target, max(1, members.size // 2))
    candidates = [(need[k] + need[k + 1]) / 2 for k in range(need.size - 1) if need[k + 1] - need[k] > 4 * delta]
    candidates = [h for h in candidates if h <= hy_max]
    candidates.sort(key=lambda h: abs(int(np.searchsorted(need, h)) - target))
    tw = win[touching]
    for hy in candidates:
        c0 = int(round((ax - asp * hy - x0) / res))
        c1 = int(round((ax + asp * hy - x0) / res))
        r0 = int(round((ytop - (ay + hy)) / res))
        r1 = int(round((ytop - (ay - hy)) / res))
        hx0, hx1, hy1, hy0 = x0 + c0 * res, x0 + c1 * res, ytop - r0 * res, ytop - r1 * res

        def within(pad: float, hx0: float = hx0, hx1: float = hx1, hy0: float = hy0, hy1: float = hy1) -> np.ndarray:
            return (tw[:, 0] - pad >= hx0) & (tw[:, 2] + pad <= hx1) & (tw[:, 1] - pad >= hy0) & (tw[:, 3] + pad <= hy1)

        strict, loose = within(delta), within(-delta)
        if np.any(loose & ~strict) or not strict.any():
            continue
        in_hole = np.zeros(plan.n, dtype=bool)
        in_hole[touching[strict]] = True
        hits = (tw[:, 2] > hx0) & (tw[:, 0] < hx1) & (tw[:, 3] > hy0) & (tw[:, 1] < hy1)
        near = np.zeros(plan.n, dtype=bool)
        near[touching[hits]] = True
        b["category"][in_hole] = CAT_NODATA
        b["near_hole"] = near
        plan.hole = {
            "tile": (tix, tiy),
            "pixels": [c0, r0, c1, r1],
            "bounds": [hx0, hy0, hx1, hy1],
        }
        return


def _drawn(plan: Plan) -> np.ndarray:
    """Buildings that exist on the imagery (broken-beyond-repair and empty ones do not)."""
    c = plan.b["category"]
    return (c == CAT_NORMAL) | (c == CAT_REPAIRABLE) | (c == CAT_NODATA)


def choose_tiles(plan: Plan) -> None:
    """Keep the tiles that hold at least one imaged building's chip window."""
    win = _chip_windows(plan)[_drawn(plan)]
    keep: set[tuple[int, int]] = set()
    for t, _ in _bucket(plan, win).items():
        keep.add(t)
    if plan.hole is not None:
        keep.add(tuple(plan.hole["tile"]))
    plan.tiles = sorted(keep, key=lambda t: (t[1], t[0]))


def _bucket(plan: Plan, boxes: np.ndarray) -> dict[tuple[int, int], np.ndarray]:
    """Spatial bucketing: for every tile, the indices (into ``boxes``) of the boxes touching it."""
    if len(boxes) == 0:
        return {}
    ix0, iy1 = _tile_of(plan, boxes[:, 0], boxes[:, 1])
    ix1, iy0 = _tile_of(plan, boxes[:, 2], boxes[:, 3])
    ix0, ix1 = np.clip(ix0, 0, plan.nx - 1), np.clip(ix1, -1, plan.nx - 1)
    iy0, iy1 = np.clip(iy0, 0, plan.ny - 1), np.clip(iy1, -1, plan.ny - 1)
    ok = (
        (ix1 >= ix0)
        & (iy1 >= iy0)
        & (boxes[:, 2] >= plan.origin_x)
        & (boxes[:, 0] <= plan.origin_x + plan.nx * plan.tile_m)
    )
    ok &= (boxes[:, 3] >= plan.origin_y) & (boxes[:, 1] <= plan.origin_y + plan.ny * plan.tile_m)
    idx = np.flatnonzero(ok)
    wx = (ix1 - ix0 + 1)[idx]
    wy = (iy1 - iy0 + 1)[idx]
    reps = wx * wy
    item = np.repeat(idx, reps)
    start = np.repeat(np.cumsum(reps) - reps, reps)
    k = np.arange(item.size) - start
    wxr = np.repeat(wx, reps)
    tx = ix0[item] + k % wxr
    ty = iy0[item] + k // wxr
    key = ty * plan.nx + tx
    order = np.lexsort((item, key))
    key, item = key[order], item[order]
    cuts = np.flatnonzero(np.diff(key)) + 1
    out: dict[tuple[int, int], np.ndarray] = {}
    for ks, items in zip(np.split(key, cuts), np.split(item, cuts), strict=True):
        iy, ix = divmod(int(ks[0]), plan.nx)
        out[(ix, iy)] = items
    return out


@dataclass
class TileJob:
    """The items to draw on one tile (indices into the plan's arrays)."""

    ix: int
    iy: int
    buildings: np.ndarray
    trees: np.ndarray
    roads: np.ndarray
    settlements: np.ndarray


def tile_jobs(plan: Plan) -> list[TileJob]:
    """Bucket every drawable thing by the tiles its drawn extent (shadow included) touches."""
    b = plan.b
    drawn = np.flatnonzero(_drawn(plan))
    reach = np.abs(b["shadow"][drawn]).max(axis=1) + 2.0
    boxes = b["bbox"][drawn] + np.stack([-reach, -reach, reach, reach], 1)
    tb = _bucket(plan, boxes)
    t = plan.trees
    treach = t[:, 2] + t[:, 3] / math.tan(plan.sun_el) + 1.0
    tt = _bucket(plan, np.stack([t[:, 0] - treach, t[:, 1] - treach, t[:, 0] + treach, t[:, 1] + treach], 1))
    r = plan.roads
    rr = _bucket(
        plan,
        np.stack(
            [
                np.minimum(r[:, 0], r[:, 2]) - r[:, 4],
                np.minimum(r[:, 1], r[:, 3]) - r[:, 4],
                np.maximum(r[:, 0], r[:, 2]) + r[:, 4],
                np.maximum(r[:, 1], r[:, 3]) + r[:, 4],
            ],
            1,
        )
        if len(r)
        else np.zeros((0, 4)),
    )
    s = plan.settlements
    sr = s[:, 2] + 60.0
    ss = _bucket(plan, np.stack([s[:, 0] - sr, s[:, 1] - sr, s[:, 0] + sr, s[:, 1] + sr], 1))
    empty = np.zeros(0, dtype=np.int64)
    return [
        TileJob(
            ix,
            iy,
            drawn[tb.get((ix, iy), empty)],
            tt.get((ix, iy), empty),
            rr.get((ix, iy), empty),
            ss.get((ix, iy), empty),
        )
        for ix, iy in plan.tiles
    ]
