"""One settlement at a time: how many there are, how big, and the buildings, trees and streets of each.

A town, a hamlet or a village beyond the imagery is laid out on its own, in
local metres around its centre: lots on a street grid at a given density, a
building in each occupied lot (never overlapping), garden trees and streets.
:mod:`synthetic.layout` then places the settlements in the département.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from synthetic.manifest import FLAT
from synthetic.roofs import ROOF_PROBS


@dataclass
class Settlement:
    """A town, hamlet or outside village in local coordinates (metres, relative to its centre)."""

    kind: str
    n: int
    density: float
    radius: float
    b: dict[str, np.ndarray]
    trees: np.ndarray  # (k, 3): x, y, crown radius
    streets: np.ndarray  # (k, 4): x0, y0, x1, y1
    street_w: float
    outline: np.ndarray  # r_cut, 3 amplitudes, 3 phases, grid rotation
    cx: float = 0.0
    cy: float = 0.0


def make_settlement(rng: np.random.Generator, n: int, density: float, kind: str) -> Settlement:
    """Lay out ``n`` buildings on a street grid at ``density`` buildings/km².

    Lots are cut from blocks (two rows of lots back to back, streets around), the
    lots nearest the centre (with a lumpy outline) are taken, some left empty as
    gardens; each building fits inside its lot with a 1 m margin, so buildings never
    overlap without any geometric test.
    """
    occ = rng.uniform(0.82, 0.95)
    a_lot = occ * 1e6 / density
    k = int(rng.integers(3, 7))
    rho = rng.uniform(0.6, 1.1)
    if kind == "hamlet":
        s = rng.uniform(4.0, 6.0)
    else:  # old dense centres have narrow streets
        s = rng.uniform(5.0, 7.0) if density > 2500 else rng.uniform(6.0, 10.0)
    qa, qb, qc = 2 * k * rho, k * rho * s + 2 * s, s * s - 2 * k * a_lot
    dl = (-qb + math.sqrt(qb * qb - 4 * qa * qc)) / (2 * qa)
    w = rho * dl
    pitch_x, pitch_y = k * w + s, 2 * dl + s
    r_est = math.sqrt(n * 1e6 / density / math.pi)
    ox, oy = rng.uniform(0, pitch_x), rng.uniform(0, pitch_y)
    amps = rng.uniform(0.0, 0.1, 3)
    phases = rng.uniform(0, 2 * math.pi, 3)
    half = 1.8 * r_est + pitch_x + pitch_y
    for _ in range(12):
        bi = np.arange(math.floor((-half - ox) / pitch_x), math.ceil((half - ox) / pitch_x) + 1)
        bj = np.arange(math.floor((-half - oy) / pitch_y), math.ceil((half - oy) / pitch_y) + 1)
        xs = (ox + bi[:, None] * pitch_x + s / 2 + (np.arange(k)[None, :] + 0.5) * w).ravel()
        ys = (oy + bj[:, None] * pitch_y + s / 2 + (np.arange(2)[None, :] + 0.5) * dl).ravel()
        rows = np.tile(np.arange(2), bj.size)
        lx, ly = np.meshgrid(xs, ys)
        lrow = np.broadcast_to(rows[:, None], lx.shape)
        lx, ly, lrow = lx.ravel(), ly.ravel(), lrow.ravel()
        ang = np.arctan2(ly, lx)
        mod = 1.0 + sum(amps[m] * np.cos((m + 1) * ang - phases[m]) for m in range(3))
        r_eff = np.hypot(lx, ly) / mod * np.exp(rng.normal(0.0, 0.04, lx.size))
        order = np.argsort(r_eff, kind="stable")
        occupied = rng.random(lx.size) < occ
        cum = np.cumsum(occupied[order])
        if cum[-1] >= n:
            break
        half *= 1.5
    else:  # pragma: no cover - the loop always finds room
        raise RuntimeError("could not lay out settlement")
    cut = int(np.searchsorted(cum, n)) + 1
    in_town = order[:cut]
    occ_in = occupied[in_town]
    b_lots, e_lots = in_town[occ_in], in_town[~occ_in]

    m = n
    farm = np.zeros(m, dtype=bool)
    if kind == "hamlet":
        farm = rng.random(m) < 0.6
        roof = np.where(farm, rng.choice(3, size=m, p=[0.2, 0.55, 0.25]), rng.choice(3, size=m, p=ROOF_PROBS))
    else:
        roof = rng.choice(3, size=m, p=ROOF_PROBS)
    length = np.where(farm, rng.uniform(14.0, 30.0, m), 6.0 + 24.0 * rng.beta(1.6, 3.2, m))
    aspect = np.where(farm, rng.uniform(1.5, 3.0, m), rng.uniform(1.0, 3.0, m))
    width = np.clip(length / aspect, 4.5, length)
    p_aligned = rng.uniform(0.55, 0.95)
    aligned = rng.random(m) < p_aligned
    psi = np.where(
        aligned,
        rng.integers(0, 2, m) * (math.pi / 2) + rng.normal(0.0, 0.04, m),
        rng.uniform(0.0, math.pi, m),
    )
    avail_x, avail_y = w - 2.0, dl - 2.0
    c, sn = np.abs(np.cos(psi)), np.abs(np.sin(psi))
    ex, ey = length * c + width * sn, length * sn + width * c
    scale = np.minimum(1.0, np.minimum(avail_x / ex, avail_y / ey))
    length, width, ex, ey = length * scale, width * scale, ex * scale, ey * scale
    slack_x, slack_y = np.maximum(avail_x - ex, 0), np.maximum(avail_y - ey, 0)
    dx = (rng.random(m) - 0.5) * slack_x
    t = rng.beta(1.3, 3.0, m)
    row = lrow[b_lots]
    dy = np.where(row == 0, -slack_y / 2 + t * slack_y, slack_y / 2 - t * slack_y)
    bx, by = lx[b_lots] + dx, ly[b_lots] + dy
    shape = ((roof == FLAT) & (rng.random(m) < 0.3) & (width >= 7.0)).astype(np.int8)
    cut_l = rng.uniform(0.35, 0.6, m)
    cut_w = rng.uniform(0.35, 0.6, m)
    flip = rng.integers(0, 4, m)

    # trees: in empty lots (gardens), in some occupied lots, and a few straddling a roof edge
    n_empty_trees = rng.integers(0, 4, e_lots.size)
    el = np.repeat(e_lots, n_empty_trees)
    t1 = np.column_stack(
        [
            lx[el] + (rng.random(el.size) - 0.5) * (w - 2),
            ly[el] + (rng.random(el.size) - 0.5) * (dl - 2),
            rng.uniform(1.8, 4.2, el.size),
        ]
    )
    garden = rng.random(m) < 0.35
    gl = b_lots[garden]
    t2 = np.column_stack(
        [
            lx[gl] + (rng.random(gl.size) - 0.5) * (w - 1),
            ly[gl] + (rng.random(gl.size) - 0.5) * (dl - 1),
            rng.uniform(1.5, 3.8, gl.size),
        ]
    )
    edge = np.flatnonzero(rng.random(m) < 0.08)
    er = rng.uniform(1.8, 3.5, edge.size)
    side = np.where(rng.random(edge.size) < 0.5, -1.0, 1.0)
    along = (rng.random(edge.size) - 0.5) * length[edge] * 0.6
    off = side * (width[edge] / 2 + 0.15 * er)
    t3 = np.column_stack(
        [
            bx[edge] + along * np.cos(psi[edge]) - off * np.sin(psi[edge]),
            by[edge] + along * np.sin(psi[edge]) + off * np.cos(psi[edge]),
            er,
        ]
    )
    trees = np.concatenate([t1, t2, t3])

    lot_r = np.hypot(lx[in_town], ly[in_town]).max() + 0.5 * math.hypot(w, dl)
    radius = float(lot_r + 1.0)
    # streets run along the block edges, only as far as the lots of the town reach
    streets = np.zeros((0, 4))
    if kind != "hamlet":
        tx, ty = lx[in_town], ly[in_town]
        segs = []
        for sx in ox + bi * pitch_x:
            near = np.abs(tx - sx) < (s + w) / 2 + 0.5
            if near.any():
                segs.append([sx, ty[near].min() - dl / 2 - s / 2, sx, ty[near].max() + dl / 2 + s / 2])
        for sy in oy + bj * pitch_y:
            near = np.abs(ty - sy) < (s + dl) / 2 + 0.5
            if near.any():
                segs.append([tx[near].min() - w / 2 - s / 2, sy, tx[near].max() + w / 2 + s / 2, sy])
        streets = np.array(segs, dtype=float).reshape(-1, 4)

    phi = rng.uniform(0.0, math.pi / 2)
    cp, sp = math.cos(phi), math.sin(phi)

    def rot(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return x * cp - y * sp, x * sp + y * cp

    bx, by = rot(bx, by)
    trees[:, 0], trees[:, 1] = rot(trees[:, 0], trees[:, 1])
    if streets.size:
        streets[:, 0], streets[:, 1] = rot(streets[:, 0], streets[:, 1])
        streets[:, 2], streets[:, 3] = rot(streets[:, 2], streets[:, 3])
    b = {
        "x": bx,
        "y": by,
        "length": length,
        "width": width,
        "theta": np.mod(psi + phi, math.pi),
        "roof": roof.astype(np.int8),
        "farm": farm,
        "shape": shape,
        "cut_l": cut_l,
        "cut_w": cut_w,
        "flip": flip.astype(np.int8),
    }
    # the outline, so the ground of gardens follows the same lumpy shape as the lots
    outline = np.array([float(r_eff[order[cut - 1]]), *amps, *phases, phi])
    return Settlement(kind, n, density, radius, b, trees, streets, s, outline)


def town_sizes(rng: np.random.Generator, total: int) -> list[int]:
    """Split ``total`` buildings into a Zipf-like set of towns (one big town, many villages)."""
    if total <= 0:
        return []
    n_towns = int(max(1, min(round(math.sqrt(total) / 5), 400)))
    w = (1.0 / np.arange(1, n_towns + 1)) * rng.uniform(0.7, 1.3, n_towns)
    sizes = np.maximum(np.floor(w / w.sum() * total).astype(int), 1)
    sizes[0] += total - int(sizes.sum())
    while sizes[0] < 1:  # pragma: no cover - only for absurdly small totals
        sizes = sizes[:-1]
        sizes[0] += total - int(sizes.sum())
    return sorted((int(v) for v in sizes), reverse=True)


def town_density(rng: np.random.Generator, n: int) -> float:
    """Bigger towns are denser, as in France: villages ~1,000/km², city centres up to 5,000/km²."""
    d = 900.0 * (max(n, 1) / 20.0) ** 0.3 * math.exp(rng.normal(0.0, 0.2))
    return float(np.clip(d, 500.0, 5000.0))


def split_sizes(rng: np.random.Generator, total: int, lo: int, hi: int) -> list[int]:
    """Cut ``total`` into chunks of lo..hi (the last one takes what is left)."""
    out: list[int] = []
    while total > 0:
        k = min(total, int(rng.integers(lo, hi + 1)))
        out.append(k)
        total -= k
    return out
