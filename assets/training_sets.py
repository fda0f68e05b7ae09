"""What the two training assets share: their config, and gathering ground truth across départements.

Each model asset says where a département's ground truth is and how to turn
it into arrays aligned with the chips; this module walks the départements,
caps the sample deterministically and names what is missing.
"""

from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
from dagster import AssetExecutionContext, Config, DataVersion, MaterializeResult
from pydantic import Field

from assets.chips import chips_prefix
from assets.metadata import confusion_figure, confusion_markdown, png_markdown
from ops.ml.training import TrainConfig, TrainResult
from ops.shards import list_shards, open_chips, read_index
from resources.model_store import ModelStore
from resources.object_store import LocalObjectStore


class ModelTrainingConfig(Config):
    departements: list[str] = Field(
        default_factory=list, description="Départements whose chips train the model (default: all with ground truth)"
    )
    epochs: int = Field(default=24, description="Training epochs")
    batch_size: int = Field(default=128)
    learning_rate: float = Field(default=3e-3)
    max_samples: int = Field(default=30_000, description="Cap on training chips (a deterministic sample)")
    max_train_seconds: float = Field(default=900.0, description="Stop training after this long")
    seed: int = Field(default=0)

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.learning_rate,
            seed=self.seed,
            max_train_seconds=self.max_train_seconds,
        )


def ok_chips(store: LocalObjectStore, dep: str) -> Iterator[tuple[str, pd.DataFrame, np.ndarray]]:
    """Per shard of a partition: (shard id, index rows of the chips with status ok, the chip array)."""
    folder = store.folder(chips_prefix(dep))
    for cell in list_shards(folder):
        idx = read_index(folder, cell).to_pandas()
        idx = idx[idx["status"] == "ok"]
        if not idx.empty:
            yield cell, idx, open_chips(folder, cell)


def gather(
    context: AssetExecutionContext,
    config: ModelTrainingConfig,
    store: LocalObjectStore,
    truth_of: Callable[[str], Path | None],
    arrays_of: Callable[[str, Path], tuple[np.ndarray, ...]],
    what: str,
) -> tuple[tuple[np.ndarray, ...], list[str]]:
    """Concatenated training arrays (chips first, cell groups last) and the départements used.

    ``truth_of(dep)`` is the ground-truth file or None; ``arrays_of(dep, path)``
    returns aligned arrays for that département. Départements named in the
    config must have ground truth; by default every cropped one that has it is used.
    """
    chip_root = store.folder("chips")
    deps = config.departements or sorted(p.name for p in chip_root.iterdir() if p.is_dir())
    parts, used = [], []
    for dep in deps:
        path = truth_of(dep)
        if path is None:
            if config.departements:
                raise FileNotFoundError(f"partition {dep}: no {what} for training")
            continue
        arrays = arrays_of(dep, path)
        context.log.info(f"partition {dep}: {len(arrays[0]):,} chips with {what}")
        if len(arrays[0]):
            parts.append(arrays)
            used.append(dep)
    if not parts:
        raise RuntimeError(
            f"no chips with {what} under {chip_root} for {deps or 'any département'}: materialize chips first"
        )
    out = tuple(np.concatenate(col) for col in zip(*parts, strict=True))
    if len(out[0]) > config.max_samples:
        keep = np.sort(np.random.default_rng(config.seed).choice(len(out[0]), config.max_samples, replace=False))
        out = tuple(a[keep] for a in out)
    return out, used


def describe(result: TrainResult, used: list[str], labels: str) -> None:
    """Record the training data and time on the model card before it is saved."""
    result.card.training_data = {
        "departements": used,
        "chips": int(result.card.metrics.get("n_train", 0) + result.card.metrics.get("n_val", 0)),
        "labels": labels,
    }
    result.card.created_at = datetime.now(UTC).isoformat(timespec="seconds")


def save_and_report(
    context: AssetExecutionContext,
    models: ModelStore,
    result: TrainResult,
    used: list[str],
    headline: list[str],
    plot_title: str = "held-out confusion matrix",
) -> MaterializeResult:
    """Save the model (it becomes current) and report it: its version is the asset's data version.

    ``headline`` names the metrics logged and shown first (accuracy, IoU, ...).
    """
    version = models.save(result.model, result.card)
    m, classes = result.card.metrics, result.card.classes
    context.log.info(f"{result.card.name}@{version}: held-out " + ", ".join(f"{k} {m[k]:.3f}" for k in headline))
    return MaterializeResult(
        data_version=DataVersion(version),
        metadata={
            "model_version": version,
            **{k: round(m[k], 4) for k in headline},
            "n_train": m["n_train"],
            "n_val": m["n_val"],
            "train_seconds": m["train_seconds"],
            "confusion_matrix": confusion_markdown(result.confusion, classes),
            "confusion_matrix_plot": png_markdown(confusion_figure(result.confusion, classes, plot_title)),
            "departements": ", ".join(used),
        },
    )
