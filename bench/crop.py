"""Benchmark of the `chips` step against what a user would write, and against the decode floor.

    make bench-crop            # or: .venv/bin/python -m bench.crop [--buildings 100000] [--format jp2]
    make bench-crop BENCH_ARGS="--format jpeg --buildings 20000"
    make bench-crop BENCH_ARGS="--format jp2 --keep-one-in 20"   # rural density, JPEG 2000

``--format`` is the imagery's encoding (``synthetic``'s ``imagery_format``): ``deflate`` (lossless
GeoTIFF, the default, whose figures earlier runs are compared with), ``jpeg`` (JPEG COG, YCbCr q85)
or ``jp2`` (lossy JPEG 2000 like BD ORTHO). The same département is generated once per format, under
``--out`` for deflate and ``--out/<format>`` for the others, so the formats don't overwrite each other.

Same files, same run:
- **baseline**: one read per building, in source order, on the mosaic (VRT): rio-tiler's
  ``Reader.part()`` and a plain rasterio windowed read with ``out_shape`` (dataset opened
  once); each chip goes to the same shard writer as ours. Run on the first
  ``--baseline-buildings`` buildings (default 20,000) to keep the run short; chips/s is
  what is compared. rio-tiler's is *the* baseline (``ratio_vs_baseline``); the plain read is reported beside it.
- **decode floor**: decompress once every raster block that the chips touch, with the fastest
  decoder we have (``ops.imagery.blocks.BlockReader``, with a thread per CPU it runs on where the
  format can use them: libdeflate on DEFLATE tiles, about 7 % faster per block than a GDAL windowed read;
  libjpeg-turbo on JPEG tiles, about 4x GDAL's libjpeg 9; OpenJPEG on each JPEG 2000 codestream
  tile, as many tiles at once as it has CPUs), so the floor is not one our own crop could beat by decoding blocks — except that on
  JPEG 2000 the crop decodes only the areas the windows need of a block that few windows touch
  (``ops.imagery.openjpeg``): there ``fraction_of_decode_floor`` can pass 1, the sparser the buildings
  the more (``--keep-one-in``).
- **ours**: the real `chips` code path (``ops.crop.partition.crop_partition``), writing shards, with 1
  and 2 workers (``workers`` is the crop's CPU budget: on JPEG 2000, 2 workers are one process
  decoding on two threads).
- **CPUs**: every contender runs pinned to as many CPUs as it is compared on (``CPUS``; Linux
  affinity; ``GDAL_NUM_THREADS=1`` on one CPU, as JP2OpenJPEG decodes on all CPUs by default; torch's
  pool resized): the baselines, the floor and ours with 1 worker on one CPU, so ``ratio_vs_baseline``
  and ``fraction_of_decode_floor`` compare like with like on every format; ours with 2 workers against
  rio-tiler on two CPUs with GDAL's defaults (``ratio_vs_baseline_2_cpus``).
- **memory**: peak RSS of the crop (1 worker, in a fresh process) for N and 2N buildings.
Every contender runs in a fresh process (as the `chips` step does in production: a Dagster step
subprocess or a pod), so none inherits another's GDAL cache or thread pools. The contenders run in ``--repeats`` rounds
(default 5), one after the other within a round; ratios are taken within a round and the median
round is reported, since this shared 2-core VM's speed drifts by 10-40 % over minutes (two
consecutive 1-worker runs differ by up to 20 %: a median of 3 rounds still moved by ±0.1 on the
2-worker scaling, so 5 are run; every round's ratios are printed and in the JSON).
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import rasterio
import torch
from rasterio.enums import Resampling
from rasterio.windows import Window

from bench.memory import peak_rss_bytes
from ops.cpus import available_cpus
from ops.crop.partition import crop_partition
from ops.crop.spec import ChipSpec, chip_windows, intersects_any
from ops.crop.tiles import TileSet
from ops.crop.writer import write_shard
from ops.geo.footprints import iter_building_batches, write_buildings_geoparquet
from ops.imagery.blocks import BlockReader
from ops.imagery.mosaic import MosaicInfo, build_mosaic, find_tiles
from synthetic import IMAGERY_FORMATS, generate_departement

DEP = "33"
SPEC = ChipSpec()
#: the CPUs each contender runs on (see the module's doc)
CPUS = {"rio-tiler": 1, "rasterio": 1, "floor": 1, "ours1": 1, "rio-tiler2": 2, "ours2": 2}
#: the baseline contenders and the reader each one runs (see :func:`baseline`)
BASELINES = {"rio-tiler": "rio-tiler", "rasterio": "rasterio", "rio-tiler2": "rio-tiler"}


def format_folder(out: Path, imagery_format: str) -> Path:
    """Where a format's data and work live: ``out`` itself for deflate (as before ``--format``), else ``out/<format>``."""
    return out if imagery_format == "deflate" else out / imagery_format


