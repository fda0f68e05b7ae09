"""Crop a whole partition: units of work cut by worker processes, resumed shard by shard.

Why this shape:
- The partition's buildings are grouped into units of work (``ops.crop.units``)
  and each unit is cut into its own shard (``ops.shards``). A shard whose
  index carries the same fingerprint (chip spec, crop version, imagery,
  buildings) is reused: a unit is the unit of resumption.
- With several workers, each is its own one-process pool (a lane) and
  ``ops.crop.lanes`` hands it the next part of the cell it holds, so the
  blocks along a seam are decoded once. Each worker streams its own shards to
  disk (``ops.crop.writer``). One worker runs in the caller's process.
- ``workers`` is the crop's CPU budget, and a worker gets its share of it as
  decode threads: on a JPEG 2000 mosaic each takes two
  (:data:`JPEG2000_CPUS_PER_WORKER`) and decodes its blocks ahead.
- With remote imagery, a prefetch (``ops.crop.prefetch``) makes the blocks of
  the next units local while the current ones are cut.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Protocol

import pyarrow.parquet as pq
import rasterio
import torch

from ops.cpus import available_cpus
from ops.crop.cut import cut_cell
from ops.crop.lanes import Schedule
from ops.crop.prefetch import INCOMPLETE, is_complete, name_remote_tiles
from ops.crop.spec import ChipSpec
from ops.crop.tiles import TileSet
from ops.crop.units import CellResult, CellTask, cell_tasks
from ops.crop.writer import ShardWriter
from ops.imagery.mosaic import MosaicInfo, is_jpeg2000
from ops.shards import list_shards, shard_meta, shard_paths, status_counts

_WORKER: dict = {}


# GDAL's own block cache (5 % of RAM by default) would keep every block we decode:
# TileSet already holds the ones still needed, so GDAL gets a small one. Small, not smaller than a
# few blocks: rasterio.Env takes GDAL_CACHEMAX in *bytes* (it calls GDALSetCacheMax64), and a cache
# smaller than one block makes GDAL decode a multi-band block once per band it cannot keep (measured:
# JP2OpenJPEG decoded every 1024 px codestream tile twice per window, 2x the CPU).
GDAL_CACHE_MB = 64
PER_LANE = 2  # units in flight per crop worker: one cut, one queued behind it
#: CPUs each worker process gets on a JPEG 2000 mosaic. Why not one process per CPU as for the other
#: formats: a worker with two CPUs decodes its blocks ahead on two threads while its sweep resamples
#: (``ops.crop.tiles``), and cuts no seam twice. Measured on the 2-core VM, 20,000 buildings of
#: BD ORTHO-like JPEG 2000: one process on both CPUs 1,087-1,106 chips/s, two processes of one CPU
#: 886-909 (one process on one CPU: 586-590).
JPEG2000_CPUS_PER_WORKER = 2


def worker_processes(info: MosaicInfo, workers: int, units: int, cpus: int) -> tuple[int, int]:
    """(worker processes, decode threads of each) for a crop asked for ``workers`` on ``cpus`` CPUs.

    ``workers`` is the crop's CPU budget (at most ``cpus``): one process per worker, at most one per
    unit of work; on a JPEG 2000 mosaic one per :data:`JPEG2000_CPUS_PER_WORKER` of them. Each process
    gets its share of the budget as decode threads, so ``workers=1`` keeps the crop on one CPU whatever
    the format (a step sharing its machine, or a one-CPU measurement), not one process on all of them.
    """
    budget = max(1, min(workers, cpus))
    n = 1 if budget == 1 or units <= 1 else min(budget, units)
    if n > 1 and info.tiles and all(is_jpeg2000(t.path) for t in info.tiles):
        n = max(1, n // JPEG2000_CPUS_PER_WORKER)
    return n, max(1, budget // n)


def _init_worker(info_json: str, spec: ChipSpec, decode_threads: int = 1) -> None:
    """Set up a crop process: one torch thread (the workers are the parallelism), a small GDAL cache, a writer.

    ``decode_threads``: this worker's share of the CPUs, for the one decode that can use threads (a
    JPEG 2000 tile, decoded ahead by as many threads, see ``ops.crop.tiles``): the workers together
    then use each CPU once.
    """
    torch.set_num_threads(1)
    os.environ["GDAL_CACHEMAX"] = str(GDAL_CACHE_MB)  # as an environment variable, GDAL reads MB
    info = MosaicInfo.from_json(info_json)
    writer = ShardWriter(row_shape=(3, spec.size, spec.size))
    _WORKER.update(tiles=TileSet(info, decode_threads), info=info, spec=spec, writer=writer)


def _run_task(task: CellTask, folder: Path, meta: dict[str, str]) -> CellResult:
    """Cut one unit of work, its chips streamed to its shard's file, and queue the shard's end (see :class:`ShardWriter`)."""
    t0 = time.perf_counter()
    w = _WORKER
    tiles, writer = w["tiles"], w["writer"]
    decodes, area_decodes, ahead = tiles.decodes, tiles.area_decodes, tiles.decoded_ahead
    stream = writer.open(folder, task.shard_id, len(task.building_ids))
    try:
        chips, index = cut_cell(tiles, w["info"], task, w["spec"], stream)
    except BaseException:
        stream.abort()
        raise
    if task.tile_paths:  # prefetched: name the remote tiles, not their deleted local copies
        index = name_remote_tiles(index, task, w["info"])
        if not is_complete(task):  # a tile could not be fetched: a resumed run cuts this unit again
            meta = {**meta, "fingerprint": f"{meta['fingerprint']}-{INCOMPLETE}"}
    counts = status_counts(index.column("status").to_pylist())
    result = CellResult(
        task.shard_id, counts, chips, time.perf_counter() - t0,
        blocks=tiles.decodes - decodes, area_blocks=tiles.area_decodes - area_decodes,
        ahead_blocks=tiles.decoded_ahead - ahead, pid=os.getpid(),
    )  # fmt: skip
    writer.submit(stream, folder, task.shard_id, index, meta)
    return result


def _finish_worker() -> None:
    """Wait for this process's last shards to be written (raising a failed write), then let its memory go."""
    w = _WORKER
    try:
        if "writer" in w:
            w["writer"].drain()
    finally:
        if "writer" in w:
            w["writer"].close()
        if "tiles" in w:
            w["tiles"].close()
        _WORKER.clear()


