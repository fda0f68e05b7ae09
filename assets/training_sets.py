"""What every training asset shares: its config, which départements to train on, saving and reporting a model.

The compute (reading labels, aligning them with chips, gathering across
départements) is ``ops.ml.datasets``; this module is the Dagster side: config,
logs, the model store and the metadata a user wants to see.
"""

import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from dagster import AssetExecutionContext, Config, DataVersion, MaterializeResult
from pydantic import Field

from assets.metadata import (
    confusion_figure,
    confusion_markdown,
    png_markdown,
    predicted_vs_true_figure,
    reliability_figure,
)
from ops.geo.departements import DEPARTEMENTS
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
    chip_set: str = "",
) -> tuple[tuple[np.ndarray, ...], list[str]]:
    """Training arrays over the configured départements (default: every cropped one with ``what``).

    ``arrays_of(chips folder, dep, ground truth)`` aligns one département's ground truth with its chips,
    those of ``chip_set`` (an attribute's own chip geometry; "" the default chips).
    """
    chip_root = store.folder(keys.chips_root(chip_set))
    deps = config.departements or sorted(p.name for p in chip_root.iterdir() if p.is_dir() and p.name in DEPARTEMENTS)
    return gather(
        deps,
        truth_of,
        lambda dep, path: arrays_of(store.folder(keys.chips(dep, chip_set)), dep, path),
        what,
        required=bool(config.departements),
        max_samples=config.max_samples,
        seed=config.seed,
        log=context.log.info,
        where=str(chip_root),
    )


def describe(result: TrainResult, used: list[str], labels: str, seen: dict[str, dict] | None = None) -> None:
    """Record the training data and time on the model card before it is saved.

    ``seen``: département → the labels read there (``digest``, ``source``,
    count); the card keeps them and one digest over all, so a model's card says
    which labels it saw (a labelling sheet filled since changes it).
    """
    result.card.training_data = {
        "departements": used,
        "chips": int(result.card.metrics.get("n_train", 0) + result.card.metrics.get("n_val", 0)),
        "labels": labels,
    }
    if seen:
        used_seen = {d: seen[d] for d in used if d in seen}
        doc = json.dumps({d: s["digest"] for d, s in used_seen.items()}, sort_keys=True).encode()
        result.card.training_data["labels_digest"] = hashlib.sha256(doc).hexdigest()[:12]
        result.card.training_data["labels_per_departement"] = used_seen
    result.card.created_at = datetime.now(UTC).isoformat(timespec="seconds")


def save_and_report(
    context: AssetExecutionContext,
    models: ModelStore,
    result: TrainResult,
    used: list[str],
    headline: list[str],
) -> MaterializeResult:
    """Save the model (it becomes current) and report it: its version is the asset's data version.

    ``headline`` names the metrics logged and shown first (accuracy, IoU, MAE...). The
    pictures follow the task: a confusion matrix, a reliability diagram before and
    after calibration, a regression's predicted-against-true values.
    """
    version = models.save(result.model, result.card)
    card = result.card
    m, classes = card.metrics, card.classes
    context.log.info(f"{card.name}@{version}: held-out " + ", ".join(f"{k} {m[k]:.3f}" for k in headline))
    metadata = {
        "model_version": version,
        **{k: round(m[k], 4) for k in headline},
        "n_train": m["n_train"],
        "n_val": m["n_val"],
        "train_seconds": m["train_seconds"],
        "threads": torch.get_num_threads(),  # torch's CPU threads it trained with
        "departements": ", ".join(used),
    }
    if card.training_data.get("labels_digest"):
        metadata["labels_digest"] = card.training_data["labels_digest"]
    if result.confusion is not None:
        title = "held-out pixel confusion matrix" if card.task == "segmentation" else "held-out confusion matrix"
        metadata["confusion_matrix"] = confusion_markdown(result.confusion, classes)
        metadata["confusion_matrix_plot"] = png_markdown(confusion_figure(result.confusion, classes, title))
    cal = result.calibration
    if cal is not None:
        metadata["temperature"] = round(cal.temperature, 4)
        metadata["ece_before"] = round(cal.ece_before, 4)
        metadata["ece_after"] = round(cal.ece_after, 4)
        metadata["reliability_diagram"] = png_markdown(
            reliability_figure(
                cal.reliability_before,
                cal.reliability_after,
                f"{card.name}@{version}: held-out reliability",
                ece_before=cal.ece_before,
                ece_after=cal.ece_after,
            )
        )
    if result.held_out is not None:
        metadata["unit"] = card.unit or ""
        metadata["predicted_vs_true"] = png_markdown(
            predicted_vs_true_figure(*result.held_out, card.unit or "", f"{card.name}@{version}: held-out")
        )
    return MaterializeResult(data_version=DataVersion(version), metadata=metadata)
