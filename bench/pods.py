"""Measured memory and disk of each production step, to size the Kubernetes step pods.

    .venv/bin/python -m bench.pods [--buildings 3000] [--tile-px 5000] [--out bench/out/pods]

Why this exists: under ``BATIVISION_ENV=prod`` every step runs in its own pod
(``orchestration/pods.py``), whose memory request/limit and ``/scratch`` emptyDir size
limit must come from measurements, not guesses: a limit too low and the kernel OOM-kills
the step mid-partition, too high and nodes sit half empty; an emptyDir too small and the
kubelet evicts the pod. This bench produces those figures, reproducibly, on a synthetic
département (``synthetic.generate_departement``, same seed every time).

What it does: one partition, each step in its own fresh process, as a step pod runs only
that step (Dagster's ``materialize`` of that one asset, in-process executor, local
resources): ``buildings``, ``ortho_mosaic``, ``chips`` with 1 worker, ``chips`` with 2
workers (its shards deleted first, so it cuts again) and ``predictions`` (CPU torch, the
shipped models). From this (parent) process it samples the step's whole process tree
with psutil:

- **peak summed RSS**, every 50 ms: counts each page shared between the step process and
  its forked crop workers (imports, torch, GDAL) once per process that maps it, so it
  overstates a forked tree; the safe figure for a limit;
- **peak summed PSS**, every 500 ms (reading it walks page tables: ~14 ms of CPU per
  650 MiB process, too dear every 50 ms on a small machine): each shared page split among
  its mappers, so the tree's pages counted once; what the pod's cgroup charges for them
  (it also charges page cache, which it reclaims before it OOM-kills). The truth lies
  between the two; USS (pages only that process maps) is kept per process: a forked
  worker's USS is the memory it really adds;
- the peak of each process of the tree, the tree's process count, and wall time;
- disk, every ~250 ms (allocated blocks, as the kubelet counts them): the step's temp dir
  (``TMPDIR`` and ``BATIVISION_CACHE_DIR`` point at a fresh folder per step) and the
  object store under the data dir (what a step's ``GcsObjectStore`` cache holds in prod:
  the inputs it downloads plus what it writes before uploading).

``emptydir_bytes`` of a step = its inputs from the store + the peak growth of the store
+ the peak of its temp dir: what that step's ``/scratch`` must hold in prod. The crop's
memory is reported two ways: ``chips`` with 2 workers minus ``chips`` with 1 (misleading:
with one worker the step process crops itself, with two it only hands out cells, so the
difference is a change of set-up, not one worker), and the bound ``orchestration/pods.py``
uses, the forked step process plus N × each worker's whole RSS. Run it at two
partition sizes (``--buildings 3000`` and ``6000``): the crop streams one unit of work
(a cell, or a part of at most 4,096 buildings of a big one) at a time, so its peak should
not grow with the partition, only with the largest unit (``largest_unit_buildings``),
while the bytes on disk do (per building). The DuckDB warehouse file (BigQuery in prod)
is reported apart and not counted in the emptyDir. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.memory import peak_rss_bytes
from ops.shards import index_rows, list_shards
from resources import keys

DEP = "12"
REPO_ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30
MIB = 2**20


@dataclass(frozen=True)
class Step:
    """One step pod: the asset it materializes, its op config, and what it reads from the object store."""

    name: str
    asset: str
    config: dict[str, Any] = field(default_factory=dict)
    reads: tuple[str, ...] = ()  # store keys a prod pod downloads into its scratch before it works
    fresh: tuple[str, ...] = ()  # store keys deleted before the step, so it recomputes them


CHIPS_READS = (keys.buildings(DEP), keys.mosaic_info(DEP))
STEPS = (
    Step("buildings", "buildings"),
    Step("ortho_mosaic", "ortho_mosaic"),
    Step("chips_w1", "chips", {"workers": 1}, CHIPS_READS, fresh=(keys.chips(DEP),)),
    Step("chips_w2", "chips", {"workers": 2}, CHIPS_READS, fresh=(keys.chips(DEP),)),
    Step("predictions", "predictions", {"device": "cpu"}, (keys.chips(DEP), *CHIPS_READS)),
)
STEP_BY_NAME = {s.name: s for s in STEPS}


def du(path: Path) -> int:
    """Allocated bytes under ``path`` (what the kubelet counts against an emptyDir), tolerant of files vanishing."""
    try:
        if not path.is_dir():
            return path.stat().st_blocks * 512
    except OSError:
        return 0
    total, stack = 0, [str(path)]
    while stack:
        try:
            it = os.scandir(stack.pop())
        except OSError:
            continue
        with it:
            for entry in it:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                    else:
                        total += entry.stat(follow_symlinks=False).st_blocks * 512
                except OSError:
                    pass
    return total


def child(step: Step) -> dict[str, Any]:
    """Run one step in this fresh process, as its pod would, and say what the process itself saw."""
    t0 = time.perf_counter()
    from dagster import DagsterInstance, materialize

    from orchestration.definitions import all_assets
    from orchestration.environment import local_resources

    t1 = time.perf_counter()
    result = materialize(
        all_assets,
        selection=[step.asset],
        partition_key=DEP,
        resources=local_resources(),
        instance=DagsterInstance.ephemeral(),
        run_config={"ops": {step.asset: {"config": step.config}}} if step.config else None,
    )
    t2 = time.perf_counter()
    metadata: dict[str, float] = {}
    for mat in result.asset_materializations_for_node(step.asset):
        for k, v in mat.metadata.items():
            value = getattr(v, "value", None)
            if isinstance(value, int | float) and not isinstance(value, bool):
                metadata[k] = value
    return {
        "success": result.success,
        "import_s": round(t1 - t0, 2),
        "step_s": round(t2 - t1, 2),
        # exact per-process peaks, to check the sampling: this process, and the largest of its reaped children
        "hwm_step_gib": peak_rss_bytes() / GIB,
        "hwm_largest_child_gib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / GIB,
        "metadata": metadata,
    }


@dataclass
class Peak:
    """The peaks of one process of a step's tree (bytes), and what it is."""

    cmd: str
    rss: int = 0
    pss: int = 0
    uss: int = 0


