"""A partition's chips through every model: shard by shard, one staged row per building and model.

The chips are read once: each batch goes through every model in turn
(:func:`predict_shards`). :func:`predict_partition` turns each shard's outputs
into ``predictions`` rows (``ops.ml.rows``), streams them to one staged
Parquet file per model, counts what a user wants to see (statuses, labels,
panel area, a map), and checks the accounting invariant — exactly one row
per building and model — before the staged files are moved into place for
the warehouse to load.
"""

from __future__ import annotations

import datetime as dt
import functools
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ops.geo.footprints import split_by_cell
from ops.ml.card import ModelCard
from ops.ml.inference import BatchRunner, prefetch
from ops.ml.postprocess import Columns, classification_columns, regression_columns, segmentation_columns
from ops.ml.rows import PREDICTIONS_SCHEMA, polygon_area_m2, prediction_batch
from ops.shards import STATUSES, index_rows, open_chips, read_index, shard_meta, shard_paths


class AccountingError(RuntimeError):
    """Chips or rows that do not account for every building of the partition exactly once."""


@dataclass
class ModelRun:
    """One model in a partition run: its card and its (OOM-proof) forward."""

    card: ModelCard
    runner: BatchRunner


@dataclass
class ShardPredictions:
    """Every index row of one shard, with each model's columns (None / NaN where no chip)."""

    shard: str
    index: pa.Table
    meta: dict[str, str]
    columns: dict[str, Columns]
    n_chips: int


def _empty_columns(n: int, task: str) -> Columns:
    return Columns(
        [None] * n,
        np.full(n, np.nan),
        [None] * n,
        [None] * n if task == "segmentation" else None,
        np.full(n, np.nan) if task == "regression" else None,
    )


def predict_shards(
    folder: Path,
    shards: Sequence[str],
    models: Sequence[ModelRun],
    batch_size: int,
    *,
    footprints: Callable[[str], dict[str, bytes]] | None = None,
    pin_memory: bool = False,
    depth: int = 3,
) -> Iterator[ShardPredictions]:
    """Run ``models`` over the chips of ``shards`` in storage order, one result per shard.

    A background thread reads each shard's index and its chips batch by
    batch (memory-mapped, copied into pinned memory on CUDA), so the device
    never waits on the disk. ``footprints(cell)`` gives building id → WKB
    (native CRS) for a cell; segmentation needs it to keep each building's
    own polygons.
    """

    def items() -> Iterator[tuple]:
        for k, shard in enumerate(shards):
            idx = read_index(folder, shard)
            yield ("shard", k, idx, shard_meta(shard_paths(folder, shard)[1]))
            arr = open_chips(folder, shard)
            for i in range(0, len(arr), batch_size):
                t = torch.from_numpy(np.array(arr[i : i + batch_size]))
                yield ("batch", k, i, t.pin_memory() if pin_memory else t)
            del arr

    seg = [m.card.task == "segmentation" for m in models]
    current: dict | None = None

    def finish(state: dict) -> ShardPredictions:
        return ShardPredictions(state["shard"], state["index"], state["meta"], state["cols"], state["n_chips"])

    for item in prefetch(items(), lambda x: x, depth):
        if item[0] == "shard":
            if current is not None:
                yield finish(current)
            _, k, idx, meta = item
            shard = shards[k]
            status = np.array(idx.column("status").to_pylist(), dtype=object)
            ok = np.flatnonzero(status == "ok")
            rows = idx.column("row").to_numpy()[ok]
            if not np.array_equal(np.sort(rows), np.arange(len(ok))):
                raise RuntimeError(f"{folder.name}/{shard}: chips index does not match its array")
            at_row = ok[np.argsort(rows)]  # index position of the chip stored at each row
            fp = footprints(shard.split(".")[0]) if footprints is not None and any(seg) else {}
            ids = idx.column("building_id").to_pylist()
            current = {
                "shard": shard,
                "index": idx,
                "meta": meta,
                "at_row": at_row,
                "windows": np.column_stack([idx.column(c).to_numpy(False) for c in ("minx", "miny", "maxx", "maxy")]),
                "footprints": [fp.get(ids[i]) for i in at_row] if fp else [None] * len(at_row),
                "cols": {m.card.name: _empty_columns(idx.num_rows, m.card.task) for m in models},
                "n_chips": len(at_row),
            }
            continue
        _, k, start, xb = item
        pos = current["at_row"][start : start + len(xb)]
        for m, is_seg in zip(models, seg, strict=True):
            probs = m.runner(xb)
            if is_seg:
                got = segmentation_columns(
                    probs, current["windows"][pos], current["footprints"][start : start + len(xb)], m.card
                )
            elif m.card.task == "regression":
                got = regression_columns(probs, m.card)
            else:
                got = classification_columns(probs, m.card)
            col = current["cols"][m.card.name]
            for j, p in enumerate(pos.tolist()):
                col.labels[p] = got.labels[j]
                col.probabilities[p] = got.probabilities[j]
                if is_seg:
                    col.geometries[p] = got.geometries[j]
            col.scores[pos] = got.scores
            if got.values is not None:
                col.values[pos] = got.values
    if current is not None:
        yield finish(current)


