"""The Kubernetes pods of the production steps: what each asks for, where it runs, as whom, and why.

Under ``BATIVISION_ENV=prod`` dagster-k8s' ``k8s_job_executor`` turns every step into a Job; this
module is the one place that writes the executor's ``step_k8s_config`` (every step) and
``per_step_k8s_config`` (by op name). ``tests/test_k8s.py`` renders the Jobs with dagster-k8s'
own step handler and checks them against the Kubernetes schema and the node types below.

Sizes come from measurements (``python -m bench.pods``: peak summed RSS of a step's process tree
on a synthetic partition, bytes left on disk per building), never from the node's size:

- ``chips``: CPU request = limit = the crop workers. The step sizes its workers from the CPUs its
  cgroup quota allows (``ops.cpus.available_cpus``), so the pod's CPU limit *is* the worker count;
  memory = (:data:`CROP_PARENT_GIB` + :data:`CROP_WORKER_GIB` × workers) × :data:`HEADROOM`
  (one worker: :data:`CROP_SINGLE_GIB` × headroom): 6 workers, (0.64 + 6 × 0.505) × 1.25 = 4.6 GiB.
- GPU steps (``predictions`` and the training assets, ``roof_model``...): one ``nvidia.com/gpu`` (a limit:
  Kubernetes does not overcommit extended resources), GKE's accelerator node selector and the
  toleration of the GPU pool's taint, :data:`GPU_STEP_CPUS` CPUs for the chip loader and the
  vectorisation of masks, memory = (measured CPU-torch peak + :data:`CUDA_HOST_GIB`) × headroom
  = (1.53 + 2.0) × 1.25 = 4.4 GiB.
- every other step (``buildings``, ``ortho_mosaic``, the dbt models, the asset checks): small
  requests and limits of their own (:data:`SMALL_STEP`: 2 GiB, 2.7× the measured peak of ``buildings``).
- every pod: non-root (uid :data:`RUN_AS`, the image's ``USER``), read-only root filesystem, no
  privilege escalation, no capabilities; ``/scratch`` is an ``emptyDir`` with a size limit, and
  ``TMPDIR``, ``HOME`` and ``BATIVISION_CACHE_DIR`` point there. A partition's chips and staged
  predictions live there (:data:`SCRATCH_BYTES_PER_BUILDING` × the largest partition), so
  ``chips`` and the GPU steps request that much ephemeral storage; the others 2 GiB.
- every pod runs under the service account that carries workload identity
  (``BATIVISION_K8S_SERVICE_ACCOUNT``, ``k8s/values.yaml``), whatever the chart's code-location context says.

Each figure can be moved from the ``bativision-env`` ConfigMap (:data:`POD_ENV`) without a new image.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ops.ml.attributes import Attribute, chip_sets, declared_attributes

SCRATCH_DIR = "/scratch"
DEFAULT_CROP_WORKERS = 6  # a 6-CPU chips pod per n2-standard-8 (7.91 allocatable, DaemonSets beside it)
RUN_AS = 10001  # the Dockerfile's numeric USER

# BATIVISION_* variables read here → what they set.
POD_ENV = {
    "BATIVISION_K8S_SERVICE_ACCOUNT": "service account of every step pod, the one with workload identity "
    "(default bativision)",
    "BATIVISION_CROP_WORKERS": "crop workers per chips pod = its CPU request and limit (default 6)",
    "BATIVISION_GPU_ACCELERATOR": "GKE accelerator of the GPU node pool (default nvidia-l4)",
    "BATIVISION_MAX_PARTITION_BUILDINGS": "buildings of the largest département, sizes the scratch volume "
    "(default 1,200,000)",
}

# Measured with `python -m bench.pods` (3,000 and 6,000 buildings; the crop's peaks do not grow with
# the partition: 0.714 → 0.738 GiB with one worker). GiB of peak RSS, summed over the step's processes.
CROP_SINGLE_GIB = 0.74  # one worker: the step process crops in-process
CROP_PARENT_GIB = 0.64  # two workers or more: the step process, which only hands out cells
# Each forked worker's RSS (0.505 GiB), although only 0.08 GiB of it is its own (USS/PSS): the rest is
# shared with the step process until written. Sizing on RSS holds even if every page gets copied.
CROP_WORKER_GIB = 0.505
PREDICT_CPU_GIB = 1.53  # the predictions step on CPU torch: 1.26-1.53 with two models, 1.27 with four (3,000 buildings)
CUDA_HOST_GIB = 2.0  # stated, not measured here (no GPU): CUDA context and loader buffers on the host
HEADROOM = 1.25  # larger cells and tiles than the sample's, allocator fragmentation
SCRATCH_BYTES_PER_BUILDING = 12_800  # measured 12,786 with four models (12,481 with two): chips + staged predictions
GPU_STEP_CPUS = 4  # chip loader thread, mask vectorisation, Arrow rows; the GPU does the rest
# buildings 0.73 GiB and ortho_mosaic 0.63 GiB measured (0.6 of it imports); buildings' source file and
# GeoParquet take about 420 B per building of scratch (0.5 GiB for the largest département)
SMALL_STEP = {"cpu": "1", "memory": "2Gi", "ephemeral-storage": "2Gi"}
#: predictions and every declared attribute's training asset (models/attributes.yaml, or BATIVISION_ATTRIBUTES)
_ATTRIBUTES = declared_attributes()
GPU_STEPS = ("predictions", *(a.asset for a in _ATTRIBUTES.values()))
#: What a building's chip set adds to the scratch besides its chip (3 bytes a pixel): the measured default
#: less a 64 px chip, i.e. its index row and more (staged rows: an overestimate, kept as headroom)
CHIP_SET_OVERHEAD_BYTES = SCRATCH_BYTES_PER_BUILDING - 3 * 64**2


@dataclass(frozen=True)
class NodeType:
    """A GKE machine type and what its kubelet leaves to pods (GKE's documented reservations)."""

    name: str
    cpus: int
    memory_gib: float
    gpus: int = 0
    accelerator: str | None = None

    @property
    def allocatable_cpu(self) -> float:
        """CPU minus GKE's reservation: 6 % of the 1st core, 1 % of the 2nd, 0.5 % of the 3rd-4th, 0.25 % above."""
        tiers = [(1, 0.06), (1, 0.01), (2, 0.005), (math.inf, 0.0025)]
        return self.cpus - _tiered(self.cpus, tiers)

    @property
    def allocatable_memory_gib(self) -> float:
        """Memory minus GKE's reservation (25 % of the first 4 GiB, 20 % of the next 4, 10 % of the next 8,
        6 % of the next 112, 2 % above) and the 100 MiB eviction threshold."""
        tiers = [(4, 0.25), (4, 0.20), (8, 0.10), (112, 0.06), (math.inf, 0.02)]
        return self.memory_gib - _tiered(self.memory_gib, tiers) - 100 / 1024


def _tiered(amount: float, tiers: list[tuple[float, float]]) -> float:
    reserved, left = 0.0, amount
    for size, share in tiers:
        take = min(left, size)
        reserved += take * share
        left -= take
        if left <= 0:
            break
    return reserved


# The node pools k8s/README.md recommends: CPU pods on n2-standard-8, GPU pods on g2-standard-8 (one L4).
# DaemonSets (kube-proxy, logging, metrics, the NVIDIA device plugin) take their share too: leave them this.
DAEMONSET_RESERVE = {"cpu": 0.4, "memory_gib": 0.6}
CPU_NODE = NodeType("n2-standard-8", cpus=8, memory_gib=32)
GPU_NODE = NodeType("g2-standard-8", cpus=8, memory_gib=32, gpus=1, accelerator="nvidia-l4")


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw.replace(",", "").replace("_", ""))
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected a whole number ({POD_ENV[name]})") from None
    if value < 1:
        raise ValueError(f"{name}={raw!r}: must be at least 1 ({POD_ENV[name]})")
    return value


