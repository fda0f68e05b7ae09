"""`solar_model`: the solar-panel segmenter, trained on chips and ground-truth panel polygons.

Like `roof_model` it is not partitioned and its data version is the model
version, so a new segmenter marks every `predictions` partition stale.
"""

from dagster import AssetExecutionContext, MaterializeResult, asset
from pydantic import Field

from assets.chips import chips
from assets.errors import IO_RETRY, bad_input_fails_fast
from assets.owners import ML
from assets.training_sets import ModelTrainingConfig, describe, save_and_report, training_arrays
from ops.ml.catalog import PANEL_CLASSES, SOLAR_PANELS
from ops.ml.datasets import panel_training_set, read_polygons
from ops.ml.training import train_segmenter
from resources.env import GPU_POOL, kinds
from resources.imagery import FootprintSource
from resources.model_store import ModelStore
from resources.object_store import ObjectStore


class SolarModelConfig(ModelTrainingConfig):
    epochs: int = Field(default=10, description="Training epochs")
    batch_size: int = Field(default=64)
    learning_rate: float = Field(default=5e-3)
    max_samples: int = Field(default=20_000, description="Cap on training chips (a deterministic sample)")


@asset(
    deps=[chips],
    group_name="model",
    kinds=kinds("pytorch"),
    owners=ML,
    pool=GPU_POOL,
    retry_policy=IO_RETRY,  # also a pod preempted on a spot GPU node: the health check fails, the step is retried
    code_version="1",
    description="Solar-panel segmenter (per-pixel none/solar_panel) trained on ground-truth polygons; versioned by weights hash.",
)
def solar_model(
    context: AssetExecutionContext,
    config: SolarModelConfig,
    store: ObjectStore,
    footprints: FootprintSource,
    models: ModelStore,
) -> MaterializeResult:
    def arrays(folder, dep, path):
        return panel_training_set(folder, dep, read_polygons(path))

    with bad_input_fails_fast():  # a bad label file fails once; I/O and a preempted pod are retried
        (x, m, g), used = training_arrays(context, config, store, footprints.panels, arrays, "solar-panel polygons")
        context.log.info(f"{len(x):,} chips, {int(m.reshape(len(m), -1).any(1).sum()):,} with panels")
        classes = list(PANEL_CLASSES)
        result = train_segmenter(
            x, m, classes, g, name=SOLAR_PANELS, config=config.train_config(), log=context.log.info
        )
        describe(result, used, "solar_panels.gpkg per département, rasterised through each chip's transform")
        headline = ["iou", "accuracy", "macro_f1", "chance_accuracy", "chip_detection_accuracy"]
        return save_and_report(context, models, result, used, headline, "held-out pixel confusion matrix")
