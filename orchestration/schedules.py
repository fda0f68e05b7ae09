"""The monthly reprocessing of every département."""

from dagster import RunRequest, ScheduleEvaluationContext, schedule

from ops.geo.departements import DEPARTEMENTS
from orchestration.jobs import enrich_job

# JPEG 2000 tiles are converted once to JPEG COGs, reused every month until the tiles change: the conversion
# pays after 3.5-7 crops of the same tiles (make bench-convert, README "Benchmarks")
MONTHLY = {"ops": {"ortho_mosaic": {"config": {"convert": "jpeg"}}}}


@schedule(job=enrich_job, cron_schedule="0 2 1 * *", execution_timezone="Europe/Paris")
def monthly_reprocessing(context: ScheduleEvaluationContext):
    """On the 1st of each month at 02:00, one run per département, tagged so the run queue lets a few at a time.

    ``orchestration/instance/*.yaml`` limit the runs carrying ``bativision/reprocessing``: 8 at once in
    production, 1 locally, leaving slots for what users launch meanwhile. JPEG 2000 tiles are converted
    to COGs once (:data:`MONTHLY`).
    """
    month = context.scheduled_execution_time.strftime("%Y-%m")
    for dep in DEPARTEMENTS:
        yield RunRequest(
            run_key=f"{month}-{dep}", partition_key=dep, tags={"bativision/reprocessing": month}, run_config=MONTHLY
        )
