"""`roof_model`: the roof-type classifier, trained on labelled chips and versioned.

Not partitioned: one model serves every département. Its data version is the
model version (a hash of the weights), so a new model marks every
`predictions` partition stale in the UI.
"""

from pathlib import Path

import numpy as np
import pandas as pd
from dagster import AssetExecutionContext, MaterializeResult, asset

from assets.chips import chips
from assets.training_sets import ModelTrainingConfig, describe, gather, ok_chips, save_and_report
from ops.ml.training import train_classifier
from resources.imagery import FootprintSource
from resources.model_store import ModelStore
from resources.object_store import LocalObjectStore

MODEL_NAME = "roof_type"
CLASSES = ["flat", "gable", "hip"]


class RoofModelConfig(ModelTrainingConfig):
    """Training settings of the roof classifier (defaults in ModelTrainingConfig)."""


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
    (x, y, g), used = gather(
        context, config, store, footprints.labels, lambda dep, p: labelled_chips(store, dep, read_labels(p)), "labels"
    )
    result = train_classifier(x, y, CLASSES, g, name=MODEL_NAME, config=config.train_config(), log=context.log.info)
    describe(result, used, "labels.csv per département")
    return save_and_report(context, models, result, used, ["accuracy", "macro_f1", "chance_accuracy"])
