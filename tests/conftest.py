"""Shared fixtures: paths to the real data shipped with the tests, and small synthetic départements."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REAL = Path(__file__).parent / "data" / "real"
OLEMPS = REAL / "bdtopo_v3_olemps" / "BATIMENT.shp"
IGN_ORTHO = REAL / "ign_ortho_20cm" / "test_data_rgb.tif"
SPACENET_TIF = REAL / "spacenet_atlanta" / "sample_geotiff.tif"
SPACENET_LABELS = REAL / "spacenet_atlanta" / "geotiff_labels.geojson"


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """Where small synthetic départements are generated once per test session."""
    return tmp_path_factory.mktemp("synth")


@pytest.fixture(scope="session")
def small_dep(synth_root):
    """A synthetic département '12' of a few hundred buildings (generated once per session)."""
    from ops.synth import generate_departement

    return generate_departement(synth_root, "12", 400, seed=3, tile_px=1000)


@pytest.fixture(autouse=True)
def _no_telemetry(monkeypatch):
    monkeypatch.setenv("DAGSTER_DISABLE_TELEMETRY", "1")
    yield


os.environ.setdefault("MPLBACKEND", "Agg")
