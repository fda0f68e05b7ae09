"""`chips`: one fixed-size image chip per building, stored as per-cell shards.

Besides the default chips (the run config's size and margins), every chip
geometry declared by an attribute (its `chip` field in models/attributes.yaml)
is cut into its own set (``keys.chips(dep, set)``, under its own root), resumed the same way.
"""

import contextlib
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from dagster import AssetExecutionContext, AssetsDefinition, Config, MaterializeResult, MetadataValue, asset
from pydantic import Field

from assets.buildings import buildings
from assets.errors import IO_RETRY, bad_input_fails_fast
from assets.metadata import counts_table
from assets.mosaic import ortho_mosaic
from assets.owners import PIPELINE
from assets.partitions import departements_partitions
from ops.cpus import available_cpus
from ops.crop.partition import crop_partition
from ops.crop.prefetch import Prefetcher
from ops.crop.service_prefetch import ServicePrefetcher
from ops.crop.spec import CROP_VERSION, ChipSpec, file_digest
from ops.crop.units import CellResult
from ops.geo.departements import check_departement
from ops.imagery.mosaic import MosaicInfo
from ops.imagery.remote import HttpRangeReader, is_remote
from ops.imagery.wms import WmsError
from ops.locks import partition_lock
from ops.ml.attributes import Attribute, chip_sets, declared_attributes
from ops.shards import STATUSES, list_shards, shard_paths
from resources import keys
from resources.env import kinds
from resources.imagery import OrthoImagery
from resources.object_store import ObjectStore


class ChipsConfig(Config):
    size: int = Field(default=64, description="Chip side in pixels (the model's input size)")
    margin_m: float = Field(default=2.0, description="Minimum margin around the building's bounding box, metres")
    margin_ratio: float = Field(default=0.15, description="Margin as a fraction of the building's extent, if larger")
    min_valid_fraction: float = Field(default=0.5, description="Below this share of valid pixels a chip is `nodata`")
    workers: int = Field(
        default=0,
        description="CPUs the crop uses, a worker process cropping cells on each; 0 = the CPUs this step may use "
        "(in a pod: its CPU limit, read from the cgroup quota, so the pod's size sets the workers). On JPEG 2000 "
        "imagery one process per two of them, each decoding blocks on two threads (faster, measured); "
        "1 keeps the crop on one CPU whatever the format",
    )
    resume: bool = Field(default=True, description="Reuse cells whose shard was cut from the same inputs")
    prefetch: Literal["auto", "always", "never"] = Field(
        default="auto",
        description="Fetch each cell's blocks of remote tiles (gs://, http) or its GetMap blocks (a WMS) in "
        "parallel before cutting it; auto = when the mosaic's tiles are remote or a WMS; never is refused with a "
        "WMS/WMTS (its requests would bypass the rate limit and the cache)",
    )
    prefetch_threads: int = Field(default=16, description="Parallel range requests of the prefetch")
    prefetch_depth: int = Field(default=2, description="Cells fetched ahead of the one being cut")
    prefetch_dir: str | None = Field(
        default=None, description="Local scratch for the fetched blocks (a few cells' worth); None = the temp folder"
    )