@dataclass
class Sampled:
    """What the parent saw of a step's process tree and folders while it ran."""

    peak_rss: int = 0
    peak_pss: int = 0
    per_pid: dict[int, Peak] = field(default_factory=dict)
    max_processes: int = 0
    samples: int = 0
    peak_tmp: int = 0
    peak_store: int = 0
    sampler_cpu_s: float = 0.0


def describe(p: psutil.Process) -> str:
    """A short name for a process of the tree: its command line, or its name."""
    try:
        cmd = p.cmdline()
    except psutil.Error:
        return "?"
    return " ".join(cmd)[:120] or p.name()


def sample_tree(procs: list[psutil.Process], got: Sampled, pss: bool) -> None:
    """One sample of the summed RSS of a step's process tree, and of its PSS and USS if ``pss``.

    RSS comes from ``/proc/<pid>/statm`` (~0.05 ms); PSS and USS from ``smaps_rollup``, which
    walks the page tables (~14 ms of CPU for a 650 MiB process here): hence sampled less often.
    """
    rss = pss_sum = n = 0
    for p in procs:
        try:
            mem = p.memory_full_info() if pss else p.memory_info()
        except psutil.Error:  # gone, or a zombie, between listing and reading
            continue
        n += 1
        rss += mem.rss
        peak = got.per_pid.get(p.pid) or got.per_pid.setdefault(p.pid, Peak(describe(p)))
        peak.rss = max(peak.rss, mem.rss)
        if pss:
            pss_sum += mem.pss
            peak.pss, peak.uss = max(peak.pss, mem.pss), max(peak.uss, mem.uss)
    got.peak_rss = max(got.peak_rss, rss)
    if pss:
        got.peak_pss = max(got.peak_pss, pss_sum)
    got.max_processes = max(got.max_processes, n)
    got.samples += 1


