"""The vocabulary of a generated sample and its ``manifest.json``.

Holds what a reader of a sample relies on: the roof classes and defect
categories (with the integer codes the stages use for them), the generator
version that decides whether a sample on disk is stale, the file names, and
:class:`SampleManifest` with :func:`load_manifest`. It imports nothing from the
rest of the package (only the model catalog's roof classes), so every stage can use these names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

# the roof_type model's classes, defined once: the truth drawn is what the model learns
from ops.ml.catalog import ROOF_CLASSES as ROOF_CLASSES

COUNT_KEYS: tuple[str, ...] = (
    "invalid_repairable",
    "invalid_unrepairable",
    "empty",
    "outside_imagery",
    "nodata_area",
    "normal",
)
#: Bumped whenever the output for given parameters changes, so stale samples are regenerated.
#: 3: the GeoPackages' ``gpkg_contents.last_change`` is a fixed date instead of the time of writing.
#: 4: ``batiment`` has a ``mat_toits`` column and ``roof_slope.csv`` is written (imagery and labels.csv unchanged).
GENERATOR_VERSION = 4
#: Margin around a footprint's bounding box that defines its image chip (used for ``nodata_area``).
CHIP_MARGIN_M = 2.0
ORTHO_YEAR = 2024
#: How the orthophoto tiles are written; the ground truth is the same whatever the format.
#: ``deflate``: tiled GeoTIFF, DEFLATE + predictor 2 (lossless, the default);
#: ``jpeg``: JPEG-compressed tiled COG, YCbCr, quality 85 (most hosted orthophotos);
#: ``jp2``: lossy JPEG 2000, BD ORTHO's delivery (``...-0M20-E080.jp2``).
ImageryFormat = Literal["deflate", "jpeg", "jp2"]
IMAGERY_FORMATS: tuple[str, ...] = ("deflate", "jpeg", "jp2")
MANIFEST_NAME = "manifest.json"
#: Share of the eligible roofs (imaged, rectangular, room for a 2 × 1.6 m array) that carry solar panels.
PANEL_SHARE = 0.33
PANEL_LAYER = "solar_panels"
#: The regression labels file (``cleabs,slope_deg``) next to ``labels.csv``.
ROOF_SLOPE_NAME = "roof_slope.csv"
#: BD TOPO v3 ``MAT_TOITS`` codes the generator writes (``mat_toits``): what the drawn texture shows.
MAT_UNKNOWN, MAT_TILES, MAT_SLATE, MAT_CONCRETE, MAT_OTHER = "00", "10", "20", "40", "90"
MAT_CODES: tuple[str, ...] = (MAT_UNKNOWN, MAT_TILES, MAT_SLATE, MAT_CONCRETE, MAT_OTHER)
#: Shares of all buildings with no ``mat_toits`` and with "00" (undetermined); the real BD TOPO of
#: Olemps (12) has 1,090 of 2,273 buildings without MAT_TOITS and 42 with "00".
MAT_UNSET_SHARE = 0.48
MAT_UNKNOWN_SHARE = 0.02

#: Roof class codes, in ROOF_CLASSES order.
FLAT, GABLE, HIP = 0, 1, 2
#: Category codes, in COUNT_KEYS order.
CAT_REPAIRABLE, CAT_UNREPAIRABLE, CAT_EMPTY, CAT_OUTSIDE, CAT_NODATA, CAT_NORMAL = range(6)


@dataclass
class SampleManifest:
    """Where a generated département lives and what a reader should find in it.

    ``counts`` are the expected per-category building counts (they sum to
    ``n_buildings``), so tests can check a pipeline's statuses exactly.
    ``imagery_format`` is one of :data:`IMAGERY_FORMATS`: a sample written in
    another format than the one asked for is not reused. ``roof_slope`` is the
    ``cleabs,slope_deg`` regression labels file; ``material_counts`` counts the
    footprints per ``mat_toits`` code (the others have none).
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
    imagery_format: str = "deflate"
    roof_slope: Path | None = None
    material_counts: dict[str, int] = field(default_factory=dict)
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
            "imagery_format": self.imagery_format,
            "roof_slope": self.roof_slope.relative_to(self.root).as_posix() if self.roof_slope else None,
            "material_counts": dict(self.material_counts),
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
        # samples written before the key existed are DEFLATE GeoTIFF, the only format then
        imagery_format=str(data.get("imagery_format", "deflate")),
        # samples written before generator version 4 have neither
        roof_slope=root / data["roof_slope"] if data.get("roof_slope") else None,
        material_counts={k: int(v) for k, v in data.get("material_counts", {}).items()},
        generator_version=int(data.get("generator_version", 0)),
    )
