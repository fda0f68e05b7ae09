"""Buildings as BD TOPO sees them: rings, heights, attributes and the deliberate geometry defects.

:func:`finish_buildings` turns the laid-out buildings into rings (rectangles
and L-shapes), heights, roof colours and the ``batiment`` columns;
:func:`choose_defects` picks the bow-ties, collinear slivers and empty
geometries counted in the manifest; :func:`footprint_geometries` builds the
shapely geometries the writer stores, defects included.
"""

from __future__ import annotations

import numpy as np

from synthetic.manifest import CAT_EMPTY, CAT_NORMAL, CAT_REPAIRABLE, CAT_UNREPAIRABLE, FLAT
from synthetic.plan import Plan, defect_count
from synthetic.roofs import COLOUR_WEIGHTS, ROOF_COLOURS

_NATURE_DEFAULT = "Indifférenciée"
_NATURE_ICA = "Industriel, agricole ou commercial"
_NATURE_RARE = ("Serre", "Château", "Chapelle", "Eglise", "Tour, donjon", "Bâtiment sportif", "Silo")
_USAGES = (
    "Résidentiel",
    "Indifférencié",
    "Annexe",
    "Commercial et services",
    "Industriel",
    "Agricole",
    "Sportif",
    "Religieux",
)
# usage_1 weights by (flat, pitched, farm); Olemps (12) has ~48 % residential, ~40 % undifferentiated.
_USAGE_WEIGHTS = np.array(
    [
        [0.30, 0.30, 0.10, 0.18, 0.08, 0.02, 0.015, 0.005],
        [0.52, 0.37, 0.06, 0.03, 0.005, 0.01, 0.0, 0.005],
        [0.05, 0.25, 0.02, 0.0, 0.03, 0.65, 0.0, 0.0],
    ]
)
_U_ICA = {"Commercial et services", "Industriel", "Agricole"}


def finish_buildings(rng: np.random.Generator, b: dict[str, np.ndarray]) -> None:
    """Rings, heights, colours and BD TOPO attributes for every building (vectorised)."""
    n = b["x"].size
    roof = b["roof"]
    a, w2 = b["length"] / 2, b["width"] / 2
    # local ring: rectangles use 4 vertices, L-shapes 6 (unused slots repeat the last vertex)
    loc = np.zeros((n, 6, 2))
    rect = np.array([(-1, -1), (1, -1), (1, 1), (-1, 1), (-1, 1), (-1, 1)], dtype=float)
    loc[:] = rect[None] * np.stack([a, w2], axis=1)[:, None, :]
    lsh = np.flatnonzero(b["shape"] == 1)
    if lsh.size:
        al, bl = a[lsh], w2[lsh]
        cl, cw = b["cut_l"][lsh] * 2 * al, b["cut_w"][lsh] * 2 * bl
        verts = np.stack(
            [
                np.stack([-al, -bl], 1),
                np.stack([al, -bl], 1),
                np.stack([al, bl - cw], 1),
                np.stack([al - cl, bl - cw], 1),
                np.stack([al - cl, bl], 1),
                np.stack([-al, bl], 1),
            ],
            axis=1,
        )
        sxy = np.stack([np.where(b["flip"][lsh] & 1, -1.0, 1.0), np.where(b["flip"][lsh] & 2, -1.0, 1.0)], 1)
        verts = verts * sxy[:, None, :]
        mirrored = sxy[:, 0] * sxy[:, 1] < 0
        verts[mirrored] = verts[mirrored][:, ::-1]  # keep the exterior counter-clockwise
        loc[lsh] = verts
    ct, st = np.cos(b["theta"]), np.sin(b["theta"])
    ring = np.empty_like(loc)
    ring[..., 0] = b["x"][:, None] + loc[..., 0] * ct[:, None] - loc[..., 1] * st[:, None]
    ring[..., 1] = b["y"][:, None] + loc[..., 0] * st[:, None] + loc[..., 1] * ct[:, None]
    b["ring"] = np.round(ring, 2)
    b["nv"] = np.where(b["shape"] == 1, 6, 4).astype(np.int8)

    farm = b["farm"]
    # Olemps (12): median height 5.6 m; a few taller flat-roofed blocks
    tall = rng.random(n) < 0.12
    height = np.where(
        roof == FLAT, np.where(tall, rng.uniform(8.0, 15.0, n), rng.uniform(3.0, 8.0, n)), rng.uniform(4.5, 8.5, n)
    )
    height = np.where(farm, rng.uniform(5.0, 9.5, n), height)
    b["height"] = height
    b["slope"] = np.radians(np.where(farm, rng.uniform(15.0, 25.0, n), rng.uniform(28.0, 42.0, n)))
    b["hip_k"] = rng.uniform(0.8, 1.0, n)
    colour = np.empty(n, dtype=np.int8)
    for cls in range(3):
        idx = np.flatnonzero(roof == cls)
        colour[idx] = rng.choice(len(ROOF_COLOURS), size=idx.size, p=COLOUR_WEIGHTS[cls])
    b["colour"] = colour
    b["tint"] = (1.0 + rng.normal(0.0, 0.07, (n, 1)) + rng.normal(0.0, 0.012, (n, 3))).astype(np.float32)
    b["detail"] = rng.random((n, 16)).astype(np.float32)

    # BD TOPO-like attributes
    group = np.where(farm, 2, np.where(roof == FLAT, 0, 1))
    usage = np.empty(n, dtype=object)
    for g in range(3):
        idx = np.flatnonzero(group == g)
        p = _USAGE_WEIGHTS[g] / _USAGE_WEIGHTS[g].sum()
        usage[idx] = np.array(_USAGES, dtype=object)[rng.choice(len(_USAGES), size=idx.size, p=p)]
    nature = np.full(n, _NATURE_DEFAULT, dtype=object)
    ica = np.array([u in _U_ICA for u in usage]) & (rng.random(n) < 0.7)
    nature[ica] = _NATURE_ICA
    rare = rng.random(n) < 0.004
    nature[rare] = np.array(_NATURE_RARE, dtype=object)[rng.integers(0, len(_NATURE_RARE), int(rare.sum()))]
    usage2 = np.full(n, None, dtype=object)
    u2 = rng.random(n) < 0.08
    usage2[u2] = np.array(["Annexe", "Résidentiel", "Commercial et services"], dtype=object)[
        rng.choice(3, size=int(u2.sum()), p=[0.8, 0.1, 0.1])
    ]
    usage2[u2 & (usage == usage2)] = None
    hauteur = np.round(height, 1)
    h_null = rng.random(n) < 0.05
    etages = np.maximum(1, np.round((height - 1.0) / 2.9)).astype(np.int64)
    e_null = h_null | (rng.random(n) < 0.15)
    seconds = rng.integers(0, (2023 - 2005) * 365 * 86400, n)
    b["usage_1"], b["usage_2"], b["nature"] = usage, usage2, nature
    b["hauteur"] = np.where(h_null, np.nan, hauteur)
    b["etages"], b["etages_null"] = etages, e_null
    b["created_s"] = seconds
    # BD TOPO's cleabs are unique across France: each département gets its own id range
    # (b["dep_rank"], set by the caller), so two sample départements never share an id.
    ids = int(b.get("dep_rank", 0)) * 10**13 + 240_000_000 + np.cumsum(rng.integers(1, 400, n))
    b["cleabs"] = np.array([f"BATIMENT{v:016d}" for v in ids], dtype=object)