def chips_asset(attributes: Mapping[str, Attribute]) -> AssetsDefinition:
    """The `chips` asset: the default chips, and the own chips of every attribute that declares a `chip` geometry."""
    sets = chip_sets(attributes)
    users = {n: sorted(a.name for a in attributes.values() if a.chip_set == n) for n in sets}

    @asset(
        name="chips",
        partitions_def=departements_partitions,
        deps=[buildings, ortho_mosaic],
        group_name="imagery",
        kinds=kinds("numpy"),
        owners=PIPELINE,
        # the crop's own version, and the declared chip sets: a change marks the asset stale in the UI (stored
        # shards are recut, a new set is cut)
        code_version="+".join([f"crop-{CROP_VERSION}", *sorted(sets)]),
        retry_policy=IO_RETRY,
        description="Image chips cut around every building from the mosaic, one shard per grid cell"
        + "".join(f"; and chip set {n} ({', '.join(users[n])})" for n in sorted(sets))
        + ".",
    )
    def chips(
        context: AssetExecutionContext, config: ChipsConfig, store: ObjectStore, imagery: OrthoImagery
    ) -> MaterializeResult:
        with bad_input_fails_fast(context.partition_key):
            dep = check_departement(context.partition_key)
            if imagery.wms_url and config.prefetch == "never":  # GDAL would read the service unthrottled, uncached
                raise WmsError(
                    f"partition {dep}: chips config prefetch: never with a {imagery.wms_protocol} source "
                    f"({imagery.wms_url}, layer {imagery.wms_layer}): its requests would bypass the rate limit "
                    f"(wms_requests_per_s={imagery.wms_requests_per_s}) and the cache; use auto or always"
                )
            default = ChipSpec(config.size, config.margin_m, config.margin_ratio, config.min_valid_fraction)
            # read once for every set: the mosaic, and the buildings' digest (a hash of the whole GeoParquet)
            info = MosaicInfo.from_json(store.path(keys.mosaic_info(dep)).read_text())
            buildings_fingerprint = file_digest(store.path(keys.buildings(dep)))
            metadata = cut_chip_set(context, config, store, imagery, dep, info, buildings_fingerprint, default, "")
            for name, geometry in sorted(sets.items()):
                spec = ChipSpec(geometry.size, geometry.margin_m, geometry.margin_ratio, config.min_valid_fraction)
                context.log.info(f"partition {dep}: chip set {name} of {', '.join(users[name])}: {spec}")
                got = cut_chip_set(context, config, store, imagery, dep, info, buildings_fingerprint, spec, name)
                metadata.update({f"{name}_{k}": v for k, v in got.items() if k in SET_METADATA})
            return MaterializeResult(metadata=metadata)

    return chips


#: What the metadata shows of each attribute's own chip set (prefixed with its name).
SET_METADATA = ("chips", "statuses", "cells_reused", "chip_size_px", "seconds", "chips_per_s", "folder")


def cut_chip_set(
    context: AssetExecutionContext,
    config: ChipsConfig,
    store: ObjectStore,
    imagery: OrthoImagery,
    dep: str,
    info: MosaicInfo,
    buildings_fingerprint: str,
    spec: ChipSpec,
    chip_set: str,
) -> dict:
    """Cut (or resume) one set of the partition's chips; its metadata."""
    bpath = store.path(keys.buildings(dep))
    out = store.folder(keys.chips(dep, chip_set))
    what = f"partition {dep}: " + (f"chip set {chip_set}: " if chip_set else "")
    t0 = time.perf_counter()
    totals = dict.fromkeys(STATUSES, 0)
    done_chips = {"n": 0, "reused": 0, "blocks": 0, "area_blocks": 0, "ahead_blocks": 0}

    def progress(r: CellResult, done: int, total: int) -> None:
        for k, v in r.counts.items():
            totals[k] += v
        done_chips["n"] += r.chips
        done_chips["reused"] += int(r.reused)
        done_chips["blocks"] += r.blocks
        done_chips["area_blocks"] += r.area_blocks
        done_chips["ahead_blocks"] += r.ahead_blocks
        elapsed = time.perf_counter() - t0
        eta = elapsed / done * (total - done)
        how = "reused" if r.reused else f"{r.seconds:.1f} s"
        context.log.info(
            f"{what}shard {r.shard_id} ({done}/{total}): {r.chips} chips ({how}); "
            f"{done_chips['n'] / max(elapsed, 1e-9):,.0f} chips/s, ETA {eta:.0f} s"
        )

    remote = any(is_remote(t.path) for t in info.tiles)
    service = bool(imagery.wms_url)
    use_prefetch = config.prefetch == "always" or (config.prefetch == "auto" and (remote or service))
    fetcher = _prefetcher(config, imagery, info, spec, dep, context) if use_prefetch else contextlib.nullcontext()
    with partition_lock(out, f"{what}chips"), fetcher as prefetcher:
        for _ in crop_partition(
            bpath,
            info,
            out,
            spec,
            buildings_fingerprint=buildings_fingerprint,
            workers=config.workers or available_cpus(),
            resume=config.resume,
            progress=progress,
            prefetch=prefetcher,
            prefetch_depth=config.prefetch_depth,
        ):
            pass
        fetched = prefetcher.stats.as_dict() if prefetcher else None
    n_chips, reused = done_chips["n"], done_chips["reused"]
    seconds = time.perf_counter() - t0
    stored = sum(shard_paths(out, c)[0].stat().st_size for c in list_shards(out))
    return {
        "buildings": sum(totals.values()),
        "chips": n_chips,
        "statuses": counts_table(totals),
        "cells": len(list_shards(out)),
        "cells_reused": reused,
        "chip_size_px": spec.size,
        "imagery_id": info.imagery_id,
        "seconds": round(seconds, 2),
        "chips_per_s": round(n_chips / seconds, 1) if seconds else 0.0,
        "bytes_per_chip": round(stored / n_chips) if n_chips else 0,
        "raster_blocks_decoded": done_chips["blocks"],
        # JPEG 2000 blocks that few windows touch: only their areas decoded (ops.crop.tiles)
        "raster_blocks_decoded_by_areas": done_chips["area_blocks"],
        # JPEG 2000 blocks decoded ahead of the sweep on the worker's spare CPUs (ops.crop.tiles)
        "raster_blocks_decoded_ahead": done_chips["ahead_blocks"],
        "folder": MetadataValue.path(str(out)),
        **(prefetch_metadata(fetched, seconds) if fetched else {"prefetch": "off"}),
    }


