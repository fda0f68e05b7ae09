"""The plan: everything the writers need, built once and deterministic from the parameters.

:class:`Plan` is the state every stage reads and fills in (buildings as columns
of arrays, trees, roads, settlements, the imagery grid, the nodata hole, the
kept tiles); it lives in its own module so the stages that build it
(``layout``, ``footprints``, ``roofs``, ``tiles``) and those that read it
(``ground``, ``render``, ``writers``) share it without importing each other.
:func:`defect_count` is the sizing rule shared by the stages that plant defects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Plan:
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
    settlements: np.ndarray  # (S, 12): x, y, radius, kind (0 town, 1 hamlet), outline (see Settlement)
    hole: dict[str, Any] | None = None
    tiles: list[tuple[int, int]] = field(default_factory=list)

    def tile_origin(self, ix: int, iy: int) -> tuple[float, float]:
        """Upper-left corner (x, y) of tile column ix, row iy (row 0 is the northernmost)."""
        return self.origin_x + ix * self.tile_m, self.origin_y + (self.ny - iy) * self.tile_m


def defect_count(frac: float, n: int) -> int:
    """How many buildings get a given defect: at least one once the sample is big enough to test it."""
    k = int(round(frac * n))
    return max(k, 1) if n >= 50 else k
