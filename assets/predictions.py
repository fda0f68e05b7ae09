"""`predictions`: the current roof model run over a partition's chips, one row per building."""

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from dagster import AssetExecutionContext, Config, MaterializeResult, MetadataValue, asset
from pydantic import Field

from assets.buildings import buildings_key
from assets.chips import chips, chips_prefix
from assets.errors import IO_RETRY, bad_input_fails_fast
from assets.metadata import counts_table, points_map
from assets.partitions import departements_partitions
from assets.roof_model import MODEL_NAME, roof_model
from ops.chips import STATUSES, list_shards, open_chips, read_index, shard_meta, shard_paths
from ops.departements import check_departement
from ops.inference import classify, pick_device
from ops.model import ModelMismatchError
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


class PredictionsConfig(Config):
    batch_size: int = Field(default=64, description="Chips per forward pass")
    device: str = Field(default="auto", description="torch device: auto (CUDA if present), cpu, cuda")
    model_version: str | None = Field(default=None, description="Model version to use (default: the current one)")


@asset(
    partitions_def=departements_partitions,
    deps=[chips, roof_model],
    group_name="inference",
    kinds={"pytorch", "duckdb"},
    pool=WAREHOUSE_POOL,
    code_version="1",
    retry_policy=IO_RETRY,
    description="Roof type of every building (label, score, probabilities, status) from the current model.",
)
def predictions(
    context: AssetExecutionContext,
    config: PredictionsConfig,
    store: LocalObjectStore,
    models: ModelStore,
    warehouse: Warehouse,
) -> MaterializeResult:
    with bad_input_fails_fast():
        dep = check_departement(context.partition_key)
        device = pick_device(config.device)
        model, card = models.load(MODEL_NAME, config.model_version, device)
        folder = store.folder(chips_prefix(dep))
        cells = list_shards(folder)
        expected = pq.ParquetFile(store.path(buildings_key(dep))).metadata.num_rows
        # Check every shard against the model before any row is written.
        for cell in cells:
            arr = open_chips(folder, cell)
            if len(arr):
                card.check_chips(arr.shape, what=f"partition {dep}, shard {shard_paths(folder, cell)[0].name}")
        n_index = sum(pq.ParquetFile(shard_paths(folder, c)[1]).metadata.num_rows for c in cells)
        if n_index != expected:
            raise RuntimeError(
                f"partition {dep}: chips index has {n_index} buildings, buildings has {expected}: re-run chips"
            )
        context.log.info(
            f"partition {dep}: {expected:,} buildings in {len(cells)} cells, model {MODEL_NAME}@{card.version} on {device}"
        )
        now = datetime.now(UTC).replace(tzinfo=None)
        totals = dict.fromkeys(STATUSES, 0)
        labels: dict[str, int] = {}
        t0 = time.perf_counter()
        n_pred = 0
        map_x: list[np.ndarray] = []  # chip-window centres and label-or-status, for the preview map
        map_y: list[np.ndarray] = []
        map_cat: list[str] = []

        def rows() -> Iterator[pa.RecordBatch]:
            nonlocal n_pred
            for k, cell in enumerate(cells, 1):
                idx = read_index(folder, cell)
                imagery = shard_meta(shard_paths(folder, cell)[1]).get("imagery_id")
                n = idx.num_rows
                status = idx.column("status").to_pylist()
                label: list[str | None] = [None] * n
                score = np.full(n, np.nan)
                probs: list[str | None] = [None] * n
                ok = np.flatnonzero(np.array(status) == "ok")
                if len(ok):
                    arr = open_chips(folder, cell)
                    # walk the shard's chips in storage order; `row` says which building each one is
                    chip_rows = idx.column("row").to_numpy()[ok]
                    ok = ok[np.argsort(chip_rows)]
                    if not np.array_equal(np.sort(chip_rows), np.arange(len(arr))):
                        raise RuntimeError(f"partition {dep}, cell {cell}: chips index does not match its array")
                    pos = 0
                    for bp in classify(model, arr, card.classes, batch_size=config.batch_size, device=device):
                        for j in range(len(bp.labels)):
                            i = ok[pos + j]
                            label[i] = bp.labels[j]
                            score[i] = float(bp.scores[j])
                            probs[i] = json.dumps(
                                {c: round(float(p), 5) for c, p in zip(card.classes, bp.probabilities[j], strict=True)}
                            )
                        pos += len(bp.labels)
                    n_pred += len(ok)
                for s in status:
                    totals[s] += 1
                for lab in label:
                    if lab is not None:
                        labels[lab] = labels.get(lab, 0) + 1
                elapsed = time.perf_counter() - t0
                context.log.info(
                    f"partition {dep}: cell {cell} ({k}/{len(cells)}): {len(ok)} chips predicted; "
                    f"{n_pred / max(elapsed, 1e-9):,.0f} chips/s, ETA {elapsed / k * (len(cells) - k):.0f} s"
                )
                map_x.append((idx.column("minx").to_numpy(False) + idx.column("maxx").to_numpy(False)) / 2)
                map_y.append((idx.column("miny").to_numpy(False) + idx.column("maxy").to_numpy(False)) / 2)
                map_cat.extend(lab if lab is not None else st for lab, st in zip(label, status, strict=True))
                yield pa.RecordBatch.from_arrays(
                    [
                        idx.column("building_id").combine_chunks(),
                        pa.array([dep] * n),
                        pa.array([MODEL_NAME] * n),
                        pa.array([card.version] * n),
                        pa.array([card.task] * n),
                        pa.array(label, pa.string()),
                        pa.array(score, pa.float64(), from_pandas=True),
                        pa.array(probs, pa.string()),
                        pa.nulls(n, pa.binary()),
                        pa.array(status, pa.string()),
                        pa.array([imagery] * n, pa.string()),
                        pa.array([context.run_id] * n, pa.string()),
                        pa.array([now] * n, pa.timestamp("us")),
                    ],
                    schema=PREDICTIONS_SCHEMA,
                )

        # Stage to a file first: inference never runs while the warehouse is locked.
        staged = store.path(f"predictions/{dep}/{MODEL_NAME}-{card.version}.parquet")
        tmp = staged.with_suffix(".tmp")
        written = 0
        with pq.ParquetWriter(tmp, PREDICTIONS_SCHEMA, compression="zstd") as w:
            for b in rows():
                w.write_batch(b)
                written += b.num_rows
        tmp.replace(staged)
        seconds = time.perf_counter() - t0
        if written != expected:
            raise RuntimeError(
                f"partition {dep}: {written} predictions for {expected} buildings (accounting invariant)"
            )
        loaded = warehouse.replace_partition(
            "predictions",
            dep,
            pq.ParquetFile(staged).iter_batches(batch_size=50_000),
            where={"model_name": MODEL_NAME, "model_version": card.version},
        )
        if totals["error"]:
            context.log.warning(
                f"partition {dep}: {totals['error']} buildings with status error (see chips index messages)"
            )
        return MaterializeResult(
            metadata={
                "rows": loaded,
                "predicted": n_pred,
                "statuses": counts_table(totals),
                "labels": counts_table(dict(sorted(labels.items())), "label"),
                "map": points_map(
                    np.concatenate(map_x) if map_x else np.zeros(0),
                    np.concatenate(map_y) if map_y else np.zeros(0),
                    map_cat,
                    f"{MODEL_NAME}@{card.version} in {dep}: label, or status when not predicted",
                ),
                "model_version": card.version,
                "device": str(device),
                "seconds": round(seconds, 2),
                "chips_per_s": round(n_pred / seconds, 1) if seconds else 0.0,
                "staged": MetadataValue.path(str(staged)),
            }
        )


__all__ = ["predictions", "ModelMismatchError"]