def _gib(value: float) -> str:
    """A memory quantity rounded up to a quarter GiB, in Mi (Kubernetes quantities are exact)."""
    return f"{math.ceil(value * 4) * 256}Mi"


def crop_memory_gib(workers: int) -> float:
    """Memory of a chips pod running ``workers`` crop workers (measured, with headroom).

    One worker crops in the step process (:data:`CROP_SINGLE_GIB`); from two on, the step process
    (:data:`CROP_PARENT_GIB`) plus each worker's whole RSS (:data:`CROP_WORKER_GIB`).
    """
    peak = CROP_SINGLE_GIB if workers <= 1 else CROP_PARENT_GIB + CROP_WORKER_GIB * workers
    return peak * HEADROOM


def gpu_step_memory_gib() -> float:
    return (PREDICT_CPU_GIB + CUDA_HOST_GIB) * HEADROOM


def scratch_bytes_per_building(attributes: Mapping[str, Attribute]) -> int:
    """Scratch per building: the measured chips and staged rows, plus each declared chip set's chip and index row."""
    sets = chip_sets(attributes).values()
    return SCRATCH_BYTES_PER_BUILDING + sum(3 * g.size**2 + CHIP_SET_OVERHEAD_BYTES for g in sets)


def scratch_gib(max_buildings: int, attributes: Mapping[str, Attribute] | None = None) -> int:
    """The scratch a partition of ``max_buildings`` needs (default: the code location's declarations), with headroom."""
    per_building = scratch_bytes_per_building(_ATTRIBUTES if attributes is None else attributes)
    return math.ceil(per_building * max_buildings * 1.25 / 2**30)


