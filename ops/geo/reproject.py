"""Geometry helpers shared by the steps that write to the warehouse."""

from __future__ import annotations

import numpy as np
import shapely
from pyproj import Transformer


def to_wgs84_wkb(wkb: np.ndarray | list, epsg: int) -> list[bytes | None]:
    """Reproject WKB geometries from ``epsg`` to WGS84 lon/lat (the warehouse's CRS)."""
    geoms = shapely.from_wkb(np.asarray(wkb, dtype=object))
    if epsg != 4326:
        tr = Transformer.from_crs(epsg, 4326, always_xy=True)
        present = ~shapely.is_missing(geoms)
        geoms[present] = shapely.transform(geoms[present], lambda xy: np.column_stack(tr.transform(xy[:, 0], xy[:, 1])))
    return shapely.to_wkb(geoms).tolist()
