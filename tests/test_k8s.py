"""The production pods, proven without a cluster: the step Jobs dagster-k8s would create, validated and executed.

``tests/k8s_render.py`` renders, with dagster-k8s' own step handler, the Job of every step of an
enrichment run (partition 12) and of a training run, from the production definitions, the
executor config of ``orchestration/pods.py`` and the run launcher and code-location context the
Helm chart builds from ``k8s/values.yaml``. Each Job is validated against the Kubernetes schema
(``kubernetes-validate``, strict, the latest version it knows), then held to the scheduling rules
the schema cannot see (a GPU limit, requests that fit the recommended nodes). Finally the
rendered ``buildings``, ``ortho_mosaic`` and ``chips`` Jobs' commands and environment run as local
processes against the instance the runs were created in, and their materializations are there.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ops.ml.attributes import load_attributes
from orchestration.pods import (
    CPU_NODE,
    DAEMONSET_RESERVE,
    GPU_NODE,
    GPU_STEPS,
    RUN_AS,
    SCRATCH_BYTES_PER_BUILDING,
    SCRATCH_DIR,
    PodSettings,
    crop_memory_gib,
    k8s_executor_config,
    scratch_bytes_per_building,
    scratch_gib,
)
from tests.prodenv import prod_env

pytestmark = [pytest.mark.k8s]

REPO = Path(__file__).resolve().parent.parent
VALUES = REPO / "k8s" / "values.yaml"
GPU_LABEL = "cloud.google.com/gke-accelerator"


def _quantity(value: str) -> float:
    """A Kubernetes quantity as a number (CPU in cores, memory in GiB)."""
    units = {"Ki": 2**-20, "Mi": 2**-10, "Gi": 1, "Ti": 2**10, "m": 1e-3}
    for suffix, scale in units.items():
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * scale
    return float(value)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> tuple[dict[str, dict[str, dict]], Path]:
    import json

    home = tmp_path_factory.mktemp("k8s") / "dagster_home"
    out = subprocess.run(
        [sys.executable, str(REPO / "tests" / "k8s_render.py"), str(VALUES), str(home)]
        + ["enrich_departement:12", "train_models"],
        cwd=REPO,
        env=prod_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout), home


def _steps(rendered) -> dict[str, dict]:
    jobs, _ = rendered
    return {step: job for run in jobs.values() for step, job in run.items()}


def _pod(job: dict) -> dict:
    return job["spec"]["template"]["spec"]


@pytest.mark.slow
def test_every_rendered_step_job_is_valid_kubernetes(rendered):
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    steps = _steps(rendered)
    # an enrichment partition: its five assets and five checks; training: one asset per declared attribute
    assert {"buildings", "ortho_mosaic", "chips", "predictions", "bativision_dbt_models"} <= set(steps)
    assert {"roof_model", "solar_model", "chips_status_shares"} <= set(steps)
    for step, job in steps.items():
        try:
            kubernetes_validate.validate(job, latest_version(), strict=True)
        except kubernetes_validate.ValidationError as exc:  # pragma: no cover - the message names the step
            pytest.fail(f"{step}: {exc}")


@pytest.mark.slow
def test_gpu_steps_alone_get_a_gpu_limit_the_accelerator_selector_and_the_toleration(rendered):
    for step, job in _steps(rendered).items():
        pod = _pod(job)
        (container,) = pod["containers"]
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        if step in GPU_STEPS:
            assert limits.get("nvidia.com/gpu") == "1", step  # extended resources are scheduled on limits
            assert pod["nodeSelector"] == {GPU_LABEL: GPU_NODE.accelerator}, step
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        else:
            assert "nvidia.com/gpu" not in {**limits, **requests}, step
            assert GPU_LABEL not in (pod.get("nodeSelector") or {}), step
            assert not pod.get("tolerations"), step


@pytest.mark.slow
def test_every_container_has_requests_and_limits_that_fit_the_recommended_nodes(rendered):
    for step, job in _steps(rendered).items():
        pod = _pod(job)
        node = GPU_NODE if step in GPU_STEPS else CPU_NODE
        for container in pod["containers"] + (pod.get("initContainers") or []):
            res = container["resources"]
            for kind in ("cpu", "memory", "ephemeral-storage"):
                assert kind in res["requests"] and kind in res["limits"], f"{step}: no {kind} request/limit"
                assert _quantity(res["requests"][kind]) <= _quantity(res["limits"][kind]), step
            cpu, mem = _quantity(res["requests"]["cpu"]), _quantity(res["requests"]["memory"])
            assert cpu <= node.allocatable_cpu - DAEMONSET_RESERVE["cpu"], f"{step}: {cpu} CPU on {node.name}"
            assert mem <= node.allocatable_memory_gib - DAEMONSET_RESERVE["memory_gib"], f"{step}: {mem} GiB"


@pytest.mark.slow
def test_step_pods_run_as_non_root_read_only_with_a_bounded_scratch_volume(rendered):
    for step, job in _steps(rendered).items():
        pod = _pod(job)
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == RUN_AS
        (container,) = pod["containers"]
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True, step
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], step
        scratch = [v for v in pod["volumes"] if v["name"] == "scratch"]
        assert scratch and scratch[0]["emptyDir"]["sizeLimit"], step
        assert {"name": "scratch", "mountPath": SCRATCH_DIR} in container["volumeMounts"], step
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["TMPDIR"] == env["BATIVISION_CACHE_DIR"] == env["HOME"] == SCRATCH_DIR, step
        storage = _quantity(container["resources"]["requests"]["ephemeral-storage"])
        if step in ("chips", "predictions"):  # a whole partition's chips live in the scratch
            assert storage >= _quantity(scratch[0]["emptyDir"]["sizeLimit"]), step


@pytest.mark.slow
def test_every_step_pod_runs_under_the_workload_identity_service_account(rendered):
    values = yaml.safe_load(VALUES.read_text())
    annotated = values["serviceAccount"]
    assert annotated["create"] and "iam.gke.io/gcp-service-account" in annotated["annotations"]
    assert not values["dagster-user-deployments"]["serviceAccount"]["create"]  # no second account of that name
    for step, job in _steps(rendered).items():
        assert _pod(job)["serviceAccountName"] == annotated["name"], step


@pytest.mark.slow
def test_a_rendered_step_job_runs_our_step_against_the_instance(rendered, tmp_path):
    """The rendered command and environment of buildings, ortho_mosaic and chips, run as local processes."""
    from dagster import AssetKey, DagsterInstance

    from synthetic import generate_departement

    jobs, home = rendered
    generate_departement(tmp_path / "sample", "12", 150, seed=3, tile_px=1000)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    for step in ("buildings", "ortho_mosaic", "chips"):
        (container,) = _pod(jobs["enrich_departement"][step])["containers"]
        env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
        # what the cluster would add: the ConfigMaps (here the local environment instead of BigQuery and
        # GCS), the instance's home, the scratch mount; and `dagster` on the PATH as in the image
        local = {"DAGSTER_HOME": str(home), "BATIVISION_ENV": "local", "BATIVISION_DATA_DIR": str(tmp_path / "data")}
        local |= {
            "BATIVISION_SOURCE_DIR": str(tmp_path / "sample"),
            "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        }
        env = {k: (str(scratch) if v == SCRATCH_DIR else v) for k, v in env.items()} | local
        done = subprocess.run(
            (container.get("command") or []) + container["args"], env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, f"{step}: {done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    instance = DagsterInstance.from_config(str(home))
    run_id = jobs["enrich_departement"]["chips"]["metadata"]["labels"]["dagster/run-id"]
    for asset in ("buildings", "ortho_mosaic", "chips"):
        event = instance.get_latest_materialization_event(AssetKey(asset))
        assert event is not None and event.run_id == run_id, asset
        assert event.asset_materialization.partition == "12", asset
    chips = instance.get_latest_materialization_event(AssetKey("chips")).asset_materialization
    assert chips.metadata["chips"].value > 0


def test_chips_pods_are_as_wide_as_their_workers_and_as_big_as_the_measured_memory():
    for workers in (1, 3, 6):
        config = k8s_executor_config(PodSettings("sa", workers, "nvidia-l4", 500_000))
        res = config["per_step_k8s_config"]["chips"]["container_config"]["resources"]
        assert res["requests"]["cpu"] == res["limits"]["cpu"] == str(workers)
        assert _quantity(res["limits"]["memory"]) >= crop_memory_gib(workers)
        assert _quantity(res["limits"]["memory"]) < crop_memory_gib(workers) + 0.25
    # the scratch follows the largest partition
    assert scratch_gib(2_000_000) > scratch_gib(500_000) > 0


def test_an_attribute_s_own_chip_set_grows_the_scratch_by_its_chips(tmp_path):
    """A declared chip set is a second set of shards on the pod's scratch: sized in, one per distinct geometry."""
    base = "attributes:\n  a:\n    task: classification\n    classes: [x, y]\n    labels: {file: l.csv, column: c}\n"
    plain = load_attributes(_declare(tmp_path / "plain.yaml", base))
    pool = base + base.replace("attributes:\n", "").replace("  a:", "  b:") + "    chip: {size: 128, margin_m: 12}\n"
    own = load_attributes(_declare(tmp_path / "own.yaml", pool))
    twice = pool + base.replace("attributes:\n", "").replace("  a:", "  c:") + "    chip: {size: 128, margin_m: 12}\n"
    shared = load_attributes(_declare(tmp_path / "twice.yaml", twice))
    assert scratch_bytes_per_building(plain) == SCRATCH_BYTES_PER_BUILDING
    added = scratch_bytes_per_building(own) - SCRATCH_BYTES_PER_BUILDING
    assert 3 * 128 * 128 < added < 3 * 128 * 128 + 1024  # its chips, 3 bytes a pixel, and an index row
    assert scratch_bytes_per_building(shared) == scratch_bytes_per_building(own)  # one set for equal geometries
    assert scratch_gib(1_200_000, own) > scratch_gib(1_200_000, plain)


