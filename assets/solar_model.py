"""`solar_model`: the solar-panel segmenter, trained on chips and ground-truth panel polygons.

Like `roof_model` it is not partitioned and its data version is the model
version, so a new segmenter marks every `predictions` partition stale. The
masks are drawn from the polygons through each chip's own transform, so the
training target is exactly the geometry that inference has to give back.
"""

from datetime import UTC, datetime

import numpy as np
import pyogrio
import shapely
from dagster import AssetExecutionContext, Config, DataVersion, MaterializeResult, asset
from pydantic import Field

from assets.chips import chips
from assets.metadata import confusion_figure, confusion_markdown, png_markdown
from assets.roof_model import ok_chips
from ops.training import TrainConfig, train_segmenter
from ops.vectorize import rasterize_masks
from resources.imagery import FootprintSource
from resources.model_store import ModelStore
from resources.object_store import LocalObjectStore

SOLAR_MODEL_NAME = "solar_panels"
SOLAR_CLASSES = ["none", "solar_panel"]


class SolarModelConfig(Config):
    departements: list[str] = Field(
        default_factory=list, description="Départements whose panel polygons train the model (default: all with them)"
    )
    epochs: int = Field(default=10, description="Training epochs")
    batch_size: int = Field(default=64)
    learning_rate: float = Field(default=5e-3)
    max_samples: int = Field(default=20_000, description="Cap on training chips (a deterministic sample)")
    max_train_seconds: float = Field(default=900.0, description="Stop training after this long")
    seed: int = Field(default=0)


def panel_training_set(
    store: LocalObjectStore, dep: str, panels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every ok chip of a partition with its panel mask: (chips, masks, cell ids)."""
    tree = shapely.STRtree(panels)
    xs, ms, gs = [], [], []
    for cell, idx, arr in ok_chips(store, dep):
        x = np.asarray(arr[idx["row"].to_numpy()])
        windows = idx[["minx", "miny", "maxx", "maxy"]].to_numpy()
        xs.append(x)
        ms.append(rasterize_masks(windows, panels, x.shape[-1], tree))
        gs.append(np.array([f"{dep}/{cell.split('.')[0]}"] * len(x), dtype=object))
    if not xs:
        return np.zeros((0, 3, 1, 1), "uint8"), np.zeros((0, 1, 1), "uint8"), np.zeros(0, object)
    return np.concatenate(xs), np.concatenate(ms), np.concatenate(gs)


@asset(
    deps=[chips],
    group_name="model",
    kinds={"pytorch"},
    code_version="1",
    description="Solar-panel segmenter (per-pixel none/solar_panel) trained on ground-truth polygons; versioned by weights hash.",
)
def solar_model(
    context: AssetExecutionContext,
    config: SolarModelConfig,
    store: LocalObjectStore,
    footprints: FootprintSource,
    models: ModelStore,
) -> MaterializeResult:
    chip_root = store.folder("chips")
    deps = config.departements or sorted(p.name for p in chip_root.iterdir() if p.is_dir())
    xs, ms, gs, used = [], [], [], []
    for dep in deps:
        path = footprints.panels(dep)
        if path is None:
            if config.departements:
                raise FileNotFoundError(f"partition {dep}: no solar-panel polygons for training")
            continue
        panels = pyogrio.read_dataframe(path).geometry.to_numpy()
        x, m, g = panel_training_set(store, dep, panels)
        context.log.info(
            f"partition {dep}: {len(x):,} chips, {int((m.reshape(len(m), -1).any(1)).sum()):,} with panels"
        )
        if len(x):
            xs.append(x), ms.append(m), gs.append(g), used.append(dep)
    if not xs:
        raise RuntimeError(f"no chips with panel polygons under {chip_root} for {deps or 'any département'}")
    x, m, g = np.concatenate(xs), np.concatenate(ms), np.concatenate(gs)
    if len(x) > config.max_samples:
        keep = np.sort(np.random.default_rng(config.seed).choice(len(x), config.max_samples, replace=False))
        x, m, g = x[keep], m[keep], g[keep]
    cfg = TrainConfig(
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.learning_rate,
        seed=config.seed,
        max_train_seconds=config.max_train_seconds,
    )
    result = train_segmenter(x, m, SOLAR_CLASSES, g, name=SOLAR_MODEL_NAME, config=cfg, log=context.log.info)
    result.card.training_data = {
        "departements": used,
        "chips": int(len(x)),
        "labels": "solar_panels.gpkg per département, rasterised through each chip's transform",
    }
    result.card.created_at = datetime.now(UTC).isoformat(timespec="seconds")
    version = models.save(result.model, result.card)
    mt = result.card.metrics
    context.log.info(
        f"{SOLAR_MODEL_NAME}@{version}: held-out panel IoU {mt['iou']:.3f}, pixel accuracy {mt['accuracy']:.3f} "
        f"(chance {mt['chance_accuracy']:.3f}), macro-F1 {mt['macro_f1']:.3f}"
    )
    return MaterializeResult(
        data_version=DataVersion(version),
        metadata={
            "model_version": version,
            "iou": round(mt["iou"], 4),
            "accuracy": round(mt["accuracy"], 4),
            "macro_f1": round(mt["macro_f1"], 4),
            "chance_accuracy": round(mt["chance_accuracy"], 4),
            "chip_detection_accuracy": round(mt["chip_detection_accuracy"], 4),
            "n_train": mt["n_train"],
            "n_val": mt["n_val"],
            "train_seconds": mt["train_seconds"],
            "confusion_matrix": confusion_markdown(result.confusion, SOLAR_CLASSES),
            "confusion_matrix_plot": png_markdown(
                confusion_figure(result.confusion, SOLAR_CLASSES, "held-out pixel confusion matrix")
            ),
            "departements": ", ".join(used),
        },
    )
