"""The ground under a tile: fields, hedges, woods, town gardens and farmyards, with their texture codes.

Computed on a ~1 m grid from global coordinates (hashes and value noise), then
upsampled, so it is continuous across tile edges and cheap even for 10,000 px
tiles. :func:`render_ground` is the first layer :func:`synthetic.render.render_tile`
draws on.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from synthetic.noise import crc, hash2, hash_unit, value_noise
from synthetic.plan import Plan
from synthetic.textures import TEX_FOLIAGE, TEX_GROUND
from synthetic.tiles import TileJob

_FIELD_COLOURS = np.array(
    [
        (98, 118, 64),  # meadow
        (122, 138, 74),  # light meadow
        (182, 168, 112),  # wheat
        (150, 126, 94),  # ploughed
        (128, 110, 82),  # dark soil
        (86, 104, 58),  # pasture
        (166, 156, 104),  # stubble
        (60, 80, 48),  # wood
    ],
    dtype=np.float32,
)
_FIELD_WEIGHTS = np.array([0.2, 0.16, 0.14, 0.12, 0.08, 0.12, 0.1, 0.08])
_GARDEN = np.array((96, 116, 66), dtype=np.float32)
_PAVED = np.array((142, 138, 130), dtype=np.float32)
_YARD = np.array((146, 136, 114), dtype=np.float32)
_HEDGE = np.array((52, 72, 42), dtype=np.float32)


def render_ground(plan: Plan, job: TileJob) -> tuple[Image.Image, Image.Image]:
    """Background (fields, hedges, woods, town gardens and yards) and its texture codes, full size.

    Computed on a ~1 m grid from global coordinates (hashes, value noise), then
    upsampled, so it is continuous across tile edges and cheap for 10,000 px tiles.
    """
    tp = plan.tile_px
    rgb, tex, f = _ground_coarse(plan, job)
    box = (1.0, 1.0, 1.0 + tp / f, 1.0 + tp / f)  # coarse cell k+1 covers pixels [k*f, (k+1)*f)
    img = Image.fromarray(rgb).resize((tp, tp), Image.Resampling.BILINEAR, box=box)
    tex_img = Image.fromarray(tex).resize((tp, tp), Image.Resampling.NEAREST, box=box)
    return img, tex_img


def _ground_coarse(plan: Plan, job: TileJob) -> tuple[np.ndarray, np.ndarray, int]:
    """The ground on a coarse grid (one cell of ``f`` pixels, one cell of padding all round)."""
    res, tp = plan.resolution, plan.tile_px
    f = max(1, int(round(1.0 / res)))
    cs = f * res
    mc = -(-tp // f)
    n = mc + 2
    # coordinates relative to the imagery's SW corner (the same for every tile), so float32 is exact enough
    x0, ytop = plan.tile_origin(job.ix, job.iy)
    xs = (x0 - plan.origin_x) + (np.arange(n) - 1 + 0.5) * cs
    ys = (ytop - plan.origin_y) - (np.arange(n) - 1 + 0.5) * cs
    salt = crc(f"{plan.departement}:{plan.seed}")
    ca, sa = math.cos(plan.field_angle), math.sin(plan.field_angle)
    x32, y32 = xs.astype(np.float32), ys.astype(np.float32)
    u = x32[None, :] * np.float32(ca) + y32[:, None] * np.float32(sa)
    v = -x32[None, :] * np.float32(sa) + y32[:, None] * np.float32(ca)
    pu, pv = 190.0, 120.0
    iu, iv = np.floor(u / pu), np.floor(v / pv)
    fu, fv = u / pu - iu, v / pv - iv
    h = hash2(iu, iv, salt)
    split = (h & np.uint64(1)).astype(bool)
    sub = split & (fu > 0.5)
    pid = hash2(iu * 2 + sub, iv, salt + 1)
    cum = np.cumsum(_FIELD_WEIGHTS) / _FIELD_WEIGHTS.sum()
    kind = np.searchsorted(cum, hash_unit(pid)).clip(0, len(_FIELD_WEIGHTS) - 1)
    rgb = _FIELD_COLOURS[kind] * (0.9 + 0.2 * hash_unit(pid >> np.uint64(7)))[..., None]  # float32
    stripes = (kind >= 2) & (kind <= 6)
    period = 3.0 + 4.0 * hash_unit(pid >> np.uint64(3))
    rgb *= (1.0 + 0.05 * np.where(stripes, np.sin(np.float32(2 * math.pi) * v / period), 0.0))[..., None]
    del u, v, iu, iv, sub, pid, stripes, period
    tex = np.where(kind == 7, TEX_FOLIAGE, TEX_GROUND).astype(np.uint8)
    du = np.minimum(fu, 1 - fu) * pu
    du = np.where(split, np.minimum(du, np.abs(fu - 0.5) * pu), du)
    dv = np.minimum(fv, 1 - fv) * pv
    hedge = ((du < 1.6) & (hash_unit(h >> np.uint64(5)) < 0.5)) | ((dv < 1.6) & (hash_unit(h >> np.uint64(9)) < 0.4))
    rgb[hedge] = _HEDGE
    tex[hedge] = TEX_FOLIAGE

    n1 = value_noise(xs, ys, 37.0, salt + 2)
    n2 = value_noise(xs, ys, 9.0, salt + 3)
    for si in job.settlements:
        sx, sy, sr, skind = plan.settlements[si, :4]
        sx, sy = sx - plan.origin_x, sy - plan.origin_y
        r_cut, amps, phases, phi = (
            plan.settlements[si, 4],
            plan.settlements[si, 5:8],
            plan.settlements[si, 8:11],
            plan.settlements[si, 11],
        )
        c_lo, c_hi = np.searchsorted(xs, [sx - sr - 50, sx + sr + 50])
        r_lo, r_hi = np.searchsorted(-ys, [-(sy + sr + 50), -(sy - sr - 50)])
        if c_hi <= c_lo or r_hi <= r_lo:
            continue
        ddx, ddy = x32[None, c_lo:c_hi] - np.float32(sx), y32[r_lo:r_hi, None] - np.float32(sy)
        d = np.hypot(ddx, ddy)
        a1, a2 = n1[r_lo:r_hi, c_lo:c_hi], n2[r_lo:r_hi, c_lo:c_hi]
        if skind == 0:  # gardens, with paved yards and car parks more common towards the centre
            ang = np.arctan2(ddy, ddx) - phi
            mod = 1.0 + sum(amps[q] * np.cos((q + 1) * ang - phases[q]) for q in range(3))
            d = d / mod
            edge = r_cut + 14.0 + 14.0 * a1
            m = np.clip((edge - d) / 8.0, 0.0, 1.0)
            t = np.clip(1.5 * a2 - 0.25 + 0.45 * (1 - d / max(sr, 1.0)), 0.0, 1.0)
            garden = _GARDEN * (1.0 + 0.15 * a1)[..., None]
            col = garden * (1 - t)[..., None] + _PAVED * t[..., None]
        else:  # farmyard around the buildings
            edge = 0.55 * sr + 12.0 * a1
            m = np.clip((edge - d) / 10.0, 0.0, 0.8)
            col = np.broadcast_to(_YARD, m.shape + (3,))
        blk = rgb[r_lo:r_hi, c_lo:c_hi]
        rgb[r_lo:r_hi, c_lo:c_hi] = blk * (1 - m)[..., None] + col * m[..., None]
        tex[r_lo:r_hi, c_lo:c_hi] = np.where(m > 0.5, TEX_GROUND, tex[r_lo:r_hi, c_lo:c_hi])
    rgb *= (1.0 + 0.07 * n1 + 0.05 * n2)[..., None].astype(np.float32)
    return np.clip(rgb, 1, 255).astype(np.uint8), tex, f
