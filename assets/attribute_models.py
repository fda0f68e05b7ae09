"""One training asset per declared attribute (``models/attributes.yaml``), generated from its declaration.

A team adding an attribute writes a declaration and provides labels; this
module turns it into an asset (``<name>_model``, or the declared ``asset``)
with the same lineage, versioning, model card and metrics for every task:
it reads the declared label source per département (plus any filled
labelling sheet, which adds to and overrides it), aligns the labels with the
``ok`` chips, trains (classification calibrated, regression, segmentation)
and saves a new model version, which becomes current. Not partitioned: one
model serves every département, and its data version is the model version,
so a new one marks every ``predictions`` partition stale. The code version
carries the declaration's digest: editing a declaration marks its model stale.
"""

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from dagster import AssetExecutionContext, AssetsDefinition, MaterializeResult, asset
from pydantic import Field, create_model

from assets.chips import chips
from assets.errors import IO_RETRY, bad_input_fails_fast
from assets.owners import ML
from assets.training_sets import ModelTrainingConfig, describe, save_and_report, training_arrays
from ops.cpus import available_cpus
from ops.ml.attributes import TRAINING_DEFAULTS, Attribute, attributes_path
from ops.ml.datasets import labelled_chips, panel_training_set, read_polygons
from ops.ml.label_sources import Labels, read_footprint_column, read_label_file
from ops.ml.labelling import labels_digest, read_sheet
from ops.ml.training import train_classifier, train_regressor, train_segmenter
from resources import keys
from resources.env import GPU_POOL, kinds
from resources.imagery import FootprintSource
from resources.model_store import ModelStore
from resources.object_store import ObjectStore

#: The training code's own version; the asset's code version is this plus the declaration's digest.
TRAINING_CODE_VERSION = "2"
HEADLINES = {
    "classification": ["accuracy", "macro_f1", "chance_accuracy"],
    "segmentation": ["iou", "accuracy", "macro_f1", "chance_accuracy", "chip_detection_accuracy"],
    "regression": ["mae", "rmse", "r2", "baseline_mae"],
}


def config_class(attr: Attribute) -> type[ModelTrainingConfig]:
    """The asset's config: every training setting, its default the declaration's (shown as such in the UI)."""
    fields = {}
    for key, default in TRAINING_DEFAULTS.items():
        base = ModelTrainingConfig.model_fields[key]
        fields[key] = (type(default), Field(default=attr.setting(key), description=base.description))
    camel = "".join(p.capitalize() for p in attr.name.split("_"))
    return create_model(f"{camel}ModelConfig", __base__=ModelTrainingConfig, **fields)


def attribute_labels(attr: Attribute, dep: str, footprints: FootprintSource, store: ObjectStore, log) -> Labels | None:
    """A département's labels for ``attr``: its declared source, then a filled labelling sheet over it (or None)."""
    src = attr.labels
    got: Labels | None = None
    if src.kind == "footprint_column":
        got = read_footprint_column(footprints.footprints(dep), attr)
    elif src.kind == "file":
        path = footprints.source_file(dep, src.file or "")
        got = read_label_file(path, attr) if path is not None else None
    sheet = store.path(keys.labelling_sheet(dep, attr.name))
    if sheet.exists():
        filled = read_sheet(sheet, None if attr.task == "regression" else list(attr.classes))
        if len(filled):
            log(f"partition {dep}: {len(filled):,} labels from the labelling sheet {sheet}")
            base = got.values if got is not None else pd.Series(dtype=filled.dtype)
            merged = pd.concat([base[~base.index.isin(filled.index)], filled])
            got = Labels(
                values=merged,
                source=(got.source + " + " if got else "") + str(sheet),
                empty=got.empty if got else 0,
                unknown=got.unknown if got else 0,
                skipped=got.skipped if got else {},
            )
    if got is not None:
        log(f"partition {dep}: {attr.name}: {got.summary()}")
    return got


def model_asset(attr: Attribute) -> AssetsDefinition:
    """The training asset of one declared attribute."""
    Config = config_class(attr)
    {"classification": "classifier", "segmentation": "segmenter", "regression": "regression"}[attr.task]
    detail = ", ".join(attr.classes) if attr.classes else f"in {attr.unit}"
    description = (
        f"{attr.description or attr.name} — {attr.task} ({detail}) trained on {attr.labels.describe()}, "
        "declared in models/attributes.yaml; versioned by weights hash."
    )

    @asset(
        name=attr.asset,
        deps=[chips],
        group_name="model",
        kinds=kinds("pytorch"),
        owners=ML,
        pool=GPU_POOL,
        retry_policy=IO_RETRY,  # also a pod preempted on a spot GPU node: the health check fails, the step is retried
        code_version=f"{TRAINING_CODE_VERSION}.{attr.digest}",
        description=description,
        metadata={"attribute": attr.name, "task": attr.task, "labels": attr.labels.describe()},
    )
    def train(
        context: AssetExecutionContext,
        config: Config,  # type: ignore[valid-type]
        store: ObjectStore,
        footprints: FootprintSource,
        models: ModelStore,
    ) -> MaterializeResult:
        log = context.log.info
        seen: dict[str, dict] = {}  # dep → the labels read there (digest, source, count): which labels the model saw
        # torch starts a thread per core of the node; a pod may use its CPU limit only (as `predictions` does).
        # Measured under a 1-CPU CFS quota on the 2-core VM: 2 threads trained in 9.2 s, 1 thread in 8.3 s.
        torch.set_num_threads(available_cpus())

        def truth_of(dep: str) -> Labels | Path | None:
            if attr.task == "segmentation":
                return footprints.source_file(dep, attr.labels.file or "")
            got = attribute_labels(attr, dep, footprints, store, log)
            if got is not None and len(got.values):
                seen[dep] = {"digest": labels_digest(got.values), "source": got.source, "labels": len(got.values)}
                return got
            return None

        def arrays_of(folder: Path, dep: str, truth) -> tuple[np.ndarray, ...]:
            if attr.task == "segmentation":
                return panel_training_set(folder, dep, read_polygons(truth))
            classes = None if attr.task == "regression" else list(attr.classes)
            return labelled_chips(folder, dep, truth.values, classes, log=log)

        with bad_input_fails_fast():  # a bad label file fails once; I/O and a preempted pod are retried
            (x, y, g), used = training_arrays(
                context, config, store, truth_of, arrays_of, attr.labels.describe(), attr.chip_set
            )
            if attr.chip:
                log(f"chips of set {attr.chip_set} ({attr.chip.size} px, declared in {attributes_path()})")
            cfg = config.train_config()
            if attr.task == "classification":
                result = train_classifier(x, y, list(attr.classes), g, name=attr.name, config=cfg, log=log)
            elif attr.task == "regression":
                result = train_regressor(
                    x, y, g, name=attr.name, unit=attr.unit or "", value_range=attr.value_range, config=cfg, log=log
                )
            else:
                log(f"{len(x):,} chips, {int(y.reshape(len(y), -1).any(1).sum()):,} with {attr.classes[1]}")
                result = train_segmenter(x, y, list(attr.classes), g, name=attr.name, config=cfg, log=log)
            result.card.chip_set = attr.chip_set  # predictions and labelling sheets read the same chips
            describe(result, used, attr.labels.describe(), seen)
            return save_and_report(context, models, result, used, HEADLINES[attr.task])

    return train


def model_assets(attributes: dict[str, Attribute]) -> list[AssetsDefinition]:
    return [model_asset(a) for a in attributes.values()]
