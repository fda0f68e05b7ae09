"""Render the Kubernetes Jobs that dagster-k8s would create for the steps of one partition run.

Run as a script with ``BATIVISION_ENV=prod`` (the production definitions: kinds, pools and the
``k8s_job_executor`` are fixed when the code location is imported), it prints one JSON object:
step key → the Job manifest. Nothing here builds a manifest: dagster-k8s' own step handler
(``K8sStepHandler.launch_step``, the code a run worker runs in the cluster) builds each Job from

- the executor config of ``orchestration/pods.py`` (through the job's configured executor);
- the run launcher the Helm chart configures from ``k8s/values.yaml`` (its ``_run-launcher.tpl``);
- the code location's container context the chart passes to the code server
  (``DAGSTER_CLI_API_GRPC_CONTAINER_CONTEXT``, from the user-deployments chart's
  ``dagsterUserDeployments.k8sContainerContext``), and the image it names.

The only thing replaced is the Kubernetes API client's ``create_namespaced_job``: it records the
Job instead of sending it (no API server can run here). The chart's templates are mirrored in
:func:`chart_run_launcher` and :func:`chart_container_context`, which name the template they follow.
The step handler, plan and run context are built as dagster-k8s' own unit tests build them
(private Dagster modules: pinned by the lock file).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
RELEASE, NAMESPACE = "bativision", "dagster"
DAGSTER_HOME = "/opt/dagster/dagster_home"  # the chart's dagsterHome default


def _fullname(chart: str) -> str:
    """``dagster.fullname``: <release>-<chart> unless the release name contains the chart's."""
    return RELEASE if chart in RELEASE else f"{RELEASE}-{chart}"


def chart_service_account(values: dict, subchart: bool) -> str:
    """``dagster.serviceAccountName`` / ``dagsterUserDeployments.serviceAccountName``."""
    glob = (values.get("global") or {}).get("serviceAccountName")
    if subchart:
        own = ((values.get("dagster-user-deployments") or {}).get("serviceAccount") or {}).get("name")
        return glob or own or f"{_fullname('dagster-user-deployments')}-user-deployments"
    return glob or (values.get("serviceAccount") or {}).get("name") or _fullname("dagster")


def chart_run_launcher(values: dict, kubeconfig: str) -> dict[str, Any]:
    """The instance's ``run_launcher`` as ``templates/helpers/instance/_run-launcher.tpl`` writes it
    (``load_incluster_config`` false and a kubeconfig file instead: there is no cluster here)."""
    cfg = values["runLauncher"]["config"]["k8sRunLauncher"]
    return {
        "module": "dagster_k8s",
        "class": "K8sRunLauncher",
        "config": {
            "load_incluster_config": False,
            "kubeconfig_file": kubeconfig,
            "job_namespace": cfg.get("jobNamespace") or NAMESPACE,
            "image_pull_policy": cfg.get("imagePullPolicy", "IfNotPresent"),
            "service_account_name": chart_service_account(values, subchart=False),
            "dagster_home": DAGSTER_HOME,
            "instance_config_map": f"{_fullname('dagster')}-instance",
            "postgres_password_secret": f"{_fullname('dagster')}-postgresql-secret",
            "env_config_maps": [f"{_fullname('dagster')}-pipeline-env"]
            + [c["name"] for c in cfg.get("envConfigMaps", []) if "name" in c],
            **({"env_secrets": [s["name"] for s in cfg["envSecrets"]]} if cfg.get("envSecrets") else {}),
        },
    }


def chart_container_context(values: dict, deployment: dict) -> dict[str, Any]:
    """``dagsterUserDeployments.k8sContainerContext`` (``charts/dagster-user-deployments/templates/helpers``)."""
    k8s: dict[str, Any] = {
        "image_pull_policy": deployment["image"].get("pullPolicy"),
        "env_config_maps": [f"{_fullname('dagster-user-deployments')}-{deployment['name']}-user-env"]
        + [c["name"] for c in deployment.get("envConfigMaps", []) if "name" in c],
        "namespace": NAMESPACE,
        "service_account_name": chart_service_account(values, subchart=True),
    }
    if deployment.get("resources"):
        k8s["resources"] = deployment["resources"]
    return {"k8s": k8s}


def chart_image(deployment: dict) -> str:
    image = deployment["image"]
    return f"{image['repository']}:{image.get('tag', 'latest')}"


class _RecordingBatchApi:
    """Kubernetes' BatchV1Api, as far as launching a step goes: keeps the Job instead of sending it."""

    def __init__(self) -> None:
        self.jobs: list[Any] = []

    def create_namespaced_job(self, body: Any, namespace: str, **_: Any) -> None:
        self.jobs.append(body)


