"""Synthetic French département: IGN-like building footprints, 20 cm orthophotos and roof labels.

Why this exists: real BD TOPO / BD ORTHO extracts are large, slow to download and
carry no roof-type ground truth, yet the demo, the tests and the benchmarks need a
département that *behaves* like IGN data (same formats, CRS, column names, tile
naming, the same kinds of broken geometries and imagery gaps) while the answer is
known. Everything here is deterministic, so a test can assert exact counts and a
benchmark can be re-run on identical inputs.

What is generated under ``DIR/<dep>/``:

* ``footprints/batiment.gpkg`` -- layer ``batiment``, 2D MultiPolygon in the
  département's native CRS, BD TOPO v3 column names (``cleabs``, ``nature``,
  ``usage_1``, ``usage_2``, ``hauteur``, ``nombre_d_etages``, ``date_creation``,
  ``etat_de_l_objet``), with deliberate defects (bow-tie polygons, zero-area
  collinear polygons, empty / null geometries);
* ``ortho/*.tif`` -- BD ORTHO-like RGB GeoTIFF tiles (tiled 256x256, DEFLATE +
  predictor 2, nodata 0), one of which has a rectangular nodata hole; a band of
  villages lies beyond the imagery on purpose;
* ``solar_panels.gpkg`` -- layer ``solar_panels``: one Polygon per solar-panel array
  drawn on a roof (``cleabs`` of the building it sits on), in the native CRS: the
  ground truth of the segmentation model (about a third of the imaged rectangular
  roofs carry one, on one plane of a pitched roof or anywhere on a flat one);
* ``labels.csv`` -- one row per footprint: ``cleabs,roof_type`` plus
  ``orientation_deg``, ``roof_colour``, ``in_nodata_hole`` and ``category`` (which
  of the manifest ``counts`` the building falls in); buildings that are not drawn
  (empty, unrepairable) carry a random class;
* ``manifest.json`` -- written last (so an interrupted run is regenerated);
  :func:`load_manifest` reads it back. ``counts`` are exact: ``invalid_repairable``
  (bow-ties, ``make_valid`` gives polygons), ``invalid_unrepairable`` (collinear,
  ``make_valid`` gives lines), ``empty`` (``MULTIPOLYGON EMPTY`` or null),
  ``outside_imagery``, ``nodata_area`` (chip window = bbox + 2 m entirely inside
  the hole, whose edges keep >= 2 px away from every chip window) and ``normal``.

Towns are laid out on street grids with a density of 500-5,000 buildings/km²,
separated by countryside with a few farms per km², and the whole département scales
with the number of buildings, so 300 and 300,000 buildings look alike. Buildings
never overlap (each one sits in its own lot with a 1 m margin). Roofs are drawn
from the class (flat: one gravel plane with parapet and rooftop boxes; gable: two
planes lit differently with a ridge; hip: four planes with a shorter ridge), with
shared colour palettes, sun shadows, trees and per-pixel texture, so a model has a
real but learnable task. Imagery costs ~120-200 ns per pixel on one core (about
1 min for 20,000 buildings over 5,000 px tiles), one tile in memory per worker.

Usage
-----
From the repository root::

    python -m ops.synth --out data/sample --departement 12 --buildings 3000 --seed 0
    python -m ops.synth --out /tmp/bench --departement 2A --buildings 300000 --tile-px 10000 --workers 2

From Python::

    from pathlib import Path
    from ops.synth import generate_departement, load_manifest

    m = generate_departement(Path("data/sample"), "12", 3000, seed=0)
    m.footprints, m.ortho_dir, m.labels, m.counts   # paths and expected defect counts
    m = load_manifest(Path("data/sample/12"))       # same object, from manifest.json

A second call with the same parameters returns the existing manifest without
regenerating (pass ``overwrite=True`` to force). Same (département, buildings, seed,
tile_px, resolution) gives identical footprint coordinates, attributes, labels and
image bytes, whatever the number of workers. Tile names follow BD ORTHO
(``{dep}-2024-{x_km}-{y_km}-LA93-0M20.tif``, upper-left corner); when a tile is not a
whole number of km (2,500 px at 20 cm = 500 m) the km get three decimals
(``12-2024-0660.500-6360.000-LA93-0M20.tif``). Only tiles holding at least one
imaged building are written, so the mosaic can have empty (missing) tiles.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ops.geo.departements import DEPARTEMENTS, check_departement, native_epsg

ROOF_CLASSES: tuple[str, ...] = ("flat", "gable", "hip")
COUNT_KEYS: tuple[str, ...] = (
    "invalid_repairable",
    "invalid_unrepairable",
    "empty",
    "outside_imagery",
    "nodata_area",
    "normal",
)
#: Bumped whenever the output for given parameters changes, so stale samples are regenerated.
GENERATOR_VERSION = 2
#: Margin around a footprint's bounding box that defines its image chip (used for ``nodata_area``).
CHIP_MARGIN_M = 2.0
ORTHO_YEAR = 2024
MANIFEST_NAME = "manifest.json"
#: Share of the eligible roofs (imaged, rectangular, room for a 2 × 1.6 m array) that carry solar panels.
PANEL_SHARE = 0.33
PANEL_LAYER = "solar_panels"

_FLAT, _GABLE, _HIP = 0, 1, 2
# category codes, in COUNT_KEYS order
_CAT_REPAIRABLE, _CAT_UNREPAIRABLE, _CAT_EMPTY, _CAT_OUTSIDE, _CAT_NODATA, _CAT_NORMAL = range(6)

# --------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------


@dataclass
class SampleManifest:
    """Where a generated département lives and what a reader should find in it.

    ``counts`` are the expected per-category building counts (they sum to
    ``n_buildings``), so tests can check a pipeline's statuses exactly.
    """

    departement: str
    root: Path
    footprints: Path
    ortho_dir: Path
    labels: Path
    epsg: int
    n_buildings: int
    counts: dict[str, int]
    classes: list[str]
    seed: int
    tile_px: int = 2500
    resolution: float = 0.2
    n_tiles: int = 0
    area_km2: float = 0.0
    density_per_km2: float = 0.0
    imagery_bounds: list[float] = field(default_factory=list)
    nodata_hole: dict[str, Any] | None = None
    class_counts: dict[str, int] = field(default_factory=dict)
    panels: Path | None = None
    panel_count: int = 0
    generator_version: int = GENERATOR_VERSION

    def to_json(self) -> dict[str, Any]:
        """JSON form with paths relative to ``root`` so the folder can be moved or copied."""
        return {
            "departement": self.departement,
            "root": ".",
            "footprints": self.footprints.relative_to(self.root).as_posix(),
            "ortho_dir": self.ortho_dir.relative_to(self.root).as_posix(),
            "labels": self.labels.relative_to(self.root).as_posix(),
            "epsg": self.epsg,
            "n_buildings": self.n_buildings,
            "counts": dict(self.counts),
            "classes": list(self.classes),
            "seed": self.seed,
            "tile_px": self.tile_px,
            "resolution": self.resolution,
            "n_tiles": self.n_tiles,
            "area_km2": self.area_km2,
            "density_per_km2": self.density_per_km2,
            "imagery_bounds": list(self.imagery_bounds),
            "nodata_hole": self.nodata_hole,
            "class_counts": dict(self.class_counts),
            "panels": self.panels.relative_to(self.root).as_posix() if self.panels else None,
            "panel_count": self.panel_count,
            "generator_version": self.generator_version,
        }


def load_manifest(dep_root: Path) -> SampleManifest:
    """Read ``dep_root/manifest.json`` (written last by :func:`generate_departement`)."""
    root = Path(dep_root)
    data = json.loads((root / MANIFEST_NAME).read_text(encoding="utf-8"))
    return SampleManifest(
        departement=str(data["departement"]),
        root=root,
        footprints=root / data["footprints"],
        ortho_dir=root / data["ortho_dir"],
        labels=root / data["labels"],
        epsg=int(data["epsg"]),
        n_buildings=int(data["n_buildings"]),
        counts={k: int(v) for k, v in data["counts"].items()},
        classes=list(data["classes"]),
        seed=int(data["seed"]),
        tile_px=int(data.get("tile_px", 2500)),
        resolution=float(data.get("resolution", 0.2)),
        n_tiles=int(data.get("n_tiles", 0)),
        area_km2=float(data.get("area_km2", 0.0)),
        density_per_km2=float(data.get("density_per_km2", 0.0)),
        imagery_bounds=list(data.get("imagery_bounds", [])),
        nodata_hole=data.get("nodata_hole"),
        class_counts={k: int(v) for k, v in data.get("class_counts", {}).items()},
        panels=root / data["panels"] if data.get("panels") else None,
        panel_count=int(data.get("panel_count", 0)),
        generator_version=int(data.get("generator_version", 0)),
    )


# --------------------------------------------------------------------------------------
# Tables: where départements sit, what buildings and roofs look like
# --------------------------------------------------------------------------------------

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
_CRS_TAGS: dict[int, str] = {
    2154: "LA93",
    5490: "RGAF09UTM20",
    2972: "UTM22RGFG95",
    2975: "RGR92UTM40S",
    4471: "RGM04UTM38S",
}

# Roof colours are shared by all classes (with different weights) so colour alone never gives the class away.
_ROOF_COLOURS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("terracotta", (198, 108, 76)),
    ("red_brown", (150, 76, 58)),
    ("slate_grey", (86, 92, 104)),
    ("dark_brown", (100, 76, 62)),
    ("light_grey", (170, 166, 158)),
    ("beige", (196, 182, 154)),
    ("dark_grey", (74, 74, 78)),
)
_COLOUR_WEIGHTS = np.array(
    [
        [0.10, 0.06, 0.12, 0.07, 0.30, 0.20, 0.15],  # flat
        [0.36, 0.20, 0.17, 0.10, 0.07, 0.05, 0.05],  # gable
        [0.34, 0.20, 0.19, 0.10, 0.07, 0.05, 0.05],  # hip
    ]
)
_ROOF_PROBS = np.array([0.30, 0.40, 0.30])

# texture codes (per pixel), each with its own noise amplitude
_TEX_GROUND, _TEX_TILES, _TEX_GRAVEL, _TEX_SMOOTH, _TEX_FOLIAGE, _TEX_ROAD = range(6)
_TEX_SIGMA = np.zeros(256, dtype=np.float32)
_TEX_SIGMA[:6] = (3.5, 3.5, 7.0, 2.5, 7.0, 3.0)  # white grain, grey levels
_TEX_BLOTCH = np.zeros(256, dtype=np.float32)
_TEX_BLOTCH[:6] = (0.08, 0.05, 0.06, 0.03, 0.18, 0.04)  # 3 px blotches, relative

_BLOT_LUT = ((np.arange(256, dtype=np.float32) - 128.0) / 32.0).astype(np.float32)  # uint8 blotch -> N(0, 1)
_SHADE_LUT = (1.0 - 0.5 * np.arange(256, dtype=np.float32) / 255.0).astype(np.float32)  # shadow mask -> factor
_SHADE_BLUE = (10.0 * np.arange(256, dtype=np.float32) / 255.0).astype(np.float32)  # skylight in shadows

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
_ASPHALT = (96, 96, 98)
_SIDEWALK = (150, 146, 140)

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

# --------------------------------------------------------------------------------------
# Small deterministic helpers
# --------------------------------------------------------------------------------------


def _crc(text: str) -> int:
    """A stable 32-bit hash (Python's hash() is salted per process)."""
    return zlib.crc32(text.encode("utf-8"))


def _rng(seed: int, *keys: int | str) -> np.random.Generator:
    """A generator keyed by (seed, ...) so each stage and tile draws independently of the others."""
    ints = [int(seed) & 0xFFFFFFFF] + [(_crc(k) if isinstance(k, str) else int(k) & 0xFFFFFFFF) for k in keys]
    return np.random.default_rng(np.random.SeedSequence(ints))


_H1 = np.uint64(0x9E3779B97F4A7C15)
_H2 = np.uint64(0xC2B2AE3D27D4EB4F)
_H3 = np.uint64(0xFF51AFD7ED558CCD)
_H4 = np.uint64(0xC4CEB9FE1A85EC53)


def _hash2(i: np.ndarray, j: np.ndarray, salt: int) -> np.ndarray:
    """Integer hash of global lattice indices, so background patterns match across tile edges."""
    with np.errstate(over="ignore"):
        a = np.asarray(i, dtype=np.int64).view(np.uint64)
        b = np.asarray(j, dtype=np.int64).view(np.uint64)
        h = a * _H1 ^ b * _H2 ^ np.uint64(salt & 0xFFFFFFFFFFFF)
        h ^= h >> np.uint64(33)
        h *= _H3
        h ^= h >> np.uint64(33)
        h *= _H4
        h ^= h >> np.uint64(33)
    return h


def _unit(h: np.ndarray) -> np.ndarray:
    """Map hashes to floats in [0, 1)."""
    return ((h >> np.uint64(40)).astype(np.float64) / float(1 << 24)).astype(np.float32)


def _value_noise(xs: np.ndarray, ys: np.ndarray, spacing: float, salt: int) -> np.ndarray:
    """Smooth noise in [-1, 1] on the grid xs (columns) x ys (rows), defined by global coordinates.

    Bilinear value noise is separable, so it is evaluated as ``Wy @ lattice @ Wx.T``:
    cheap even for a 2,000 x 2,000 coarse grid, and seamless across tiles.
    """

    def weights(c: np.ndarray) -> tuple[np.ndarray, int, int]:
        g = c / spacing
        g0 = np.floor(g)
        i0, i1 = int(g0.min()), int(g0.max()) + 1
        f = g - g0
        s = f * f * (3.0 - 2.0 * f)
        w = np.zeros((c.size, i1 - i0 + 1), dtype=np.float32)
        k = (g0 - i0).astype(np.int64)
        rows = np.arange(c.size)
        w[rows, k] = 1.0 - s
        w[rows, k + 1] = s
        return w, i0, i1

    wx, x0, x1 = weights(xs)
    wy, y0, y1 = weights(ys)
    iy, ix = np.meshgrid(np.arange(y0, y1 + 1), np.arange(x0, x1 + 1), indexing="ij")
    lattice = _unit(_hash2(ix, iy, salt)) * 2.0 - 1.0
    return (wy @ lattice) @ wx.T


def _defect_count(frac: float, n: int) -> int:
    """How many buildings get a given defect: at least one once the sample is big enough to test it."""
    k = int(round(frac * n))
    return max(k, 1) if n >= 50 else k


# --------------------------------------------------------------------------------------
# Layout: settlements, buildings, trees, roads
# --------------------------------------------------------------------------------------


@dataclass
class _Settlement:
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


def _make_settlement(rng: np.random.Generator, n: int, density: float, kind: str) -> _Settlement:
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
        roof = np.where(farm, rng.choice(3, size=m, p=[0.2, 0.55, 0.25]), rng.choice(3, size=m, p=_ROOF_PROBS))
    else:
        roof = rng.choice(3, size=m, p=_ROOF_PROBS)
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
    shape = ((roof == _FLAT) & (rng.random(m) < 0.3) & (width >= 7.0)).astype(np.int8)
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
    return _Settlement(kind, n, density, radius, b, trees, streets, s, outline)


def _town_sizes(rng: np.random.Generator, total: int) -> list[int]:
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


def _town_density(rng: np.random.Generator, n: int) -> float:
    """Bigger towns are denser, as in France: villages ~1,000/km², city centres up to 5,000/km²."""
    d = 900.0 * (max(n, 1) / 20.0) ** 0.3 * math.exp(rng.normal(0.0, 0.2))
    return float(np.clip(d, 500.0, 5000.0))


def _split(rng: np.random.Generator, total: int, lo: int, hi: int) -> list[int]:
    """Cut ``total`` into chunks of lo..hi (the last one takes what is left)."""
    out: list[int] = []
    while total > 0:
        k = min(total, int(rng.integers(lo, hi + 1)))
        out.append(k)
        total -= k
    return out


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


@dataclass
class _Plan:
    """Everything needed to write the outputs; built once, deterministic from the parameters."""

    departement: str
    n: int
    seed: int
    tile_px: int
    resolution: float
    epsg: int
    tile_m: float
    origin_x: float  # map x of the imagery's west edge
    origin_y: float  # map y of the imagery's south edge
    nx: int
    ny: int
    extent: tuple[float, float, float, float]  # whole département incl. the outside band
    sun_az: float
    sun_el: float
    field_angle: float
    b: dict[str, np.ndarray]
    trees: np.ndarray  # (T, 4): x, y, crown radius, height
    tree_col: np.ndarray  # (T, 3) uint8
    roads: np.ndarray  # (R, 5): x0, y0, x1, y1, width
    settlements: np.ndarray  # (S, 12): x, y, radius, kind (0 town, 1 hamlet), outline (see _Settlement)
    hole: dict[str, Any] | None = None
    tiles: list[tuple[int, int]] = field(default_factory=list)

    def tile_origin(self, ix: int, iy: int) -> tuple[float, float]:
        """Upper-left corner (x, y) of tile column ix, row iy (row 0 is the northernmost)."""
        return self.origin_x + ix * self.tile_m, self.origin_y + (self.ny - iy) * self.tile_m


def _anchor(dep: str, epsg: int) -> tuple[float, float]:
    """A plausible centre for the département in its native CRS."""
    if dep in _ANCHORS:
        return _ANCHORS[dep]
    h = _crc("anchor:" + dep)
    if epsg == 2154:
        # inland-ish France in Lambert-93
        return 300_000.0 + (h % 700) * 1000.0, 6_250_000.0 + ((h >> 10) % 650) * 1000.0
    return 500_000.0, 1_000_000.0  # pragma: no cover - every overseas code is in _ANCHORS


def _plan(dep: str, n: int, seed: int, tile_px: int, res: float) -> _Plan:
    """Lay out the whole département: settlements, buildings, trees, roads, tiles, defects."""
    epsg = native_epsg(dep)
    rng = _rng(seed, dep, n, "layout")
    tile_m = tile_px * res

    n_out = _defect_count(0.02, n) if n >= 10 else 0
    n_in = n - n_out
    sizes = _town_sizes(rng, n_in)
    dens = [_town_density(rng, s) for s in sizes]
    est_km2 = sum(s / d for s, d in zip(sizes, dens, strict=True))
    n_country = int(round(8.0 * est_km2)) if n_in >= 50 else 0
    if sizes and sizes[0] > 3 * n_country:
        sizes[0] -= n_country
    else:
        n_country = 0
    inside: list[_Settlement] = [_make_settlement(rng, s, d, "town") for s, d in zip(sizes, dens, strict=True)]
    inside += [_make_settlement(rng, s, rng.uniform(150.0, 300.0), "hamlet") for s in _split(rng, n_country, 1, 5)]
    outside = [_make_settlement(rng, s, _town_density(rng, s), "outside") for s in _split(rng, n_out, 8, 80)]

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
    cat = np.concatenate([np.full(s.n, _CAT_OUTSIDE if s.kind == "outside" else _CAT_NORMAL) for s in parts])
    b: dict[str, np.ndarray] = {key: np.concatenate([s.b[key] for s in parts]) for key in parts[0].b}
    b["x"] = b["x"] + np.concatenate([np.full(s.n, s.cx) for s in parts]) + origin_x
    b["y"] = b["y"] + np.concatenate([np.full(s.n, s.cy) for s in parts]) + origin_y
    b["category"] = cat.astype(np.int8)
    b["dep_rank"] = np.array(DEPARTEMENTS.index(dep) + 1)
    _finish_buildings(rng, b)
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

    plan = _Plan(
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
    _shading(plan)
    _choose_hole(plan)
    _choose_defects(plan, rng)
    _choose_panels(plan)
    _choose_tiles(plan)
    return plan


def _finish_buildings(rng: np.random.Generator, b: dict[str, np.ndarray]) -> None:
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
        roof == _FLAT, np.where(tall, rng.uniform(8.0, 15.0, n), rng.uniform(3.0, 8.0, n)), rng.uniform(4.5, 8.5, n)
    )
    height = np.where(farm, rng.uniform(5.0, 9.5, n), height)
    b["height"] = height
    b["slope"] = np.radians(np.where(farm, rng.uniform(15.0, 25.0, n), rng.uniform(28.0, 42.0, n)))
    b["hip_k"] = rng.uniform(0.8, 1.0, n)
    colour = np.empty(n, dtype=np.int8)
    for cls in range(3):
        idx = np.flatnonzero(roof == cls)
        colour[idx] = rng.choice(len(_ROOF_COLOURS), size=idx.size, p=_COLOUR_WEIGHTS[cls])
    b["colour"] = colour
    b["tint"] = (1.0 + rng.normal(0.0, 0.07, (n, 1)) + rng.normal(0.0, 0.012, (n, 3))).astype(np.float32)
    b["detail"] = rng.random((n, 16)).astype(np.float32)

    # BD TOPO-like attributes
    group = np.where(farm, 2, np.where(roof == _FLAT, 0, 1))
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


def _shading(plan: _Plan) -> None:
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

    base = np.array([c for _, c in _ROOF_COLOURS], dtype=np.float32)[b["colour"]] * b["tint"]
    det = b["detail"]
    f = np.ones((n, 5), dtype=np.float32)
    pitched = b["roof"] != _FLAT
    f[:, 0] = np.where(pitched, factor(-v), 1.0) * (0.97 + 0.06 * det[:, 13])
    f[:, 1] = np.where(pitched, factor(v), 1.0) * (0.97 + 0.06 * det[:, 14])
    f[:, 2] = factor(u) * (0.97 + 0.06 * det[:, 15])
    f[:, 3] = factor(-u) * (0.97 + 0.06 * det[:, 15])
    f[:, 4] = np.where(pitched, np.maximum(f[:, 0], f[:, 1]) * 1.08, 1.18)
    b["plane_rgb"] = np.clip(base[:, None, :] * f[:, :, None], 8, 250).astype(np.uint8)
    tex = np.where(pitched, _TEX_TILES, _TEX_GRAVEL)
    smooth = np.isin(b["colour"], [2, 6])  # slate and dark grey read as smooth slate / bitumen
    b["tex"] = np.where(smooth, _TEX_SMOOTH, tex).astype(np.uint8)
    shadow_len = (
        b["height"] * np.where(pitched, 0.85, 1.0) / math.tan(el)
    )  # a pitched roof's shadow is shorter on average
    b["shadow"] = np.stack([-math.sin(az) * shadow_len, -math.cos(az) * shadow_len], 1)
    ring = b["ring"]
    lo, hi = ring.min(axis=1), ring.max(axis=1)
    b["bbox"] = np.concatenate([lo, hi], axis=1)  # drawn shape (before any defect)


def _chip_windows(plan: _Plan) -> np.ndarray:
    """(N, 4) chip windows: footprint bbox plus the chip margin."""
    return plan.b["bbox"] + np.array([-CHIP_MARGIN_M, -CHIP_MARGIN_M, CHIP_MARGIN_M, CHIP_MARGIN_M])


def _tile_of(plan: _Plan, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tile column / row (row 0 north) of map points, unclipped."""
    ix = np.floor((x - plan.origin_x) / plan.tile_m).astype(np.int64)
    iy = np.floor((plan.origin_y + plan.ny * plan.tile_m - y) / plan.tile_m).astype(np.int64)
    return ix, iy


def _choose_hole(plan: _Plan) -> None:
    """Cut a nodata hole in the busiest tile that swallows ~1 % of the buildings entirely.

    The hole's edges are placed so that no chip window sits within two pixels of
    them: a chip is then either all nodata or clearly has valid pixels, whatever
    rounding a reader applies to its window.
    """
    b = plan.b
    win = _chip_windows(plan)
    inside = b["category"] == _CAT_NORMAL
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
    target = _defect_count(0.01, plan.n)
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
        b["category"][in_hole] = _CAT_NODATA
        b["near_hole"] = near
        plan.hole = {
            "tile": (tix, tiy),
            "pixels": [c0, r0, c1, r1],
            "bounds": [hx0, hy0, hx1, hy1],
        }
        return


def _choose_defects(plan: _Plan, rng: np.random.Generator) -> None:
    """Turn a few imaged rectangles into bow-ties, collinear slivers and empty geometries."""
    b = plan.b
    near = b.get("near_hole", np.zeros(plan.n, dtype=bool))
    pool = np.flatnonzero((b["category"] == _CAT_NORMAL) & (b["shape"] == 0) & ~near)
    k_rep, k_unrep, k_empty = _defect_count(0.01, plan.n), _defect_count(0.005, plan.n), _defect_count(0.005, plan.n)
    total = min(pool.size, k_rep + k_unrep + k_empty)
    chosen = rng.choice(pool, size=total, replace=False) if total else np.zeros(0, dtype=np.int64)
    k_rep = min(k_rep, total)
    k_unrep = min(k_unrep, total - k_rep)
    b["category"][chosen[:k_rep]] = _CAT_REPAIRABLE
    b["category"][chosen[k_rep : k_rep + k_unrep]] = _CAT_UNREPAIRABLE
    b["category"][chosen[k_rep + k_unrep :]] = _CAT_EMPTY
    # empties are half "MultiPolygon EMPTY", half null geometry
    b["null_geom"] = np.zeros(plan.n, dtype=bool)
    empties = chosen[k_rep + k_unrep :]
    b["null_geom"][empties[1::2]] = True


def _choose_panels(plan: _Plan) -> None:
    """Put a solar-panel array on about a third of the imaged rectangular roofs.

    An array is a rectangle aligned with the building: on one plane of a pitched
    roof (kept clear of the ridge, the eaves and, for hips, the hip lines) or
    anywhere on a flat one. Its own random stream, so adding panels moved no
    building, label or tree.
    """
    b = plan.b
    n = plan.n
    rng = _rng(plan.seed, plan.departement, plan.n, "panels")
    a, w2, roof = b["length"] / 2, b["width"] / 2, b["roof"]
    flat = roof == _FLAT
    u_half = np.where(flat, 0.75 * a, np.where(roof == _HIP, a - 0.95 * w2, 0.85 * a))
    v_lo = np.where(flat, -0.75 * w2, 0.2 * w2)
    v_hi = np.where(flat, 0.75 * w2, 0.85 * w2)
    avail_u, avail_v = 2 * u_half, v_hi - v_lo
    pick, f_len, f_dep, f_u, f_v, f_side = (rng.random(n) for _ in range(6))
    tone = rng.uniform(0.85, 1.15, n)
    eligible = (b["category"] == _CAT_NORMAL) & (b["shape"] == 0) & (avail_u >= 2.4) & (avail_v >= 1.6)
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


def _solar_panel(
    draw: ImageDraw.ImageDraw, tdraw: ImageDraw.ImageDraw, quad: np.ndarray, rgb: tuple[int, int, int], res: float
) -> None:
    """A dark blue array with a light frame and the grid of its modules (about 1.0 × 1.7 m)."""
    pts = _flat(quad)
    draw.polygon(pts, fill=rgb)
    tdraw.polygon(pts, fill=_TEX_SMOOTH)
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


def _drawn(plan: _Plan) -> np.ndarray:
    """Buildings that exist on the imagery (broken-beyond-repair and empty ones do not)."""
    c = plan.b["category"]
    return (c == _CAT_NORMAL) | (c == _CAT_REPAIRABLE) | (c == _CAT_NODATA)


def _choose_tiles(plan: _Plan) -> None:
    """Keep the tiles that hold at least one imaged building's chip window."""
    win = _chip_windows(plan)[_drawn(plan)]
    keep: set[tuple[int, int]] = set()
    for t, _ in _bucket(plan, win).items():
        keep.add(t)
    if plan.hole is not None:
        keep.add(tuple(plan.hole["tile"]))
    plan.tiles = sorted(keep, key=lambda t: (t[1], t[0]))


def _bucket(plan: _Plan, boxes: np.ndarray) -> dict[tuple[int, int], np.ndarray]:
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


# --------------------------------------------------------------------------------------
# Output: footprints and labels
# --------------------------------------------------------------------------------------


def _footprint_geometries(plan: _Plan) -> np.ndarray:
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
    rep = np.flatnonzero(cat == _CAT_REPAIRABLE)
    if rep.size:  # swap two corners: the edges cross in the middle (a bow-tie)
        polys[rep] = shapely.polygons(ring[rep][:, [0, 1, 3, 2]])
    unrep = np.flatnonzero(cat == _CAT_UNREPAIRABLE)
    if unrep.size:  # three collinear vertices on one exact y: zero area, no polygonal repair
        yy = np.round(b["y"][unrep], 2)
        xa = np.round(b["x"][unrep] - b["length"][unrep] / 2, 2)
        xb = np.round(b["x"][unrep], 2)
        xc = np.round(b["x"][unrep] + b["length"][unrep] / 2, 2)
        coords = np.stack([np.stack([xa, yy], 1), np.stack([xb, yy], 1), np.stack([xc, yy], 1)], axis=1)
        polys[unrep] = shapely.polygons(coords)
    geoms = shapely.multipolygons(polys[:, None])
    empty = np.flatnonzero(cat == _CAT_EMPTY)
    geoms[empty] = shapely.from_wkt("MULTIPOLYGON EMPTY")
    geoms[b["null_geom"]] = None
    return geoms


def _write_footprints(plan: _Plan, path: Path) -> None:
    """Write the BD TOPO-like ``batiment`` layer (GeoPackage, native CRS, MultiPolygon)."""
    import geopandas as gpd
    import pandas as pd
    import pyogrio

    b = plan.b
    created = pd.Timestamp("2005-01-01") + pd.to_timedelta(b["created_s"], unit="s")
    etages = pd.array(b["etages"], dtype="Int64")
    etages[b["etages_null"]] = pd.NA
    df = pd.DataFrame(
        {
            "cleabs": b["cleabs"],
            "nature": b["nature"],
            "usage_1": b["usage_1"],
            "usage_2": b["usage_2"],
            "hauteur": b["hauteur"],
            "nombre_d_etages": etages,
            "date_creation": created.astype("datetime64[ms]"),
            "etat_de_l_objet": np.full(plan.n, "En service", dtype=object),
        }
    )
    gdf = gpd.GeoDataFrame(df, geometry=_footprint_geometries(plan), crs=f"EPSG:{plan.epsg}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.gpkg")
    tmp.unlink(missing_ok=True)
    pyogrio.write_dataframe(gdf, tmp, layer="batiment", driver="GPKG", geometry_type="MultiPolygon")
    os.replace(tmp, path)


def _write_panels(plan: _Plan, path: Path) -> int:
    """The drawn solar-panel arrays as Polygons (native CRS) with their building's ``cleabs``."""
    import geopandas as gpd
    import pyogrio
    import shapely

    b = plan.b
    idx = np.flatnonzero(b["has_panel"])
    gdf = gpd.GeoDataFrame(
        {"cleabs": b["cleabs"][idx]}, geometry=shapely.polygons(b["panel"][idx]), crs=f"EPSG:{plan.epsg}"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.gpkg")
    tmp.unlink(missing_ok=True)
    pyogrio.write_dataframe(gdf, tmp, layer=PANEL_LAYER, driver="GPKG", geometry_type="Polygon")
    os.replace(tmp, path)
    return int(idx.size)


def _write_labels(plan: _Plan, path: Path) -> None:
    """One row per footprint: the roof class drawn (random for buildings that are not drawn)."""
    b = plan.b
    hole = b["category"] == _CAT_NODATA
    orient = np.round(np.degrees(b["theta"]) % 180.0, 1)
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        wr = csv.writer(fh)
        wr.writerow(["cleabs", "roof_type", "orientation_deg", "roof_colour", "in_nodata_hole", "category"])
        for i in range(plan.n):
            wr.writerow(
                [
                    b["cleabs"][i],
                    ROOF_CLASSES[b["roof"][i]],
                    f"{orient[i]:.1f}",
                    _ROOF_COLOURS[b["colour"][i]][0],
                    int(hole[i]),
                    COUNT_KEYS[b["category"][i]],
                ]
            )
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------
# Output: orthophoto tiles
# --------------------------------------------------------------------------------------


def tile_name(dep: str, x_ul: float, y_ul: float, epsg: int, resolution: float, tile_m: float = 1000.0) -> str:
    """BD ORTHO-style file name from the upper-left corner in km, e.g. ``12-2024-0660-6361-LA93-0M20.tif``.

    When tiles are not a whole number of kilometres (2,500 px at 20 cm is 500 m), every
    name of the département uses three decimals (``12-2024-0660.500-6360.000-...``) so
    names stay unique and sort the same way.
    """
    whole_km = round(tile_m) % 1000 == 0

    def km(v: float) -> str:
        return f"{int(round(v)) // 1000:04d}" if whole_km else f"{v / 1000:08.3f}"

    whole = int(resolution)
    frac = int(round((resolution - whole) * 100))
    return f"{dep}-{ORTHO_YEAR}-{km(x_ul)}-{km(y_ul)}-{_CRS_TAGS.get(epsg, str(epsg))}-{whole}M{frac:02d}.tif"


@dataclass
class _TileJob:
    """The items to draw on one tile (indices into the plan's arrays)."""

    ix: int
    iy: int
    buildings: np.ndarray
    trees: np.ndarray
    roads: np.ndarray
    settlements: np.ndarray


def _tile_jobs(plan: _Plan) -> list[_TileJob]:
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
        _TileJob(
            ix,
            iy,
            drawn[tb.get((ix, iy), empty)],
            tt.get((ix, iy), empty),
            rr.get((ix, iy), empty),
            ss.get((ix, iy), empty),
        )
        for ix, iy in plan.tiles
    ]


def _ground(plan: _Plan, job: _TileJob) -> tuple[Image.Image, Image.Image]:
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


def _ground_coarse(plan: _Plan, job: _TileJob) -> tuple[np.ndarray, np.ndarray, int]:
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
    salt = _crc(f"{plan.departement}:{plan.seed}")
    ca, sa = math.cos(plan.field_angle), math.sin(plan.field_angle)
    x32, y32 = xs.astype(np.float32), ys.astype(np.float32)
    u = x32[None, :] * np.float32(ca) + y32[:, None] * np.float32(sa)
    v = -x32[None, :] * np.float32(sa) + y32[:, None] * np.float32(ca)
    pu, pv = 190.0, 120.0
    iu, iv = np.floor(u / pu), np.floor(v / pv)
    fu, fv = u / pu - iu, v / pv - iv
    h = _hash2(iu, iv, salt)
    split = (h & np.uint64(1)).astype(bool)
    sub = split & (fu > 0.5)
    pid = _hash2(iu * 2 + sub, iv, salt + 1)
    cum = np.cumsum(_FIELD_WEIGHTS) / _FIELD_WEIGHTS.sum()
    kind = np.searchsorted(cum, _unit(pid)).clip(0, len(_FIELD_WEIGHTS) - 1)
    rgb = _FIELD_COLOURS[kind] * (0.9 + 0.2 * _unit(pid >> np.uint64(7)))[..., None]  # float32
    stripes = (kind >= 2) & (kind <= 6)
    period = 3.0 + 4.0 * _unit(pid >> np.uint64(3))
    rgb *= (1.0 + 0.05 * np.where(stripes, np.sin(np.float32(2 * math.pi) * v / period), 0.0))[..., None]
    del u, v, iu, iv, sub, pid, stripes, period
    tex = np.where(kind == 7, _TEX_FOLIAGE, _TEX_GROUND).astype(np.uint8)
    du = np.minimum(fu, 1 - fu) * pu
    du = np.where(split, np.minimum(du, np.abs(fu - 0.5) * pu), du)
    dv = np.minimum(fv, 1 - fv) * pv
    hedge = ((du < 1.6) & (_unit(h >> np.uint64(5)) < 0.5)) | ((dv < 1.6) & (_unit(h >> np.uint64(9)) < 0.4))
    rgb[hedge] = _HEDGE
    tex[hedge] = _TEX_FOLIAGE

    n1 = _value_noise(xs, ys, 37.0, salt + 2)
    n2 = _value_noise(xs, ys, 9.0, salt + 3)
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
        tex[r_lo:r_hi, c_lo:c_hi] = np.where(m > 0.5, _TEX_GROUND, tex[r_lo:r_hi, c_lo:c_hi])
    rgb *= (1.0 + 0.07 * n1 + 0.05 * n2)[..., None].astype(np.float32)
    return np.clip(rgb, 1, 255).astype(np.uint8), tex, f


def _flat(points: np.ndarray) -> list[float]:
    """PIL wants a flat [x0, y0, x1, y1, ...] list."""
    return points.ravel().tolist()


def _render_tile(plan: _Plan, job: _TileJob) -> np.ndarray:
    """Draw one tile (H, W, 3 uint8): ground, roads, shadows, roofs, trees, noise, soft focus."""
    res, tp = plan.resolution, plan.tile_px
    x0, ytop = plan.tile_origin(job.ix, job.iy)
    img, tex = _ground(plan, job)
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
        tdraw.line(seg, fill=_TEX_ROAD, width=max(1, int(round((wd + 3.0) / res))))

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
    is_hip = b["roof"][bi] == _HIP
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
        if roofs[j] == _FLAT:
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
        if roofs[j] == _HIP:
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
        tdraw.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], fill=_TEX_FOLIAGE)
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
    rng = _rng(plan.seed, plan.departement, plan.n, plan.tile_px, "tile", job.ix, job.iy)
    bf = 3
    nb = -(-tp // bf) + 1
    blot = Image.fromarray(np.clip(rng.normal(128.0, 32.0, (nb, nb)), 0, 255).astype(np.uint8))
    step = 512
    for r0_ in range(0, tp, step):
        r1_ = min(tp, r0_ + step)
        t = tex_arr[r0_:r1_]
        m = mask_arr[r0_:r1_]
        grain = rng.standard_normal(t.shape, dtype=np.float32)
        grain *= _TEX_SIGMA[t]
        fac = np.asarray(blot.resize((tp, r1_ - r0_), Image.Resampling.BILINEAR, box=(0, r0_ / bf, tp / bf, r1_ / bf)))
        fac = _BLOT_LUT[fac] * _TEX_BLOTCH[t]
        fac += 1.0
        fac *= _SHADE_LUT[m]
        chunk = arr[r0_:r1_].astype(np.float32)
        chunk *= fac[..., None]
        chunk += grain[..., None]
        chunk[..., 2] += _SHADE_BLUE[m]
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


def _write_tile(plan: _Plan, arr: np.ndarray, path: Path, ix: int, iy: int, threads: str) -> None:
    """Write one BD ORTHO-like GeoTIFF: RGB uint8, 256x256 tiles, DEFLATE + predictor 2, nodata 0."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    x0, ytop = plan.tile_origin(ix, iy)
    tp = plan.tile_px
    tmp = path.with_name(path.name + ".tmp")
    profile = {
        "driver": "GTiff",
        "width": tp,
        "height": tp,
        "count": 3,
        "dtype": "uint8",
        "crs": f"EPSG:{plan.epsg}",
        "transform": from_origin(x0, ytop, plan.resolution, plan.resolution),
        "nodata": 0,
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "compress": "deflate",
        "predictor": 2,
        "zlevel": 1,  # ~2.5x faster than the default 6 for a ~4 % larger file
        "interleave": "pixel",
        "photometric": "RGB",
        "num_threads": threads,
    }
    with rasterio.open(tmp, "w", **profile) as ds:
        step = 1024
        for r0 in range(0, tp, step):
            r1 = min(tp, r0 + step)
            ds.write(np.ascontiguousarray(np.moveaxis(arr[r0:r1], 2, 0)), window=Window(0, r0, tp, r1 - r0))
    os.replace(tmp, path)


def _tile_path(plan: _Plan, ortho: Path, ix: int, iy: int) -> Path:
    """Where tile (ix, iy) is written."""
    x0, ytop = plan.tile_origin(ix, iy)
    return ortho / tile_name(plan.departement, x0, ytop, plan.epsg, plan.resolution, plan.tile_m)


_WORKER_PLAN: _Plan | None = None


def _worker_init(plan: _Plan) -> None:
    """Give a worker process the plan once (inherited by fork, not re-sent per tile)."""
    global _WORKER_PLAN
    _WORKER_PLAN = plan


def _worker_tile(job: _TileJob, path: Path, threads: str) -> str:
    """Render and write one tile in a worker process."""
    assert _WORKER_PLAN is not None
    _write_tile(_WORKER_PLAN, _render_tile(_WORKER_PLAN, job), path, job.ix, job.iy, threads)
    return path.name


def _write_tiles(plan: _Plan, ortho: Path, workers: int, log: Any = None) -> list[str]:
    """Render and write every kept tile, one tile in memory per worker."""
    ortho.mkdir(parents=True, exist_ok=True)
    jobs = _tile_jobs(plan)
    paths = [_tile_path(plan, ortho, j.ix, j.iy) for j in jobs]
    t0 = time.perf_counter()
    if workers <= 1 or len(jobs) <= 1:
        for k, (job, path) in enumerate(zip(jobs, paths, strict=True)):
            _write_tile(plan, _render_tile(plan, job), path, job.ix, job.iy, "ALL_CPUS")
            if log:
                log(f"tile {k + 1}/{len(jobs)} {path.name} ({time.perf_counter() - t0:.1f}s)")
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(plan,)) as pool:
            futs = [pool.submit(_worker_tile, job, path, "1") for job, path in zip(jobs, paths, strict=True)]
            for k, fut in enumerate(futs):
                name = fut.result()
                if log:
                    log(f"tile {k + 1}/{len(jobs)} {name} ({time.perf_counter() - t0:.1f}s)")
    return [p.name for p in paths]


# --------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------


def _matches(m: SampleManifest, dep: str, n: int, seed: int, tile_px: int, res: float) -> bool:
    """An existing sample is reusable if made by this generator version with the same parameters."""
    return (
        m.departement == dep
        and m.n_buildings == n
        and m.seed == seed
        and m.tile_px == tile_px
        and abs(m.resolution - res) < 1e-9
        and m.generator_version == GENERATOR_VERSION
        and m.footprints.exists()
        and m.labels.exists()
        and m.panels is not None
        and m.panels.exists()
        and m.ortho_dir.is_dir()
    )


def _clear(root: Path) -> None:
    """Remove what a previous generation wrote (only our own files), manifest first."""
    (root / MANIFEST_NAME).unlink(missing_ok=True)
    for p in (root / "footprints" / "batiment.gpkg", root / "labels.csv", root / "solar_panels.gpkg"):
        p.unlink(missing_ok=True)
    ortho = root / "ortho"
    if ortho.is_dir():
        for p in ortho.glob("*.tif"):
            p.unlink()
        for p in ortho.glob("*.tif.tmp"):
            p.unlink()


def generate_departement(
    out_dir: Path,
    departement: str,
    n_buildings: int,
    seed: int = 0,
    *,
    tile_px: int = 2500,
    resolution: float = 0.2,
    overwrite: bool = False,
    workers: int = 1,
    verbose: bool = False,
) -> SampleManifest:
    """Generate (or reuse) the synthetic département ``out_dir/<departement>`` and return its manifest.

    If a ``manifest.json`` made by this generator version with the same
    parameters is there (and its files are), it is returned as is: the demo calls
    this on every run. Otherwise the files this module owns are removed (manifest
    first) and everything is written again, the manifest last.

    ``workers`` > 1 renders tiles in that many processes: same bytes, less wall
    time on a multi-core machine, but each worker holds one tile (~2 GB at
    10,000 px). ``verbose`` prints progress to stderr.
    """
    dep = check_departement(departement)
    if n_buildings < 1:
        raise ValueError(f"n_buildings must be >= 1, got {n_buildings}")
    if tile_px < 256:
        raise ValueError(f"tile_px must be >= 256, got {tile_px}")
    if not 0.05 <= resolution <= 5.0:
        raise ValueError(f"resolution must be between 0.05 and 5 m, got {resolution}")
    root = Path(out_dir) / dep
    if not overwrite and (root / MANIFEST_NAME).exists():
        try:
            existing = load_manifest(root)
        except (ValueError, KeyError, TypeError, json.JSONDecodeError):
            existing = None
        if existing is not None and _matches(existing, dep, n_buildings, seed, tile_px, resolution):
            return existing

    def log(msg: str) -> None:
        if verbose:
            print(f"[synth {dep}] {msg}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    _clear(root)
    root.mkdir(parents=True, exist_ok=True)
    plan = _plan(dep, n_buildings, seed, tile_px, resolution)
    log(f"layout: {n_buildings} buildings, {len(plan.tiles)} tiles ({time.perf_counter() - t0:.1f}s)")
    # tiles first: worker processes are forked before this process has touched GDAL
    ortho = root / "ortho"
    _write_tiles(plan, ortho, workers, log if verbose else None)
    footprints = root / "footprints" / "batiment.gpkg"
    _write_footprints(plan, footprints)
    labels = root / "labels.csv"
    _write_labels(plan, labels)
    panels = root / "solar_panels.gpkg"
    panel_count = _write_panels(plan, panels)
    log(f"footprints, labels and {panel_count} solar-panel arrays written ({time.perf_counter() - t0:.1f}s)")

    cat = plan.b["category"]
    counts = {k: int(np.sum(cat == i)) for i, k in enumerate(COUNT_KEYS)}
    ex = plan.extent
    area = (ex[2] - ex[0]) * (ex[3] - ex[1]) / 1e6
    hole = None
    if plan.hole is not None:
        hx, hy = plan.hole["tile"]
        x0, ytop = plan.tile_origin(hx, hy)
        hole = {
            "tile": tile_name(dep, x0, ytop, plan.epsg, resolution, plan.tile_m),
            "pixels": list(plan.hole["pixels"]),
            "bounds": [round(v, 3) for v in plan.hole["bounds"]],
        }
    manifest = SampleManifest(
        departement=dep,
        root=root,
        footprints=footprints,
        ortho_dir=ortho,
        labels=labels,
        epsg=plan.epsg,
        n_buildings=n_buildings,
        counts=counts,
        classes=list(ROOF_CLASSES),
        seed=seed,
        tile_px=tile_px,
        resolution=resolution,
        n_tiles=len(plan.tiles),
        area_km2=round(area, 3),
        density_per_km2=round(n_buildings / area, 1),
        imagery_bounds=[
            plan.origin_x,
            plan.origin_y,
            plan.origin_x + plan.nx * plan.tile_m,
            plan.origin_y + plan.ny * plan.tile_m,
        ],
        nodata_hole=hole,
        class_counts={c: int(np.sum(plan.b["roof"] == i)) for i, c in enumerate(ROOF_CLASSES)},
        panels=panels,
        panel_count=panel_count,
    )
    tmp = root / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest.to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, root / MANIFEST_NAME)
    log(f"done ({time.perf_counter() - t0:.1f}s)")
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ops.synth``: generate one département and print its manifest."""
    ap = argparse.ArgumentParser(prog="python -m ops.synth", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="output folder; the département goes in OUT/<dep>")
    ap.add_argument("--departement", default="12", help="INSEE code (01-95, 2A, 2B, 971-976)")
    ap.add_argument("--buildings", type=int, default=3000, help="number of footprints")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tile-px", type=int, default=2500, help="ortho tile side in pixels")
    ap.add_argument("--resolution", type=float, default=0.2, help="ground sampling distance in metres")
    ap.add_argument("--workers", type=int, default=1, help="processes rendering tiles")
    ap.add_argument("--overwrite", action="store_true", help="regenerate even if a matching sample exists")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    m = generate_departement(
        args.out,
        args.departement,
        args.buildings,
        args.seed,
        tile_px=args.tile_px,
        resolution=args.resolution,
        overwrite=args.overwrite,
        workers=args.workers,
        verbose=not args.quiet,
    )
    out = m.to_json()
    out["root"] = str(m.root)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    print(json.dumps(out, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
