"""Reprojection to WGS84 lon/lat, the warehouse's CRS: geometries are kept in the native CRS until they are written."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
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


def wgs84_batches(path: Path, epsg: int, batch_size: int = 50_000) -> Iterator[pa.RecordBatch]:
    """A GeoParquet file's batches with their ``geometry`` column reprojected from ``epsg`` to WGS84."""
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size):
        geom = to_wgs84_wkb(batch.column("geometry").to_numpy(zero_copy_only=False), epsg)
        i = batch.schema.get_field_index("geometry")
        yield batch.set_column(i, "geometry", pa.array(geom, pa.binary()))
