"""One shard's model outputs as ``predictions`` rows: the staged file's schema and the row assembly.

Every index row of a shard becomes one row per model, chip or not (the
accounting invariant): buildings without a chip carry their status and no
label. Segmentation polygons are traced in the native CRS and reprojected to
WGS84 here, once, as the warehouse wants them.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import shapely

from ops.geo.reproject import to_wgs84_wkb
from ops.ml.card import ModelCard
from ops.ml.postprocess import Columns

#: The staged Parquet file of one model's rows (``docs/DESIGN.md``, table ``predictions``; geometry as WGS84 WKB).
PREDICTIONS_SCHEMA = pa.schema(
    [
        ("building_id", pa.string()),
        ("departement", pa.string()),
        ("model_name", pa.string()),
        ("model_version", pa.string()),
        ("task", pa.string()),
        ("label", pa.string()),
        ("score", pa.float64()),
        ("value", pa.float64()),
        ("probabilities", pa.string()),
        ("geometry", pa.binary()),
        ("status", pa.string()),
        ("imagery_id", pa.string()),
        ("run_id", pa.string()),
        ("predicted_at", pa.timestamp("us")),
    ]
)


def polygon_area_m2(cols: Columns) -> float:
    """Area of a segmentation model's polygons over a shard, in the native CRS's square metres."""
    present = [g for g in cols.geometries or () if g is not None]
    return float(shapely.area(np.array(present, dtype=object)).sum()) if present else 0.0


def prediction_batch(
    index: pa.Table,
    status: list[str],
    cols: Columns,
    card: ModelCard,
    *,
    departement: str,
    epsg: int,
    imagery_id: str | None,
    run_id: str,
    predicted_at: dt.datetime,
) -> pa.RecordBatch:
    """The rows of one model for every building of a shard's ``index`` (``status``: its status column)."""
    n = index.num_rows
    geometry = pa.nulls(n, pa.binary())
    if cols.geometries is not None and any(g is not None for g in cols.geometries):
        wkb = to_wgs84_wkb(shapely.to_wkb(np.array(cols.geometries, dtype=object)), epsg)
        geometry = pa.array(wkb, pa.binary())
    return pa.RecordBatch.from_arrays(
        [
            index.column("building_id").combine_chunks(),
            pa.array([departement] * n),
            pa.array([card.name] * n),
            pa.array([card.version] * n),
            pa.array([card.task] * n),
            pa.array(cols.labels, pa.string()),
            pa.array(cols.scores, pa.float64(), from_pandas=True),
            pa.array(cols.values, pa.float64(), from_pandas=True)
            if cols.values is not None
            else pa.nulls(n, pa.float64()),
            pa.array(cols.probabilities, pa.string()),
            geometry,
            pa.array(status, pa.string()),
            pa.array([imagery_id] * n, pa.string()),
            pa.array([run_id] * n, pa.string()),
            pa.array([predicted_at] * n, pa.timestamp("us")),
        ],
        schema=PREDICTIONS_SCHEMA,
    )
