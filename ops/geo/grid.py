"""The tile grid that cuts a département into cells.

A cell is the unit of parallel crop work, of progress reporting and of
resumption. Cells are squares of a fixed grid in the département's native CRS
(5 km by default: BD ORTHO's own slab size, so a cell maps onto few source
tiles). A building belongs to the one cell that holds its centroid, so the
assignment is stable across runs and independent of the imagery.
"""

from __future__ import annotations

import numpy as np

DEFAULT_CELL_SIZE_M = 5000.0
NO_CELL = "none"  # cell of buildings without a geometry (status `empty`)


def cell_ids(x: np.ndarray, y: np.ndarray, cell_size_m: float = DEFAULT_CELL_SIZE_M) -> np.ndarray:
    """Cell id of each point, named after the cell's lower-left corner in metres.

    ``E0660000_N6360000`` reads as the 5 km cell whose lower-left corner is
    (660 000, 6 360 000). NaN coordinates get :data:`NO_CELL`.
    """
    if not (cell_size_m > 0 and np.isfinite(cell_size_m)):
        # a 0 or negative size would name every building's cell garbage, silently
        raise ValueError(f"cell_size_m must be a positive number of metres, got {cell_size_m!r}")
    x = np.asarray(x, dtype="float64")
    y = np.asarray(y, dtype="float64")
    out = np.full(x.shape, NO_CELL, dtype=object)
    ok = np.isfinite(x) & np.isfinite(y)
    ex = (np.floor(x[ok] / cell_size_m) * cell_size_m).astype("int64")
    ny = (np.floor(y[ok] / cell_size_m) * cell_size_m).astype("int64")
    out[ok] = [f"E{a:07d}_N{b:07d}" for a, b in zip(ex.tolist(), ny.tolist(), strict=True)]
    return out
