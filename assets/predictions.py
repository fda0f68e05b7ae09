"""`predictions`: every model of the store run over a partition's chips, one row per building and model.

The chips are read once: each batch goes through the roof classifier and the
solar-panel segmenter in turn. Rows are staged to one parquet file per model,
then each model's rows replace that partition's rows in the warehouse in one
transaction, so a re-run never duplicates and readers never see half a
partition.
"""

import json
import os
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import shapely
import torch
from dagster import AssetExecutionContext, Config, MaterializeResult, MetadataValue, asset
from pydantic import Field

from assets.buildings import buildings_key
from assets.chips import chips, chips_prefix
from assets.errors import IO_RETRY, bad_input_fails_fast
from assets.metadata import counts_table, points_map
from assets.partitions import departements_partitions
from assets.roof_model import MODEL_NAME, roof_model
from assets.solar_model import SOLAR_MODEL_NAME, solar_model
from ops.geo.departements import check_departement
from ops.geo.footprints import split_by_cell
from ops.geo.reproject import to_wgs84_wkb
from ops.ml.card import ModelMismatchError, check_outputs
from ops.ml.inference import (
    BatchRunner,
    ModelRun,
    forward_fn,
    pick_device,
    predict_shards,
    reuse_freed_memory,
    tune_batch_size,
)
from ops.shards import STATUSES, list_shards, open_chips, shard_paths
from resources.model_store import ModelStore
from resources.object_store import LocalObjectStore
from resources.warehouse import WAREHOUSE_POOL, Warehouse

PREDICTIONS_SCHEMA = pa.schema(
    [
        ("building_id", pa.string()),
        ("departement", pa.string()),
        ("model_name", pa.string()),
        ("model_version", pa.string()),
        ("task", pa.string()),
        ("label", pa.string()),
        ("score", pa.float64()),
        ("probabilities", pa.string()),
        ("geometry", pa.binary()),
        ("status", pa.string()),
        ("imagery_id", pa.string()),
        ("run_id", pa.string()),
        ("predicted_at", pa.timestamp("us")),
    ]
)
#: Below this many chips a partition runs at a fixed batch size: measuring would cost more than it saves.
TUNE_MIN_CHIPS = 2048
CPU_DEFAULT_BATCH = 32
CUDA_DEFAULT_BATCH = 512


class PredictionsConfig(Config):
    models: list[str] = Field(
        default_factory=lambda: [MODEL_NAME, SOLAR_MODEL_NAME], description="Models to run, by name (model store)"
    )
    model_versions: dict[str, str] = Field(
        default_factory=dict, description="Model name → version to use (default: each model's current version)"
    )
    batch_size: int = Field(
        default=0,
        description=f"Chips per forward pass; 0 = measured on the partition's own chips on CPU "
        f"({CPU_DEFAULT_BATCH} for small partitions), {CUDA_DEFAULT_BATCH} on CUDA (halved on out-of-memory)",
    )
    device: str = Field(default="auto", description="torch device: auto (CUDA if present), cpu, cuda")
    prefetch_batches: int = Field(default=3, description="Batches read ahead by the background loader")
    threads: int = Field(default=0, description="torch CPU threads; 0 = every core this process may use")


def machine_key(device) -> str:
    """What the best batch size depends on: the device model, or the CPU count and torch threads."""
    if device.type == "cuda":
        return "cuda-" + "".join(c if c.isalnum() else "_" for c in torch.cuda.get_device_name(device))
    return f"cpu{os.cpu_count()}-threads{torch.get_num_threads()}"


def choose_batch_size(
    config: PredictionsConfig, device, runs: list[ModelRun], folder: Path, shards: list[str], total: int, store, log
) -> tuple[int, dict, Path | None]:
    """The configured batch size; else on CPU the one measured for these models on this kind of machine.

    A measurement is kept in the object store, keyed by machine kind and model
    versions, so the next partitions start straight away; returns (batch size,
    measured chips/s per batch size, where the measurement is kept).
    """
    if config.batch_size > 0:
        return config.batch_size, {}, None
    if device.type == "cuda":
        return CUDA_DEFAULT_BATCH, {}, None
    if total < TUNE_MIN_CHIPS:  # ``total``: chips in the partition
        return CPU_DEFAULT_BATCH, {}, None
    models_key = "+".join(f"{r.card.name}@{r.card.version}" for r in runs)
    cache = store.path(f"inference/batch_size/{machine_key(device)}/{models_key}.json")
    if cache.exists():
        known = json.loads(cache.read_text())
        log(f"batch size {known['best']} (measured before for {models_key} on {machine_key(device)})")
        return int(known["best"]), {int(k): v for k, v in known["rates"].items()}, cache
    sample, n = [], 0
    for shard in shards:
        arr = open_chips(folder, shard)
        sample.append(np.array(arr[: 512 - n]))
        n += len(sample[-1])
        if n >= 512:
            break
    best, rates = tune_batch_size([r.runner.forward for r in runs], np.concatenate(sample))
    log(
        "batch size measured on this partition's chips: "
        + ", ".join(f"{b}: {r:,.0f} chips/s" for b, r in rates.items())
        + f" → {best}"
    )
    cache.write_text(json.dumps({"best": best, "rates": {str(b): round(r, 1) for b, r in rates.items()}}))
    return best, rates, cache


