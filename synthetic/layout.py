"""The département's layout: settlements packed into a compact area, roads between them, the plan.

:func:`make_plan` is the first stage and runs the others that only choose
things (no file is written): it sizes and lays out the towns, hamlets and the
band of villages beyond the imagery, packs them with countryside between them,
anchors the whole near the real département, then lets the building, roof and
tile stages finish the :class:`~synthetic.plan.Plan`. The order of the random
draws is part of the output: changing it changes every file.
"""

from __future__ import annotations

import math

import numpy as np

from ops.geo.departements import DEPARTEMENTS, native_epsg
from synthetic.footprints import choose_defects, finish_buildings
from synthetic.manifest import CAT_NORMAL, CAT_OUTSIDE
from synthetic.noise import crc, keyed_rng
from synthetic.plan import Plan, defect_count
from synthetic.roofs import choose_materials, choose_panels, shade_roofs
from synthetic.settlements import Settlement, make_settlement, split_sizes, town_density, town_sizes
from synthetic.tiles import choose_hole, choose_tiles

# Rough centres in the native CRS, so a sample lands where the real département is.
_ANCHORS: dict[str, tuple[float, float]] = {
    "12": (660_000.0, 6_360_000.0),
    "2A": (1_190_000.0, 6_110_000.0),
    "2B": (1_215_000.0, 6_175_000.0),
    "13": (880_000.0, 6_250_000.0),
    "29": (170_000.0, 6_810_000.0),
    "31": (570_000.0, 6_280_000.0),
    "33": (420_000.0, 6_420_000.0),
    "59": (700_000.0, 7_040_000.0),
    "67": (1_040_000.0, 6_840_000.0),
    "69": (842_000.0, 6_520_000.0),
    "75": (652_000.0, 6_862_000.0),
    "971": (650_000.0, 1_780_000.0),
    "972": (710_000.0, 1_620_000.0),
    "973": (350_000.0, 550_000.0),
    "974": (340_000.0, 7_670_000.0),
    "976": (515_000.0, 8_585_000.0),
}


def _gap(r1: float | np.ndarray, r2: float | np.ndarray) -> float | np.ndarray:
    """Countryside kept between two settlements: wider between big towns."""
    return 20.0 + 0.08 * (r1 + r2)


def _pack(rng: np.random.Generator, radii: np.ndarray, aspect: float) -> tuple[np.ndarray, np.ndarray]:
    """Pack discs compactly (largest first), each one next to an already placed one.

    Candidates are drawn on rings around placed discs, at the countryside gap
    plus a little slack; the valid candidate that keeps the cluster closest to a
    rectangle of the given aspect wins. The result is a compact département (so
    the imagery, which costs time, is mostly towns) with countryside between
    towns and farms filling the holes. Returns centres relative to the cluster.
    """
    order = np.argsort(-radii, kind="stable")
    cx = np.zeros(radii.size)
    cy = np.zeros(radii.size)
    px, py, pr = np.zeros(radii.size), np.zeros(radii.size), np.zeros(radii.size)
    k = 0
    for i in order:
        r = float(radii[i])
        if k == 0:
            px[0], py[0], pr[0] = 0.0, 0.0, r
            k = 1
            continue
        ax, ay, ar = px[:k], py[:k], pr[:k]
        slack = 10.0
        while True:
            j = rng.integers(0, k, 96)
            ang = rng.uniform(0.0, 2 * math.pi, 96)
            dist = r + ar[j] + _gap(r, ar[j]) + rng.uniform(0.0, slack, 96)
            cand_x = ax[j] + dist * np.cos(ang)
            cand_y = ay[j] + dist * np.sin(ang)
            d = np.hypot(cand_x[:, None] - ax[None, :], cand_y[:, None] - ay[None, :])
            good = np.all(d >= r + ar[None, :] + _gap(r, ar[None, :]), axis=1)
            if good.any():
                score = np.maximum(np.abs(cand_x) / math.sqrt(aspect), np.abs(cand_y) * math.sqrt(aspect)) + r
                score = np.where(good, score, np.inf)
                c = int(np.argmin(score))
                px[k], py[k], pr[k] = cand_x[c], cand_y[c], r
                k += 1
                break
            slack *= 1.5
    cx[order], cy[order] = px, py
    return cx, cy


def _anchor(dep: str, epsg: int) -> tuple[float, float]:
    """A plausible centre for the département in its native CRS."""
    if dep in _ANCHORS:
        return _ANCHORS[dep]
    h = crc("anchor:" + dep)
    if epsg == 2154:
        # inland-ish France in Lambert-93
        return 300_000.0 + (h % 700) * 1000.0, 6_250_000.0 + ((h >> 10) % 650) * 1000.0
    return 500_000.0, 1_000_000.0  # pragma: no cover - every overseas code is in _ANCHORS


