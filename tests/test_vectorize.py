"""Masks ↔ map polygons through a chip's transform: the georeferencing of segmentation."""

from __future__ import annotations

import numpy as np
import pyogrio
import shapely

from ops.ml.vectorize import chip_transform, polygons_from_probability, rasterize_masks

WINDOW = (660_000.0, 6_360_000.0, 660_019.2, 6_360_019.2)  # 19.2 m square: 0.3 m per pixel at 64 px


def test_a_predicted_blob_becomes_the_polygon_of_its_pixels():
    prob = np.full((64, 64), 0.05, dtype=np.float32)
    prob[20:36, 10:30] = 0.9  # rows 20-35, columns 10-29
    got = polygons_from_probability(prob, WINDOW)
    expected = shapely.box(660_000 + 10 * 0.3, 6_360_019.2 - 36 * 0.3, 660_000 + 30 * 0.3, 6_360_019.2 - 20 * 0.3)
    assert got.geometry is not None and len(shapely.get_parts(got.geometry)) == 1
    assert got.geometry.symmetric_difference(expected).area < 1e-6
    assert abs(got.largest_area_m2 - expected.area) < 1e-6 and abs(got.score - 0.9) < 1e-6
    assert chip_transform(WINDOW, 64) * (10, 20) == (660_003.0, 6_360_013.2)


def test_polygons_are_clipped_to_the_building_and_specks_dropped():
    prob = np.zeros((64, 64), dtype=np.float32)
    prob[5:15, 5:15] = 0.95  # on this building
    prob[50:60, 50:62] = 0.95  # on the neighbour's roof, in the chip's margin
    prob[30, 40] = 0.99  # a one-pixel speck
    building = shapely.box(660_000.6, 6_360_013.0, 660_006.0, 6_360_019.0)
    got = polygons_from_probability(prob, WINDOW, clip=building, min_area_px=4)
    parts = shapely.get_parts(got.geometry)
    assert len(parts) == 1 and parts[0].within(building.buffer(1e-9))
    nothing = polygons_from_probability(np.zeros((64, 64), np.float32), WINDOW)
    assert nothing.geometry is None and nothing.score == 0.0


def test_a_chip_whose_hits_are_all_away_from_the_building_is_not_traced_and_nothing_near_it_is_lost():
    """Blobs anywhere in the chip, buildings anywhere: clipping gives what tracing everything then clipping gives.

    Tracing is skipped when no pixel above the threshold lies within a pixel of the
    building's bounds; this checks the skip never drops a polygon that reaches the building.
    """
    rng = np.random.default_rng(7)
    rows, cols = np.mgrid[:64, :64]
    px, skipped = 0.3, 0
    for _ in range(300):
        r, c, rad = rng.uniform(0, 64), rng.uniform(0, 64), rng.uniform(1.5, 8)
        prob = np.clip(1.2 - np.hypot(rows - r, cols - c) / rad, 0, 1).astype(np.float32)
        x0, y0 = WINDOW[0] + rng.uniform(0, 17) * px / 0.3, WINDOW[1] + rng.uniform(0, 17)
        building = shapely.box(x0, y0, x0 + rng.uniform(0.5, 8), y0 + rng.uniform(0.5, 8))
        clip = building.buffer(0.5)
        got = polygons_from_probability(prob, WINDOW, clip=building, clip_buffer_m=0.5, min_area_px=4)
        whole = polygons_from_probability(prob, WINDOW, min_area_px=0)
        near = [] if whole.geometry is None else shapely.get_parts(shapely.intersection(whole.geometry, clip))
        kept = [g for g in near if g.geom_type == "Polygon" and g.area >= 4 * px * px]
        if not kept:
            assert got.geometry is None
            skipped += whole.geometry is not None
        else:
            assert got.geometry is not None
            assert abs(got.geometry.area - sum(g.area for g in kept)) < 1e-6
    assert skipped > 50  # most blobs miss a small building: the case the skip is for happened


def test_ground_truth_panels_survive_rasterising_and_vectorising(small_dep):
    """Draw each generated panel into its chip, trace it back: same place within a pixel."""
    panels = pyogrio.read_dataframe(small_dep.panels).geometry.to_numpy()[:60]
    assert len(panels) >= 30
    b = shapely.bounds(panels)
    side = np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) + 8.0
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    windows = np.column_stack([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2])
    masks = rasterize_masks(windows, panels, 64)
    for k, (w, mask, truth) in enumerate(zip(windows, masks, panels, strict=True)):
        px = (w[2] - w[0]) / 64
        got = polygons_from_probability(mask.astype(np.float32), w)
        assert got.geometry is not None, k
        # every panel in the window is drawn (neighbours' too): compare the part over this one
        part = max(shapely.get_parts(got.geometry), key=lambda p: p.intersection(truth).area)
        assert part.intersection(truth).area / part.union(truth).area >= 0.8, k
        assert part.centroid.distance(truth.centroid) <= px, k
