"""`buildings`: a département's footprints, validated, repaired, gridded, written as GeoParquet.

The warehouse's `buildings` rows are not written here: `predictions` publishes
them together with the partition's predictions, in one transaction, so that a
run failing after this step (a broken tile, a model that doesn't fit) leaves the
warehouse as the last successful run published it, buildings and predictions in
step, instead of new buildings beside old predictions.
"""

import time

import pyarrow.parquet as pq
from dagster import AssetExecutionContext, Config, MaterializeResult, MetadataValue, asset
from pydantic import Field

from assets.errors import IO_RETRY, bad_input_fails_fast
from assets.inputs import footprint_files
from assets.metadata import counts_table, points_map
from assets.owners import PIPELINE
from assets.partitions import departements_partitions
from ops.geo.departements import check_departement, native_epsg
from ops.geo.footprints import FootprintStats, iter_building_batches, write_buildings_geoparquet
from ops.geo.grid import DEFAULT_CELL_SIZE_M
from resources import keys
from resources.env import kinds
from resources.imagery import FootprintSource
from resources.object_store import ObjectStore


class BuildingsConfig(Config):
    layer: str | None = Field(default=None, description="Layer to read (default: the file's first layer)")
    id_column: str | None = Field(default=None, description="Id column (default: cleabs, ID, osm_id, ... found first)")
    generate_ids: bool = Field(
        default=False,
        description="Number the features by position when the file has no id column "
        "(ids then change whenever the file does: predictions of two months no longer match)",
    )
    cell_size_m: float = Field(default=DEFAULT_CELL_SIZE_M, description="Side of the work grid's cells, metres")


@asset(
    partitions_def=departements_partitions,
    deps=[footprint_files],
    group_name="ingest",
    kinds=kinds("parquet"),
    owners=PIPELINE,
    code_version="2",
    retry_policy=IO_RETRY,
    description="One row per input building: id, cell, geometry (validated/repaired), area, height, usage, status "
    "(GeoParquet; published to the warehouse with the partition's predictions).",
)
def buildings(
    context: AssetExecutionContext,
    config: BuildingsConfig,
    footprints: FootprintSource,
    store: ObjectStore,
) -> MaterializeResult:
    with bad_input_fails_fast(context.partition_key):
        dep = check_departement(context.partition_key)
        epsg = native_epsg(dep)
        src = footprints.footprints(dep)
        context.log.info(f"partition {dep}: reading {src} into EPSG:{epsg}")
        t0 = time.perf_counter()
        stats = FootprintStats()
        out = store.path(keys.buildings(dep))
        batches = iter_building_batches(
            src,
            dep,
            epsg,
            layer=config.layer,
            id_column=config.id_column,
            generate_ids=config.generate_ids,
            cell_size_m=config.cell_size_m,
            stats=stats,
        )
        rows = write_buildings_geoparquet(batches, out, epsg, source=src, layer=config.layer)
        seconds = time.perf_counter() - t0
        preview = pq.read_table(out, columns=["bbox", "geometry_status"])  # bbox centres: no WKB to parse
        bbox = preview.column("bbox").combine_chunks()
        px = (bbox.field("xmin").to_numpy(zero_copy_only=False) + bbox.field("xmax").to_numpy(zero_copy_only=False)) / 2
        py = (bbox.field("ymin").to_numpy(zero_copy_only=False) + bbox.field("ymax").to_numpy(zero_copy_only=False)) / 2
        context.log.info(f"partition {dep}: {rows:,} buildings, statuses {stats.statuses}, {len(stats.cells)} cells")
        return MaterializeResult(
            metadata={
                "rows": rows,
                "statuses": counts_table(stats.statuses, "geometry_status"),
                "map": points_map(
                    px,
                    py,
                    preview.column("geometry_status").to_numpy(zero_copy_only=False),
                    f"buildings {dep} by geometry_status (EPSG:{epsg})",
                ),
                "cells": len(stats.cells),
                "source": MetadataValue.path(str(src)),
                "source_epsg": stats.source_epsg,
                "generated_ids": stats.generated_ids,
                "geoparquet": MetadataValue.path(str(out)),
                "seconds": round(seconds, 2),
                "buildings_per_s": round(rows / seconds, 1) if seconds else 0.0,
            }
        )
