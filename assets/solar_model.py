"""`solar_model`: the solar-panel segmenter, trained on chips and ground-truth panel polygons.

Like `roof_model` it is not partitioned and its data version is the model
version, so a new segmenter marks every `predictions` partition stale. The
masks are drawn from the polygons through each chip's own transform, so the
training target is exactly the geometry that inference has to give back.
"""

import numpy as np
import pyogrio
import shapely
from dagster import AssetExecutionContext, MaterializeResult, asset
from pydantic import Field

from assets.chips import chips
from assets.training_sets import ModelTrainingConfig, describe, gather, ok_chips, save_and_report
from ops.ml.training import train_segmenter
from ops.ml.vectorize import rasterize_masks
from resources.imagery import FootprintSource
from resources.model_store import ModelStore
from resources.object_store import LocalObjectStore

SOLAR_MODEL_NAME = "solar_panels"
SOLAR_CLASSES = ["none", "solar_panel"]


class SolarModelConfig(ModelTrainingConfig):
    epochs: int = Field(default=10, description="Training epochs")
    batch_size: int = Field(default=64)
    learning_rate: float = Field(default=5e-3)
    max_samples: int = Field(default=20_000, description="Cap on training chips (a deterministic sample)")


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
    def arrays(dep: str, path) -> tuple[np.ndarray, ...]:
        return panel_training_set(store, dep, pyogrio.read_dataframe(path).geometry.to_numpy())

    (x, m, g), used = gather(context, config, store, footprints.panels, arrays, "solar-panel polygons")
    context.log.info(f"{len(x):,} chips, {int(m.reshape(len(m), -1).any(1).sum()):,} with panels")
    result = train_segmenter(
        x, m, SOLAR_CLASSES, g, name=SOLAR_MODEL_NAME, config=config.train_config(), log=context.log.info
    )
    describe(result, used, "solar_panels.gpkg per département, rasterised through each chip's transform")
    headline = ["iou", "accuracy", "macro_f1", "chance_accuracy", "chip_detection_accuracy"]
    return save_and_report(context, models, result, used, headline, "held-out pixel confusion matrix")