def _declare(path, text: str):
    path.write_text(text)
    return path


def test_pod_settings_come_from_the_configmap_and_bad_values_are_named(monkeypatch):
    monkeypatch.setenv("BATIVISION_CROP_WORKERS", "3")
    monkeypatch.setenv("BATIVISION_GPU_ACCELERATOR", "nvidia-tesla-t4")
    settings = PodSettings.from_env()
    assert settings.crop_workers == 3 and settings.accelerator == "nvidia-tesla-t4"
    monkeypatch.setenv("BATIVISION_CROP_WORKERS", "three")
    with pytest.raises(ValueError, match="BATIVISION_CROP_WORKERS"):
        PodSettings.from_env()


def test_gke_allocatable_follows_the_documented_reservations():
    # n2-standard-8: 8 - (0.06 + 0.01 + 2 * 0.005 + 4 * 0.0025) = 7.91 CPU;
    # 32 GiB - (1 + 0.8 + 0.8 + 0.96) - 100 MiB
    assert CPU_NODE.allocatable_cpu == pytest.approx(7.91)
    assert CPU_NODE.allocatable_memory_gib == pytest.approx(32 - 3.56 - 100 / 1024)


@pytest.mark.slow  # imports the production code location in a fresh process
def test_gpu_steps_share_the_gpu_pool_and_preemptible_steps_are_retried():
    """In prod: one `gpu` pool slot per GPU step; the pod steps a spot node can take away have a retry policy.

    A pod evicted or preempted fails its Kubernetes Job; the executor's health check reports the step
    failed and its retry policy runs it again in a new Job (chips resumes from published shards,
    predictions replaces its partition in one transaction: nothing is written twice).
    """
    probe = (
        "import json\n"
        "from dagster import AssetsDefinition\n"
        "from orchestration.definitions import all_assets\n"
        "out = {key.to_user_string(): [a.op.pool, a.op.retry_policy is not None]\n"
        "       for a in all_assets if isinstance(a, AssetsDefinition) and a.is_executable for key in a.keys}\n"
        "print(json.dumps(out))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, env=prod_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    assets = json.loads(done.stdout.strip().splitlines()[-1])
    for step in GPU_STEPS:
        assert assets[step][0] == "gpu", (step, assets[step])
    for step in ("chips", *GPU_STEPS):
        assert assets[step][1], f"{step} has no retry policy"


def test_a_transaction_aborted_by_a_concurrent_one_is_run_again_and_other_errors_are_not():
    from google.api_core.exceptions import BadRequest

    from resources.bigquery import run_transaction

    calls = []

    def collides_twice() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise BadRequest("Transaction is aborted due to concurrent update against table p.d.predictions")
        return "committed"

    assert run_transaction(collides_twice, "predictions[12]", first_wait_s=0) == "committed"
    assert len(calls) == 3

    def broken() -> None:
        calls.append(1)
        raise BadRequest("predictions[12]: the partition does not hold the 10 staged rows; rolled back")

    calls.clear()
    with pytest.raises(BadRequest, match="staged rows"):
        run_transaction(broken, "predictions[12]", first_wait_s=0)
    assert len(calls) == 1


def _dockerfile() -> list[str]:
    return [line.strip() for line in (REPO / "Dockerfile").read_text().splitlines()]


def test_helm_values_name_this_image_and_this_code_location():
    """The values parse; their code location is the module the Dockerfile serves, workspace.yaml loads
    and pyproject.toml packages; the port is the one the image exposes; the image is the one README builds."""
    import json
    import tomllib

    values = yaml.safe_load(VALUES.read_text())
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    module = deployment["dagsterApiGrpcArgs"][deployment["dagsterApiGrpcArgs"].index("-m") + 1]
    workspace = yaml.safe_load((REPO / "workspace.yaml").read_text())
    assert module in [entry["python_module"]["module_name"] for entry in workspace["load_from"]]
    assert (REPO / Path(*module.split("."))).with_suffix(".py").is_file()
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert any(module.split(".")[0] + "*" in p or module.split(".")[0] == p for p in packages["include"])
    cmd = next(line for line in _dockerfile() if line.startswith("CMD"))
    args = json.loads(cmd.removeprefix("CMD").strip())
    assert args[args.index("-m") + 1] == module
    assert f"EXPOSE {deployment['port']}" in _dockerfile() and args[args.index("-p") + 1] == str(deployment["port"])
    repository = deployment["image"]["repository"]
    assert f"docker build -t {repository}:TAG ." in (REPO / "k8s" / "README.md").read_text()
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert "bativision-env" in [c["name"] for c in deployment["envConfigMaps"]]


def test_helm_values_queue_a_monthly_backfill_as_the_instance_does_and_hold_no_secret():
    values = yaml.safe_load(VALUES.read_text())
    prod = yaml.safe_load((REPO / "orchestration" / "instance" / "prod.yaml").read_text())["concurrency"]
    runs = values["concurrency"]["runs"]
    assert values["dagsterDaemon"]["enabled"] and values["dagsterDaemon"]["runCoordinator"]["type"] == (
        "QueuedRunCoordinator"
    )
    assert runs["maxConcurrentRuns"] == prod["runs"]["max_concurrent_runs"]
    assert {(t["key"], t["limit"], str(t.get("value"))) for t in runs["tagConcurrencyLimits"]} == {
        (t["key"], t["limit"], str(t.get("value"))) for t in prod["runs"]["tag_concurrency_limits"]
    }
    one_per_partition = {"key": "dagster/partition", "value": {"applyLimitPerUniqueValue": True}, "limit": 1}
    assert one_per_partition in runs["tagConcurrencyLimits"]
    # 101 départements queue, never more at once than the limit: the month's runs leave room for others
    month = next(t["limit"] for t in runs["tagConcurrencyLimits"] if t["key"] == "bativision/reprocessing")
    assert month < runs["maxConcurrentRuns"] < 101
    assert values["concurrency"]["pools"]["defaultLimit"] == prod["pools"]["default_limit"] == 1

    def secrets(node, path=""):
        if isinstance(node, dict):
            for key, value in node.items():
                lowered = key.lower()
                if any(s in lowered for s in ("password", "secret", "token", "apikey", "credential")) and isinstance(
                    value, str
                ):
                    yield f"{path}.{key}"
                yield from secrets(value, f"{path}.{key}")
        elif isinstance(node, list):
            for k, value in enumerate(node):
                yield from secrets(value, f"{path}[{k}]")

    assert not list(secrets(values)), "credentials belong in Secrets or workload identity, not in values"


def test_helm_values_keep_step_logs_where_the_instance_does():
    """The chart's compute log manager is prod.yaml's: GCS, in the ConfigMap's bucket, under the ConfigMap's prefix."""
    values = yaml.safe_load(VALUES.read_text())["computeLogManager"]
    prod = yaml.safe_load((REPO / "orchestration" / "instance" / "prod.yaml").read_text())["compute_logs"]
    env = yaml.safe_load((REPO / "k8s" / "bativision-env.yaml").read_text())["data"]
    assert values["type"] == prod["class"] == "GCSComputeLogManager"
    gcs = values["config"]["gcsComputeLogManager"]
    assert (
        prod["config"]["bucket"] == {"env": "BATIVISION_GCS_BUCKET"} and gcs["bucket"] == env["BATIVISION_GCS_BUCKET"]
    )
    assert prod["config"]["prefix"] == {"env": "BATIVISION_COMPUTE_LOG_PREFIX"}
    assert gcs["prefix"] == env["BATIVISION_COMPUTE_LOG_PREFIX"]
    assert gcs["uploadInterval"] == prod["config"]["upload_interval"]
