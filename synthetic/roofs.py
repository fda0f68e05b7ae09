"""What roofs look like: class odds, colour palettes, sunlit planes, shadows, solar panels, materials.

Colours are shared by all classes with different weights, so colour alone never
gives the class away. :func:`shade_roofs` lights each roof plane with a
Lambertian sun and casts its shadow; :func:`choose_panels` puts solar-panel
arrays (the segmentation ground truth) on about a third of the eligible roofs,
from their own random stream; :func:`choose_materials` derives BD TOPO's roof
material code (``mat_toits``) from what is drawn and blanks it, like the real
BD TOPO, on about half the buildings, from its own random stream too.
"""

from __future__ import annotations

import math

import numpy as np

from synthetic.manifest import (
    CAT_EMPTY,
    CAT_NORMAL,
    CAT_UNREPAIRABLE,
    FLAT,
    HIP,
    MAT_CONCRETE,
    MAT_OTHER,
    MAT_SLATE,
    MAT_TILES,
    MAT_UNKNOWN,
    MAT_UNKNOWN_SHARE,
    MAT_UNSET_SHARE,
    PANEL_SHARE,
)
from synthetic.noise import keyed_rng
from synthetic.plan import Plan
from synthetic.textures import TEX_GRAVEL, TEX_SMOOTH, TEX_TILES

# Roof colours are shared by all classes (with different weights) so colour alone never gives the class away.
ROOF_COLOURS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("terracotta", (198, 108, 76)),
    ("red_brown", (150, 76, 58)),
    ("slate_grey", (86, 92, 104)),
    ("dark_brown", (100, 76, 62)),
    ("light_grey", (170, 166, 158)),
    ("beige", (196, 182, 154)),
    ("dark_grey", (74, 74, 78)),
)
COLOUR_WEIGHTS = np.array(
    [
        [0.10, 0.06, 0.12, 0.07, 0.30, 0.20, 0.15],  # flat
        [0.36, 0.20, 0.17, 0.10, 0.07, 0.05, 0.05],  # gable
        [0.34, 0.20, 0.19, 0.10, 0.07, 0.05, 0.05],  # hip
    ]
)
ROOF_PROBS = np.array([0.30, 0.40, 0.30])


def shade_roofs(plan: Plan) -> None:
    """Per-building plane colours from a Lambertian sun, shadow vectors and roof texture codes.

    Plane colours: 0 = flat roof / plane facing -v, 1 = plane facing +v, 2 = hip end
    facing +u, 3 = hip end facing -u, 4 = ridge / parapet line.
    """
    b = plan.b
    n = b["x"].size
    az, el = plan.sun_az, plan.sun_el
    sun = np.array([math.sin(az) * math.cos(el), math.cos(az) * math.cos(el), math.sin(el)])
    ct, st = np.cos(b["theta"]), np.sin(b["theta"])
    u = np.stack([ct, st], 1)
    v = np.stack([-st, ct], 1)
    slope = b["slope"]
    amb, dif = 0.42, 0.58
    flat_lit = amb + dif * sun[2]

    def factor(h: np.ndarray) -> np.ndarray:
        d = np.sin(slope) * (h @ sun[:2]) + np.cos(slope) * sun[2]
        return (amb + dif * np.maximum(d, 0.0)) / flat_lit

    base = np.array([c for _, c in ROOF_COLOURS], dtype=np.float32)[b["colour"]] * b["tint"]
    det = b["detail"]
    f = np.ones((n, 5), dtype=np.float32)
    pitched = b["roof"] != FLAT
    f[:, 0] = np.where(pitched, factor(-v), 1.0) * (0.97 + 0.06 * det[:, 13])
    f[:, 1] = np.where(pitched, factor(v), 1.0) * (0.97 + 0.06 * det[:, 14])
    f[:, 2] = factor(u) * (0.97 + 0.06 * det[:, 15])
    f[:, 3] = factor(-u) * (0.97 + 0.06 * det[:, 15])
    f[:, 4] = np.where(pitched, np.maximum(f[:, 0], f[:, 1]) * 1.08, 1.18)
    b["plane_rgb"] = np.clip(base[:, None, :] * f[:, :, None], 8, 250).astype(np.uint8)
    tex = np.where(pitched, TEX_TILES, TEX_GRAVEL)
    smooth = np.isin(b["colour"], [2, 6])  # slate and dark grey read as smooth slate / bitumen
    b["tex"] = np.where(smooth, TEX_SMOOTH, tex).astype(np.uint8)
    shadow_len = (
        b["height"] * np.where(pitched, 0.85, 1.0) / math.tan(el)
    )  # a pitched roof's shadow is shorter on average
    b["shadow"] = np.stack([-math.sin(az) * shadow_len, -math.cos(az) * shadow_len], 1)
    ring = b["ring"]
    lo, hi = ring.min(axis=1), ring.max(axis=1)
    b["bbox"] = np.concatenate([lo, hi], axis=1)  # drawn shape (before any defect)


