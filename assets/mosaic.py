"""`ortho_mosaic`: a VRT over the département's orthophoto tiles, plus what the crop needs to know.

With ``convert``, JPEG 2000 tiles (BD ORTHO's delivery) are first converted to COGs that the crop
decodes about ten times faster, kept in step with them (``ops.imagery.convert``): measured with
``make bench-convert``, the conversion pays for itself after 3.5 to 7 crops of the same tiles, so
the monthly reprocessing asks for it and a one-off run does not (README, "Benchmarks").
"""

import time
from pathlib import Path
from typing import Literal

from dagster import AssetExecutionContext, Config, MaterializeResult, MetadataValue, asset
from pydantic import Field

from assets.errors import IO_RETRY, bad_input_fails_fast
from assets.inputs import orthophoto_tiles
from assets.owners import PIPELINE
from assets.partitions import departements_partitions
from ops.cpus import available_cpus
from ops.geo.departements import check_departement, native_epsg
from ops.imagery.convert import convert_tiles
from ops.imagery.mosaic import build_mosaic, is_jpeg2000
from ops.imagery.remote import is_remote
from resources import keys
from resources.env import kinds
from resources.imagery import OrthoImagery
from resources.object_store import ObjectStore


class MosaicConfig(Config):
    convert: Literal["never", "jpeg", "deflate"] = Field(
        default="never",
        description="Convert JPEG 2000 tiles once to COGs (jpeg: q85 YCbCr, 2.4x smaller than the JP2; deflate: "
        "lossless, 3.6x larger) kept in step with them, and build the mosaic over those: pays after 3.5-7 "
        "crops of the same tiles (make bench-convert); the monthly reprocessing sets jpeg",
    )


@asset(
    partitions_def=departements_partitions,
    deps=[orthophoto_tiles],
    group_name="ingest",
    kinds=kinds("gdal"),
    owners=PIPELINE,
    # 2: overlapping, truncated tiles and mixed nodata refused; 3: a WMS/WMTS as source, JP2 converted on request;
    # 4: gs:// tiles' generations in the imagery id, JP2 in a bucket converted (COGs in the store's bucket)
    code_version="4",
    retry_policy=IO_RETRY,
    description="Virtual mosaic (VRT) over the département's orthophoto tiles, in its native CRS.",
)
def ortho_mosaic(
    context: AssetExecutionContext, config: MosaicConfig, imagery: OrthoImagery, store: ObjectStore
) -> MaterializeResult:
    with bad_input_fails_fast(context.partition_key):
        dep = check_departement(context.partition_key)
        if imagery.wms_url:  # the service is the mosaic: its layer is checked now, naming URL and layer
            tiles, versions = [imagery.service_tile(dep, store.path(keys.mosaic_service(dep)))], {}
            context.log.info(f"partition {dep}: mosaic over WMS {imagery.wms_url} layer {imagery.wms_layer}")
        else:
            tiles, versions = imagery.tiles_and_versions(dep)
            context.log.info(f"partition {dep}: building a mosaic over {len(tiles)} tiles")
        converted = _convert(context, config, dep, tiles, versions, imagery, store) if config.convert != "never" else {}
        tiles = [converted[t][0] if t in converted else t for t in tiles]
        versions |= {cog: digest for cog, digest in converted.values() if is_remote(cog)}
        vrt_key, info_key = keys.mosaic_vrt(dep), keys.mosaic_info(dep)
        info = build_mosaic(
            tiles, store.path(vrt_key), name=f"ortho-{dep}", target_epsg=native_epsg(dep), versions=versions,
            http_timeout_s=imagery.http_timeout_s,
        )  # fmt: skip
        store.path(info_key).write_text(info.to_json())
        w, h = info.bounds[2] - info.bounds[0], info.bounds[3] - info.bounds[1]
        return MaterializeResult(
            metadata={
                "imagery_id": info.imagery_id,
                "tiles": len(tiles),
                "tiles_converted": f"{len(converted)} JPEG 2000 → {config.convert} COG" if converted else "none",
                "source": f"WMS {imagery.wms_url} layer {imagery.wms_layer}" if imagery.wms_url else "tile files",
                "crs": f"EPSG:{info.epsg}",
                "resolution_m": info.resolution,
                "size_px": f"{info.width} x {info.height}",
                "extent_km": f"{w / 1000:.2f} x {h / 1000:.2f}",
                "bands": f"{info.count} x {info.dtype} ({info.band_rule})",
                "vrt": MetadataValue.path(str(store.path(vrt_key))),
            }
        )


def _convert(
    context: AssetExecutionContext,
    config: MosaicConfig,
    dep: str,
    tiles: list[str],
    versions: dict[str, str],
    imagery: OrthoImagery,
    store: ObjectStore,
) -> dict[str, tuple[str, str]]:
    """{JP2 tile: (its COG, the COG's source digest)} for the département's JPEG 2000 tiles, converted or reused.

    Tiles in a bucket are downloaded one at a time for their conversion; with a bucket as store
    the COGs are uploaded to it as they are finished and the mosaic reads them there (see
    ``ops.imagery.convert``).
    """
    jp2 = [t for t in tiles if is_jpeg2000(t)]
    if not jp2:
        return {}
    key = keys.converted_tiles(dep)
    t0 = time.perf_counter()

    def progress(done: int, total: int, c) -> None:
        if done % 25 == 0 or done == total:
            how = "reused" if c.reused else f"converted in {c.seconds:.1f} s"
            context.log.info(f"partition {dep}: {done}/{total} JPEG 2000 tiles to COG ({Path(c.source).name} {how})")

    done = convert_tiles(jp2, store.cogs(key), compression=config.convert, threads=available_cpus(),
                         versions=versions, fetch=imagery.download, progress=progress)  # fmt: skip
    fresh = [c for c in done if not c.reused]
    context.log.info(
        f"partition {dep}: {len(fresh)} tiles converted, {len(done) - len(fresh)} reused, "
        f"{sum(c.bytes for c in done) / 2**20:,.0f} MiB of COGs in {store.uri(key)}, "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    return {c.source: (c.location, c.digest) for c in done}
