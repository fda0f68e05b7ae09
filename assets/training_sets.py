"""What the two training assets share: their config, which départements to train on, saving and reporting a model.

The compute (reading labels, aligning them with chips, gathering across
départements) is ``ops.ml.datasets``; this module is the Dagster side: config,
logs, the model store and the metadata a user wants to see.
"""

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from dagster import AssetExecutionContext, Config, DataVersion, MaterializeResult
from pydantic import Field

from assets.metadata import confusion_figure, confusion_markdown, png_markdown
from ops.ml.datasets import gather
from ops.ml.training import TrainConfig, TrainResult
from resources import keys
from resources.model_store import ModelStore
from resources.object_store import ObjectStore


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


def training_arrays(
    context: AssetExecutionContext,
    config: ModelTrainingConfig,
    store: ObjectStore,
    truth_of: Callable[[str], Path | None],
    arrays_of: Callable[[Path, str, Path], tuple[np.ndarray, ...]],
    what: str,
) -> tuple[tuple[np.ndarray, ...], list[str]]:
    """Training arrays over the configured départements (default: every cropped one with ``what``).

    ``arrays_of(chips folder, dep, ground truth)`` aligns one département's ground truth with its chips.
    """
    chip_root = store.folder(keys.CHIPS_ROOT)
    deps = config.departements or sorted(p.name for p in chip_root.iterdir() if p.is_dir())
    return gather(
        deps,
        truth_of,
        lambda dep, path: arrays_of(store.folder(keys.chips(dep)), dep, path),
        what,
        required=bool(config.departements),
        max_samples=config.max_samples,
        seed=config.seed,
        log=context.log.info,
        where=str(chip_root),
    )


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