def choose_defects(plan: Plan, rng: np.random.Generator) -> None:
    """Turn a few imaged rectangles into bow-ties, collinear slivers and empty geometries."""
    b = plan.b
    near = b.get("near_hole", np.zeros(plan.n, dtype=bool))
    pool = np.flatnonzero((b["category"] == CAT_NORMAL) & (b["shape"] == 0) & ~near)
    k_rep, k_unrep, k_empty = defect_count(0.01, plan.n), defect_count(0.005, plan.n), defect_count(0.005, plan.n)
    total = min(pool.size, k_rep + k_unrep + k_empty)
    chosen = rng.choice(pool, size=total, replace=False) if total else np.zeros(0, dtype=np.int64)
    k_rep = min(k_rep, total)
    k_unrep = min(k_unrep, total - k_rep)
    b["category"][chosen[:k_rep]] = CAT_REPAIRABLE
    b["category"][chosen[k_rep : k_rep + k_unrep]] = CAT_UNREPAIRABLE
    b["category"][chosen[k_rep + k_unrep :]] = CAT_EMPTY
    # empties are half "MultiPolygon EMPTY", half null geometry
    b["null_geom"] = np.zeros(plan.n, dtype=bool)
    empties = chosen[k_rep + k_unrep :]
    b["null_geom"][empties[1::2]] = True


def footprint_geometries(plan: Plan) -> np.ndarray:
    """Shapely MultiPolygons (or None) for every building, defects included."""
    import shapely

    b = plan.b
    n = plan.n
    ring, nv, cat = b["ring"], b["nv"], b["category"]
    polys = np.empty(n, dtype=object)
    for k in (4, 6):
        idx = np.flatnonzero(nv == k)
        if idx.size:
            polys[idx] = shapely.polygons(ring[idx, :k])
    rep = np.flatnonzero(cat == CAT_REPAIRABLE)
    if rep.size:  # swap two corners: the edges cross in the middle (a bow-tie)
        polys[rep] = shapely.polygons(ring[rep][:, [0, 1, 3, 2]])
    unrep = np.flatnonzero(cat == CAT_UNREPAIRABLE)
    if unrep.size:  # three collinear vertices on one exact y: zero area, no polygonal repair
        yy = np.round(b["y"][unrep], 2)
        xa = np.round(b["x"][unrep] - b["length"][unrep] / 2, 2)
        xb = np.round(b["x"][unrep], 2)
        xc = np.round(b["x"][unrep] + b["length"][unrep] / 2, 2)
        coords = np.stack([np.stack([xa, yy], 1), np.stack([xb, yy], 1), np.stack([xc, yy], 1)], axis=1)
        polys[unrep] = shapely.polygons(coords)
    geoms = shapely.multipolygons(polys[:, None])
    empty = np.flatnonzero(cat == CAT_EMPTY)
    geoms[empty] = shapely.from_wkt("MULTIPOLYGON EMPTY")
    geoms[b["null_geom"]] = None
    return geoms