class Prefetch(Protocol):
    """Makes a unit of work's remote blocks local before it is cut (see ``ops.crop.prefetch``)."""

    def warm(self, tasks: list[CellTask]) -> None: ...

    def prepare(self, task: CellTask) -> CellTask: ...

    def release(self, task: CellTask) -> None: ...


def _prefetched(todo: list[CellTask], prefetch: Prefetch | None, depth: int) -> Iterator[CellTask]:
    """``todo`` in order, each task yielded once its blocks are local, with ``depth`` tasks fetched ahead."""
    if prefetch is None:
        yield from todo
        return
    prefetch.warm(todo)  # tile headers first, one at a time, before blocks are fetched in parallel
    ahead: deque[Future] = deque()
    rest = iter(todo)
    with ThreadPoolExecutor(max_workers=max(1, depth), thread_name_prefix="prefetch") as pool:
        try:
            for t in rest:
                ahead.append(pool.submit(prefetch.prepare, t))
                if len(ahead) >= depth:
                    break
            while ahead:
                ready = ahead.popleft().result()
                nxt = next(rest, None)
                if nxt is not None:
                    ahead.append(pool.submit(prefetch.prepare, nxt))
                yield ready
        finally:
            for f in ahead:
                f.cancel()


def _cut_in_lanes(
    lanes: list[ProcessPoolExecutor], ready: Iterator[CellTask], folder: Path, meta: dict[str, str], prefetched: bool
) -> Iterator[CellResult]:
    """Units cut by worker processes (one pool of one process per lane), a big cell's parts on one worker.

    Each lane has up to ``PER_LANE`` units in flight, so its worker never
    waits for the main process between units. Without prefetch every unit is
    ready at once and :class:`ops.crop.lanes.Schedule` picks among them; with
    prefetch, units are taken one at a time in prefetch order, as they become
    local (bounded disk), by whichever lane has room. Each worker writes its
    own shards; once every unit is cut, each is asked to finish its writes.
    """
    schedule = Schedule(len(lanes))
    if not prefetched:  # every unit is local already: the schedule chooses among all of them
        for t in ready:
            schedule.add(t)
    load = [0] * len(lanes)
    running: dict[Future, int] = {}  # future -> lane

    def fill() -> None:
        for lane in sorted(range(len(lanes)), key=lambda k: load[k]):
            while load[lane] < PER_LANE:
                if not len(schedule):
                    nxt = next(ready, None)
                    if nxt is None:
                        return
                    schedule.add(nxt)
                running[lanes[lane].submit(_run_task, schedule.pick(lane), folder, meta)] = lane
                load[lane] += 1

    try:
        while True:
            fill()
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in done:
                load[running.pop(f)] -= 1
                yield f.result()
    finally:  # stopped early (an error, or the consumer gave up): queued units are not started
        for f in running:
            f.cancel()
    for f in [lane.submit(_finish_worker) for lane in lanes]:
        f.result()