def tree(root: psutil.Process) -> list[psutil.Process]:
    """``root`` and its descendants (psutil scans every /proc entry for them: a few ms, so not every sample)."""
    try:
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return [root]


def run_step(step: Step, root: Path, interval: float, pss_interval: float) -> dict[str, Any]:
    """Run ``step`` in a fresh subprocess with its own temp dir; sample memory and disk until it exits.

    RSS every ``interval`` s, PSS and USS every ``pss_interval`` s (0: never), disk and the
    list of the tree's processes every 250 ms.
    """
    pss = pss_interval > 0
    pss_every = max(1, round(pss_interval / interval)) if pss else 0
    data, store = root / "data", root / "data" / "store"
    for key in step.fresh:
        shutil.rmtree(store / key, ignore_errors=True)
    tmp = root / "scratch" / step.name
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    inputs = sum(du(store / k) for k in step.reads)
    if step.name == "buildings":  # prod downloads the source footprints into the pod's scratch
        inputs += du(root / "sample" / DEP / "footprints")
    store_before, warehouse_before = du(store), du(data) - du(store)
    env = {
        **os.environ,
        "BATIVISION_ENV": "local",
        "BATIVISION_DATA_DIR": str(data),
        "BATIVISION_SOURCE_DIR": str(root / "sample"),
        "BATIVISION_CACHE_DIR": str(tmp),
        "TMPDIR": str(tmp),
        "DAGSTER_DISABLE_TELEMETRY": "1",
    }
    log = root / "logs"
    log.mkdir(exist_ok=True)
    got = Sampled(peak_tmp=du(tmp), peak_store=store_before)
    every = max(1, round(0.25 / interval))
    cmd = [sys.executable, "-m", "bench.pods", "--child", step.name]
    with open(log / f"{step.name}.out", "w") as out, open(log / f"{step.name}.err", "w") as err:
        t0, cpu0 = time.perf_counter(), time.process_time()
        proc = subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stdout=out, stderr=err)
        top = psutil.Process(proc.pid)
        procs, k = [top], 0
        while proc.poll() is None:
            tick = time.perf_counter()
            if k % every == 0:  # new workers are found within 250 ms, the survivors sampled every 50 ms
                procs = tree(top)
            sample_tree(procs, got, pss and k % pss_every == 0)
            if k % every == 0:
                got.peak_tmp, got.peak_store = max(got.peak_tmp, du(tmp)), max(got.peak_store, du(store))
            k += 1
            time.sleep(max(0.0, interval - (time.perf_counter() - tick)))
        wall = time.perf_counter() - t0
        got.sampler_cpu_s = time.process_time() - cpu0
    if proc.returncode != 0:
        tail = (log / f"{step.name}.err").read_text()[-3000:]
        raise RuntimeError(f"step {step.name} exited with {proc.returncode}; stderr ends with:\n{tail}")
    final_tmp, final_store = du(tmp), du(store)
    got.peak_tmp, got.peak_store = max(got.peak_tmp, final_tmp), max(got.peak_store, final_store)
    said = json.loads((log / f"{step.name}.out").read_text().strip().splitlines()[-1])
    me = got.per_pid.get(proc.pid, Peak("?"))
    others = sorted((v for pid, v in got.per_pid.items() if pid != proc.pid), key=lambda v: -v.rss)
    return {
        "peak_rss_gib": round(got.peak_rss / GIB, 3),
        "peak_pss_gib": round(got.peak_pss / GIB, 3) if pss else None,
        "step_process_peak_gib": gib(me, pss),
        # forked workers share the step's command line; anything else (a resource tracker...) says what it is
        "child_peaks_gib": [{**gib(v, pss), "cmd": "(forked)" if v.cmd == me.cmd else v.cmd} for v in others],
        "hwm_step_gib": round(said["hwm_step_gib"], 3),
        "hwm_largest_child_gib": round(said["hwm_largest_child_gib"], 3),
        "max_processes": got.max_processes,
        "wall_s": round(wall, 2),
        "import_s": said["import_s"],
        "step_s": said["step_s"],
        "samples": got.samples,
        "sampler_cpu_s": round(got.sampler_cpu_s, 2),
        "inputs_bytes": inputs,
        "tmp_peak_bytes": got.peak_tmp,
        "tmp_final_bytes": final_tmp,
        "store_peak_growth_bytes": got.peak_store - store_before,
        "store_final_growth_bytes": final_store - store_before,
        "warehouse_growth_bytes": du(data) - final_store - warehouse_before,
        "emptydir_bytes": inputs + got.peak_store - store_before + got.peak_tmp,
        "metadata": said["metadata"],
    }


