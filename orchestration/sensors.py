"""Sensors: re-run a département when its orthophoto tiles change.

IGN publishes BD ORTHO by département; when a new vintage lands in a
département's imagery folder, its mosaic, chips and predictions are out of
date. The sensor fingerprints each département's tile list (names, sizes,
modification times) and requests one enrichment run per changed département.
"""

import json

from dagster import RunRequest, SensorEvaluationContext, SkipReason, sensor

from ops.geo.departements import DEPARTEMENTS
from orchestration.jobs import enrich_job
from resources.imagery import OrthoImagery


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
