"""Step logs kept in Cloud Storage: ``orchestration/instance/prod.yaml``'s compute log manager, on the emulator.

A step pod's stdout and stderr would go with the pod. The instance section of
prod.yaml (dagster-gcp's ``GCSComputeLogManager``, bucket and prefix from the
environment) is used as it is; the only change is the environment variable
``STORAGE_EMULATOR_HOST``, google-cloud-storage's own switch to an emulator
(the manager builds a plain ``storage.Client()``, as in production).
"""

from __future__ import annotations

import sys

import pytest
import yaml
from dagster import DagsterEventType, asset, instance_for_test, materialize

from orchestration.environment import REPO_ROOT
from resources.gcs import gcs_client
from tests.standins.servers import gcs_emulator

pytestmark = [pytest.mark.bigquery, pytest.mark.slow]

PROD_YAML = REPO_ROOT / "orchestration" / "instance" / "prod.yaml"
BUCKET, PREFIX = "bativision-logs", "bativision/compute-logs"


@asset
def chatty(context) -> None:
    """A step that writes to both streams, as a crop or inference step does (progress on stderr, tools on stdout)."""
    print("crop: 1,234 chips written")
    print("a warning a library printed", file=sys.stderr)
    context.log.info("partition 12: shard 3/9")


def test_a_steps_stdout_and_stderr_land_in_the_bucket_and_are_read_back(tmp_path, monkeypatch):
    compute_logs = yaml.safe_load(PROD_YAML.read_text())["compute_logs"]
    assert compute_logs["class"] == "GCSComputeLogManager"
    with gcs_emulator(tmp_path) as url:
        gcs_client(url).create_bucket(BUCKET)
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
        monkeypatch.setenv("BATIVISION_GCS_BUCKET", BUCKET)
        monkeypatch.setenv("BATIVISION_COMPUTE_LOG_PREFIX", PREFIX)
        with instance_for_test(overrides={"compute_logs": compute_logs}) as instance:
            result = materialize([chatty], instance=instance)
            assert result.success
            (captured,) = [
                e.dagster_event.logs_captured_data
                for e in instance.all_logs(result.run_id, of_type=DagsterEventType.LOGS_CAPTURED)
            ]
            assert captured.step_keys == ["chatty"]
            keys = sorted(b.name for b in gcs_client(url).list_blobs(BUCKET, prefix=f"{PREFIX}/"))
            run_keys = [k for k in keys if result.run_id in k]
            assert {k.rsplit(".", 1)[-1] for k in run_keys} >= {"out", "err"}, keys  # both streams, in the bucket
            assert all(k.startswith(f"{PREFIX}/storage/{result.run_id}/compute_logs/") for k in run_keys)

            # read back through the instance, as the UI does, from the bucket (the local copies gone)
            manager = instance.compute_log_manager
            log_key = manager.build_log_key_for_run(result.run_id, captured.file_key)
            manager.local_manager.delete_logs(log_key=log_key)
            data = manager.get_log_data(log_key)
            assert b"crop: 1,234 chips written" in data.stdout
            assert b"a warning a library printed" in data.stderr
            assert b"partition 12: shard 3/9" in data.stderr  # the step's own log lines too