def check_partition(
    folder: Path, shards: Sequence[str], cards: Sequence[ModelCard], buildings: int, departement: str
) -> int:
    """The partition's chip count, once every shard's chips fit every model and the index holds every building.

    Raises before any row is written: a model that cannot read the chips
    (``ModelMismatchError`` naming the shard), or an index that does not hold
    the partition's ``buildings`` (the chips are stale: re-run chips).
    """
    n_chips = 0
    for shard in shards:
        arr = open_chips(folder, shard)
        n_chips += len(arr)
        if len(arr):
            for card in cards:
                card.check_chips(arr.shape, what=f"partition {departement}, shard {shard_paths(folder, shard)[0].name}")
    n_index = sum(index_rows(folder, s) for s in shards)
    if n_index != buildings:
        raise AccountingError(
            f"partition {departement}: chips index has {n_index} buildings, buildings has {buildings}: re-run chips"
        )
    return n_chips


#: What the step keeps for its pictures, whatever the partition's size: map points, polygons, example chips.
MAP_POINTS = 5_000
MAP_POLYGONS = 2_000
EXAMPLES_PER_CLASS = 6


@dataclass
class PartitionPredictions:
    """What a partition's predictions came to: for the step's checks, logs and metadata.

    Counts cover every building; what is kept for pictures is bounded: about
    :data:`MAP_POINTS` chip centres (every ``stride``-th building), a seeded
    reservoir of :data:`MAP_POLYGONS` segmentation polygons per model, and the
    first :data:`EXAMPLES_PER_CLASS` chips of each label (shard, row, score).
    """

    stride: int = 1  # one building in `stride` is kept for the map
    statuses: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATUSES, 0))
    labels: dict[str, dict[str, int]] = field(default_factory=dict)  # model → label → buildings
    rows: dict[str, int] = field(default_factory=dict)  # model → rows staged
    area_m2: dict[str, float] = field(default_factory=dict)  # segmentation model → polygon area
    chips: int = 0  # chips predicted
    seconds: float = 0.0
    seen: int = 0  # buildings counted so far
    map_x: list[np.ndarray] = field(default_factory=list)  # sampled chip-window centres, native CRS
    map_y: list[np.ndarray] = field(default_factory=list)
    map_categories: dict[str, list[str]] = field(default_factory=dict)  # model → label, or status without one
    polygons: dict[str, list] = field(default_factory=dict)  # segmentation model → sampled polygons, native CRS
    polygons_seen: dict[str, int] = field(default_factory=dict)
    values: dict[str, list[float]] = field(default_factory=dict)  # regression model → [count, sum, min, max]
    examples: dict[str, dict[str, list[tuple[str, int, float]]]] = field(default_factory=dict)

    def add(self, res: ShardPredictions, cards: Sequence[ModelCard]) -> list[str]:
        """Count one shard's results; returns its status column."""
        idx = res.index
        status = idx.column("status").to_pylist()
        for s in status:
            self.statuses[s] += 1
        self.chips += res.n_chips
        keep = np.flatnonzero(np.arange(self.seen, self.seen + idx.num_rows) % self.stride == 0)
        self.seen += idx.num_rows
        minx, maxx = idx.column("minx").to_numpy(False), idx.column("maxx").to_numpy(False)
        miny, maxy = idx.column("miny").to_numpy(False), idx.column("maxy").to_numpy(False)
        self.map_x.append(((minx + maxx) / 2)[keep])
        self.map_y.append(((miny + maxy) / 2)[keep])
        chip_rows = idx.column("row").to_numpy()
        for card in cards:
            cols = res.columns[card.name]
            counts = self.labels.setdefault(card.name, {})
            examples = self.examples.setdefault(card.name, {})
            for i, lab in enumerate(cols.labels):
                if lab is None:
                    continue
                counts[lab] = counts.get(lab, 0) + 1
                got = examples.setdefault(lab, [])
                if len(got) < EXAMPLES_PER_CLASS:
                    got.append((res.shard, int(chip_rows[i]), float(cols.scores[i])))
            if card.task == "segmentation":
                self.area_m2[card.name] = self.area_m2.get(card.name, 0.0) + polygon_area_m2(cols)
                self._sample_polygons(card.name, cols)
            shown = cols.labels
            if card.task == "regression":
                shown = self._count_values(card, cols.values, keep)
            self.map_categories.setdefault(card.name, []).extend(
                shown[i] if shown[i] is not None else status[i] for i in keep.tolist()
            )
        return status

    def _count_values(self, card: ModelCard, values: np.ndarray, keep: np.ndarray) -> dict[int, str | None]:
        """Count a regression's values; returns the value range (five bins of the training range) of the
        buildings kept for the map, by index — the only ones whose category is drawn."""
        finite = np.isfinite(values)
        got = values[finite]
        acc = self.values.setdefault(card.name, [0, 0.0, np.inf, -np.inf])
        if len(got):
            acc[0] += len(got)
            acc[1] += float(got.sum())
            acc[2] = min(acc[2], float(got.min()))
            acc[3] = max(acc[3], float(got.max()))
        lo, hi = (card.metrics.get("train_range") or [0.0, 1.0])[:2]
        step = (hi - lo) / 5 or 1.0
        names = [f"{lo + k * step:.3g}–{lo + (k + 1) * step:.3g} {card.unit or ''}".rstrip() for k in range(5)]
        bins = np.clip((np.nan_to_num(values[keep]) - lo) // step, 0, 4).astype(int)
        return {i: names[b] if finite[i] else None for i, b in zip(keep.tolist(), bins.tolist(), strict=True)}

    def _sample_polygons(self, model: str, cols: Columns) -> None:
        """Reservoir sampling (seeded, so the picture is the same run to run) of the model's polygons."""
        kept = self.polygons.setdefault(model, [])
        rng = np.random.default_rng(self.polygons_seen.get(model, 0))
        n = self.polygons_seen.get(model, 0)
        for g in cols.geometries or ():
            if g is None:
                continue
            for part in getattr(g, "geoms", [g]):
                if len(kept) < MAP_POLYGONS:
                    kept.append(part)
                else:
                    j = int(rng.integers(0, n + 1))
                    if j < MAP_POLYGONS:
                        kept[j] = part
                n += 1
        self.polygons_seen[model] = n

    def centres(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.map_x:
            return np.zeros(0), np.zeros(0)
        return np.concatenate(self.map_x), np.concatenate(self.map_y)


@contextmanager
def _naming(path: Path, departement: str) -> Iterator[None]:
    """An OSError writing a staged file (a full disk) re-raised naming the file and the partition."""
    try:
        yield
    except OSError as exc:
        where = f"partition {departement}: writing staged predictions {path.with_suffix('.tmp')}"
        raise OSError(exc.errno, f"{where}: {exc.strerror or exc}") from exc


def _discard(writers: dict[str, pq.ParquetWriter], staged: dict[str, Path]) -> None:
    """Close and delete the half-written staged files of a failed run (they would hold a full disk's space)."""
    for name, w in writers.items():
        with suppress(Exception):
            w.close()
        staged[name].with_suffix(".tmp").unlink(missing_ok=True)


def predict_partition(
    folder: Path,
    shards: Sequence[str],
    runs: Sequence[ModelRun],
    batch_size: int,
    *,
    departement: str,
    buildings: Path,
    staged: dict[str, Path],
    scratch: Path,
    run_id: str,
    pin_memory: bool = False,
    depth: int = 3,
    progress: Callable[[ShardPredictions, int, PartitionPredictions, float], None] | None = None,
) -> PartitionPredictions:
    """Predict every shard of a partition and stage each model's rows at ``staged[model name]``.

    ``buildings``: the partition's buildings GeoParquet (segmentation keeps
    each building's own polygons, clipped to its footprint; split by cell into
    ``scratch`` for the run). Rows are written to ``<staged>.tmp`` and moved
    into place only once each model has exactly one row per building: a
    failed run never leaves a staged file that looks complete.
    ``progress(shard result, shards done, tally so far, seconds)`` after each shard.
    """
    cards = [r.card for r in runs]
    expected = pq.ParquetFile(buildings).metadata.num_rows
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    tally = PartitionPredictions(stride=max(1, -(-expected // MAP_POINTS)), rows=dict.fromkeys(staged, 0))
    writers = {
        n: pq.ParquetWriter(p.with_suffix(".tmp"), PREDICTIONS_SCHEMA, compression="zstd") for n, p in staged.items()
    }
    t0 = time.perf_counter()
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"footprints-{departement}-", dir=scratch) as tmp:
        segmenting = any(c.task == "segmentation" for c in cards)
        cell_files = split_by_cell(buildings, Path(tmp)) if segmenting else {}

        @functools.lru_cache(maxsize=1)  # one cell at a time: memory stays that of the biggest cell
        def footprints(cell: str) -> dict[str, bytes]:
            """A cell's footprints, read once for its consecutive shards (a dense cell has dozens)."""
            if cell not in cell_files:
                return {}
            t = pq.read_table(cell_files[cell])
            return dict(zip(t.column("building_id").to_pylist(), t.column("geometry").to_pylist(), strict=True))

        try:
            results = predict_shards(
                folder, shards, runs, batch_size, footprints=footprints, pin_memory=pin_memory, depth=depth
            )
            for k, res in enumerate(results, 1):
                status = tally.add(res, cards)
                for card in cards:
                    with _naming(staged[card.name], departement):
                        writers[card.name].write_batch(
                            prediction_batch(
                                res.index,
                                status,
                                res.columns[card.name],
                                card,
                                departement=departement,
                                epsg=int(res.meta.get("epsg", "0") or 0),
                                imagery_id=res.meta.get("imagery_id"),
                                run_id=run_id,
                                predicted_at=now,
                            )
                        )
                    tally.rows[card.name] += res.index.num_rows
                if progress is not None:
                    progress(res, k, tally, time.perf_counter() - t0)
            for name, w in writers.items():
                with _naming(staged[name], departement):
                    w.close()  # flushes the last rows: may be the write that finds the disk full
        except BaseException:
            _discard(writers, staged)
            raise
    tally.seconds = time.perf_counter() - t0
    for name, n in tally.rows.items():
        if n != expected:
            raise AccountingError(
                f"partition {departement}: {n} {name} predictions for {expected} buildings (accounting invariant)"
            )
    for path in staged.values():
        path.with_suffix(".tmp").replace(path)
    return tally
