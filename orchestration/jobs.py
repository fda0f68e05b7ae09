"""Jobs: the per-département enrichment, and the model training."""

from dagster import AssetSelection, define_asset_job

from assets.partitions import departements_partitions

ENRICH_JOB = "enrich_departement"
TRAIN_JOB = "train_roof_model"

enrich_job = define_asset_job(
    ENRICH_JOB,
    selection=AssetSelection.all() - AssetSelection.assets("roof_model"),
    partitions_def=departements_partitions,
    description="Footprints → buildings → mosaic → chips → predictions → dbt models, for one département.",
)
train_job = define_asset_job(
    TRAIN_JOB,
    selection=AssetSelection.assets("roof_model"),
    description="Train a new version of the roof-type model from the labelled chips.",
)
