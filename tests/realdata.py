"""Paths to the small real public files shipped with the tests (sources and licences: tests/data/real/README.md)."""

from __future__ import annotations

from pathlib import Path

REAL = Path(__file__).parent / "data" / "real"
OLEMPS = REAL / "bdtopo_v3_olemps" / "BATIMENT.shp"
IGN_ORTHO = REAL / "ign_ortho_20cm" / "test_data_rgb.tif"
SPACENET_TIF = REAL / "spacenet_atlanta" / "sample_geotiff.tif"
SPACENET_LABELS = REAL / "spacenet_atlanta" / "geotiff_labels.geojson"