def _kubeconfig(folder: Path) -> str:
    path = folder / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "none", "cluster": {"server": "https://127.0.0.1:9"}}],
                "users": [{"name": "none", "user": {"token": "none"}}],
                "contexts": [{"name": "none", "context": {"cluster": "none", "user": "none"}}],
                "current-context": "none",
            }
        )
    )
    return str(path)


def render(values_path: Path, runs: list[tuple[str, str | None]], dagster_home: Path) -> dict[str, dict[str, dict]]:
    """Job name → step key → Job manifest (a JSON-able dict), for every step of each (job, partition) run.

    The runs are created in the instance at ``dagster_home`` (SQLite storage, the chart's run
    launcher), so a rendered step can then be executed against that same instance.
    """
    from dagster import DagsterInstance
    from dagster._core.definitions.reconstruct import ReconstructableRepository
    from dagster._core.execution.api import create_execution_plan
    from dagster._core.execution.context.system import PlanData, PlanOrchestrationContext
    from dagster._core.execution.context_creation_job import create_context_free_log_manager
    from dagster._core.execution.retries import RetryMode
    from dagster._core.executor.init import InitExecutorContext
    from dagster._core.executor.step_delegating.step_handler.base import StepHandlerContext
    from dagster._core.system_config.objects import ResolvedRunConfig
    from dagster._grpc.types import ExecuteStepArgs
    from dagster_k8s.client import DagsterKubernetesClient
    from kubernetes.client import ApiClient

    values = yaml.safe_load(values_path.read_text())
    deployment = values["dagster-user-deployments"]["deployments"][0]
    module = deployment["dagsterApiGrpcArgs"][deployment["dagsterApiGrpcArgs"].index("-m") + 1]
    dagster_home.mkdir(parents=True, exist_ok=True)
    launcher = chart_run_launcher(values, _kubeconfig(dagster_home))
    (dagster_home / "dagster.yaml").write_text(
        yaml.safe_dump({"run_launcher": launcher, "telemetry": {"enabled": False}})
    )
    instance = DagsterInstance.from_config(str(dagster_home))
    # what the code server reports as its origin: module, image and container context from the chart
    repo = ReconstructableRepository.for_module(
        module,
        "defs",
        working_directory=str(REPO),
        container_image=chart_image(deployment),
        container_context=chart_container_context(values, deployment),
    )
    out: dict[str, dict[str, dict]] = {}
    for job_name, partition in runs:
        recon_job = repo.get_reconstructable_job(job_name)
        job_def = recon_job.get_definition()
        origin = recon_job.get_python_origin()
        run = instance.create_run_for_job(
            job_def,
            run_config={},
            tags={"dagster/partition": partition} if partition else {},
            job_code_origin=origin,
        )
        # the executor config as a run resolves it: the configured k8s executor of orchestration/pods.py
        executor_def = job_def.executor_def
        executor_config = ResolvedRunConfig.build(job_def, {}).execution.execution_engine_config
        executor = executor_def.executor_creation_fn(
            InitExecutorContext(
                job=recon_job, executor_def=executor_def, executor_config=executor_config, instance=instance
            )
        )
        recorder = _RecordingBatchApi()
        handler = executor._step_handler
        handler._api_client = DagsterKubernetesClient.production_client(batch_api_override=recorder)
        plan = create_execution_plan(recon_job, run_config={})
        plan_context = PlanOrchestrationContext(
            plan_data=PlanData(
                job=recon_job,
                dagster_run=run,
                instance=instance,
                execution_plan=plan,
                raise_on_error=True,
                retry_mode=RetryMode.DISABLED,
            ),
            log_manager=create_context_free_log_manager(instance, run),
            executor=executor,
            output_capture=None,
        )
        jobs: dict[str, dict] = {}
        for step in plan.steps:
            args = ExecuteStepArgs(origin, run.run_id, [step.key], print_serialized_events=False)
            list(handler.launch_step(StepHandlerContext(instance, plan_context, plan.steps, args, run)))
            jobs[step.key] = ApiClient().sanitize_for_serialization(recorder.jobs[-1])
        out[job_name] = jobs
    return out


if __name__ == "__main__":
    # k8s_render.py VALUES DAGSTER_HOME JOB[:PARTITION]... → JSON on stdout
    values_path, home = Path(sys.argv[1]), Path(sys.argv[2])
    pairs = [(arg.partition(":")[0], arg.partition(":")[2] or None) for arg in sys.argv[3:]]
    json.dump(render(values_path, pairs, home), sys.stdout)
