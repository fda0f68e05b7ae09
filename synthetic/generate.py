"""The entry point that runs the stages: plan, tiles, footprints, labels, slopes, panels, then the manifest.

:func:`generate_departement` reuses a sample already on disk when its manifest
matches the parameters and this generator version; otherwise it removes only
the files this package writes (manifest first), writes everything again and
the manifest last, so an interrupted run is regenerated next time.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from ops.geo.departements import check_departement
from synthetic.layout import make_plan
from synthetic.manifest import (
    COUNT_KEYS,
    GENERATOR_VERSION,
    IMAGERY_FORMATS,
    MANIFEST_NAME,
    MAT_CODES,
    ROOF_CLASSES,
    ROOF_SLOPE_NAME,
    ImageryFormat,
    SampleManifest,
    load_manifest,
)
from synthetic.tiles import tile_name
from synthetic.writers import write_footprints, write_labels, write_panels, write_roof_slope, write_tiles


def _matches(m: SampleManifest, dep: str, n: int, seed: int, tile_px: int, res: float, fmt: str) -> bool:
    """An existing sample is reusable if made by this generator version with the same parameters and format."""
    return (
        m.departement == dep
        and m.imagery_format == fmt
        and m.n_buildings == n
        and m.seed == seed
        and m.tile_px == tile_px
        and abs(m.resolution - res) < 1e-9
        and m.generator_version == GENERATOR_VERSION
        and m.footprints.exists()
        and m.labels.exists()
        and m.roof_slope is not None
        and m.roof_slope.exists()
        and m.panels is not None
        and m.panels.exists()
        and m.ortho_dir.is_dir()
    )


def _clear(root: Path) -> None:
    """Remove what a previous generation wrote (only our own files), manifest first."""
    (root / MANIFEST_NAME).unlink(missing_ok=True)
    for p in (
        root / "footprints" / "batiment.gpkg",
        root / "labels.csv",
        root / ROOF_SLOPE_NAME,
        root / "solar_panels.gpkg",
    ):
        p.unlink(missing_ok=True)
    ortho = root / "ortho"
    if ortho.is_dir():  # every format's tiles: the mosaic would take a previous format's tiles as well
        for pattern in ("*.tif", "*.jp2", "*.tif.tmp", "*.jp2.tmp"):
            for p in ortho.glob(pattern):
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
    imagery_format: ImageryFormat = "deflate",
) -> SampleManifest:
    """Generate (or reuse) the synthetic département ``out_dir/<departement>`` and return its manifest.

    If a ``manifest.json`` made by this generator version with the same
    parameters is there (and its files are), it is returned as is: the demo calls
    this on every run. Otherwise the files this module owns are removed (manifest
    first) and everything is written again, the manifest last.

    ``workers`` > 1 renders tiles in that many processes: same bytes, less wall
    time on a multi-core machine, but each worker holds one tile (~2 GB at
    10,000 px). ``verbose`` prints progress to stderr.

    ``imagery_format`` chooses how the tiles are encoded, nothing else (footprints,
    labels, panels and counts are the same): ``deflate`` (lossless GeoTIFF, the
    default), ``jpeg`` (JPEG-compressed tiled COG, YCbCr, quality 85) or ``jp2``
    (lossy JPEG 2000 named like BD ORTHO's ``...-LA93-0M20-E080.jp2``; its real
    layout is ``tile_px=5000``, 1 km at 20 cm). It is recorded in the manifest, so
    a sample of another format is regenerated rather than reused.
    """
    dep = check_departement(departement)
    if n_buildings < 1:
        raise ValueError(f"n_buildings must be >= 1, got {n_buildings}")
    if tile_px < 256:
        raise ValueError(f"tile_px must be >= 256, got {tile_px}")
    if not 0.05 <= resolution <= 5.0:
        raise ValueError(f"resolution must be between 0.05 and 5 m, got {resolution}")
    if imagery_format not in IMAGERY_FORMATS:
        raise ValueError(f"imagery_format must be one of {', '.join(IMAGERY_FORMATS)}; got {imagery_format!r}")
    root = Path(out_dir) / dep
    if not overwrite and (root / MANIFEST_NAME).exists():
        try:
            existing = load_manifest(root)
        except (ValueError, KeyError, TypeError, json.JSONDecodeError):
            existing = None
        if existing is not None and _matches(existing, dep, n_buildings, seed, tile_px, resolution, imagery_format):
            return existing

    def log(msg: str) -> None:
        if verbose:
            print(f"[synth {dep}] {msg}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    _clear(root)
    root.mkdir(parents=True, exist_ok=True)
    plan = make_plan(dep, n_buildings, seed, tile_px, resolution)
    log(f"layout: {n_buildings} buildings, {len(plan.tiles)} {imagery_format} tiles ({time.perf_counter() - t0:.1f}s)")
    # tiles first: worker processes are forked before this process has touched GDAL
    ortho = root / "ortho"
    write_tiles(plan, ortho, workers, log if verbose else None, imagery_format)
    footprints = root / "footprints" / "batiment.gpkg"
    write_footprints(plan, footprints)
    labels = root / "labels.csv"
    write_labels(plan, labels)
    roof_slope = root / ROOF_SLOPE_NAME
    write_roof_slope(plan, roof_slope)
    panels = root / "solar_panels.gpkg"
    panel_count = write_panels(plan, panels)
    log(f"footprints, labels, slopes and {panel_count} solar-panel arrays written ({time.perf_counter() - t0:.1f}s)")

    cat = plan.b["category"]
    counts = {k: int(np.sum(cat == i)) for i, k in enumerate(COUNT_KEYS)}
    ex = plan.extent
    area = (ex[2] - ex[0]) * (ex[3] - ex[1]) / 1e6
    hole = None
    if plan.hole is not None:
        hx, hy = plan.hole["tile"]
        x0, ytop = plan.tile_origin(hx, hy)
        hole = {
            "tile": tile_name(dep, x0, ytop, plan.epsg, resolution, plan.tile_m, imagery_format),
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
        imagery_format=imagery_format,
        roof_slope=roof_slope,
        material_counts={c: int(np.sum(plan.b["mat_toits"] == c)) for c in MAT_CODES},
    )
    tmp = root / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest.to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, root / MANIFEST_NAME)
    log(f"done ({time.perf_counter() - t0:.1f}s)")
    return manifest
