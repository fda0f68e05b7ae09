"""`roof_model`: the roof-type classifier, trained on labelled chips and versioned.

Not partitioned: one model serves every département. Its data version is the
model version (a hash of the weights), so a new model marks every
`predictions` partition stale in the UI.
"""

from dagster import AssetExecutionContext, MaterializeResult, asset

from assets.chips import chips
from assets.errors import IO_RETRY, bad_input_fails_fast
from assets.owners import ML
from assets.training_sets import ModelTrainingConfig, describe, save_and_report, training_arrays
from ops.ml.catalog import ROOF_CLASSES, ROOF_TYPE
from ops.ml.datasets import labelled_chips, read_labels
from ops.ml.training import train_classifier
from resources.env import GPU_POOL, kinds
from resources.imagery import FootprintSource
from resources.model_store import ModelStore
from resources.object_store import ObjectStore


class RoofModelConfig(ModelTrainingConfig):
    """Training settings of the roof classifier (defaults in ModelTrainingConfig)."""


@asset(
    deps=[chips],
    group_name="model",
    kinds=kinds("pytorch"),
    owners=ML,
    pool=GPU_POOL,
    retry_policy=IO_RETRY,  # also a pod preempted on a spot GPU node: the health check fails, the step is retried
    code_version="1",
    description="Roof-type classifier (flat/gable/hip) trained on labelled chips; versioned by weights hash.",
)
def roof_model(
    context: AssetExecutionContext,
    config: RoofModelConfig,
    store: ObjectStore,
    footprints: FootprintSource,
    models: ModelStore,
) -> MaterializeResult:
    def arrays(folder, dep, path):
        labels = read_labels(path, ROOF_TYPE, ROOF_CLASSES)
        return labelled_chips(folder, dep, labels, ROOF_CLASSES, log=context.log.info)

    with bad_input_fails_fast():  # a bad label file fails once; I/O and a preempted pod are retried
        (x, y, g), used = training_arrays(context, config, store, footprints.labels, arrays, "labels")
        classes = list(ROOF_CLASSES)
        result = train_classifier(x, y, classes, g, name=ROOF_TYPE, config=config.train_config(), log=context.log.info)
        describe(result, used, "labels.csv per département")
        return save_and_report(context, models, result, used, ["accuracy", "macro_f1", "chance_accuracy"])
