"""Capacity plan: core-hours, GPU-hours, wall time and cost of enriching départements or France.

    python -m orchestration.capacity                       # all of France (the default)
    python -m orchestration.capacity --departements 75 2A  # a table per département, then the total
    python -m orchestration.capacity --gpu-nodes 14 --gpu-images-per-s roof_type=9000 --measured

Why a module of its own: sizing a node pool, or answering "what does France cost?", should take
seconds and say which inputs were measured (on this project's 2-core VM) and which are only stated
(anything on a GPU, prices): every figure is a named constant whose comment gives its source (the
rates in ``orchestration.capacity_rates``, the buildings and km² in ``orchestration.capacity_workload``).
The arithmetic (:func:`plan`) is pure, on frozen :class:`Rates`, :class:`Pool`, :class:`Prices` and
:class:`Plan`; only the command line reads footprint files (Dagster-backed resources imported lazily).

Work model (one chip per building, every model on every chip: an upper bound, some chips end ``nodata``):

- crop core-hours = chip sets × (buildings / (chips/s per core) + km² of imagery × core-s per km²) / 3600,
  each chip set the declared attributes ask for beyond the default chips being cut (decoded) again, the
  rates of the imagery's format (``orchestration.capacity_rates``: on JPEG 2000 decoding the km²
  dominates); a département's km² is France's spread evenly unless given;
- GPU-hours = buildings × Σ over models (1 / images/s of that model on one GPU) / 3600;
- wall time = max(crop core-hours / crop cores, GPU-hours / GPUs)  (the bottleneck stage: crop and
  inference of *different* départements overlap, since each run's ``predictions`` waits only for
  its own ``chips``)
  + the other stage's time for the largest département alone (the pipeline's fill or drain)
  + ceil(partitions / concurrent runs) × a per-partition overhead (pods scheduled, images pulled,
  ``buildings``, ``ortho_mosaic``, model loading, dbt: stated). Crop cores and GPUs are what the pool
  can keep busy: crop cores = min(nodes × usable cores, (concurrent runs, partitions) × crop workers
  per run), GPUs = min(GPU nodes, concurrent runs, predictions steps at once, partitions): one
  ``predictions`` step holds one GPU. One département alone is crop + inference + overhead.
- cost = crop core-hours × price per vCPU-hour + GPU-hours × price per GPU node-hour (the work, nodes
  scaled to it); pool cost = wall time × the whole pool's hourly price (nodes held for the whole run).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from ops.geo.departements import DEPARTEMENTS, check_departement
from ops.ml.attributes import DEFAULT_PATH, attributes_path, chip_sets, load_attributes
from ops.ml.catalog import MODELS
from orchestration.capacity_rates import (
    CPU_BENCH_CORES,
    CPU_NETWORK_IMAGES_PER_S,
    CROP_COST,
    GPU_IMAGES_PER_S,
    GPU_NETWORK_IMAGES_PER_S,
    IMAGERY_FORMAT,
    PARTITION_OVERHEAD_S,
    Rates,
    per_attribute,
    positive,
)
from orchestration.capacity_workload import (
    COUNTED,
    FRANCE_BUILDINGS,
    FRANCE_KM2,
    buildings_by_departement,
    default_source_dir,
    estimate_km2,
    footprint_counter,
)
from orchestration.pods import DEFAULT_CROP_WORKERS

# --- Pool (defaults: the production configuration of this repository) ----------------------------
CROP_NODES = 2
# n2-standard-8 nodes (orchestration/pods.py CPU_NODE), one chips pod each, as wide as its workers
CROP_NODE_CPUS = DEFAULT_CROP_WORKERS
GPU_NODES = 8  # g2-standard-8, one L4 each; Dagster's `gpu` pool limit must be set to this (k8s/values.yaml)
CONCURRENT_RUNS = 8  # orchestration/instance/prod.yaml: tag limit of bativision/reprocessing
CROP_WORKERS_PER_RUN = DEFAULT_CROP_WORKERS  # BATIVISION_CROP_WORKERS' default (pods.py)

# --- Prices --------------------------------------------------------------------------------------
# Stated GKE spot list prices as of 2026, not fetched: plausible figures to check against Google
# Cloud's pricing page before budgeting (European regions run some 10-20 % above us-central1).
CROP_VCPU_HOUR_USD = 0.0125  # n2-standard-8 spot ≈ $0.10/hour (c3-standard-8 similar), per vCPU-hour
CROP_NODE_VCPUS = 8  # n2-standard-8
GPU_NODE_HOUR_USD = 0.32  # g2-standard-8 (8 vCPUs, 32 GB, 1 NVIDIA L4) spot, per node-hour


@dataclass(frozen=True)
class Pool:
    """The node pools and the limits that decide how much of them one can keep busy."""

    crop_nodes: int = CROP_NODES
    crop_node_cpus: int = CROP_NODE_CPUS
    gpu_nodes: int = GPU_NODES
    concurrent_runs: int = CONCURRENT_RUNS
    crop_workers_per_run: int = CROP_WORKERS_PER_RUN
    predictions_at_once: int | None = None  # the `gpu` pool's limit; None: as many as concurrent runs

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not (value is None and f.name == "predictions_at_once") and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{f.name} must be an integer >= 1, got {value!r}")

    def crop_cores(self, partitions: int) -> int:
        """Cores the crop can keep busy with ``partitions`` départements to cut."""
        per_run = min(self.crop_workers_per_run, self.crop_nodes * self.crop_node_cpus)
        return min(self.crop_nodes * self.crop_node_cpus, per_run * min(self.concurrent_runs, partitions))

    def gpus(self, partitions: int) -> int:
        """GPUs inference can keep busy: one per ``predictions`` step running."""
        at_once = self.predictions_at_once or self.concurrent_runs
        return min(self.gpu_nodes, self.concurrent_runs, at_once, partitions)


@dataclass(frozen=True)
class Prices:
    """Stated prices (USD): a crop vCPU-hour, the crop node's vCPUs, a GPU node-hour."""

    crop_vcpu_hour_usd: float = CROP_VCPU_HOUR_USD
    crop_node_vcpus: int = CROP_NODE_VCPUS
    gpu_node_hour_usd: float = GPU_NODE_HOUR_USD

    def __post_init__(self) -> None:
        positive("crop vCPU-hour price", self.crop_vcpu_hour_usd)
        positive("crop node vCPUs", self.crop_node_vcpus)
        positive("GPU node-hour price", self.gpu_node_hour_usd)


