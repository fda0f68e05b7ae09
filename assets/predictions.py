"""`predictions`: every declared attribute's current model run over a partition's chips, one row per building and model.

The compute is ``ops.ml.predict``: the chips are read once, each batch goes
through every model, rows are staged to one Parquet file per model and the
accounting invariant is checked before they are. This asset holds the config,
loads the models, picks the device and batch size, publishes the partition to the
warehouse — its buildings (from the `buildings` GeoParquet) and every model's
staged rows replace that partition's rows in one transaction, so a re-run never
duplicates, readers never see half a partition, and a run that fails anywhere
before leaves the partition's buildings and predictions as the last successful
run published them — and reports.
"""

import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
from dagster import AssetExecutionContext, AssetKey, AssetsDefinition, Config, MaterializeResult, MetadataValue, asset
from pydantic import Field

from assets.buildings import buildings
from assets.chips import chips
from assets.errors import IO_RETRY, bad_input_fails_fast
from assets.metadata import chip_grid, counts_table, points_map
from assets.owners import ML
from assets.partitions import departements_partitions
from ops.cpus import available_cpus
from ops.geo.departements import check_departement, native_epsg
from ops.geo.reproject import wgs84_batches
from ops.imagery.mosaic import MosaicInfo
from ops.locks import partition_lock
from ops.ml.attributes import Attribute, declared_attributes
from ops.ml.batch_size import (
    CPU_DEFAULT_BATCH,
    CUDA_DEFAULT_BATCH,
    BatchSize,
    choose_batch_size,
    machine_key,
    models_key,
)
from ops.ml.card import check_outputs
from ops.ml.inference import BatchRunner, forward_fn, pick_device, reuse_freed_memory
from ops.ml.predict import ModelRun, PartitionPredictions, ShardPredictions, check_partition, predict_partition
from ops.shards import list_shards, open_chips
from resources import keys
from resources.env import inference_pool, kinds
from resources.model_store import ModelNotFoundError, ModelStore
from resources.object_store import ObjectStore
from resources.warehouse import PartitionRows, Warehouse


