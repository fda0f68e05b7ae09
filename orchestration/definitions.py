"""The Dagster code location: every asset, check, job, schedule, sensor and resource of bativision."""

from dagster import Definitions, load_asset_checks_from_modules, load_assets_from_modules

from assets import buildings, checks, chips, dbt, inputs, mosaic, predictions, roof_model, solar_model
from orchestration.environment import executor_for, resources_for
from orchestration.jobs import enrich_job, predict_job, train_job
from orchestration.schedules import monthly_reprocessing
from orchestration.sensors import model_rollout_sensor, new_imagery_sensor

all_assets = load_assets_from_modules([inputs, buildings, mosaic, chips, roof_model, solar_model, predictions, dbt])
all_checks = load_asset_checks_from_modules([checks])

defs = Definitions(
    assets=all_assets,
    asset_checks=all_checks,
    jobs=[enrich_job, predict_job, train_job],
    schedules=[monthly_reprocessing],
    sensors=[new_imagery_sensor, model_rollout_sensor],
    resources=resources_for(),
    executor=executor_for(),
)
