"""The Dagster code location: every asset, job, schedule and resource of bativision."""

from dagster import Definitions, load_assets_from_modules

from assets import buildings, chips, dbt, mosaic, predictions, roof_model, solar_model
from orchestration.environment import executor_for, resources_for
from orchestration.jobs import enrich_job, train_job
from orchestration.schedules import monthly_reprocessing
from orchestration.sensors import new_imagery_sensor

all_assets = load_assets_from_modules([buildings, mosaic, chips, roof_model, solar_model, predictions, dbt])

defs = Definitions(
    assets=all_assets,
    jobs=[enrich_job, train_job],
    schedules=[monthly_reprocessing],
    sensors=[new_imagery_sensor],
    resources=resources_for(),
    executor=executor_for(),
)
