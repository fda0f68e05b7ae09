"""From chip pixels to map geometries and back.

A chip is the square window ``(minx, miny, maxx, maxy)`` of the mosaic (native
CRS, stored in the chips index) resampled to S×S pixels, so its affine
transform is known exactly: that is all that is needed to turn a predicted
mask into georeferenced polygons, and ground-truth polygons into training
masks. Everything here works in the native CRS; reprojection to WGS84 happens
once, when rows are written (:func:`ops.geo.reproject.to_wgs84_wkb`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import shapely
from affine import Affine
from rasterio import features


def chip_transform(window: Sequence[float], size: int) -> Affine:
    """Affine transform of a chip: pixel (col, row) → map (x, y), row 0 at the top."""
    minx, miny, maxx, maxy = (float(v) for v in window)
    return Affine((maxx - minx) / size, 0.0, minx, 0.0, -(maxy - miny) / size, maxy)


def rasterize_masks(
    windows: np.ndarray, polygons: np.ndarray, size: int, tree: shapely.STRtree | None = None
) -> np.ndarray:
    """Binary masks (N, S, S) uint8: which chip pixels' centres fall inside any of ``polygons``.

    Every polygon visible in a chip is drawn, not only those of its building:
    the model must learn what a panel looks like wherever it is in the chip.
    """
    tree = tree or shapely.STRtree(polygons)
    out = np.zeros((len(windows), size, size), dtype=np.uint8)
    for i, w in enumerate(np.asarray(windows, dtype="float64")):
        hits = tree.query(shapely.box(*w))
        if len(hits):
            out[i] = features.rasterize(
                ((g, 1) for g in polygons[hits]),
                out_shape=(size, size),
                transform=chip_transform(w, size),
                dtype="uint8",
            )
    return out


def _pixel_window(bounds: Sequence[float], tr: Affine, size: int) -> tuple[slice, slice]:
    """The chip's rows and columns within a pixel of ``bounds`` (map coordinates).

    Traced polygons follow pixel edges and are simplified by half a pixel, so
    none of the pixels outside this window can give a polygon that reaches ``bounds``.
    """
    minx, miny, maxx, maxy = bounds
    if not all(math.isfinite(v) for v in bounds):  # an empty geometry: nothing can reach it
        return slice(0, 0), slice(0, 0)
    c0, c1 = math.floor((minx - tr.c) / tr.a) - 1, math.ceil((maxx - tr.c) / tr.a) + 1
    r0, r1 = math.floor((maxy - tr.f) / tr.e) - 1, math.ceil((miny - tr.f) / tr.e) + 1
    return slice(max(r0, 0), max(min(r1, size), 0)), slice(max(c0, 0), max(min(c1, size), 0))


@dataclass
class ChipPolygons:
    """The polygons of one class found in one chip, clipped to the building."""

    geometry: shapely.Geometry | None  # MultiPolygon in the native CRS, None when nothing was found
    largest_area_m2: float
    score: float  # mean probability of the class over the largest polygon's pixels


def polygons_from_probability(
    prob: np.ndarray,
    window: Sequence[float],
    *,
    threshold: float = 0.5,
    min_area_px: int = 4,
    clip: shapely.Geometry | None = None,
    clip_buffer_m: float = 0.0,
) -> ChipPolygons:
    """Vectorise one class's probability map (S×S) into map polygons.

    Pixels above ``threshold`` are traced along pixel edges, simplified by
    half a pixel (the staircase of a straight edge goes, the corners stay),
    specks under ``min_area_px`` pixels dropped, and the rest clipped to
    ``clip`` (the building footprint) grown by ``clip_buffer_m``: a panel on the
    neighbour's roof, visible in the chip's margin, is not this building's.
    """
    size = prob.shape[-1]
    mask = (prob > threshold).astype(np.uint8)
    if not mask.any():
        return ChipPolygons(None, 0.0, 0.0)
    tr = chip_transform(window, size)
    if clip is not None:
        minx, miny, maxx, maxy = clip.bounds
        near = (minx - clip_buffer_m, miny - clip_buffer_m, maxx + clip_buffer_m, maxy + clip_buffer_m)
        if not mask[_pixel_window(near, tr, size)].any():
            # nothing near the building (a panel on the neighbour's roof): what tracing would find, the clip
            # removes; the buffer is only drawn for the chips traced
            return ChipPolygons(None, 0.0, 0.0)
    px_area = abs(tr.a * tr.e)
    polys = [shapely.geometry.shape(g) for g, v in features.shapes(mask, mask=mask.astype(bool), transform=tr) if v]
    geoms = shapely.simplify(np.array(polys, dtype=object), abs(tr.a) / 2)
    geoms = geoms[shapely.area(geoms) >= min_area_px * px_area]
    if clip is not None and len(geoms):
        geoms = shapely.intersection(geoms, clip.buffer(clip_buffer_m) if clip_buffer_m else clip)
        geoms = np.array([p for g in geoms for p in shapely.get_parts(g) if p.geom_type == "Polygon"], dtype=object)
        if len(geoms):
            geoms = geoms[shapely.area(geoms) >= min_area_px * px_area]
    if not len(geoms):
        return ChipPolygons(None, 0.0, 0.0)
    areas = shapely.area(geoms)
    big = geoms[int(np.argmax(areas))]
    inside = features.rasterize([(big, 1)], out_shape=(size, size), transform=tr, dtype="uint8").astype(bool)
    score = float(prob[inside].mean()) if inside.any() else float(prob[mask.astype(bool)].mean())
    return ChipPolygons(shapely.multipolygons(list(geoms)), float(areas.max()), score)