def _prefetcher(
    config: ChipsConfig, imagery: OrthoImagery, info: MosaicInfo, spec: ChipSpec, dep: str, context
) -> Prefetcher | ServicePrefetcher:
    """The images of a WMS/WMTS layer, or the blocks of remote tiles, fetched ahead of the crop."""
    wms = imagery.service(dep)
    if wms is not None:
        return ServicePrefetcher(
            info, spec, wms, HttpRangeReader(imagery.http_timeout_s), Path(imagery.wms_cache_dir),
            threads=imagery.wms_threads, rate_per_s=imagery.wms_requests_per_s,
            cache_max_bytes=imagery.wms_cache_mb << 20, log=context.log.info,
        )  # fmt: skip
    return Prefetcher(
        info, spec, imagery.range_reader(), Path(config.prefetch_dir) if config.prefetch_dir else None,
        threads=config.prefetch_threads, log=context.log.debug,
    )  # fmt: skip


def prefetch_metadata(stats: dict, seconds: float) -> dict:
    """What the prefetch of remote tiles did: volume, requests, retries, and its rate over the step."""
    return {
        "prefetch": "on",
        "prefetch_blocks": int(stats["blocks"]),
        "prefetch_mib": round(stats["bytes"] / 2**20, 1),
        "prefetch_requests": int(stats["requests"]),
        "prefetch_retries": int(stats["retries"]),
        "prefetch_whole_files": int(stats["whole_files"]),
        # tiles given up after their retries: their buildings have status `error`, the message names the URL
        "prefetch_unavailable_tiles": int(stats.get("unavailable_tiles", 0)),
        # a WMS layer: blocks found in the local GetMap cache, and blocks given up (their buildings: `error`)
        "prefetch_cached_blocks": int(stats.get("cached", 0)),
        "prefetch_unavailable_blocks": int(stats.get("unavailable_blocks", 0)),
        "prefetch_mib_per_s": round(stats["bytes"] / 2**20 / seconds, 1) if seconds else 0.0,
    }


#: The code location's `chips`: the default chips and the chip sets of models/attributes.yaml (or BATIVISION_ATTRIBUTES).
chips = chips_asset(declared_attributes())
