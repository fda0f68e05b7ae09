"""The capacity plan's rates: how fast the crop and the inference go, and where each figure comes from.

Why a module of its own: the rates are the plan's evidence (measured on this project's 2-core VM, or
only stated), and the crop's depends on the imagery's format and on how densely buildings sit on it.
``orchestration.capacity`` does the arithmetic on them.

The crop's cost on one core is modelled as ``km² of imagery × s_per_km2 + chips × s_per_chip``: a
block of imagery is decoded once whatever number of windows it feeds (the first term, which dominates
on JPEG 2000), and each chip is resampled and written (the second). Both are solved from two
``bench.crop`` measurements per format on the same 24 km² of imagery, with every building and with one
in ten. The synthetic buildings are spread over the whole area; real ones cluster in villages and
leave whole blocks untouched (never decoded), so at France's density the first term is an upper bound.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from ops.ml.catalog import MODELS, ROOF_TYPE, SOLAR_PANELS

STATED = "stated, not measured"
MEASURED = "measured"


@dataclass(frozen=True)
class CropRun:
    """One measured crop run on one CPU: ``chips`` cut from ``km2`` of imagery at ``chips_per_s``."""

    chips: int
    km2: float
    chips_per_s: float

    @property
    def core_s_per_km2(self) -> float:
        return self.chips / self.chips_per_s / self.km2

    @property
    def chips_per_km2(self) -> float:
        return self.chips / self.km2


def crop_cost(dense: CropRun, sparse: CropRun) -> tuple[float, float]:
    """(core-seconds per km² of imagery, chips/s per core) through two runs at different densities.

    Core-seconds per km² = s_per_km2 + density × s_per_chip: the line through the two runs. Noise can
    put the intercept below zero where decoding is cheap; a format's area cost is never negative.
    """
    if not dense.chips_per_km2 > sparse.chips_per_km2:
        raise ValueError(f"the first run must be the denser: {dense} against {sparse}")
    s_per_chip = (dense.core_s_per_km2 - sparse.core_s_per_km2) / (dense.chips_per_km2 - sparse.chips_per_km2)
    if not s_per_chip > 0:
        raise ValueError(f"the denser run must cost more per km²: {dense} against {sparse}")
    s_per_km2 = max(0.0, dense.core_s_per_km2 - dense.chips_per_km2 * s_per_chip)
    return s_per_km2, 1.0 / s_per_chip


# Measured 2026-11-30 on the 2-core VM: `bench.crop`'s "ours, 1 worker" (the real `chips` code path
# pinned to one CPU), 20,000 synthetic buildings on 24 km² of imagery (833 per km²) and one in ten of
# them (`--keep-one-in 10`), the best of two runs each. France averages about 55 buildings per km².
# `jpeg` is the JPEG COG the monthly run converts BD ORTHO to once (`ortho_mosaic`, `convert: jpeg`); `deflate` the
# lossless GeoTIFF of the sample data.
CROP_RUNS: Mapping[str, tuple[CropRun, CropRun]] = MappingProxyType(
    {
        "jp2": (CropRun(19_174, 24.0, 621.9), CropRun(1_922, 24.0, 109.1)),
        "jpeg": (CropRun(19_175, 24.0, 9_378.9), CropRun(1_922, 24.0, 2_424.0)),
        "deflate": (CropRun(19_174, 24.0, 6_854.4), CropRun(1_922, 24.0, 1_530.1)),
    }
)
# BD ORTHO as IGN delivers it: what a first run over France decodes
IMAGERY_FORMAT = "jp2"
CROP_COST: Mapping[str, tuple[float, float]] = MappingProxyType({f: crop_cost(*runs) for f, runs in CROP_RUNS.items()})


# Stated for one NVIDIA L4 (g2-standard-8), 64 × 64 chips, batch 512, shards to rows: no L4 was measured. An H200
# was (make bench-cuda, README): both models 45,387 images/s, bound by one CPU core; an L4 has a fraction of its fp16.
def per_attribute(measured: Mapping[str, float], tasks: Mapping[str, str] = MODELS) -> Mapping[str, float]:
    """Every attribute's rate (all run on each chip): its own if measured, else its network's.

    ``tasks``: attribute → task, the shipped ones unless a declarations file says otherwise. A
    classification or regression is RoofNet's body (ValueNet: one output), costed at roof_type's rate;
    a segmentation is solar_panels' network.
    """
    like = {name: SOLAR_PANELS if task == "segmentation" else ROOF_TYPE for name, task in tasks.items()}
    return MappingProxyType({name: measured.get(name, measured[like[name]]) for name in tasks})


GPU_NETWORK_IMAGES_PER_S: Mapping[str, float] = MappingProxyType({ROOF_TYPE: 8_000.0, SOLAR_PANELS: 2_000.0})
GPU_IMAGES_PER_S: Mapping[str, float] = per_attribute(GPU_NETWORK_IMAGES_PER_S)
# Measured: `make bench-infer` (README "Benchmarks"), the real `predictions` step on CPU, 50,000
# buildings, 2 torch threads on the 2-core VM: roof_type 1,139 images/s, solar_panels ≈ 220.
# Only a reference (CPU inference core-hours); the plan's inference runs on GPUs.
CPU_NETWORK_IMAGES_PER_S: Mapping[str, float] = MappingProxyType({ROOF_TYPE: 1_139.0, SOLAR_PANELS: 220.0})
CPU_IMAGES_PER_S: Mapping[str, float] = per_attribute(CPU_NETWORK_IMAGES_PER_S)
CPU_BENCH_CORES = 2

# Stated: per-partition work outside crop and inference (pod scheduling and image pull, `buildings`,
# `ortho_mosaic`, model loading and batch-size choice, the dbt build). Not measured.
PARTITION_OVERHEAD_S = 600.0


def positive(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number, got {value!r}")


@dataclass(frozen=True)
class Rates:
    """How fast the work goes: the crop per core (per chip and per km² of imagery), inference
    images/s per model on one GPU. The defaults are the crop's on :data:`IMAGERY_FORMAT`
    (:meth:`for_format` for another).

    ``gpu_measured`` says whether the GPU figures come from a measurement (only the caller knows);
    the plan prints it beside every GPU figure.
    """

    crop_chips_per_s_per_core: float = CROP_COST[IMAGERY_FORMAT][1]
    gpu_images_per_s: Mapping[str, float] = field(default_factory=lambda: GPU_IMAGES_PER_S, hash=False)
    gpu_measured: bool = False
    partition_overhead_s: float = PARTITION_OVERHEAD_S
    crop_core_s_per_km2: float = CROP_COST[IMAGERY_FORMAT][0]
    imagery_format: str = IMAGERY_FORMAT
    # reference only: the same models on CPU (the plan's "inference on CPU" line)
    cpu_images_per_s: Mapping[str, float] = field(default_factory=lambda: CPU_IMAGES_PER_S, hash=False)

    def __post_init__(self) -> None:
        positive("crop chips/s per core", self.crop_chips_per_s_per_core)
        if not (math.isfinite(self.crop_core_s_per_km2) and self.crop_core_s_per_km2 >= 0):
            raise ValueError(f"crop core-seconds per km² must be >= 0, got {self.crop_core_s_per_km2!r}")
        if not self.gpu_images_per_s:
            raise ValueError("gpu_images_per_s names no model")
        for model, rate in self.gpu_images_per_s.items():
            positive(f"GPU images/s of {model}", rate)
        if not (math.isfinite(self.partition_overhead_s) and self.partition_overhead_s >= 0):
            raise ValueError(f"partition overhead must be >= 0 s, got {self.partition_overhead_s!r}")
        for model, rate in self.cpu_images_per_s.items():
            positive(f"CPU images/s of {model}", rate)
        object.__setattr__(self, "gpu_images_per_s", MappingProxyType(dict(self.gpu_images_per_s)))
        object.__setattr__(self, "cpu_images_per_s", MappingProxyType(dict(self.cpu_images_per_s)))

    @classmethod
    def for_format(cls, imagery_format: str, **overrides: object) -> Rates:
        """The measured crop rates of ``imagery_format`` (an unknown one raises naming the known)."""
        if imagery_format not in CROP_COST:
            raise ValueError(f"unknown imagery format {imagery_format!r}: expected one of {', '.join(CROP_COST)}")
        s_per_km2, chips_per_s = CROP_COST[imagery_format]
        crop = {"crop_chips_per_s_per_core": chips_per_s, "crop_core_s_per_km2": s_per_km2}
        return cls(**{**crop, "imagery_format": imagery_format, **overrides})  # type: ignore[arg-type]

    @property
    def gpu_label(self) -> str:
        return MEASURED if self.gpu_measured else STATED

    @property
    def crop_label(self) -> str:
        """Whether the crop rates are its format's measured ones (:data:`CROP_COST`) or given."""
        measured = CROP_COST.get(self.imagery_format) == (self.crop_core_s_per_km2, self.crop_chips_per_s_per_core)
        return f"{MEASURED}: bench-crop, 1 CPU" if measured else "given"

    @property
    def gpu_s_per_chip(self) -> float:
        """GPU-seconds per chip: every model runs on every chip, so their times add up."""
        return sum(1.0 / r for r in self.gpu_images_per_s.values())

    def crop_core_s(self, chips: int, km2: float) -> float:
        """Core-seconds to cut ``chips`` from ``km2`` of imagery (see the module's doc)."""
        return chips / self.crop_chips_per_s_per_core + km2 * self.crop_core_s_per_km2
