"""Shared fixtures: small synthetic départements, no telemetry. Paths to real data are in ``tests/realdata.py``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """Where small synthetic départements are generated once per test session."""
    return tmp_path_factory.mktemp("synth")


@pytest.fixture(scope="session")
def small_dep(synth_root):
    """A synthetic département '12' of a few hundred buildings (generated once per session)."""
    from synthetic import generate_departement

    return generate_departement(synth_root, "12", 400, seed=3, tile_px=1000)


@pytest.fixture(autouse=True)
def _no_telemetry(monkeypatch):
    monkeypatch.setenv("DAGSTER_DISABLE_TELEMETRY", "1")
    yield


os.environ.setdefault("MPLBACKEND", "Agg")
