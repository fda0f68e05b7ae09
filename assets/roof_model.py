"""`roof_model`: the roof-type classifier, trained on labelled chips and versioned.

Not partitioned: one model serves every département. Its data version is the
model version (a hash of the weights), so a new model marks every
`predictions` partition stale in the UI.
"""

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
from dagster import AssetExecutionContext, Config, DataVersion, MaterializeResult, asset
from pydantic import Field

from assets.chips import chips, chips_prefix
from assets.metadata import confusion_figure, confusion_markdown, png_markdown
from ops.chips import list_shards, open_chips, read_index
from ops.training import TrainConfig, train_classifier
from resources.imagery import FootprintSource
from resources.model_store import ModelStore
from resources.object_store import LocalObjectStore

MODEL_NAME = "roof_type"
CLASSES = ["flat", "gable", "hip"]


class RoofModelConfig(Config):
    departements: list[str] = Field(
        default_factory=list, description="Départements whose labelled chips train the model (default: all with labels)"
    )
    epochs: int = Field(default=24, description="Training epochs")
    batch_size: int = Field(default=128)
    learning_rate: float = Field(default=3e-3)
    max_samples: int = Field(default=30_000, description="Cap on training chips (a deterministic sample)")
    max_train_seconds: float = Field(default=900.0, description="Stop training after this long")
    seed: int = Field(default=0)


def read_labels(path: Path) -> pd.Series:
    """Ground truth as a Series building_id → class, from a CSV with an id column and `roof_type`."""
    df = pd.read_csv(path, dtype=str)
    id_col = next((c for c in ("building_id", "cleabs", "id", "ID") if c in df.columns), None)
    if id_col is None or "roof_type" not in df.columns:
        raise ValueError(f"{path}: expected an id column (building_id/cleabs) and `roof_type`; got {list(df.columns)}")
    unknown = sorted(set(df["roof_type"].dropna()) - set(CLASSES))
    if unknown:
        raise ValueError(f"{path}: unknown roof_type value(s) {unknown[:5]}; classes are {CLASSES}")
    return df.set_index(id_col)["roof_type"]


def ok_chips(store: LocalObjectStore, dep: str) -> Iterator[tuple[str, pd.DataFrame, np.ndarray]]:
    """Per shard of a partition: (shard id, index rows of the chips with status ok, the chip array)."""
    folder = store.folder(chips_prefix(dep))
    for cell in list_shards(folder):
        idx = read_index(folder, cell).to_pandas()
        idx = idx[idx["status"] == "ok"]
        if not idx.empty:
            yield cell, idx, open_chips(folder, cell)


def labelled_chips(store: LocalObjectStore, dep: str, labels: pd.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Chips with status ok that have a label: (chips, label indices, cell ids)."""
    xs, ys, gs = [], [], []
    for cell, idx, arr in ok_chips(store, dep):
        idx = idx[idx["building_id"].isin(labels.index)]
        if idx.empty:
            continue
        xs.append(np.asarray(arr[idx["row"].to_numpy()]))
        ys.append(labels.loc[idx["building_id"]].map(CLASSES.index).to_numpy())
        gs.append(np.array([f"{dep}/{cell}"] * len(idx), dtype=object))
    if not xs:
        return np.zeros((0, 3, 1, 1), "uint8"), np.zeros(0, "int64"), np.zeros(0, object)
    return np.concatenate(xs), np.concatenate(ys).astype("int64"), np.concatenate(gs)


@asset(
    deps=[chips],
    group_name="model",
    kinds={"pytorch"},
    code_version="1",
    description="Roof-type classifier (flat/gable/hip) trained on labelled chips; versioned by weights hash.",
)
def roof_model(
    context: AssetExecutionContext,
    config: RoofModelConfig,
    store: LocalObjectStore,
    footprints: FootprintSource,
    models: ModelStore,
) -> MaterializeResult:
    chip_root = store.folder("chips")
    deps = config.departements or sorted(p.name for p in chip_root.iterdir() if p.is_dir())
    xs, ys, gs, used = [], [], [], []
    for dep in deps:
        lpath = footprints.labels(dep)
        if lpath is None:
            if config.departements:
                raise FileNotFoundError(f"partition {dep}: no labels file for training")
            continue
        x, y, g = labelled_chips(store, dep, read_labels(lpath))
        context.log.info(f"partition {dep}: {len(x):,} labelled chips")
        if len(x):
            xs.append(x), ys.append(y), gs.append(g), used.append(dep)
    if not xs:
        raise RuntimeError(
            f"no labelled chips found under {chip_root} for {deps or 'any département'}: materialize chips first"
        )
    x, y, g = np.concatenate(xs), np.concatenate(ys), np.concatenate(gs)
    if len(x) > config.max_samples:
        keep = np.sort(np.random.default_rng(config.seed).choice(len(x), config.max_samples, replace=False))
        x, y, g = x[keep], y[keep], g[keep]
    cfg = TrainConfig(
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.learning_rate,
        seed=config.seed,
        max_train_seconds=config.max_train_seconds,
    )
    result = train_classifier(x, y, CLASSES, g, name=MODEL_NAME, config=cfg, log=context.log.info)
    result.card.training_data = {"departements": used, "chips": int(len(x)), "labels": "labels.csv per département"}
    from datetime import UTC, datetime

    result.card.created_at = datetime.now(UTC).isoformat(timespec="seconds")
    version = models.save(result.model, result.card)
    m = result.card.metrics
    context.log.info(
        f"{MODEL_NAME}@{version}: held-out accuracy {m['accuracy']:.3f} (chance {m['chance_accuracy']:.3f}), "
        f"macro-F1 {m['macro_f1']:.3f}"
    )
    return MaterializeResult(
        data_version=DataVersion(version),
        metadata={
            "model_version": version,
            "accuracy": round(m["accuracy"], 4),
            "macro_f1": round(m["macro_f1"], 4),
            "chance_accuracy": round(m["chance_accuracy"], 4),
            "n_train": m["n_train"],
            "n_val": m["n_val"],
            "train_seconds": m["train_seconds"],
            "confusion_matrix": confusion_markdown(result.confusion, CLASSES),
            "confusion_matrix_plot": png_markdown(confusion_figure(result.confusion, CLASSES)),
            "departements": ", ".join(used),
        },
    )