@dataclass(frozen=True)
class Plan:
    """Départements run together on a pool: the work, what the pool keeps busy, wall time, cost."""

    departements: tuple[str, ...]
    buildings: int
    km2: float
    chip_sets: int
    crop_core_hours: float
    gpu_hours: float
    gpu_label: str
    cpu_inference_core_hours: float  # reference only: the same inference on CPU at the measured rates
    crop_cores: int
    gpus: int
    crop_wall_hours: float
    gpu_wall_hours: float
    fill_hours: float
    overhead_hours: float
    wall_hours: float
    cost_usd: float
    pool_cost_usd: float

    def totals(self) -> dict:
        """The totals as plain JSON values (the command's last line)."""
        return {
            "departements": len(self.departements),
            "buildings": self.buildings,
            "km2": round(self.km2, 1),
            "chip_sets": self.chip_sets,
            "crop_core_hours": round(self.crop_core_hours, 3),
            "gpu_hours": round(self.gpu_hours, 3),
            "gpu_rates": self.gpu_label,
            "cpu_inference_core_hours": round(self.cpu_inference_core_hours, 1),
            "crop_cores": self.crop_cores,
            "gpus": self.gpus,
            "wall_hours": round(self.wall_hours, 3),
            "cost_usd": round(self.cost_usd, 2),
            "pool_cost_usd": round(self.pool_cost_usd, 2),
        }


