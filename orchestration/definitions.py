"""The Dagster code location: every asset, check, job, schedule, sensor and resource of bativision.

The attribute assets (one training asset per declaration, `predictions` over
all of them, the dbt models' attribute columns, the chip sets `chips` cuts) come from
``models/attributes.yaml`` — or the file ``BATIVISION_ATTRIBUTES`` names — read
once when the code location loads: a bad declaration fails the load, naming
the file, the attribute and the field.
"""

from dagster import AssetsDefinition, Definitions, load_asset_checks_from_modules, load_assets_from_modules

from assets import buildings, checks, inputs, mosaic
from assets.attribute_models import model_assets
from assets.chips import chips_asset
from assets.dbt import dbt_models_asset
from assets.labelling import labelling_sheet
from assets.predictions import predictions_asset
from ops.ml.attributes import Attribute, declared_attributes
from orchestration.environment import executor_for, resources_for
from orchestration.jobs import enrich_job, predict_job, train_job
from orchestration.schedules import monthly_reprocessing
from orchestration.sensors import model_rollout_sensor, new_imagery_sensor


def assemble_assets(attributes: dict[str, Attribute]) -> list[AssetsDefinition]:
    """Every asset of the code location for these declared attributes."""
    return [
        *load_assets_from_modules([inputs, buildings, mosaic]),
        chips_asset(attributes),
        *model_assets(attributes),
        predictions_asset(attributes),
        labelling_sheet,
        dbt_models_asset(attributes),
    ]


attributes = declared_attributes()
all_assets = assemble_assets(attributes)
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
