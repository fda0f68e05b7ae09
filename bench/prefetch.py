"""Benchmark of the chips step on remote imagery: GDAL reading blocks over HTTP vs the prefetch.

    make bench-prefetch        # or: .venv/bin/python -m bench.prefetch [--buildings 10000] [--latency-ms 20]

Reuses `make bench-crop`'s synthetic département (generated on first use). Its tiles are served
over HTTP with Range requests by a local server that waits ``--latency-ms`` before answering each
request (object stores answer a first byte in tens of milliseconds). Same buildings, same run,
each contender in a fresh process:

- **local**: the crop on the local files (what the step does once the blocks are here);
- **direct**: the crop on ``/vsicurl/`` URLs: GDAL fetches each block when the crop asks for it;
- **prefetch**: the crop on ``/vsicurl/`` URLs with the prefetch (``--threads`` range requests in
  flight, ``--depth`` units ahead).

Prints chips/s of each, prefetch/direct and prefetch/local, the bytes and requests the prefetch
made against what the chips need, and ends with one JSON line.

``--source wms`` runs the same comparison against a WMS: the département's tiles served by
Debian's MapServer (``tests/standins/mapserver.py``, ``make install-mapserver``) as one layer,
``--latency-ms`` before each answer, and the contenders are **direct** (GDAL's WMS driver: one
GetMap when the crop asks for each block) and **prefetch** (``ops.crop.service_prefetch``: the
unit's GetMaps in parallel, ``--threads`` in flight, into a local cache). MapServer renders each
GetMap in a CGI process on this machine's two cores, so its own rendering time is part of both.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from bench.crop import DEP, SPEC
from ops.crop.partition import crop_partition
from ops.crop.prefetch import Prefetcher
from ops.crop.service_prefetch import ServicePrefetcher
from ops.geo.footprints import iter_building_batches, write_buildings_geoparquet
from ops.imagery.mosaic import MosaicInfo, build_mosaic
from ops.imagery.remote import HttpRangeReader
from ops.imagery.wms import WmsLayer, gdal_wms_xml, open_layer, write_service_tile
from synthetic import generate_departement


def contender(kind: str, work: Path, parquet: Path, threads: int, depth: int) -> dict:
    name = "local" if kind == "local" else "wms" if kind.startswith("wms") else "remote"
    info = MosaicInfo.from_json((work / f"{name}.json").read_text())
    out = work / f"out_{kind}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    stats: dict = {}
    if kind == "wms-prefetch":
        wms = WmsLayer(**json.loads((work / "wms_layer.json").read_text()))
        shutil.rmtree(work / "wms-cache", ignore_errors=True)  # a cold cache: every GetMap is made
        with ServicePrefetcher(info, SPEC, wms, HttpRangeReader(), work / "wms-cache", threads=threads,
                               rate_per_s=None) as p:  # fmt: skip
            results = list(crop_partition(parquet, info, out, SPEC, buildings_fingerprint="b", resume=False,
                                          prefetch=p, prefetch_depth=depth))  # fmt: skip
            stats = p.stats.as_dict()
    elif kind == "prefetch":
        with Prefetcher(info, SPEC, HttpRangeReader(), work, threads=threads) as p:
            results = list(crop_partition(parquet, info, out, SPEC, buildings_fingerprint="b", resume=False,
                                          prefetch=p, prefetch_depth=depth))  # fmt: skip
            stats = p.stats.as_dict()
    else:
        results = list(crop_partition(parquet, info, out, SPEC, buildings_fingerprint="b", resume=False))
    seconds = time.perf_counter() - t0
    chips = sum(r.chips for r in results)
    return {"chips": chips, "seconds": seconds, "chips_per_s": chips / seconds, **stats}


def run(kind: str, work: Path, parquet: Path, threads: int, depth: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "bench.prefetch", "--child", kind, str(work), str(parquet), str(threads), str(depth)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--buildings", type=int, default=10_000, help="the first N buildings of the bench département")
    p.add_argument("--latency-ms", type=float, default=20.0)
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("bench/out"))
    p.add_argument("--source", choices=("http", "wms"), default="http", help="tiles over HTTP, or a WMS (MapServer)")
    p.add_argument("--block-px", type=int, default=512, help="GetMap size of the WMS run")
    p.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        kind, work, parquet, threads, depth = args.child
        print(json.dumps(contender(kind, Path(work), Path(parquet), int(threads), int(depth))))
        return
    from tests.standins.range_server import range_server

    m = generate_departement(args.out / "data", DEP, 100_000, seed=0, tile_px=10_000, verbose=True)
    work = args.out / "prefetch"
    work.mkdir(parents=True, exist_ok=True)
    full = args.out / "work" / "buildings_100000.parquet"
    if not full.exists():
        full.parent.mkdir(parents=True, exist_ok=True)
        write_buildings_geoparquet(iter_building_batches(m.footprints, DEP, m.epsg), full, m.epsg)
    parquet = work / f"buildings_{args.buildings}.parquet"
    pq.write_table(pq.read_table(full).slice(0, args.buildings), parquet)
    tiles = sorted(m.ortho_dir.glob("*.tif"))
    local = build_mosaic([str(t.resolve()) for t in tiles], work / "local.vrt", name="local")
    (work / "local.json").write_text(local.to_json())
    if args.source == "wms":
        return wms_run(args, work, parquet, local)
    with range_server(m.ortho_dir, latency_s=args.latency_ms / 1000) as (url, _):
        remote = build_mosaic([f"/vsicurl/{url}/{t.name}" for t in tiles], work / "remote.vrt", name="remote")
        (work / "remote.json").write_text(remote.to_json())
        print(f"{args.buildings:,} buildings, {len(tiles)} tiles served over HTTP, {args.latency_ms:g} ms per request")
        res = {k: run(k, work, parquet, args.threads, args.depth) for k in ("local", "prefetch", "direct")}
    lo, pf, di = (res[k]["chips_per_s"] for k in ("local", "prefetch", "direct"))
    print(f"local files                    : {lo:8,.0f} chips/s")
    print(f"direct /vsicurl/ (GDAL)        : {di:8,.0f} chips/s")
    print(f"prefetch ({args.threads} threads, depth {args.depth}) : {pf:8,.0f} chips/s")
    s = res["prefetch"]
    print(f"prefetch / direct              : {pf / di:.1f}x")
    print(f"prefetch / local               : {pf / lo:.2f}")
    print(f"prefetch fetched {s['bytes'] / 2**20:,.0f} MiB in {s['requests']:,} requests "
          f"({s['retries']} retries) for {s['blocks']:,} blocks")  # fmt: skip
    print(json.dumps({
        "bench": "prefetch", "buildings": args.buildings, "latency_ms": args.latency_ms,
        "local_chips_per_s": round(lo, 1), "direct_chips_per_s": round(di, 1), "prefetch_chips_per_s": round(pf, 1),
        "ratio_vs_direct": round(pf / di, 2), "fraction_of_local": round(pf / lo, 3),
        "source": "http", "prefetch_mib": round(s["bytes"] / 2**20, 1), "prefetch_requests": s["requests"],
    }))  # fmt: skip


def wms_run(args: argparse.Namespace, work: Path, parquet: Path, local: MosaicInfo) -> None:
    """The same buildings from MapServer serving the tiles as a WMS: GDAL's direct reads vs the prefetch."""
    from tests.standins.mapserver import LAYER, wms_server

    with wms_server(work / "local.vrt", local.bounds, latency_s=args.latency_ms / 1000) as (url, control):
        wms = WmsLayer(url, LAYER, format="image/png", block_px=args.block_px)
        xml = write_service_tile(gdal_wms_xml(wms, open_layer(wms, HttpRangeReader())), work / "service.xml")
        (work / "wms.json").write_text(build_mosaic([str(xml)], work / "wms.vrt", name="wms").to_json())
        (work / "wms_layer.json").write_text(json.dumps(wms.__dict__))
        print(f"{args.buildings:,} buildings from MapServer's WMS, {args.block_px} px PNG GetMaps, "
              f"{args.latency_ms:g} ms per request")  # fmt: skip
        res = {}
        for k in ("local", "wms-prefetch", "wms-direct"):
            before = control.log()["getmaps"]
            res[k] = {**run(k, work, parquet, args.threads, args.depth), "getmaps": control.log()["getmaps"] - before}
    lo, pf, di = (res[k]["chips_per_s"] for k in ("local", "wms-prefetch", "wms-direct"))
    s = res["wms-prefetch"]
    print(f"local files                     : {lo:8,.0f} chips/s")
    print(f"direct GDAL WMS driver          : {di:8,.0f} chips/s ({res['wms-direct']['getmaps']:,} GetMaps)")
    print(f"prefetch ({args.threads} threads, depth {args.depth})  : {pf:8,.0f} chips/s ({s['getmaps']:,} GetMaps)")
    print(f"prefetch / direct               : {pf / di:.1f}x")
    print(f"prefetch / local                : {pf / lo:.3f}")
    print(json.dumps({
        "bench": "prefetch", "source": "wms", "buildings": args.buildings, "latency_ms": args.latency_ms,
        "block_px": args.block_px, "local_chips_per_s": round(lo, 1), "direct_chips_per_s": round(di, 1),
        "prefetch_chips_per_s": round(pf, 1), "ratio_vs_direct": round(pf / di, 2),
        "fraction_of_local": round(pf / lo, 3), "direct_getmaps": res["wms-direct"]["getmaps"],
        "prefetch_getmaps": s["getmaps"], "prefetch_mib": round(s["bytes"] / 2**20, 1),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