def plan(
    buildings_by_dep: Mapping[str, int],
    rates: Rates | None = None,
    pool: Pool | None = None,
    prices: Prices | None = None,
    km2_by_dep: Mapping[str, float] | None = None,
    chip_sets: int = 1,
) -> Plan:
    """Plan these départements run together on ``pool`` (the model is in the module docstring).

    One département alone is ``plan({dep: n}, ...)``: its crop, then its inference, then overhead.
    ``km2_by_dep``: each one's km² of imagery (default :func:`estimate_km2`); ``chip_sets``: the crops
    of each département (the default chips and every declared attribute's own set).
    """
    rates, pool, prices = rates or Rates(), pool or Pool(), prices or Prices()
    if not buildings_by_dep:
        raise ValueError("no département to plan")
    for dep, n in buildings_by_dep.items():
        check_departement(dep)
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"département {dep}: buildings must be an integer >= 0, got {n!r}")
    km2 = dict(km2_by_dep) if km2_by_dep is not None else estimate_km2(buildings_by_dep)
    for dep in buildings_by_dep:
        if not (isinstance(km2.get(dep), int | float) and math.isfinite(km2[dep]) and km2[dep] >= 0):
            raise ValueError(f"département {dep}: km² of imagery must be a number >= 0, got {km2.get(dep)!r}")
    if not isinstance(chip_sets, int) or chip_sets < 1:
        raise ValueError(f"chip sets must be an integer >= 1, got {chip_sets!r}")
    total, parts = sum(buildings_by_dep.values()), len(buildings_by_dep)
    crop_s = {dep: chip_sets * rates.crop_core_s(n, km2[dep]) for dep, n in buildings_by_dep.items()}
    crop_h = sum(crop_s.values()) / 3600
    gpu_h = total * rates.gpu_s_per_chip / 3600
    crop_wall, gpu_wall = crop_h / pool.crop_cores(parts), gpu_h / pool.gpus(parts)
    # fill or drain: the stage that is not the bottleneck, for the largest département on its own share
    largest = max(buildings_by_dep.values())
    if crop_wall >= gpu_wall:
        fill = largest * rates.gpu_s_per_chip / 3600 / pool.gpus(1)
    else:
        fill = max(crop_s.values()) / 3600 / pool.crop_cores(1)
    overhead = math.ceil(parts / pool.concurrent_runs) * rates.partition_overhead_s / 3600
    wall = max(crop_wall, gpu_wall) + fill + overhead
    pool_hourly = pool.crop_nodes * prices.crop_node_vcpus * prices.crop_vcpu_hour_usd
    pool_hourly += pool.gpu_nodes * prices.gpu_node_hour_usd
    return Plan(
        departements=tuple(buildings_by_dep),
        buildings=total,
        km2=sum(km2[dep] for dep in buildings_by_dep),
        chip_sets=chip_sets,
        crop_core_hours=crop_h,
        gpu_hours=gpu_h,
        gpu_label=rates.gpu_label,
        cpu_inference_core_hours=total * sum(CPU_BENCH_CORES / r for r in rates.cpu_images_per_s.values()) / 3600,
        crop_cores=pool.crop_cores(parts),
        gpus=pool.gpus(parts),
        crop_wall_hours=crop_wall,
        gpu_wall_hours=gpu_wall,
        fill_hours=fill,
        overhead_hours=overhead,
        wall_hours=wall,
        cost_usd=crop_h * prices.crop_vcpu_hour_usd + gpu_h * prices.gpu_node_hour_usd,
        pool_cost_usd=wall * pool_hourly,
    )


