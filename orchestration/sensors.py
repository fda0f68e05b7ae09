"""Sensors: re-run a département when its orthophoto tiles change; roll a new model version out to every département.

IGN publishes BD ORTHO by département; when a new vintage lands in a
département's imagery folder, its mosaic, chips and predictions are out of
date. The imagery sensor fingerprints each département's tile list (names,
sizes, modification times) and requests one enrichment run per changed
département.

When a training asset materializes a new model version, every département
that already has chips should get that version's predictions, and nothing
else: the roll-out sensor requests the ``predict_departement`` job (predictions
and the dbt models, no crop) for each of them, once per set of model versions.
"""

import json

from dagster import AssetKey, RunRequest, SensorEvaluationContext, SkipReason, sensor

from ops.geo.departements import DEPARTEMENTS
from orchestration.jobs import MODEL_GROUP, enrich_job, predict_job
from resources.imagery import OrthoImagery

ROLLOUT_TAG = "bativision/model_rollout"


@sensor(job=enrich_job, minimum_interval_seconds=300)
def new_imagery_sensor(context: SensorEvaluationContext, imagery: OrthoImagery):
    """One run per département whose tiles changed since the last evaluation."""
    seen = json.loads(context.cursor) if context.cursor else {}
    now = {}
    for dep in DEPARTEMENTS:
        fp = imagery.fingerprint(dep)
        if fp is not None:
            now[dep] = fp
    changed = [d for d, fp in now.items() if seen.get(d) != fp]
    context.update_cursor(json.dumps(now))
    if not changed:
        return SkipReason("no imagery folder changed")
    for dep in changed:
        yield RunRequest(run_key=f"{dep}-{now[dep]}", partition_key=dep, tags={"bativision/trigger": "new_imagery"})


def model_assets(context: SensorEvaluationContext) -> list[AssetKey]:
    graph = context.repository_def.asset_graph
    return sorted((k for k in graph.get_all_asset_keys() if graph.get(k).group_name == MODEL_GROUP), key=str)


@sensor(job=predict_job, minimum_interval_seconds=60)
def model_rollout_sensor(context: SensorEvaluationContext):
    """Once per new model materialization: predictions (and dbt) for every département with chips, no re-crop."""
    first = context.cursor is None
    seen = json.loads(context.cursor) if context.cursor else {}
    latest = {}
    for key in model_assets(context):
        records = context.instance.fetch_materializations(key, limit=1).records
        if records:
            latest[key.to_user_string()] = records[0].storage_id
    new = sorted(k for k, sid in latest.items() if seen.get(k) != sid)
    context.update_cursor(json.dumps(latest))
    if first:  # remember where the models are; roll out only what is trained from now on
        return SkipReason(f"watching {sorted(latest) or 'no model yet'}")
    if not new:
        return SkipReason("no new model version")
    cropped = set(context.instance.get_materialized_partitions(AssetKey("chips")))
    deps = [d for d in DEPARTEMENTS if d in cropped]
    if not deps:
        return SkipReason(f"new {', '.join(new)}, but no département has chips yet")
    stamp = "+".join(f"{k}:{latest[k]}" for k in new)
    context.log.info(f"new {', '.join(new)}: predictions for {len(deps)} département(s) with chips")
    for dep in deps:
        yield RunRequest(run_key=f"rollout-{stamp}-{dep}", partition_key=dep, tags={ROLLOUT_TAG: stamp})