def choose_panels(plan: Plan) -> None:
    """Put a solar-panel array on about a third of the imaged rectangular roofs.

    An array is a rectangle aligned with the building: on one plane of a pitched
    roof (kept clear of the ridge, the eaves and, for hips, the hip lines) or
    anywhere on a flat one. Its own random stream, so adding panels moved no
    building, label or tree.
    """
    b = plan.b
    n = plan.n
    rng = keyed_rng(plan.seed, plan.departement, plan.n, "panels")
    a, w2, roof = b["length"] / 2, b["width"] / 2, b["roof"]
    flat = roof == FLAT
    u_half = np.where(flat, 0.75 * a, np.where(roof == HIP, a - 0.95 * w2, 0.85 * a))
    v_lo = np.where(flat, -0.75 * w2, 0.2 * w2)
    v_hi = np.where(flat, 0.75 * w2, 0.85 * w2)
    avail_u, avail_v = 2 * u_half, v_hi - v_lo
    pick, f_len, f_dep, f_u, f_v, f_side = (rng.random(n) for _ in range(6))
    tone = rng.uniform(0.85, 1.15, n)
    eligible = (b["category"] == CAT_NORMAL) & (b["shape"] == 0) & (avail_u >= 2.4) & (avail_v >= 1.6)
    has = eligible & (pick < PANEL_SHARE)
    length = np.minimum(np.maximum(avail_u * (0.35 + 0.55 * f_len), 2.0), avail_u)
    depth = np.minimum(np.maximum(avail_v * (0.65 + 0.35 * f_dep), 1.6), avail_v)
    uc = (2 * f_u - 1) * np.maximum(avail_u - length, 0) / 2
    vc = (v_lo + v_hi) / 2 + (2 * f_v - 1) * np.maximum(avail_v - depth, 0) / 2
    vc = np.where(flat | (f_side < 0.5), vc, -vc)  # pitched: either plane
    lu = np.stack([uc - length / 2, uc + length / 2, uc + length / 2, uc - length / 2], 1)
    lv = np.stack([vc - depth / 2, vc - depth / 2, vc + depth / 2, vc + depth / 2], 1)
    ct, st = np.cos(b["theta"])[:, None], np.sin(b["theta"])[:, None]
    panel = np.stack([b["x"][:, None] + lu * ct - lv * st, b["y"][:, None] + lu * st + lv * ct], axis=2)
    b["panel"] = np.round(panel, 2)
    b["has_panel"] = has
    b["panel_rgb"] = np.clip(np.array([34.0, 44.0, 72.0])[None, :] * tone[:, None], 0, 255).astype(np.uint8)


def has_roof(plan: Plan) -> np.ndarray:
    """Buildings whose roof is known: every one but the empty and unrepairable geometries.

    Those two are not drawn and their roof_type in ``labels.csv`` is random, so no
    material or slope is given for them. Buildings beyond the imagery or in the
    nodata hole keep theirs: their roof exists (labels.csv gives its class), the
    imagery just does not show it, as with a real survey.
    """
    c = plan.b["category"]
    return (c != CAT_EMPTY) & (c != CAT_UNREPAIRABLE)


def choose_materials(plan: Plan) -> None:
    """Set ``b["mat_toits"]``: BD TOPO v3's roof-material code of what is drawn, or None.

    The code follows the texture and class :func:`shade_roofs` drew, so it is
    learnable from the pixels: a pitched roof in smooth slate / dark grey is
    slate (``"20"``), any other pitched roof tiles (``"10"``), a flat gravel
    roof concrete (``"40"``) and a flat smooth one (bitumen) other (``"90"``).
    As in the real BD TOPO (Olemps: 48 % of the buildings without MAT_TOITS,
    1.8 % ``"00"``), :data:`~synthetic.manifest.MAT_UNSET_SHARE` of them get no
    code and :data:`~synthetic.manifest.MAT_UNKNOWN_SHARE` get ``"00"``
    (undetermined), picked from a stream of their own so that adding the column
    moved no other attribute, label, panel, tree or pixel. Must run after
    :func:`shade_roofs` (texture) and the defect choice (categories).
    """
    b = plan.b
    rng = keyed_rng(plan.seed, plan.departement, plan.n, "mat_toits")
    pick = rng.random(plan.n)  # drawn for every building, so the choice depends on nothing else
    pitched = b["roof"] != FLAT
    smooth = b["tex"] == TEX_SMOOTH
    code = np.where(
        pitched,
        np.where(smooth, MAT_SLATE, MAT_TILES),
        np.where(b["tex"] == TEX_GRAVEL, MAT_CONCRETE, MAT_OTHER),
    ).astype(object)
    code[pick < MAT_UNSET_SHARE + MAT_UNKNOWN_SHARE] = MAT_UNKNOWN
    code[(pick < MAT_UNSET_SHARE) | ~has_roof(plan)] = None
    b["mat_toits"] = code


def slope_degrees(plan: Plan) -> np.ndarray:
    """The drawn roof pitch in degrees: 0 for flat roofs (drawn flat whatever ``b["slope"]`` holds)."""
    b = plan.b
    return np.where(b["roof"] == FLAT, 0.0, np.degrees(b["slope"]))