def select_departements(codes: Iterable[str] | None) -> tuple[str, ...]:
    """The départements asked for, in order, without repeats (None: France); an unknown code raises naming it."""
    if codes is None:
        return DEPARTEMENTS
    chosen = tuple(dict.fromkeys(check_departement(c.strip().upper()) for c in codes))
    if not chosen:
        raise ValueError("no département given")
    return chosen


# --- Command line --------------------------------------------------------------------------------


def _number(cast: type, minimum: float, strict: bool) -> Callable[[str], float]:
    """An argparse type: ``cast(text)``, finite, above ``minimum`` (or equal when not ``strict``)."""
    want = f"{'an integer' if cast is int else 'a number'} {'>' if strict else '>='} {minimum:g}"

    def parse(text: str) -> float:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
        return value

    return parse


_count, _rate, _seconds = _number(int, 1, False), _number(float, 0, True), _number(float, 0, False)


def parse_model_rates(text: str, models: Iterable[str] = MODELS) -> dict[str, float]:
    """``roof_type=8000,solar_panels=2000`` → {model: images/s}; models not named keep their default."""
    models = list(models)
    rates: dict[str, float] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = (x.strip() for x in item.partition("="))
        if not sep:
            raise argparse.ArgumentTypeError(f"expected model=images_per_s, got {item!r}")
        if name not in models:
            raise argparse.ArgumentTypeError(f"unknown model {name!r}: expected one of {', '.join(models)}")
        rates[name] = _rate(value)
    if not rates:
        raise argparse.ArgumentTypeError("expected model=images_per_s[,model=images_per_s]")
    return rates


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m orchestration.capacity",
        description="Capacity plan: crop core-hours, GPU-hours, wall time and cost for départements or France.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--departements", nargs="+", metavar="CODE", help="INSEE codes (01, 2A, 974, ...)")
    scope.add_argument("--france", action="store_true", help="all 101 départements (the default)")
    b = p.add_argument_group("buildings")
    b.add_argument(
        "--source-dir",
        help="folder with one sub-folder per département (a gs:// URI downloads the footprints); "
        "default: BATIVISION_SOURCE_DIR, as the pipeline reads it",
    )
    b.add_argument("--estimate-only", action="store_true", help="do not look for footprint files")
    b.add_argument("--france-buildings", type=_count, default=FRANCE_BUILDINGS, help="basis of the estimates")
    b.add_argument("--france-km2", type=_rate, default=FRANCE_KM2, help="imagery km² spread over the départements")
    b.add_argument(
        "--attributes",
        help="attribute declarations: each one's model runs on every chip, each chip set it declares is "
        "one more crop (default: BATIVISION_ATTRIBUTES, else the shipped models/attributes.yaml)",
    )
    r = p.add_argument_group("rates")
    r.add_argument(
        "--imagery-format", choices=sorted(CROP_COST), default=IMAGERY_FORMAT,
        help="the imagery the crop decodes: jp2 = BD ORTHO as delivered, jpeg = its JPEG COG conversion",
    )  # fmt: skip
    r.add_argument("--crop-chips-per-s-per-core", type=_rate, help="per chip (default: the format's, measured)")
    r.add_argument("--crop-core-s-per-km2", type=_seconds, help="per km² of imagery (default: the format's, measured)")
    default_gpu = ",".join(f"{k}={v:g}" for k, v in GPU_IMAGES_PER_S.items())
    r.add_argument(
        "--gpu-images-per-s",
        type=str,
        metavar="MODEL=N[,MODEL=N]",
        help=f"images/s of each model on one GPU (default {default_gpu}, stated)",
    )
    r.add_argument("--measured", action="store_true", help="the GPU images/s given were measured")
    r.add_argument("--partition-overhead-s", type=_seconds, default=PARTITION_OVERHEAD_S, help="stated")
    n = p.add_argument_group("node pool")
    n.add_argument("--crop-nodes", type=_count, default=CROP_NODES)
    n.add_argument("--crop-node-cpus", type=_count, default=CROP_NODE_CPUS, help="cores usable for workers per node")
    n.add_argument("--gpu-nodes", type=_count, default=GPU_NODES, help="nodes with one GPU each")
    n.add_argument("--concurrent-runs", type=_count, default=CONCURRENT_RUNS, help="départements at once")
    n.add_argument("--crop-workers-per-run", type=_count, default=CROP_WORKERS_PER_RUN)
    n.add_argument(
        "--predictions-at-once",
        type=_count,
        help="predictions steps at once (the `gpu` pool's limit, 1 unless set); default: concurrent runs",
    )
    c = p.add_argument_group("prices (USD, stated GKE spot list prices)")
    c.add_argument("--crop-vcpu-hour-usd", type=_rate, default=CROP_VCPU_HOUR_USD)
    c.add_argument("--crop-node-vcpus", type=_count, default=CROP_NODE_VCPUS, help="vCPUs billed per crop node")
    c.add_argument("--gpu-node-hour-usd", type=_rate, default=GPU_NODE_HOUR_USD)
    return p