class PredictionsConfig(Config):
    models: list[str] = Field(
        default_factory=list,
        description="Models to run, by name (model store); empty = every attribute declared in models/attributes.yaml "
        "that has a model (one without is skipped with a warning)",
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
    threads: int = Field(default=0, description="torch CPU threads; 0 = the CPUs this step may use (a pod's CPU limit)")


def predictions_asset(attributes: dict[str, Attribute]) -> AssetsDefinition:
    """The `predictions` asset for these declared attributes: each one's training asset is an input (lineage)."""
    names = ", ".join(f"{a.name} ({a.task})" for a in attributes.values())

    @asset(
        name="predictions",
        partitions_def=departements_partitions,
        deps=[buildings, chips, *(AssetKey(a.asset) for a in attributes.values())],
        group_name="inference",
        kinds=kinds("pytorch", "parquet", warehouse=True),
        owners=ML,
        pool=inference_pool(),
        code_version="4",
        retry_policy=IO_RETRY,
        description=f"Every declared attribute of every building — {names} — one row per building and model version.",
    )
    def predictions(
        context: AssetExecutionContext,
        config: PredictionsConfig,
        store: ObjectStore,
        models: ModelStore,
        warehouse: Warehouse,
    ) -> MaterializeResult:
        return run_predictions(context, config, store, models, warehouse, list(attributes))

    return predictions


def run_predictions(
    context: AssetExecutionContext,
    config: PredictionsConfig,
    store: ObjectStore,
    models: ModelStore,
    warehouse: Warehouse,
    declared: list[str],
) -> MaterializeResult:
    t_start = time.perf_counter()
    with bad_input_fails_fast(context.partition_key):
        dep = check_departement(context.partition_key)
        device = pick_device(config.device)
        torch.set_num_threads(config.threads or available_cpus())
        reuse_freed_memory()
        unknown = sorted(set(config.model_versions) - set(config.models or declared))
        if unknown:
            raise ValueError(f"model_versions names {unknown}, which are not in models {config.models or declared}")
        runs, untrained = [], []
        for name in config.models or declared:
            try:
                model, card = models.load(name, config.model_versions.get(name), device)
            except ModelNotFoundError:
                if config.models or name in config.model_versions:  # named by the user: not having it is an error
                    raise
                untrained.append(name)  # declared, never trained: the rest of the attributes still run
                continue
            check_outputs(model, card, device)
            runs.append(ModelRun(card, BatchRunner(forward_fn(model, device, card.task), 1 << 30, context.log.warning)))
        if untrained:
            context.log.warning(
                f"partition {dep}: declared attribute(s) {untrained} have no model yet: materialize their training "
                "asset (see models/attributes.yaml); predicting the others"
            )
        if not runs:
            raise ModelNotFoundError(f"partition {dep}: no model to run: {untrained} are declared but none is trained")
        cards = [r.card for r in runs]
        # models read the chips they were trained on: the default ones, or their attribute's own chip set
        groups: dict[str, list[ModelRun]] = {}
        for r in runs:
            groups.setdefault(r.card.chip_set, []).append(r)
        buildings_path = store.path(keys.buildings(dep))
        expected = pq.ParquetFile(buildings_path).metadata.num_rows
        folders = {s: store.folder(keys.chips(dep, s)) for s in groups}
        shards = {s: list_shards(f) for s, f in folders.items()}
        n_chips = {  # every set checked before any row is written
            s: check_partition(folders[s], shards[s], [r.card for r in g], expected, _where(dep, s, g))
            for s, g in groups.items()
        }
        batches = {}
        for s, g in groups.items():
            batches[s] = choose_batch_size(
                config.batch_size,
                device,
                [r.runner.forward for r in g],
                folders[s],
                shards[s],
                n_chips[s],
                store.path(keys.batch_size_cache(machine_key(device), models_key([r.card for r in g]))),
                context.log.info,
            )
            for r in g:
                r.runner.max_batch = batches[s].size
        names = ", ".join(f"{c.name}@{c.version} ({c.task})" for c in cards)
        sizes = ", ".join(f"{s or 'default chips'}: batch {b.size}" for s, b in batches.items())
        context.log.info(
            f"partition {dep}: {expected:,} buildings in {len(shards[cards[0].chip_set])} shards; {names} on "
            f"{device}, {sizes}"
        )
        staged = {c.name: store.path(keys.staged_predictions(dep, c.name, c.version)) for c in cards}
        tallies: dict[str, PartitionPredictions] = {}
        # one run stages and publishes a partition at a time: another would overwrite the staged files
        with partition_lock(next(iter(staged.values())).parent, f"partition {dep}: predictions"):
            for s, g in groups.items():
                group_staged = {r.card.name: staged[r.card.name] for r in g}
                tallies[s] = _predict_set(
                    context, config, dep, s, g, folders[s], shards[s], batches[s], device, group_staged,
                    buildings_path, store,
                )  # fmt: skip
            written = warehouse.publish(
                dep,
                [
                    PartitionRows("buildings", wgs84_batches(buildings_path, native_epsg(dep))),
                    *(
                        PartitionRows(
                            "predictions",
                            pq.ParquetFile(staged[c.name]).iter_batches(batch_size=50_000),
                            where={"model_name": c.name, "model_version": c.version},
                        )
                        for c in cards
                    ),
                ],
            )
            if written[0] != expected:
                raise RuntimeError(f"partition {dep}: {expected} buildings staged but {written[0]} published")
            loaded = {c.name: n for c, n in zip(cards, written[1:], strict=True)}
            context.log.info(
                f"partition {dep}: published {written[0]:,} buildings and {sum(loaded.values()):,} predictions"
            )
        tally = tallies[cards[0].chip_set]  # the first model's chips: the step's statuses and speed
        if tally.statuses["error"]:
            context.log.warning(
                f"partition {dep}: {tally.statuses['error']} buildings with status error (see chips index messages)"
            )
        tiles = [t.bounds for t in MosaicInfo.from_json(store.path(keys.mosaic_info(dep)).read_text()).tiles]
        seconds = sum(t.seconds for t in tallies.values())
        predicted = sum(t.chips for t in tallies.values())
        metadata = {
            "rows": sum(loaded.values()),
            "predicted": predicted,
            "statuses": counts_table(tally.statuses),
            "models": ", ".join(f"{c.name}@{c.version}" for c in cards),
            "device": str(device),
            "batch_size": batches[cards[0].chip_set].size,
            "threads": torch.get_num_threads(),
            "oom_halvings": sum(r.runner.halvings for r in runs),
            "seconds": round(seconds, 2),
            "chips_per_s": round(predicted / seconds, 1) if seconds else 0.0,
        }
        rates = batches[cards[0].chip_set].rates
        if rates:
            metadata["batch_size_rates"] = MetadataValue.json({str(b): round(v, 1) for b, v in rates.items()})
        for s in groups:
            if s:
                metadata[f"{s}_statuses"] = counts_table(tallies[s].statuses)
                metadata[f"{s}_batch_size"] = batches[s].size
        for c in cards:
            t, folder = tallies[c.chip_set], folders[c.chip_set]
            xs, ys = t.centres()
            metadata[f"{c.name}_model_version"] = c.version
            if c.chip_set:
                metadata[f"{c.name}_chip_set"] = c.chip_set
            metadata[f"{c.name}_labels"] = counts_table(dict(sorted(t.labels.get(c.name, {}).items())), "label")
            metadata[f"{c.name}_map"] = points_map(
                xs,
                ys,
                t.map_categories.get(c.name, []),
                f"{c.name}@{c.version} in {dep}: label, or status when not predicted",
                polygons=t.polygons.get(c.name, []),
                tiles=tiles,
            )
            examples = {
                label: [(open_chips(folder, shard)[row], score) for shard, row, score in found]
                for label, found in t.examples.get(c.name, {}).items()
            }
            metadata[f"{c.name}_examples"] = chip_grid(examples, f"{c.name}@{c.version} in {dep}: examples and scores")
            metadata[f"{c.name}_staged"] = MetadataValue.path(str(staged[c.name]))
            if c.name in t.area_m2:
                metadata[f"{c.name}_area_m2"] = round(t.area_m2[c.name], 1)
            if t.values.get(c.name, [0])[0]:
                n, total, lo, hi = t.values[c.name]
                metadata[f"{c.name}_mean_value"] = round(total / n, 3)
                metadata[f"{c.name}_value_range"] = f"{lo:.3g} to {hi:.3g} {c.unit or ''}".rstrip()
        # from the step's start: model loading, checks, batch-size choice, warehouse load and these previews included
        metadata["total_seconds"] = round(time.perf_counter() - t_start, 2)
        if untrained:
            metadata["untrained_attributes"] = ", ".join(untrained)
        return MaterializeResult(metadata=metadata)


def _where(dep: str, chip_set: str, group: list[ModelRun]) -> str:
    """How errors name a partition's chips: the partition, and the chip set of these models if not the default."""
    if not chip_set:
        return dep
    return f"{dep}, chip set {chip_set} of {', '.join(r.card.name for r in group)}"


def _predict_set(
    context: AssetExecutionContext,
    config: PredictionsConfig,
    dep: str,
    chip_set: str,
    group: list[ModelRun],
    folder: Path,
    shards: list[str],
    batch: BatchSize,
    device: torch.device,
    staged: dict[str, Path],
    buildings_path: Path,
    store: ObjectStore,
) -> PartitionPredictions:
    """Run the models that read one set of the partition's chips over it (the chips read once)."""
    what = _where(dep, chip_set, group)

    def progress(res: ShardPredictions, k: int, tally: PartitionPredictions, elapsed: float) -> None:
        context.log.info(
            f"partition {what}: shard {res.shard} ({k}/{len(shards)}): {res.n_chips} chips; "
            f"{tally.chips / max(elapsed, 1e-9):,.0f} chips/s, ETA {elapsed / k * (len(shards) - k):.0f} s"
        )

    tally = predict_partition(
        folder,
        shards,
        group,
        batch.size,
        departement=dep,
        buildings=buildings_path,
        staged=staged,
        scratch=store.folder(keys.scratch()),
        run_id=context.run_id,
        pin_memory=device.type == "cuda",
        depth=config.prefetch_batches,
        progress=progress,
    )
    batch.forget_if_slower(tally.chips, tally.seconds, lambda msg: context.log.warning(f"partition {what}: {msg}"))
    return tally


#: The code location's `predictions`: the attributes of models/attributes.yaml (or BATIVISION_ATTRIBUTES).
predictions = predictions_asset(declared_attributes())