def gib(peak: Peak, pss: bool) -> dict[str, float]:
    """One process's peaks in GiB (RSS; PSS and USS when sampled)."""
    out = {"rss": round(peak.rss / GIB, 3)}
    if pss:
        out |= {"pss": round(peak.pss / GIB, 3), "uss": round(peak.uss / GIB, 3)}
    return out


def print_table(steps: dict[str, dict[str, Any]]) -> None:
    head = (f"{'step':<13}{'RSS GiB':>9}{'PSS GiB':>9}{'procs':>6}{'wall s':>8}{'step s':>8}"
            f"{'tmp MiB':>9}{'store+ MiB':>11}{'whouse+ MiB':>12}{'emptyDir MiB':>13}")  # fmt: skip
    print(head)
    print("-" * len(head))
    for name, s in steps.items():
        pss = f"{s['peak_pss_gib']:9.3f}" if s["peak_pss_gib"] is not None else f"{'-':>9}"
        print(f"{name:<13}{s['peak_rss_gib']:9.3f}{pss}{s['max_processes']:6d}{s['wall_s']:8.1f}{s['step_s']:8.1f}"
              f"{s['tmp_peak_bytes'] / MIB:9.1f}{s['store_peak_growth_bytes'] / MIB:11.1f}"
              f"{s['warehouse_growth_bytes'] / MIB:12.1f}{s['emptydir_bytes'] / MIB:13.1f}")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--buildings", type=int, default=3_000, help="buildings of the synthetic département")
    p.add_argument("--tile-px", type=int, default=5_000, help="orthophoto tile side in pixels (1 km at 20 cm)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench/out/pods"), help="one sub-folder per partition size")
    p.add_argument("--interval", type=float, default=0.05, help="RSS sampling period, seconds")
    p.add_argument("--pss-interval", type=float, default=0.5,
                   help="PSS/USS sampling period, seconds (0: RSS only); each read costs ~14 ms of CPU per "
                   "650 MiB process, which would slow the step on a small machine if done every 50 ms")  # fmt: skip
    p.add_argument("--child", choices=list(STEP_BY_NAME), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(STEP_BY_NAME[args.child])))
        return
    from synthetic import generate_departement

    root = (args.out / f"n{args.buildings}").resolve()
    m = generate_departement(root / "sample", DEP, args.buildings, seed=args.seed, tile_px=args.tile_px, verbose=True)
    shutil.rmtree(root / "data", ignore_errors=True)  # every step starts from what the previous ones wrote
    n = m.n_buildings
    print(f"partition {DEP}: {n:,} buildings, tiles of {m.tile_px} px, {psutil.cpu_count()} CPUs; "
          f"one fresh process per step; RSS sampled every {args.interval * 1000:.0f} ms, "
          f"PSS every {args.pss_interval * 1000:.0f} ms")  # fmt: skip
    steps: dict[str, dict[str, Any]] = {}
    for step in STEPS:
        steps[step.name] = run_step(step, root, args.interval, args.pss_interval)
        s = steps[step.name]
        print(f"  {step.name}: peak RSS {s['peak_rss_gib']:.3f} GiB, PSS {s['peak_pss_gib']} GiB, "
              f"{s['wall_s']:.1f} s, {s['max_processes']} processes", flush=True)  # fmt: skip
    print()
    print_table(steps)
    w1, w2 = steps["chips_w1"], steps["chips_w2"]
    pss = args.pss_interval > 0
    per_worker = w2["peak_rss_gib"] - w1["peak_rss_gib"]
    per_worker_pss = w2["peak_pss_gib"] - w1["peak_pss_gib"] if pss else None
    crop_workers = [c for c in w2["child_peaks_gib"] if c["cmd"] == "(forked)"]
    worker_uss = max((c["uss"] for c in crop_workers), default=None) if pss else None
    # with 2+ workers the step process only hands out work: N workers take at most base + N x a worker's RSS
    forked_base = w2["step_process_peak_gib"]["rss"]
    worker_rss = max((c["rss"] for c in crop_workers), default=0.0)
    chips_dir = root / "data" / "store" / keys.chips(DEP)
    chips_bytes = du(chips_dir)
    staged_bytes = du(root / "data" / "store" / keys.PREDICTIONS_ROOT / DEP)
    biggest = max(steps, key=lambda k: steps[k]["emptydir_bytes"])
    scratch_per_building = steps[biggest]["emptydir_bytes"] / n
    cells = w1["metadata"].get("cells")
    largest_unit = max((index_rows(chips_dir, u) for u in list_shards(chips_dir)), default=0)
    print()
    print(f"chips per extra worker (w2 - w1)  : {per_worker:.3f} GiB RSS"
          + (f", {per_worker_pss:.3f} GiB PSS; a worker's private memory (peak USS) {worker_uss:.3f} GiB"
             if pss else ""))  # fmt: skip
    print(f"chips w2, step process            : {w2['step_process_peak_gib']} GiB "
          f"({cells} units of work, the largest {largest_unit:,} buildings)")  # fmt: skip
    for c in w2["child_peaks_gib"]:
        figures = ", ".join(f"{k} {v}" for k, v in c.items() if k != "cmd")
        print(f"  child {c['cmd'][:30]:<30}  : {figures} GiB")
    print(f"chips with N >= 2 workers, RSS    : <= {forked_base:.3f} + N x {worker_rss:.3f} GiB "
          "(the step process, then each forked worker whole)")  # fmt: skip
    print(f"chips shards on disk              : {chips_bytes / n:,.0f} bytes per building")
    print(f"staged predictions on disk        : {staged_bytes / n:,.0f} bytes per building")
    print(f"largest emptyDir ({biggest:<12})  : {steps[biggest]['emptydir_bytes'] / MIB:,.1f} MiB, "
          f"{scratch_per_building:,.0f} bytes per building")  # fmt: skip
    if len(crop_workers) < 2:
        print(f"WARNING: chips_w2 ran {len(crop_workers)} crop worker process(es) (fewer cells than workers?): "
              "the per-worker figure is meaningless at this size")  # fmt: skip
    print(json.dumps({
        "bench": "pods",
        "buildings": n,
        "tile_px": m.tile_px,
        "cells": cells,
        "largest_unit_buildings": largest_unit,
        "cpus": psutil.cpu_count(),
        "steps": steps,
        "chips_per_worker_gib": round(per_worker, 3),
        "chips_per_worker_pss_gib": round(per_worker_pss, 3) if per_worker_pss is not None else None,
        "chips_worker_peak_uss_gib": worker_uss,
        "chips_worker_processes": len(crop_workers),
        "chips_forked_base_rss_gib": forked_base,
        "chips_worker_peak_rss_gib": worker_rss,
        "chips_bytes_per_building": round(chips_bytes / n),
        "staged_predictions_bytes_per_building": round(staged_bytes / n),
        "scratch_bytes_per_building": round(scratch_per_building),
        "scratch_step": biggest,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