def _duration(hours: float) -> str:
    return f"{hours * 60:.1f} min" if hours < 1 else f"{hours:.2f} h"


def render(
    result: Plan, each: Sequence[Plan], basis: Mapping[str, str], inputs: tuple[Rates, Pool, Prices], notes: list[str]
) -> str:
    """The report: the inputs and their labels, one row per département (``each``), the total."""
    rates, pool, prices = inputs
    gpu = ", ".join(f"{k} {v:,.0f}" for k, v in rates.gpu_images_per_s.items())
    at_once = f", {pool.predictions_at_once} predictions at once" if pool.predictions_at_once else ""
    lines = [
        f"  crop ({rates.imagery_format}): {rates.crop_chips_per_s_per_core:,.0f} chips/s per core + "
        f"{rates.crop_core_s_per_km2:.2f} core-s per km² of imagery ({rates.crop_label})",
        f"  GPU: {gpu} images/s on one GPU ({rates.gpu_label}); every model runs on every chip",
        f"  pool: {pool.crop_nodes} crop nodes × {pool.crop_node_cpus} cores, {pool.gpu_nodes} GPU nodes, "
        f"{pool.concurrent_runs} runs at once, {pool.crop_workers_per_run} crop workers per run{at_once}",
        f"  overhead: {rates.partition_overhead_s:,.0f} s per partition (stated)",
        f"  prices: ${prices.crop_vcpu_hour_usd}/vCPU-hour crop, ${prices.gpu_node_hour_usd}/hour GPU node (stated spot)",
        *(f"  {note}" for note in notes),
        "",
    ]
    if each:
        head = f"{'dep':>4} {'buildings':>11} {'basis':>9} {'km²':>8} {'crop core-h':>12} {'GPU-h':>9} {'wall':>10} {'cost $':>9}"
        lines += [head, "-" * len(head)]
        for d in each:
            (dep,) = d.departements
            lines.append(
                f"{dep:>4} {d.buildings:>11,} {basis[dep]:>9} {d.km2:>8,.0f} {d.crop_core_hours:>12.3f} {d.gpu_hours:>9.3f} "
                f"{_duration(d.wall_hours):>10} {d.cost_usd:>9.2f}"
            )
        lines += ["(each département alone on the pool: its crop, then its inference, then overhead)", ""]
    counted = sum(1 for d in result.departements if basis[d] == COUNTED)
    lines += [
        f"Total, {len(result.departements)} département(s) together: {result.buildings:,} buildings "
        f"({counted} counted, {len(result.departements) - counted} estimated) on {result.km2:,.0f} km² of imagery",
        f"  crop: {result.crop_core_hours:,.2f} core-hours on {result.crop_cores} cores = "
        f"{_duration(result.crop_wall_hours)}",
        f"  inference: {result.gpu_hours:,.2f} GPU-hours ({result.gpu_label}) on {result.gpus} GPUs = "
        f"{_duration(result.gpu_wall_hours)}",
        f"  wall: {_duration(result.wall_hours)} = the bottleneck stage + {_duration(result.fill_hours)} fill/drain"
        f" + {_duration(result.overhead_hours)} overhead",
        f"  cost: ${result.cost_usd:,.2f} for the work (nodes scaled to it), "
        f"${result.pool_cost_usd:,.2f} with the whole pool held for the wall time",
        f"  reference: this inference on CPU at the measured rates = {result.cpu_inference_core_hours:,.0f} core-hours",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        deps = select_departements(args.departements)
    except ValueError as exc:  # UnknownDepartementError names the code
        parser.error(f"argument --departements: {exc}")
    path = Path(args.attributes) if args.attributes else attributes_path()
    try:
        declared = load_attributes(path)  # a DeclarationError names the file and the field
    except ValueError as exc:
        parser.error(f"argument --attributes: {exc}")
    tasks = {name: a.task for name, a in declared.items()}
    try:
        given_gpu = parse_model_rates(args.gpu_images_per_s, tasks) if args.gpu_images_per_s else {}
    except argparse.ArgumentTypeError as exc:
        parser.error(f"argument --gpu-images-per-s: {exc}")
    gpu_rates = {**per_attribute(GPU_NETWORK_IMAGES_PER_S, tasks), **given_gpu}
    given = {
        "crop_chips_per_s_per_core": args.crop_chips_per_s_per_core,
        "crop_core_s_per_km2": args.crop_core_s_per_km2,
    }
    rates = Rates.for_format(
        args.imagery_format, gpu_images_per_s=gpu_rates, gpu_measured=args.measured,
        partition_overhead_s=args.partition_overhead_s, cpu_images_per_s=per_attribute(CPU_NETWORK_IMAGES_PER_S, tasks),
        **{k: v for k, v in given.items() if v is not None},
    )  # fmt: skip
    # the options' names are the fields' names
    pool = Pool(**{f.name: getattr(args, f.name) for f in fields(Pool)})
    prices = Prices(**{f.name: getattr(args, f.name) for f in fields(Prices)})
    estimated = f"estimated: {args.france_buildings:,} for France spread evenly"
    if args.estimate_only:
        counts, basis, why = buildings_by_departement(deps, None, None, args.france_buildings)
        notes = [f"buildings: {estimated}"]
    else:
        source = args.source_dir or default_source_dir()
        counts, basis, why = buildings_by_departement(deps, *footprint_counter(source), args.france_buildings)
        found = sum(1 for d in deps if basis[d] == COUNTED)
        notes = [f"buildings: counted from the footprints in {source} for {found} of {len(deps)}, the rest {estimated}"]
        notes += [f"  {d} not counted: {why[d]}" for d in deps if d in why] if len(deps) <= 10 else []
    km2 = estimate_km2(deps, args.france_km2)
    notes.append(f"imagery: {args.france_km2:,.0f} km² for France spread evenly (stated)")
    sets = 1 + len(chip_sets(declared))
    where = "the shipped models/attributes.yaml" if path.resolve() == DEFAULT_PATH else path
    notes.append(f"attributes: {len(tasks)} declared in {where}; {sets} chip set(s), each cut on its own")
    result = plan(counts, rates, pool, prices, km2, sets)
    each = [plan({d: counts[d]}, rates, pool, prices, km2, sets) for d in deps] if len(deps) <= 10 else []
    scope = "France (101 départements)" if args.departements is None else ", ".join(deps)
    print(f"Capacity plan: {scope}")
    print(render(result, each, basis, (rates, pool, prices), notes))
    totals = {"scope": "france" if args.departements is None else list(deps), **result.totals()}
    totals["buildings_counted_departements"] = sum(1 for d in deps if basis[d] == COUNTED)
    print(json.dumps(totals))
    return 0


if __name__ == "__main__":
    sys.exit(main())
