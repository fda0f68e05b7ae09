"""Drawing one orthophoto tile: roads, shadows, roofs, panels, trees, then grain and soft focus.

:func:`render_tile` returns the tile as an (H, W, 3) uint8 array; it holds one
tile in memory and works in row strips for the noise, so 10,000 px tiles fit in
a worker. Roof planes are computed for all the tile's buildings at once, then
drawn with PIL. Writing the array is :mod:`synthetic.writers`' job.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from synthetic.ground import render_ground
from synthetic.manifest import FLAT, HIP
from synthetic.noise import keyed_rng
from synthetic.plan import Plan
from synthetic.textures import (
    BLOT_LUT,
    SHADE_BLUE,
    SHADE_LUT,
    TEX_BLOTCH,
    TEX_FOLIAGE,
    TEX_ROAD,
    TEX_SIGMA,
    TEX_SMOOTH,
)
from synthetic.tiles import TileJob

_ASPHALT = (96, 96, 98)
_SIDEWALK = (150, 146, 140)


def render_tile(plan: Plan, job: TileJob) -> np.ndarray:
    """Draw one tile (H, W, 3 uint8): ground, roads, shadows, roofs, trees, noise, soft focus."""
    res, tp = plan.resolution, plan.tile_px
    x0, ytop = plan.tile_origin(job.ix, job.iy)
    img, tex = render_ground(plan, job)
    draw, tdraw = ImageDraw.Draw(img), ImageDraw.Draw(tex)
    scale = np.array([1.0 / res, -1.0 / res])
    off = np.array([x0, ytop])

    def px(p: np.ndarray) -> np.ndarray:
        return (p - off) * scale

    # roads: sidewalk then asphalt
    for k in job.roads:
        x_a, y_a, x_b, y_b, wd = plan.roads[k]
        seg = _flat(px(np.array([[x_a, y_a], [x_b, y_b]])))
        draw.line(seg, fill=_SIDEWALK, width=max(1, int(round((wd + 3.0) / res))))
        draw.line(seg, fill=_ASPHALT, width=max(1, int(round(wd / res))))
        tdraw.line(seg, fill=TEX_ROAD, width=max(1, int(round((wd + 3.0) / res))))

    b = plan.b
    bi = job.buildings
    rings = px(b["ring"][bi])  # (m, 6, 2)
    shadows = b["shadow"][bi] * scale  # (m, 2) in pixels
    nv = b["nv"][bi].tolist()
    roofs = b["roof"][bi].tolist()
    planes = b["plane_rgb"][bi].tolist()
    texc = b["tex"][bi].tolist()
    det = b["detail"][bi]
    hip_k = b["hip_k"][bi]
    sdir = np.array([-math.sin(plan.sun_az), math.cos(plan.sun_az)])  # shadow direction in pixels (y down)
    sun_px = -sdir

    # --- shadows: a mask, then the ground under it is darkened (bluish), keeping its texture
    mask = Image.new("L", (tp, tp), 0)
    mdraw = ImageDraw.Draw(mask)
    for j in range(len(bi)):
        r = rings[j, : nv[j]]
        s = shadows[j]
        rs = r + s
        mdraw.polygon(_flat(rs), fill=255)
        for q in range(nv[j]):
            p0, p1 = r[q], r[(q + 1) % nv[j]]
            mdraw.polygon(
                [p0[0], p0[1], p1[0], p1[1], p1[0] + s[0], p1[1] + s[1], p0[0] + s[0], p0[1] + s[1]], fill=255
            )
    tel = math.tan(plan.sun_el)
    t_all = plan.trees[job.trees]
    t_px = px(t_all[:, :2]) if len(t_all) else np.zeros((0, 2))
    t_r = t_all[:, 2] / res
    # a crown's shadow: the crown disc moved by (height - radius) / tan(elevation), joined to the trunk
    t_sh = ((t_all[:, 3] - t_all[:, 2]) / tel / res)[:, None] * sdir[None, :] if len(t_all) else np.zeros((0, 2))
    for j in range(len(t_all)):
        tx, ty = t_px[j]
        cx, cy = t_px[j] + t_sh[j]
        rr = t_r[j]
        mdraw.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], fill=255)
        mdraw.line([tx, ty, cx, cy], fill=255, width=max(1, int(rr * 0.8)))
    # the mask is applied with the texture below; roofs and crowns drawn later clear it under them
    draw = ImageDraw.Draw(img)

    # --- roofs: the geometry of every plane is computed for the whole tile at once
    line_w = max(1, int(round(0.25 / res)))
    m_b = len(bi)
    quad = rings[:, :4]
    p0, p1, p2, p3 = quad[:, 0], quad[:, 1], quad[:, 2], quad[:, 3]
    a_mid, b_mid = (p0 + p3) / 2, (p1 + p2) / 2
    half_len = np.linalg.norm(p1 - p0, axis=1) / 2
    half_w = np.linalg.norm(p3 - p0, axis=1) / 2
    is_hip = b["roof"][bi] == HIP
    t_in = np.where(is_hip, np.minimum(0.5, half_w * hip_k / np.maximum(2 * half_len, 1e-6)), 0.0)[:, None]
    r0 = a_mid + t_in * (b_mid - a_mid)  # ridge ends: the gable's run end to end, the hip's stop short
    r1 = b_mid - t_in * (b_mid - a_mid)
    plane_a = np.stack([p0, p1, r1, r0], 1).reshape(m_b, 8).tolist()
    plane_b = np.stack([r0, r1, p2, p3], 1).reshape(m_b, 8).tolist()
    end_u = np.stack([p1, p2, r1], 1).reshape(m_b, 6).tolist()
    end_v = np.stack([p3, p0, r0], 1).reshape(m_b, 6).tolist()
    ridge_l = np.stack([r0, r1], 1).reshape(m_b, 4).tolist()
    hip_l = np.stack([p0, r0, p3, r0, p1, r1, p2, r1], 1).reshape(m_b, 4, 4).tolist()
    outline = np.concatenate([rings, rings[:, :1]], axis=1).reshape(m_b, 14).tolist()
    ax_u = (p1 - p0) / np.maximum(np.linalg.norm(p1 - p0, axis=1), 1e-9)[:, None]
    ax_v = np.stack([-ax_u[:, 1], ax_u[:, 0]], 1)
    chim_c = r0 + det[:, 10:11] * (r1 - r0) + (det[:, 11:12] - 0.5) * 0.25 * (p3 - p0)
    ch = 0.45 / res
    chim = np.stack(
        [
            chim_c - ch * ax_u - ch * ax_v,
            chim_c + ch * ax_u - ch * ax_v,
            chim_c + ch * ax_u + ch * ax_v,
            chim_c - ch * ax_u + ch * ax_v,
        ],
        1,
    )
    chim_sh = (chim + sdir * (1.2 / res / tel)).reshape(m_b, 8).tolist()
    chim = chim.reshape(m_b, 8).tolist()
    has_chim = (det[:, 9] < 0.35).tolist()
    has_parapet = (det[:, 0] < 0.6).tolist()
    has_panel = b["has_panel"][bi].tolist()
    panel_px = px(b["panel"][bi])
    panel_rgb = b["panel_rgb"][bi].tolist()
    for j in range(m_b):
        k = nv[j]
        ring_j = outline[j][: 2 * k]
        pl = planes[j]
        tdraw.polygon(ring_j, fill=texc[j])
        mdraw.polygon(ring_j, fill=0)
        if roofs[j] == FLAT:
            draw.polygon(ring_j, fill=tuple(pl[0]))
            if has_parapet[j]:
                draw.line(outline[j][: 2 * k] + outline[j][:2], fill=tuple(pl[4]), width=line_w, joint="curve")
            if k == 4:
                _rooftop_boxes(draw, rings[j, :4], det[j], res, sdir)
            if has_panel[j]:
                _solar_panel(draw, tdraw, panel_px[j], tuple(panel_rgb[j]), res)
            continue
        draw.polygon(plane_a[j], fill=tuple(pl[0]))
        draw.polygon(plane_b[j], fill=tuple(pl[1]))
        ridge = tuple(pl[4])
        if roofs[j] == HIP:
            draw.polygon(end_u[j], fill=tuple(pl[2]))
            draw.polygon(end_v[j], fill=tuple(pl[3]))
            for seg in hip_l[j]:
                draw.line(seg, fill=ridge, width=1)
        draw.line(ridge_l[j], fill=ridge, width=line_w)
        if has_chim[j]:
            draw.polygon(chim_sh[j], fill=(30, 30, 34))
            draw.polygon(chim[j], fill=(60, 52, 48))
        if has_panel[j]:
            _solar_panel(draw, tdraw, panel_px[j], tuple(panel_rgb[j]), res)

    # --- trees, over everything: a few lobes and a sunlit highlight
    for j in range(len(t_all)):
        cx, cy = t_px[j]
        rr = t_r[j]
        col = plan.tree_col[job.trees[j]].tolist()
        dark = tuple(int(c * 0.75) for c in col)
        hl = tuple(min(255, int(c * 1.25)) for c in col)
        dseed = (t_all[j, 0] * 7.31 + t_all[j, 1] * 3.17) % 1.0  # lobe layout fixed by position: same on every tile
        draw.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], fill=dark)
        tdraw.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], fill=TEX_FOLIAGE)
        mdraw.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], fill=0)
        for q in range(3):
            ang = 2 * math.pi * (dseed + q / 3)
            lr = rr * 0.6
            lx, ly = cx + math.cos(ang) * rr * 0.4, cy + math.sin(ang) * rr * 0.4
            draw.ellipse([lx - lr, ly - lr, lx + lr, ly + lr], fill=tuple(col))
        hx, hy = cx + sun_px[0] * rr * 0.3, cy + sun_px[1] * rr * 0.3
        hr = rr * 0.45
        draw.ellipse([hx - hr, hy - hr, hx + hr, hy + hr], fill=hl)

    # --- shadows (darker, a little bluish), multiplicative blotches (3 px grain, keeps hue) and
    # white grain by surface type, then a slight blur: soft, JPEG-like, and it compresses like real
    # imagery (~2-3x with DEFLATE). Done in row strips so only one tile-sized array is live.
    arr = np.array(img)
    del img, draw
    tex_arr = np.asarray(tex)
    mask_arr = np.asarray(mask)
    del tex, mask, mdraw, tdraw
    rng = keyed_rng(plan.seed, plan.departement, plan.n, plan.tile_px, "tile", job.ix, job.iy)
    bf = 3
    nb = -(-tp // bf) + 1
    blot = Image.fromarray(np.clip(rng.normal(128.0, 32.0, (nb, nb)), 0, 255).astype(np.uint8))
    step = 512
    for r0_ in range(0, tp, step):
        r1_ = min(tp, r0_ + step)
        t = tex_arr[r0_:r1_]
        m = mask_arr[r0_:r1_]
        grain = rng.standard_normal(t.shape, dtype=np.float32)
        grain *= TEX_SIGMA[t]
        fac = np.asarray(blot.resize((tp, r1_ - r0_), Image.Resampling.BILINEAR, box=(0, r0_ / bf, tp / bf, r1_ / bf)))
        fac = BLOT_LUT[fac] * TEX_BLOTCH[t]
        fac += 1.0
        fac *= SHADE_LUT[m]
        chunk = arr[r0_:r1_].astype(np.float32)
        chunk *= fac[..., None]
        chunk += grain[..., None]
        chunk[..., 2] += SHADE_BLUE[m]
        np.clip(chunk, 1, 255, out=chunk)
        arr[r0_:r1_] = chunk
    del tex_arr, mask_arr, blot, chunk, grain, fac
    img = Image.fromarray(arr)
    del arr
    img = img.filter(ImageFilter.BoxBlur(0.5))  # [1 2 1]/4 each way, 3x cheaper than Gaussian
    arr = np.array(img)
    del img
    np.maximum(arr, 1, out=arr)  # 0 is nodata: only the hole may hold it
    if plan.hole is not None and tuple(plan.hole["tile"]) == (job.ix, job.iy):
        c0, r0_, c1, r1_ = plan.hole["pixels"]
        arr[r0_:r1_, c0:c1] = 0
    return arr


def _flat(points: np.ndarray) -> list[float]:
    """PIL wants a flat [x0, y0, x1, y1, ...] list."""
    return points.ravel().tolist()


def _box(
    draw: ImageDraw.ImageDraw,
    centre: np.ndarray,
    axis: np.ndarray,
    half: float,
    colour: tuple[int, int, int],
    shadow: np.ndarray,
    shadow_colour: tuple[int, int, int],
) -> None:
    """A small square (chimney, AC unit) aligned with ``axis``, with its cast shadow."""
    u = axis / max(float(np.linalg.norm(axis)), 1e-9)
    v = np.array([-u[1], u[0]])
    pts = np.array(
        [
            centre - half * u - half * v,
            centre + half * u - half * v,
            centre + half * u + half * v,
            centre - half * u + half * v,
        ]
    )
    draw.polygon(_flat(pts + shadow), fill=shadow_colour)
    draw.polygon(_flat(pts), fill=colour)


def _rooftop_boxes(draw: ImageDraw.ImageDraw, r: np.ndarray, d: np.ndarray, res: float, sdir: np.ndarray) -> None:
    """0-3 AC units / skylights on a flat rectangular roof."""
    p0, p1, _, p3 = r
    u, v = p1 - p0, p3 - p0
    size = min(np.linalg.norm(u), np.linalg.norm(v))
    half = min((0.5 + 0.9 * d[8]) / res, 0.12 * size)
    if half < 1.5:
        return
    for q in range(int(d[1] * 4)):
        c = p0 + (0.2 + 0.6 * d[2 + 2 * q]) * u + (0.2 + 0.6 * d[3 + 2 * q]) * v
        shade = 190 + int(40 * d[12])
        _box(draw, c, u, half, (shade, shade, shade + 4), sdir * (1.0 / res), (70, 70, 76))


def _solar_panel(
    draw: ImageDraw.ImageDraw, tdraw: ImageDraw.ImageDraw, quad: np.ndarray, rgb: tuple[int, int, int], res: float
) -> None:
    """A dark blue array with a light frame and the grid of its modules (about 1.0 × 1.7 m)."""
    pts = _flat(quad)
    draw.polygon(pts, fill=rgb)
    tdraw.polygon(pts, fill=TEX_SMOOTH)
    grid = tuple(min(255, int(c * 1.6) + 12) for c in rgb)
    p0, p1, _, p3 = quad
    u, v = p1 - p0, p3 - p0
    nu = max(1, int(round(np.linalg.norm(u) * res / 1.0)))
    nv = max(1, int(round(np.linalg.norm(v) * res / 1.7)))
    for k in range(1, nu):
        q = p0 + u * k / nu
        draw.line(_flat(np.array([q, q + v])), fill=grid, width=1)
    for k in range(1, nv):
        q = p0 + v * k / nv
        draw.line(_flat(np.array([q, q + u])), fill=grid, width=1)
    draw.line(pts + pts[:2], fill=(150, 152, 160), width=1)
