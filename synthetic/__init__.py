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
  ``etat_de_l_objet``, ``mat_toits``), with deliberate defects (bow-tie polygons,
  zero-area collinear polygons, empty / null geometries). ``mat_toits`` is BD TOPO's
  roof-material code of the roof drawn, a label read from the footprints: ``"10"``
  tiles (pitched), ``"20"`` slate (pitched, smooth slate / dark grey), ``"40"``
  concrete (flat gravel), ``"90"`` other (flat smooth), ``"00"`` undetermined on
  ~2 % and NULL on ~48 % of the buildings (as in the real BD TOPO) and on the
  empty / unrepairable ones;
* ``ortho/*.tif`` -- BD ORTHO-like RGB GeoTIFF tiles (tiled 256x256, DEFLATE +
  predictor 2, nodata 0), one of which has a rectangular nodata hole; a band of
  villages lies beyond the imagery on purpose. On request (``imagery_format``,
  ``--format``) the same pixels are encoded as JPEG-compressed tiled COGs
  (``jpeg``: YCbCr, quality 85, 256 px blocks, overviews, nodata 0) or as BD
  ORTHO's lossy JPEG 2000 (``jp2``: ``ortho/*-E080.jp2``, ~1/5 of the raw size,
  1024 px codestream tiles, no declared nodata, as IGN's); nothing else changes;
* ``solar_panels.gpkg`` -- layer ``solar_panels``: one Polygon per solar-panel array
  drawn on a roof (``cleabs`` of the building it sits on), in the native CRS: the
  ground truth of the segmentation model (about a third of the imaged rectangular
  roofs carry one, on one plane of a pitched roof or anywhere on a flat one);
* ``labels.csv`` -- one row per footprint: ``cleabs,roof_type`` plus
  ``orientation_deg``, ``roof_colour``, ``in_nodata_hole`` and ``category`` (which
  of the manifest ``counts`` the building falls in); buildings that are not drawn
  (empty, unrepairable) carry a random class;
* ``roof_slope.csv`` -- ``cleabs,slope_deg``: a regression label delivered as a CSV
  keyed by building id, one row per building with a roof (not the empty or
  unrepairable ones): 0.0 for flat roofs, the pitch the planes were shaded with
  (15-25° on farms, 28-42° elsewhere) for gable and hip roofs, one decimal;
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

Where each stage lives
----------------------
* :mod:`synthetic.manifest` -- roof classes, defect categories, generator version,
  :class:`SampleManifest` and :func:`load_manifest`;
* :mod:`synthetic.noise` -- stable hashes, keyed random generators, value noise;
* :mod:`synthetic.plan` -- :class:`~synthetic.plan.Plan`, the state the stages fill in;
* :mod:`synthetic.settlements` -- one town, hamlet or village: lots, buildings, trees, streets;
* :mod:`synthetic.layout` -- sizes and packs the settlements, roads, runs the choosing stages;
* :mod:`synthetic.footprints` -- rings, BD TOPO attributes, the deliberate geometry defects;
* :mod:`synthetic.roofs` -- roof odds and colours, sunlit planes, shadows, solar panels;
* :mod:`synthetic.tiles` -- the imagery grid, tile names, the nodata hole, per-tile work lists;
* :mod:`synthetic.textures` -- per-pixel surface codes and their grain;
* :mod:`synthetic.ground` -- fields, hedges, gardens and yards under a tile;
* :mod:`synthetic.render` -- drawing one tile;
* :mod:`synthetic.writers` -- the GeoPackages, ``labels.csv`` and the tiles (GeoTIFF, JPEG COG, JPEG 2000);
* :mod:`synthetic.generate` -- :func:`generate_departement`, which runs them in order;
* :mod:`synthetic.cli` -- ``python -m synthetic``.

Usage
-----
From the repository root::

    python -m synthetic --out data/sample --departement 12 --buildings 3000 --seed 0
    python -m synthetic --out /tmp/bench --departement 2A --buildings 300000 --tile-px 10000 --workers 2
    python -m synthetic --out /tmp/bdortho --departement 12 --buildings 20000 --tile-px 5000 --format jp2

From Python::

    from pathlib import Path
    from synthetic import generate_departement, load_manifest

    m = generate_departement(Path("data/sample"), "12", 3000, seed=0)
    m.footprints, m.ortho_dir, m.labels, m.counts   # paths and expected defect counts
    m.roof_slope, m.material_counts                 # slope labels file, footprints per mat_toits code
    m = load_manifest(Path("data/sample/12"))       # same object, from manifest.json

A second call with the same parameters returns the existing manifest without
regenerating (pass ``overwrite=True`` to force). Same (département, buildings, seed,
tile_px, resolution, imagery_format) gives byte-identical files (footprints, panels,
labels, slopes, tiles, manifest), whatever the number of workers; another imagery_format
changes the tiles only. Tile names follow BD ORTHO
(``{dep}-2024-{x_km}-{y_km}-LA93-0M20.tif``, upper-left corner; JPEG 2000:
``{dep}-2024-{x_km}-{y_km}-LA93-0M20-E080.jp2``); when a tile is not a
whole number of km (2,500 px at 20 cm = 500 m) the km get three decimals
(``12-2024-0660.500-6360.000-LA93-0M20.tif``). Only tiles holding at least one
imaged building are written, so the mosaic can have empty (missing) tiles.
"""

from synthetic.generate import generate_departement
from synthetic.manifest import (
    CHIP_MARGIN_M,
    COUNT_KEYS,
    GENERATOR_VERSION,
    IMAGERY_FORMATS,
    MANIFEST_NAME,
    MAT_CODES,
    ORTHO_YEAR,
    PANEL_LAYER,
    PANEL_SHARE,
    ROOF_CLASSES,
    ROOF_SLOPE_NAME,
    SampleManifest,
    load_manifest,
)
from synthetic.tiles import tile_name

__all__ = [
    "CHIP_MARGIN_M",
    "COUNT_KEYS",
    "GENERATOR_VERSION",
    "IMAGERY_FORMATS",
    "MANIFEST_NAME",
    "MAT_CODES",
    "ORTHO_YEAR",
    "PANEL_LAYER",
    "PANEL_SHARE",
    "ROOF_CLASSES",
    "ROOF_SLOPE_NAME",
    "SampleManifest",
    "generate_departement",
    "load_manifest",
    "tile_name",
]