def prepare(out: Path, n: int, imagery_format: str = "deflate") -> tuple[Path, Path, MosaicInfo, dict]:
    m = generate_departement(out / "data", DEP, n, seed=0, tile_px=10_000, verbose=True, imagery_format=imagery_format)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    full = work / f"buildings_{n}.parquet"
    fresh = full.exists() and full.stat().st_mtime > m.footprints.stat().st_mtime  # else regenerated data
    if not fresh:
        write_buildings_geoparquet(iter_building_batches(m.footprints, DEP, m.epsg), full, m.epsg)
    half = work / f"buildings_{n // 2}.parquet"
    if not fresh or not half.exists():
        pq.write_table(pq.read_table(full).slice(0, n // 2), half)
    info = build_mosaic(find_tiles(m.ortho_dir), work / "mosaic.vrt", name="bench")
    tiles = info.tile_bounds_array()
    area = float(((tiles[:, 2] - tiles[:, 0]) * (tiles[:, 3] - tiles[:, 1])).sum()) / 1e6
    facts = {
        "buildings": m.n_buildings,
        "tiles": len(info.tiles),
        "tile_px": m.tile_px,
        "imagery_km2": round(area, 1),
        "buildings_per_km2_imagery": round(m.n_buildings / area, 1),
        "buildings_per_km2_extent": m.density_per_km2,
        "compression": round(
            sum(t.width * t.height * 3 for t in info.tiles) / sum(Path(t.path).stat().st_size for t in info.tiles), 2
        ),
    }
    return full, half, info, facts


def thin(parquet: Path, k: int) -> Path:
    """One building in ``k`` of ``parquet`` (every k-th row), written beside it."""
    out = parquet.with_name(f"{parquet.stem}_1in{k}.parquet")
    table = pq.read_table(parquet)
    pq.write_table(table.take(np.arange(0, table.num_rows, k)), out)
    return out


def windows_in_source_order(parquet: Path, info: MosaicInfo) -> np.ndarray:
    """Chip windows (minx, miny, maxx, maxy) of the buildings that have imagery, in file order."""
    import shapely

    geoms = shapely.from_wkb(pq.read_table(parquet, columns=["geometry"]).column("geometry").to_numpy(False))
    status = pq.read_table(parquet, columns=["geometry_status"]).column("geometry_status").to_numpy(False)
    b = shapely.bounds(geoms)
    ok = np.isfinite(b).all(axis=1) & np.isin(status, ("ok", "repaired"))
    w = chip_windows(b[ok], SPEC, info.resolution, (info.bounds[0], info.bounds[3]))
    return w[intersects_any(w, info.tile_bounds_array())]


def _write_chunks(chips: list[np.ndarray], folder: Path, k: int) -> None:
    import pyarrow as pa

    ids = [f"b{i}" for i in range(len(chips))]
    index = pa.table({"building_id": ids, "row": np.arange(len(chips), dtype="int32")})
    write_shard(folder, f"part{k:04d}", np.stack(chips), index, {})


def baseline(kind: str, vrt: Path, windows: np.ndarray, folder: Path) -> float:
    """chips/s of one read per building on the mosaic, chips handed to the shard writer."""
    shutil.rmtree(folder, ignore_errors=True)
    size = SPEC.size
    chips: list[np.ndarray] = []
    k = 0
    t0 = time.perf_counter()
    if kind == "rio-tiler":
        from rio_tiler.io import Reader

        with Reader(str(vrt)) as r:
            crs = r.crs
            for x0, y0, x1, y1 in windows:
                img = r.part((x0, y0, x1, y1), dst_crs=crs, bounds_crs=crs, height=size, width=size,
                             resampling_method="bilinear")  # fmt: skip
                chips.append(img.data[:3].astype("uint8"))
                if len(chips) == 4096:
                    _write_chunks(chips, folder, k)
                    chips, k = [], k + 1
    else:
        with rasterio.open(vrt) as ds:
            whole = Window(0, 0, ds.width, ds.height)
            for x0, y0, x1, y1 in windows:
                # clipped to the raster, as a user would (boundless reads are far slower)
                win = ds.window(x0, y0, x1, y1).round_offsets().round_lengths().intersection(whole)
                chips.append(ds.read(window=win, out_shape=(ds.count, size, size), resampling=Resampling.bilinear))
                if len(chips) == 4096:
                    _write_chunks(chips, folder, k)
                    chips, k = [], k + 1
    if chips:
        _write_chunks(chips, folder, k)
    return len(windows) / (time.perf_counter() - t0)


def decode_floor(info: MosaicInfo, windows: np.ndarray) -> tuple[float, int, int, str]:
    """Seconds to decompress once every block the windows touch; (seconds, blocks, bytes, decoder).

    One process. JPEG 2000 blocks, which can use threads, are decoded on all the CPUs the fastest way
    measured: as many blocks at once as there are CPUs, each on one thread (2.0x one thread on two
    cores, where OpenJPEG's own threads split one block 1.7x); the other formats' blocks one after
    another, as one crop worker does.
    """
    ts = TileSet(info)
    res, left, top = info.resolution, info.bounds[0], info.bounds[3]
    cols = np.rint((windows[:, 0] - left) / res).astype(np.int64)
    rows = np.rint((top - windows[:, 3]) / res).astype(np.int64)
    npx = np.rint((windows[:, 2] - windows[:, 0]) / res).astype(np.int64)
    # the crop's own enumeration of the blocks its windows touch
    needed = {(i, br, bc) for i, blocks in ts.blocks(cols, rows, npx).items() for br, bc in blocks}
    t0 = time.perf_counter()
    nbytes = 0
    readers: dict[int, BlockReader] = {}
    threads = available_cpus()
    parallel = []
    for i, br, bc in sorted(needed):
        reader = readers.get(i) or readers.setdefault(i, BlockReader(info.tiles[i].path, threads))
        if reader.decodes_areas and threads > 1:
            parallel.append((reader, br, bc))
        else:
            nbytes += reader.read(br, bc).nbytes
    if parallel:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            nbytes += sum(
                b.nbytes for b in pool.map(lambda job: job[0].decode_direct(job[1], job[2], None, 1), parallel)
            )
    seconds = time.perf_counter() - t0
    decoders = sorted({r.decoder for r in readers.values()})
    for reader in readers.values():
        reader.close()
    return seconds, len(needed), nbytes, "+".join(decoders)


def ours(parquet: Path, info: MosaicInfo, folder: Path, workers: int) -> tuple[float, int, float, int, int]:
    """(seconds, chips, stored bytes per chip, raster blocks decoded, of which by areas) of the real crop path."""
    shutil.rmtree(folder, ignore_errors=True)
    t0 = time.perf_counter()
    results = list(crop_partition(parquet, info, folder, SPEC, buildings_fingerprint="bench", workers=workers,
                                  resume=False))  # fmt: skip
    seconds = time.perf_counter() - t0
    chips = sum(r.chips for r in results)
    stored = sum(p.stat().st_size for p in folder.glob("*.chips.npy"))
    return seconds, chips, stored / max(chips, 1), sum(r.blocks for r in results), sum(r.area_blocks for r in results)


def child(kind: str, work: Path, parquet: Path, n_sample: int) -> dict:
    """Run one contender in this (fresh) process: the state a production step starts from."""
    info = MosaicInfo.from_json((work / "mosaic.json").read_text())
    if kind in BASELINES:
        sample = windows_in_source_order(parquet, info)[:n_sample]
        reader = BASELINES[kind]
        return {"chips_per_s": baseline(reader, work / "mosaic.vrt", sample, work / f"baseline_{reader}")}
    if kind == "floor":
        windows = windows_in_source_order(parquet, info)
        seconds, blocks, nbytes, decoder = decode_floor(info, windows)
        return {
            "chips_per_s": len(windows) / seconds, "blocks": blocks, "bytes": nbytes, "seconds": seconds,
            "decoder": decoder,
        }  # fmt: skip
    workers = int(kind.removeprefix("ours"))
    seconds, chips, bpc, blocks, by_areas = ours(parquet, info, work / f"ours_{workers}", workers)
    return {
        "chips_per_s": chips / seconds, "chips": chips, "seconds": seconds, "bytes_per_chip": bpc, "blocks": blocks,
        "area_blocks": by_areas,
    }  # fmt: skip


def pin(cpus: int) -> int:
    """Keep this process (and the threads it will start) on its first ``cpus`` CPUs; the CPUs it got.

    torch's thread pool was sized when it was imported, on every CPU: two of its threads on one CPU
    made the DEFLATE floor (whose predictor is undone by a torch cumsum) 15x slower, so it is resized.
    """
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cpus])
    got = min(cpus, available_cpus())
    torch.set_num_threads(got)
    return got


