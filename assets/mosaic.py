"""`ortho_mosaic`: a VRT over the département's orthophoto tiles, plus what the crop needs to know."""

from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, asset

from assets.errors import IO_RETRY, bad_input_fails_fast
from assets.inputs import orthophoto_tiles
from assets.owners import PIPELINE
from assets.partitions import departements_partitions
from ops.geo.departements import check_departement, native_epsg
from ops.imagery.mosaic import build_mosaic
from resources import keys
from resources.env import kinds
from resources.imagery import OrthoImagery
from resources.object_store import ObjectStore


@asset(
    partitions_def=departements_partitions,
    deps=[orthophoto_tiles],
    group_name="ingest",
    kinds=kinds("gdal"),
    owners=PIPELINE,
    code_version="3",  # 2: overlapping, truncated tiles and mixed nodata refused; 3: a WMS as source
    retry_policy=IO_RETRY,
    description="Virtual mosaic (VRT) over the département's orthophoto tiles, in its native CRS.",
)
def ortho_mosaic(context: AssetExecutionContext, imagery: OrthoImagery, store: ObjectStore) -> MaterializeResult:
    with bad_input_fails_fast(context.partition_key):
        dep = check_departement(context.partition_key)
        if imagery.wms_url:  # the service is the mosaic: its layer is checked now, naming URL and layer
            tiles = [imagery.service_tile(dep, store.path(keys.mosaic_service(dep)))]
            context.log.info(f"partition {dep}: mosaic over WMS {imagery.wms_url} layer {imagery.wms_layer}")
        else:
            tiles = imagery.tiles(dep)
            context.log.info(f"partition {dep}: building a mosaic over {len(tiles)} tiles")
        vrt_key, info_key = keys.mosaic_vrt(dep), keys.mosaic_info(dep)
        info = build_mosaic(tiles, store.path(vrt_key), name=f"ortho-{dep}", target_epsg=native_epsg(dep))
        store.path(info_key).write_text(info.to_json())
        w, h = info.bounds[2] - info.bounds[0], info.bounds[3] - info.bounds[1]
        return MaterializeResult(
            metadata={
                "imagery_id": info.imagery_id,
                "tiles": len(tiles),
                "source": f"WMS {imagery.wms_url} layer {imagery.wms_layer}" if imagery.wms_url else "tile files",
                "crs": f"EPSG:{info.epsg}",
                "resolution_m": info.resolution,
                "size_px": f"{info.width} x {info.height}",
                "extent_km": f"{w / 1000:.2f} x {h / 1000:.2f}",
                "bands": f"{info.count} x {info.dtype} ({info.band_rule})",
                "vrt": MetadataValue.path(str(store.path(vrt_key))),
            }
        )