@dataclass(frozen=True)
class PodSettings:
    service_account: str
    crop_workers: int
    accelerator: str
    max_partition_buildings: int

    @classmethod
    def from_env(cls) -> PodSettings:
        return cls(
            service_account=os.environ.get("BATIVISION_K8S_SERVICE_ACCOUNT", "").strip() or "bativision",
            crop_workers=_env_int("BATIVISION_CROP_WORKERS", DEFAULT_CROP_WORKERS),
            accelerator=os.environ.get("BATIVISION_GPU_ACCELERATOR", "").strip() or str(GPU_NODE.accelerator),
            max_partition_buildings=_env_int("BATIVISION_MAX_PARTITION_BUILDINGS", 1_200_000),
        )


def _resources(cpu: str, memory: str, storage: str, gpu: int = 0) -> dict[str, Any]:
    """Requests = limits: Guaranteed QoS, so a busy node evicts these pods last."""
    amounts = {"cpu": cpu, "memory": memory, "ephemeral-storage": storage}
    if gpu:
        amounts["nvidia.com/gpu"] = str(gpu)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def step_k8s_config(settings: PodSettings) -> dict[str, Any]:
    """What every step pod gets: security, the scratch volume, small resources (identity: the executor's
    ``service_account_name``, which overrides the code location's container context)."""
    scratch = scratch_gib(settings.max_partition_buildings)
    return {
        "container_config": {
            "resources": _resources(SMALL_STEP["cpu"], SMALL_STEP["memory"], SMALL_STEP["ephemeral-storage"]),
            "security_context": {
                "allow_privilege_escalation": False,
                "read_only_root_filesystem": True,
                "run_as_non_root": True,
                "run_as_user": RUN_AS,
                "run_as_group": RUN_AS,
                "capabilities": {"drop": ["ALL"]},
            },
            "volume_mounts": [{"name": "scratch", "mount_path": SCRATCH_DIR}],
            "env": [
                {"name": "TMPDIR", "value": SCRATCH_DIR},
                {"name": "HOME", "value": SCRATCH_DIR},
                {"name": "BATIVISION_CACHE_DIR", "value": SCRATCH_DIR},
            ],
        },
        "pod_spec_config": {
            "security_context": {
                "run_as_non_root": True,
                "run_as_user": RUN_AS,
                "run_as_group": RUN_AS,
                "fs_group": RUN_AS,
                "seccomp_profile": {"type": "RuntimeDefault"},
            },
            "volumes": [{"name": "scratch", "empty_dir": {"size_limit": f"{scratch}Gi"}}],
        },
    }


def _gpu_step(settings: PodSettings, storage: str) -> dict[str, Any]:
    return {
        "container_config": {"resources": _resources(str(GPU_STEP_CPUS), _gib(gpu_step_memory_gib()), storage, gpu=1)},
        "pod_spec_config": {
            "node_selector": {"cloud.google.com/gke-accelerator": settings.accelerator},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        },
    }


def per_step_k8s_config(settings: PodSettings) -> dict[str, dict[str, Any]]:
    """By op name: the crop's CPUs and memory, the GPU steps' accelerator, the scratch-heavy steps' disk."""
    scratch = f"{scratch_gib(settings.max_partition_buildings) + 1}Gi"  # + the container's logs
    workers = settings.crop_workers
    config = {name: _gpu_step(settings, scratch) for name in GPU_STEPS}  # training reads chips too
    config["chips"] = {
        "container_config": {"resources": _resources(str(workers), _gib(crop_memory_gib(workers)), scratch)}
    }
    return config


def k8s_executor_config(settings: PodSettings | None = None) -> dict[str, Any]:
    """The ``k8s_job_executor`` config of production (see the module docstring)."""
    settings = settings or PodSettings.from_env()
    return {
        # pods of one run at once: a partition's DAG is a chain (buildings → mosaic → chips → predictions
        # → dbt) with its checks beside it; 4 lets the checks run next to the next step
        "max_concurrent": 4,
        "service_account_name": settings.service_account,
        "step_k8s_config": step_k8s_config(settings),
        "per_step_k8s_config": per_step_k8s_config(settings),
    }