def run_child(kind: str, work: Path, parquet: Path, n_sample: int = 0) -> dict:
    """One contender in a fresh process on its :data:`CPUS`: on one CPU GDAL gets one thread; on two,
    GDAL's defaults, as a user runs it (JP2OpenJPEG then decodes on both CPUs, GTiff on one: forcing
    two threads made rio-tiler's small DEFLATE reads slower, 751 against 1,321 chips/s)."""
    env = {k: v for k, v in os.environ.items() if k != "GDAL_NUM_THREADS"}
    if CPUS[kind] == 1:
        env["GDAL_NUM_THREADS"] = "1"
    out = subprocess.run(
        [sys.executable, "-m", "bench.crop", "--child", kind, str(work), str(parquet), str(n_sample)],
        check=True, capture_output=True, text=True, env=env,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def rss_child(parquet: str, info_json: str, folder: str) -> None:
    pin(CPUS["ours1"])
    info = MosaicInfo.from_json(Path(info_json).read_text())
    ours(Path(parquet), info, Path(folder), workers=1)
    print(json.dumps({"peak_rss_mib": peak_rss_bytes() / 2**20}))


def peak_rss(parquet: Path, info: MosaicInfo, work: Path) -> float:
    info_json = work / "mosaic.json"
    info_json.write_text(info.to_json())
    out = subprocess.run(
        [sys.executable, "-m", "bench.crop", "--rss-child", str(parquet), str(info_json), str(work / "rss_out")],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mib"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--buildings", type=int, default=100_000)
    p.add_argument("--baseline-buildings", type=int, default=20_000)
    p.add_argument("--out", type=Path, default=Path("bench/out"))
    p.add_argument("--format", choices=IMAGERY_FORMATS, default="deflate", help="the imagery's encoding (see above)")
    p.add_argument("--repeats", type=int, default=5, help="rounds (each runs every contender once)")
    p.add_argument(
        "--keep-one-in", type=int, default=1, metavar="K",
        help="crop one building in K (a sparser, rural département on the same imagery: France averages about "
        "60 buildings per km²; the sample is denser)",
    )  # fmt: skip
    p.add_argument("--rss-child", nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rss_child:
        return rss_child(*args.rss_child)
    if args.child:
        kind, work, parquet, n = args.child
        got = pin(CPUS[kind])
        result = child(kind, Path(work), Path(parquet), int(n))
        print(json.dumps({**result, "cpus": got, "torch_threads": torch.get_num_threads()}))
        return None
    root = format_folder(args.out, args.format)
    full, half, info, facts = prepare(root, args.buildings, args.format)
    work = root / "work"
    if args.keep_one_in > 1:
        full, half = (thin(f, args.keep_one_in) for f in (full, half))
        facts = {**facts, "kept_one_in": args.keep_one_in, "buildings": pq.ParquetFile(full).metadata.num_rows}
        for k in ("buildings_per_km2_imagery", "buildings_per_km2_extent"):
            facts[k] = round(facts[k] / args.keep_one_in, 1)
    print(f"data ({args.format}): {facts}")
    print(f"{args.repeats} rounds; in each, every contender runs once, one after the other, in a fresh process. "
          "Ratios are taken within a round (this VM's speed drifts by 10-40 % over minutes) and the median "
          "round is reported; chips/s are medians too.")  # fmt: skip
    (work / "mosaic.json").write_text(info.to_json())
    nb = args.baseline_buildings
    rounds = []
    for k in range(args.repeats):
        got = {
            "rio-tiler": run_child("rio-tiler", work, full, nb),
            "rasterio": run_child("rasterio", work, full, nb),
            "floor": run_child("floor", work, full),
            "ours1": run_child("ours1", work, full),
            "ours2": run_child("ours2", work, full),
            "rio-tiler2": run_child("rio-tiler2", work, full, nb),
        }
        cps = {kind: d["chips_per_s"] for kind, d in got.items()}
        rounds.append((cps, got))
        print(f"round {k + 1}: " + ", ".join(f"{kind} {v:,.0f}" for kind, v in cps.items()) + " chips/s; "
              f"ours/rio-tiler {cps['ours1'] / cps['rio-tiler']:.2f}x, ours/rasterio {cps['ours1'] / cps['rasterio']:.2f}x, "
              f"ours/floor {cps['ours1'] / cps['floor']:.2f}, 2 workers/1 {cps['ours2'] / cps['ours1']:.2f}, "
              f"on 2 CPUs ours/rio-tiler {cps['ours2'] / cps['rio-tiler2']:.2f}x")  # fmt: skip

    def med(f) -> float:
        return float(np.median([f(c) for c, _ in rounds]))

    base_rt, base_rio, floor = med(lambda c: c["rio-tiler"]), med(lambda c: c["rasterio"]), med(lambda c: c["floor"])
    one, two = med(lambda c: c["ours1"]), med(lambda c: c["ours2"])
    ratio_rt, ratio_rio = med(lambda c: c["ours1"] / c["rio-tiler"]), med(lambda c: c["ours1"] / c["rasterio"])
    frac, scale = med(lambda c: c["ours1"] / c["floor"]), med(lambda c: c["ours2"] / c["ours1"])
    base_rt2, ratio_rt2 = med(lambda c: c["rio-tiler2"]), med(lambda c: c["ours2"] / c["rio-tiler2"])
    if rounds[0][1]["ours2"]["cpus"] < 2:
        print("this machine gave the 2-CPU contenders one CPU: their figures are not a 2-CPU measurement")
    fl, o1, o2 = rounds[0][1]["floor"], rounds[0][1]["ours1"], rounds[0][1]["ours2"]
    bpc = o1["bytes_per_chip"]
    print(f"baseline rio-tiler part() per building : {base_rt:8,.0f} chips/s ({nb:,} buildings)")
    print(f"baseline rasterio read per building    : {base_rio:8,.0f} chips/s ({nb:,} buildings)")
    print(f"baseline rio-tiler on 2 CPUs           : {base_rt2:8,.0f} chips/s (GDAL's default threads)")
    print(f"decode floor ({fl['decoder']}, {fl['blocks']:,} blocks, {fl['bytes'] / 2**20:,.0f} MiB, "
          f"{fl['bytes'] / 2**20 / fl['seconds']:,.0f} MiB/s in round 1, {fl['cpus']} CPU) : {floor:8,.0f} chips/s")  # fmt: skip
    print(f"ours, 1 worker (1 CPU)                 : {one:8,.0f} chips/s ({o1['chips']:,} chips)")
    print(f"ours, 2 workers ({o2['cpus']} CPUs)               : {two:8,.0f} chips/s ({scale:.2f}x one worker)")
    print(f"raster blocks decoded                  : {o1['blocks']:,} with 1 worker, {o2['blocks']:,} with 2 "
          f"(the floor's {fl['blocks']:,} are each needed block once, whole; cells decode the blocks they share); "
          f"by areas only: {o1['area_blocks']:,} / {o2['area_blocks']:,}")  # fmt: skip
    rss_n = peak_rss(half, info, work)
    rss_2n = peak_rss(full, info, work)
    print(f"ratio ours/baseline (rio-tiler part()) : {ratio_rt:.2f}x")
    print(f"ratio ours/rasterio windowed read      : {ratio_rio:.2f}x")
    print(f"ratio on 2 CPUs, ours/rio-tiler        : {ratio_rt2:.2f}x")
    print(f"fraction of decode floor               : {frac:.2f}")
    print(f"bytes per stored chip                  : {bpc:,.0f}")
    print(f"peak RSS, {args.buildings // 2:,} / {args.buildings:,} buildings : {rss_n:,.0f} / {rss_2n:,.0f} MiB "
          f"(+{100 * (rss_2n / rss_n - 1):.1f} %)")  # fmt: skip
    result = {
        "bench": "crop",
        "format": args.format,
        "decoder": fl["decoder"],
        "chips_per_s": round(one, 1),
        "chips_per_s_2_workers": round(two, 1),
        "baseline_chips_per_s": round(base_rt, 1),
        "baseline_rasterio_chips_per_s": round(base_rio, 1),
        "decode_floor_chips_per_s": round(floor, 1),
        "ratio_vs_baseline": round(ratio_rt, 2),
        "ratio_vs_rasterio": round(ratio_rio, 2),
        "baseline_2_cpus_chips_per_s": round(base_rt2, 1),
        "ratio_vs_baseline_2_cpus": round(ratio_rt2, 2),
        "fraction_of_decode_floor": round(frac, 3),
        "two_workers_vs_one": round(scale, 2),
        "two_workers_vs_one_rounds": [round(c["ours2"] / c["ours1"], 2) for c, _ in rounds],
        "bytes_per_chip": round(bpc),
        "blocks_decoded_1_worker": o1["blocks"],
        "blocks_decoded_2_workers": o2["blocks"],
        "blocks_decoded_by_areas_1_worker": o1["area_blocks"],
        "blocks_needed": fl["blocks"],
        "peak_rss_mib_n": round(rss_n, 1),
        "peak_rss_mib_2n": round(rss_2n, 1),
        **{f"data_{k}": v for k, v in facts.items()},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
