"""Sources of a partition's inputs: orthophoto tiles, building footprints, labels.

The default layout is the one the sample generator writes, one folder per
département: ``<root>/<dep>/ortho/*.tif``, ``<root>/<dep>/footprints/<file>``
(any OGR format) and ``<root>/<dep>/labels.csv``. A missing input is an error
naming the partition and the path that was looked at.
"""

from __future__ import annotations

from pathlib import Path

from dagster import ConfigurableResource
from pydantic import Field

from ops.mosaic import find_tiles

FOOTPRINT_SUFFIXES = (".gpkg", ".shp", ".geojson", ".json", ".parquet", ".fgb")


class MissingInputError(FileNotFoundError):
    """A partition whose input files are not where the source says."""


class OrthoImagery(ConfigurableResource):
    """Orthophoto tiles per département (COG/GeoTIFF/JP2)."""

    root: str = Field(default="data/sample", description="Folder with one sub-folder per département")
    subdir: str = Field(default="ortho", description="Sub-folder of a département holding its tiles")

    def tiles(self, departement: str) -> list[str]:
        folder = Path(self.root) / departement / self.subdir
        if not folder.is_dir():
            raise MissingInputError(f"partition {departement}: no imagery folder at {folder.resolve()}")
        return find_tiles(folder)


class FootprintSource(ConfigurableResource):
    """Building footprints (and optional roof labels) per département."""

    root: str = Field(default="data/sample", description="Folder with one sub-folder per département")
    subdir: str = Field(default="footprints", description="Sub-folder holding the footprint file")
    labels_file: str = Field(default="labels.csv", description="Ground-truth labels (building id, roof_type)")
    panels_file: str = Field(
        default="solar_panels.gpkg", description="Ground-truth solar-panel polygons (any OGR format, native CRS)"
    )

    def footprints(self, departement: str) -> Path:
        folder = Path(self.root) / departement / self.subdir
        files = sorted(p for p in folder.glob("*") if p.suffix.lower() in FOOTPRINT_SUFFIXES) if folder.is_dir() else []
        if not files:
            raise MissingInputError(
                f"partition {departement}: no footprint file ({', '.join(FOOTPRINT_SUFFIXES)}) in {folder.resolve()}"
            )
        if len(files) > 1:
            raise MissingInputError(
                f"partition {departement}: several footprint files in {folder}: {[f.name for f in files]}"
            )
        return files[0].resolve()

    def labels(self, departement: str) -> Path | None:
        p = Path(self.root) / departement / self.labels_file
        return p.resolve() if p.exists() else None

    def panels(self, departement: str) -> Path | None:
        """Ground-truth solar-panel polygons of a département, if it has any (training only)."""
        p = Path(self.root) / departement / self.panels_file
        return p.resolve() if p.exists() else None
