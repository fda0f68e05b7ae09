"""Jobs: the per-département enrichment, its predictions alone (model roll-outs), and the training of the models."""

from dagster import AssetSelection, define_asset_job

from assets.partitions import departements_partitions

ENRICH_JOB = "enrich_departement"
PREDICT_JOB = "predict_departement"
TRAIN_JOB = "train_models"
MODEL_GROUP = "model"  # the training assets' group (one per declared attribute): not partitioned, trained on demand
LABELLING_GROUP = "labelling"  # labelling sheets: exported on demand, never part of a département's run

enrich_job = define_asset_job(
    ENRICH_JOB,
    selection=AssetSelection.all() - AssetSelection.groups(MODEL_GROUP, LABELLING_GROUP),
    partitions_def=departements_partitions,
    description="Footprints → buildings → mosaic → chips → predictions → dbt models, for one département.",
)
predict_job = define_asset_job(
    PREDICT_JOB,
    # predictions and everything downstream of it (the dbt models), never the crop
    selection=AssetSelection.assets("predictions").downstream() - AssetSelection.groups(LABELLING_GROUP),
    partitions_def=departements_partitions,
    description="Predictions → dbt models for one département, from its stored chips: what a new model version re-runs.",
)
train_job = define_asset_job(
    TRAIN_JOB,
    selection=AssetSelection.groups(MODEL_GROUP),
    description="Train new versions of every declared attribute's model (models/attributes.yaml) from labelled chips.",
)