def crop_partition(
    buildings_parquet: Path,
    info: MosaicInfo,
    out_dir: Path,
    spec: ChipSpec,
    *,
    buildings_fingerprint: str,
    workers: int = 1,
    resume: bool = True,
    part_size: int = 4096,
    progress: Callable[[CellResult, int, int], None] | None = None,
    prefetch: Prefetch | None = None,
    prefetch_depth: int = 2,
) -> Iterator[CellResult]:
    """Crop every cell of a partition into ``out_dir``, yielding one result per shard (cell or part of a cell).

    Chips are read from the tiles listed in ``info`` (the VRT is for people
    and other tools; the crop reads blocks from the tiles themselves).

    With ``resume``, a cell whose complete shard carries the same fingerprint
    (same chip spec, imagery and buildings) is reused rather than recut. Shards
    of cells that no longer exist are removed, so the folder always describes
    exactly the current buildings.

    With ``prefetch`` (remote imagery), the blocks of the next ``prefetch_depth``
    units of work are fetched while the current ones are cut, and each unit's
    local copy is released once its shard is written: disk use stays bounded.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = cell_tasks(buildings_parquet, part_size)
    fp = spec.fingerprint(info.imagery_id, buildings_fingerprint)
    meta = {"fingerprint": fp, "imagery_id": info.imagery_id, "chip_size": str(spec.size), "epsg": str(info.epsg)}
    wanted = {t.shard_id for t in tasks}
    for stale in set(list_shards(out_dir)) - wanted:
        for p in shard_paths(out_dir, stale):
            p.unlink(missing_ok=True)
    todo: list[CellTask] = []
    done = 0
    for t in tasks:
        idx = shard_paths(out_dir, t.shard_id)[1]
        if resume and idx.exists() and shard_meta(idx).get("fingerprint") == fp:
            counts = status_counts(pq.read_table(idx, columns=["status"]).column("status").to_pylist())
            r = CellResult(t.shard_id, counts, counts["ok"], 0.0, reused=True)
            done += 1
            if progress:
                progress(r, done, len(tasks))
            yield r
        else:
            todo.append(t)
    # big cells first (better load balance), each cell's parts together and in order (see ops.crop.lanes)
    size: dict[str, int] = {}
    for t in todo:
        size[t.cell_id] = size.get(t.cell_id, 0) + len(t.building_ids)
    todo.sort(key=lambda t: -size[t.cell_id])  # stable: cells come from cell_tasks grouped, parts in order
    by_shard = {t.shard_id: t for t in todo}
    n, decode_threads = worker_processes(info, workers, len(todo), available_cpus())
    single = n == 1
    init_args = (info.to_json(), spec, decode_threads)
    ready = _prefetched(todo, prefetch, prefetch_depth)
    # in-process, the worker set-up must not outlive the crop (a later step in the same process, or a
    # caller, would run torch on one thread)
    saved = (torch.get_num_threads(), os.environ.get("GDAL_CACHEMAX"))
    if single:
        _init_worker(*init_args)
        cut = (_run_task(t, out_dir, meta) for t in ready)
    else:
        # forked: a spawned worker would import torch, rasterio and pyarrow again (seconds each)
        ctx = multiprocessing.get_context("fork")
        lanes = [
            ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=_init_worker, initargs=init_args)
            for _ in range(n)
        ]
        cut = _cut_in_lanes(lanes, ready, out_dir, meta, prefetched=prefetch is not None)
    try:
        with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB << 20):  # bytes (see GDAL_CACHE_MB)
            for r in cut:
                if prefetch is not None:
                    prefetch.release(by_shard[r.shard_id])
                done += 1
                if progress:
                    progress(r, done, len(tasks))
                yield r
    finally:
        try:
            if single:
                _finish_worker()  # every shard is on disk (or its error raised) before we return
            else:
                for lane in lanes:
                    lane.shutdown(cancel_futures=True)
        finally:
            ready.close()
            if single:
                torch.set_num_threads(saved[0])
                if saved[1] is None:
                    os.environ.pop("GDAL_CACHEMAX", None)
                else:
                    os.environ["GDAL_CACHEMAX"] = saved[1]