@asset(
    partitions_def=departements_partitions,
    deps=[chips, roof_model, solar_model],
    group_name="inference",
    kinds={"pytorch", "duckdb"},
    pool=WAREHOUSE_POOL,
    code_version="2",
    retry_policy=IO_RETRY,
    description="Roof type (classification) and solar panels (segmentation, polygons) of every building, "
    "one row per building and model version.",
)
def predictions(
    context: AssetExecutionContext,
    config: PredictionsConfig,
    store: LocalObjectStore,
    models: ModelStore,
    warehouse: Warehouse,
) -> MaterializeResult:
    t_start = time.perf_counter()
    with bad_input_fails_fast():
        dep = check_departement(context.partition_key)
        device = pick_device(config.device)
        torch.set_num_threads(config.threads or len(os.sched_getaffinity(0)))
        reuse_freed_memory()
        unknown = sorted(set(config.model_versions) - set(config.models))
        if unknown:
            raise ValueError(f"model_versions names {unknown}, which are not in models {config.models}")
        runs = []
        for name in config.models:
            model, card = models.load(name, config.model_versions.get(name), device)
            check_outputs(model, card, device)
            runs.append(ModelRun(card, BatchRunner(forward_fn(model, device), 1 << 30, context.log.warning)))
        folder = store.folder(chips_prefix(dep))
        shards = list_shards(folder)
        buildings_path = store.path(buildings_key(dep))
        expected = pq.ParquetFile(buildings_path).metadata.num_rows
        # Check every shard against every model before any row is written.
        n_chips = 0
        for shard in shards:
            arr = open_chips(folder, shard)
            n_chips += len(arr)
            if len(arr):
                for r in runs:
                    r.card.check_chips(arr.shape, what=f"partition {dep}, shard {shard_paths(folder, shard)[0].name}")
        n_index = sum(pq.ParquetFile(shard_paths(folder, c)[1]).metadata.num_rows for c in shards)
        if n_index != expected:
            raise RuntimeError(
                f"partition {dep}: chips index has {n_index} buildings, buildings has {expected}: re-run chips"
            )
        batch, rates, tuned = choose_batch_size(config, device, runs, folder, shards, n_chips, store, context.log.info)
        for r in runs:
            r.runner.max_batch = batch
        names = ", ".join(f"{r.card.name}@{r.card.version} ({r.card.task})" for r in runs)
        context.log.info(
            f"partition {dep}: {expected:,} buildings in {len(shards)} shards; {names} on {device}, batch {batch}"
        )
        now = datetime.now(UTC).replace(tzinfo=None)
        totals = dict.fromkeys(STATUSES, 0)
        labels: dict[str, dict[str, int]] = {r.card.name: {} for r in runs}
        panel_area = 0.0
        map_x: list[np.ndarray] = []  # chip-window centres, and each model's label-or-status, for the preview maps
        map_y: list[np.ndarray] = []
        map_cat: dict[str, list[str]] = {r.card.name: [] for r in runs}
        staged = {r.card.name: store.path(f"predictions/{dep}/{r.card.name}-{r.card.version}.parquet") for r in runs}
        writers = {
            n: pq.ParquetWriter(p.with_suffix(".tmp"), PREDICTIONS_SCHEMA, compression="zstd")
            for n, p in staged.items()
        }
        written = dict.fromkeys(staged, 0)
        t0 = time.perf_counter()
        n_pred = 0
        with tempfile.TemporaryDirectory(prefix=f"footprints-{dep}-", dir=store.folder("tmp")) as tmp:
            cell_files = (
                split_by_cell(buildings_path, Path(tmp)) if any(r.card.task == "segmentation" for r in runs) else {}
            )

            def footprints(cell: str) -> dict[str, bytes]:
                if cell not in cell_files:
                    return {}
                t = pq.read_table(cell_files[cell])
                return dict(zip(t.column("building_id").to_pylist(), t.column("geometry").to_pylist(), strict=True))

            try:
                results = predict_shards(
                    folder,
                    shards,
                    runs,
                    batch,
                    footprints=footprints,
                    pin_memory=device.type == "cuda",
                    depth=config.prefetch_batches,
                )
                for k, res in enumerate(results, 1):
                    idx, n = res.index, res.index.num_rows
                    status = idx.column("status").to_pylist()
                    epsg = int(res.meta.get("epsg", "0") or 0)
                    for s in status:
                        totals[s] += 1
                    n_pred += res.n_chips
                    map_x.append((idx.column("minx").to_numpy(False) + idx.column("maxx").to_numpy(False)) / 2)
                    map_y.append((idx.column("miny").to_numpy(False) + idx.column("maxy").to_numpy(False)) / 2)
                    for r in runs:
                        name, card = r.card.name, r.card
                        cols = res.columns[name]
                        geometry = pa.nulls(n, pa.binary())
                        if cols.geometries is not None:
                            present = [g for g in cols.geometries if g is not None]
                            if present:
                                panel_area += float(shapely.area(np.array(present, dtype=object)).sum())
                                wkb = to_wgs84_wkb(shapely.to_wkb(np.array(cols.geometries, dtype=object)), epsg)
                                geometry = pa.array(wkb, pa.binary())
                        for lab in cols.labels:
                            if lab is not None:
                                labels[name][lab] = labels[name].get(lab, 0) + 1
                        map_cat[name].extend(
                            lab if lab is not None else st for lab, st in zip(cols.labels, status, strict=True)
                        )
                        writers[name].write_batch(
                            pa.RecordBatch.from_arrays(
                                [
                                    idx.column("building_id").combine_chunks(),
                                    pa.array([dep] * n),
                                    pa.array([name] * n),
                                    pa.array([card.version] * n),
                                    pa.array([card.task] * n),
                                    pa.array(cols.labels, pa.string()),
                                    pa.array(cols.scores, pa.float64(), from_pandas=True),
                                    pa.array(cols.probabilities, pa.string()),
                                    geometry,
                                    pa.array(status, pa.string()),
                                    pa.array([res.meta.get("imagery_id")] * n, pa.string()),
                                    pa.array([context.run_id] * n, pa.string()),
                                    pa.array([now] * n, pa.timestamp("us")),
                                ],
                                schema=PREDICTIONS_SCHEMA,
                            )
                        )
                        written[name] += n
                    elapsed = time.perf_counter() - t0
                    context.log.info(
                        f"partition {dep}: shard {res.shard} ({k}/{len(shards)}): {res.n_chips} chips; "
                        f"{n_pred / max(elapsed, 1e-9):,.0f} chips/s, ETA {elapsed / k * (len(shards) - k):.0f} s"
                    )
            finally:
                for w in writers.values():
                    w.close()
        seconds = time.perf_counter() - t0
        if tuned is not None and n_pred >= TUNE_MIN_CHIPS and n_pred / seconds < 0.5 * rates.get(batch, 0):
            # far below what was measured: the machine was busy then or is now; measure again next time
            tuned.unlink(missing_ok=True)
            context.log.warning(
                f"partition {dep}: {n_pred / seconds:,.0f} chips/s against {rates[batch]:,.0f} measured for batch "
                f"{batch}: the batch size will be measured again on the next partition"
            )
        for name, n in written.items():
            if n != expected:
                raise RuntimeError(
                    f"partition {dep}: {n} {name} predictions for {expected} buildings (accounting invariant)"
                )
            staged[name].with_suffix(".tmp").replace(staged[name])
        loaded = {}
        for r in runs:
            loaded[r.card.name] = warehouse.replace_partition(
                "predictions",
                dep,
                pq.ParquetFile(staged[r.card.name]).iter_batches(batch_size=50_000),
                where={"model_name": r.card.name, "model_version": r.card.version},
            )
        if totals["error"]:
            context.log.warning(
                f"partition {dep}: {totals['error']} buildings with status error (see chips index messages)"
            )
        xs = np.concatenate(map_x) if map_x else np.zeros(0)
        ys = np.concatenate(map_y) if map_y else np.zeros(0)
        metadata = {
            "rows": sum(loaded.values()),
            "predicted": n_pred,
            "statuses": counts_table(totals),
            "models": ", ".join(f"{r.card.name}@{r.card.version}" for r in runs),
            "device": str(device),
            "batch_size": batch,
            "threads": torch.get_num_threads(),
            "oom_halvings": sum(r.runner.halvings for r in runs),
            "seconds": round(seconds, 2),
            "chips_per_s": round(n_pred / seconds, 1) if seconds else 0.0,
        }
        if rates:
            metadata["batch_size_rates"] = MetadataValue.json({str(b): round(v, 1) for b, v in rates.items()})
        for r in runs:
            name = r.card.name
            metadata[f"{name}_model_version"] = r.card.version
            metadata[f"{name}_labels"] = counts_table(dict(sorted(labels[name].items())), "label")
            metadata[f"{name}_map"] = points_map(
                xs, ys, map_cat[name], f"{name}@{r.card.version} in {dep}: label, or status when not predicted"
            )
            metadata[f"{name}_staged"] = MetadataValue.path(str(staged[name]))
            if r.card.task == "segmentation":
                metadata[f"{name}_area_m2"] = round(panel_area, 1)
        # from the step's start: model loading, checks, batch-size choice, warehouse load and these previews included
        metadata["total_seconds"] = round(time.perf_counter() - t_start, 2)
        return MaterializeResult(metadata=metadata)


__all__ = ["predictions", "ModelMismatchError"]