def make_plan(dep: str, n: int, seed: int, tile_px: int, res: float) -> Plan:
    """Lay out the whole département: settlements, buildings, trees, roads, tiles, defects."""
    epsg = native_epsg(dep)
    rng = keyed_rng(seed, dep, n, "layout")
    tile_m = tile_px * res

    n_out = defect_count(0.02, n) if n >= 10 else 0
    n_in = n - n_out
    sizes = town_sizes(rng, n_in)
    dens = [town_density(rng, s) for s in sizes]
    est_km2 = sum(s / d for s, d in zip(sizes, dens, strict=True))
    n_country = int(round(8.0 * est_km2)) if n_in >= 50 else 0
    if sizes and sizes[0] > 3 * n_country:
        sizes[0] -= n_country
    else:
        n_country = 0
    inside: list[Settlement] = [make_settlement(rng, s, d, "town") for s, d in zip(sizes, dens, strict=True)]
    inside += [make_settlement(rng, s, rng.uniform(150.0, 300.0), "hamlet") for s in split_sizes(rng, n_country, 1, 5)]
    outside = [make_settlement(rng, s, town_density(rng, s), "outside") for s in split_sizes(rng, n_out, 8, 80)]

    radii = np.array([s.radius for s in inside])
    margin = 25.0
    px, py = _pack(rng, radii, rng.uniform(1.0, 1.35))
    px = px - (px - radii).min() + margin
    py = py - (py - radii).min() + margin
    for s, x, y in zip(inside, px, py, strict=True):
        s.cx, s.cy = float(x), float(y)
    sx, sy = float((px + radii).max() + margin), float((py + radii).max() + margin)
    nx, ny = max(1, math.ceil(sx / tile_m)), max(1, math.ceil(sy / tile_m))
    img_w, img_h = nx * tile_m, ny * tile_m

    # villages beyond the imagery's east edge, with countryside in between
    band_x0 = img_w + 150.0
    band_x1, band_h = band_x0, img_h
    if outside:
        oradii = np.array([s.radius for s in outside])
        ox, oy = _pack(rng, oradii, 0.35)  # a tall band
        ox = ox - (ox - oradii).min() + band_x0
        oy = oy - (oy - oradii).min()
        oy = oy + max(0.0, (img_h - float((oy + oradii).max())) / 2)
        for s, x, y in zip(outside, ox, oy, strict=True):
            s.cx, s.cy = float(x), float(y)
        band_x1 = float((ox + oradii).max())
        band_h = max(img_h, float((oy + oradii).max()))

    ax, ay = _anchor(dep, epsg)
    origin_x = math.floor((ax - band_x1 / 2) / tile_m) * tile_m
    origin_y = math.floor((ay - img_h / 2) / tile_m) * tile_m

    # ---- buildings, in file order: towns, hamlets, outside villages
    parts = inside + outside
    cat = np.concatenate([np.full(s.n, CAT_OUTSIDE if s.kind == "outside" else CAT_NORMAL) for s in parts])
    b: dict[str, np.ndarray] = {key: np.concatenate([s.b[key] for s in parts]) for key in parts[0].b}
    b["x"] = b["x"] + np.concatenate([np.full(s.n, s.cx) for s in parts]) + origin_x
    b["y"] = b["y"] + np.concatenate([np.full(s.n, s.cy) for s in parts]) + origin_y
    b["category"] = cat.astype(np.int8)
    b["dep_rank"] = np.array(DEPARTEMENTS.index(dep) + 1)
    finish_buildings(rng, b)
    del b["dep_rank"]

    # ---- trees and roads (inside only: nothing is rendered beyond the imagery)
    tr = [s.trees + np.array([s.cx + origin_x, s.cy + origin_y, 0.0]) for s in inside]
    trees = np.concatenate(tr) if tr else np.zeros((0, 3))
    t_h = 2.5 + 1.4 * trees[:, 2] + rng.uniform(-0.5, 1.5, len(trees))
    trees = np.column_stack([trees, t_h])
    tree_col = np.clip(
        np.array([58, 82, 46]) * rng.uniform(0.75, 1.2, (len(trees), 1)) + rng.normal(0, 5, (len(trees), 3)), 20, 255
    ).astype(np.uint8)
    roads = [
        np.column_stack(
            [
                s.streets + np.array([s.cx, s.cy, s.cx, s.cy]) + [origin_x, origin_y] * 2,
                np.full(len(s.streets), s.street_w),
            ]
        )
        for s in inside
        if len(s.streets)
    ]
    # main roads: each settlement joins its nearest bigger neighbour, edge to edge
    order = np.argsort([-s.radius for s in inside], kind="stable")
    main = []
    for k in range(1, len(order)):
        a = inside[order[k]]
        cands = [inside[j] for j in order[:k]]
        d = [math.hypot(c.cx - a.cx, c.cy - a.cy) for c in cands]
        c = cands[int(np.argmin(d))]
        dist = min(d)
        if dist <= a.radius + c.radius + 1:
            continue
        ux, uy = (c.cx - a.cx) / dist, (c.cy - a.cy) / dist
        main.append(
            [
                a.cx + ux * a.radius + origin_x,
                a.cy + uy * a.radius + origin_y,
                c.cx - ux * c.radius + origin_x,
                c.cy - uy * c.radius + origin_y,
                rng.uniform(5.0, 7.0) if a.kind != "hamlet" else 3.5,
            ]
        )
    if main:
        roads.append(np.array(main))
    roads_arr = np.concatenate(roads) if roads else np.zeros((0, 5))
    settlements = np.array(
        [[s.cx + origin_x, s.cy + origin_y, s.radius, 0 if s.kind == "town" else 1, *s.outline] for s in inside]
    )

    plan = Plan(
        departement=dep,
        n=n,
        seed=seed,
        tile_px=tile_px,
        resolution=res,
        epsg=epsg,
        tile_m=tile_m,
        origin_x=origin_x,
        origin_y=origin_y,
        nx=nx,
        ny=ny,
        extent=(origin_x, origin_y, origin_x + band_x1, origin_y + band_h),
        sun_az=math.radians(rng.uniform(150.0, 205.0)),
        sun_el=math.radians(rng.uniform(42.0, 58.0)),
        field_angle=rng.uniform(0.0, math.pi),
        b=b,
        trees=trees,
        tree_col=tree_col,
        roads=roads_arr,
        settlements=settlements,
    )
    shade_roofs(plan)
    choose_hole(plan)
    choose_defects(plan, rng)
    choose_panels(plan)
    choose_materials(plan)  # its own stream, after the defects (categories) and the shading (textures)
    choose_tiles(plan)
    return plan
