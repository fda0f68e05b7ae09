"""Break-even of converting BD ORTHO's JPEG 2000 tiles once to COGs, for a département reprocessed every month.

    make bench-convert         # or: .venv/bin/python -m bench.convert [--tiles 4] [--buildings 5000] [--repeats 1]

BD ORTHO comes as lossy JPEG 2000 (5,000 px tiles of 1 km², 1,024 px codestream tiles), which decodes
about ten times slower than a JPEG or DEFLATE GeoTIFF. Either every monthly run decodes the JP2 again,
or each tile is converted once (``ops.imagery.convert.convert_tiles``) and the runs crop the COG. On a
generated ``jp2`` département (``synthetic.generate_departement(..., tile_px=5000, imagery_format="jp2")``,
the first ``--tiles`` tiles and the buildings whose centre is on them), the contenders are:

- **conversion** of those tiles to a COG: JPEG q85 (YCbCr) in 256 and 512 px blocks and DEFLATE in
  256 px blocks with one thread, JPEG 256 with two threads: seconds, MP/s and bytes;
- **crop** (the real ``chips`` path, ``ops.crop.partition.crop_partition``, one worker) of the same
  buildings from the JP2 and from each COG; and, to see how the answer depends on the density of
  buildings, of every ``--sparse``-th building only, from the JP2 and from the JPEG 256 COG.

The break-even is the conversion's seconds over what one run saves (crop from JP2 − crop from COG):
the number of runs (months) after which converting has paid for itself. It is scaled to France's
BD ORTHO (~550,000 tiles of 25 MP, ~5,700 per département) per tile: at the sample's density and at
the sparse one, with the share of a tile's blocks the crop decodes in each layout (a chip touches a
whole 1,024 px JP2 block but only the 256 px COG blocks under it). The extra storage is the COGs'
bytes (the JP2 stay: they are the source of record).

Every contender runs in a fresh process (as a Dagster step does), one after the other in
``--repeats`` rounds; ratios are taken within a round and the median round is reported, since this
shared VM's speed drifts by 10-40 % over minutes. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import shapely

from bench.crop import ours, windows_in_source_order
from bench.memory import peak_rss_bytes
from ops.crop.tiles import TileSet
from ops.geo.footprints import iter_building_batches, write_buildings_geoparquet
from ops.imagery.convert import convert_tiles
from ops.imagery.mosaic import MosaicInfo, build_mosaic, find_tiles
from synthetic import generate_departement

DEP = "33"
TILE_PX = 5000
FRANCE_TILES = 550_000  # BD ORTHO 20 cm: ~550,000 km² of 1 km² tiles
DEPARTEMENT_TILES = FRANCE_TILES // 96  # an average metropolitan département
VINTAGE_MONTHS = 36  # BD ORTHO is re-flown about every 3 years: the monthly runs one conversion serves
#: (name, compression, block, threads) of each conversion contender; the 1-thread ones are cropped.
CONVERSIONS = [("jpeg256", "jpeg", 256, 1), ("jpeg512", "jpeg", 512, 1), ("deflate256", "deflate", 256, 1),
               ("jpeg256_t2", "jpeg", 256, 2)]  # fmt: skip
CROPPED = ["jp2", "jpeg256", "jpeg512", "deflate256"]


def prepare(out: Path, n: int, n_tiles: int, sparse: int) -> tuple[list[str], dict]:
    """Generate the JP2 sample; write the buildings on the first ``n_tiles`` tiles (all, and every ``sparse``-th)."""
    m = generate_departement(out / "data", DEP, n, seed=0, tile_px=TILE_PX, imagery_format="jp2", verbose=True)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    tiles = find_tiles(m.ortho_dir)[:n_tiles]
    full = work / f"buildings_{n}.parquet"
    if not full.exists() or full.stat().st_mtime < m.footprints.stat().st_mtime:
        write_buildings_geoparquet(iter_building_batches(m.footprints, DEP, m.epsg), full, m.epsg)
    info = build_mosaic(tiles, work / "jp2.vrt", name="jp2")
    table = pq.read_table(full)
    c = shapely.centroid(shapely.from_wkb(table.column("geometry").to_numpy(False)))
    x, y = shapely.get_x(c), shapely.get_y(c)
    on = np.zeros(len(x), dtype=bool)
    for b in info.tile_bounds_array():
        on |= (x >= b[0]) & (x < b[2]) & (y >= b[1]) & (y < b[3])
    pq.write_table(table.filter(on), work / "buildings.parquet")
    pq.write_table(table.filter(on).take(np.arange(0, int(on.sum()), sparse)), work / "buildings_sparse.parquet")
    km2 = len(tiles) * (TILE_PX * m.resolution / 1000) ** 2
    facts = {
        "tiles": len(tiles),
        "tile_px": TILE_PX,
        "buildings": int(on.sum()),
        "buildings_per_km2": round(int(on.sum()) / km2, 1),
        "sparse_every": sparse,
        "jp2_bytes_per_tile": round(sum(Path(t).stat().st_size for t in tiles) / len(tiles)),
    }
    return tiles, facts


def block_share(info: MosaicInfo, parquet: Path) -> float:
    """Share of the tiles' blocks that the chips of ``parquet``'s buildings touch (what the crop must decode)."""
    windows = windows_in_source_order(parquet, info)
    ts = TileSet(info)
    res, left, top = info.resolution, info.bounds[0], info.bounds[3]
    cols = np.rint((windows[:, 0] - left) / res).astype(np.int64)
    rows = np.rint((top - windows[:, 3]) / res).astype(np.int64)
    npx = np.rint((windows[:, 2] - windows[:, 0]) / res).astype(np.int64)
    touched = sum(len(b) for b in ts.blocks(cols, rows, npx).values())
    total = sum(-(-t.height // t.block[0]) * -(-t.width // t.block[1]) for t in info.tiles)
    return touched / total


def rss_bytes() -> int:
    """VmRSS: this process's resident memory now."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def child(kind: str, work: Path) -> dict:
    """Run one contender in this (fresh) process."""
    what, name = kind.split(":")
    if what == "convert":
        _, compression, block, threads = next(c for c in CONVERSIONS if c[0] == name)
        tiles = json.loads((work / "tiles.json").read_text())
        folder = work / f"cog_{name}"
        shutil.rmtree(folder, ignore_errors=True)
        before = rss_bytes()  # the imports (torch, through the crop) are not the conversion's
        t0 = time.perf_counter()
        done = convert_tiles(tiles, folder, compression=compression, block=block, threads=threads)
        seconds = time.perf_counter() - t0
        peak = peak_rss_bytes()
        return {"seconds": seconds, "bytes": sum(c.bytes for c in done), "peak_rss_mib": peak / 2**20,
                "rss_growth_mib": (peak - before) / 2**20}  # fmt: skip
    source, _, density = name.partition("+")
    info = MosaicInfo.from_json((work / f"{source}.json").read_text())
    parquet = work / ("buildings_sparse.parquet" if density == "sparse" else "buildings.parquet")
    seconds, chips, _, blocks, by_areas = ours(parquet, info, work / f"chips_{source}", workers=1)
    return {"seconds": seconds, "chips": chips, "blocks": blocks, "area_blocks": by_areas}


def run_child(kind: str, work: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.convert", "--child", kind, str(work)],
                         check=True, capture_output=True, text=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def mosaics(work: Path, tiles: list[str]) -> dict[str, MosaicInfo]:
    """The JP2 mosaic and one per 1-thread COG folder, saved where the crop children read them."""
    infos = {"jp2": build_mosaic(tiles, work / "jp2.vrt", name="jp2")}
    for name in CROPPED[1:]:
        infos[name] = build_mosaic(find_tiles(work / f"cog_{name}"), work / f"{name}.vrt", name=name)
    for name, info in infos.items():
        (work / f"{name}.json").write_text(info.to_json())
    return infos


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--buildings", type=int, default=5000, help="buildings of the generated sample (5000: 9 tiles)")
    p.add_argument("--tiles", type=int, default=4, help="tiles converted and cropped (the first by name)")
    p.add_argument("--sparse", type=int, default=10, help="the sparse crop keeps every N-th building")
    p.add_argument("--repeats", type=int, default=1, help="rounds (each runs every contender once)")
    p.add_argument("--out", type=Path, default=Path("bench/out/convert"))
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]))))
        return None
    tiles, facts = prepare(args.out, args.buildings, args.tiles, args.sparse)
    work = args.out / "work"
    (work / "tiles.json").write_text(json.dumps(tiles))
    mp = len(tiles) * TILE_PX * TILE_PX / 1e6
    print(f"data: {facts}")
    rounds = []
    for k in range(args.repeats):
        conv = {name: run_child(f"convert:{name}", work) for name, *_ in CONVERSIONS}
        infos = mosaics(work, tiles)
        crop = {name: run_child(f"crop:{name}", work) for name in CROPPED}
        crop |= {f"{n}+sparse": run_child(f"crop:{n}+sparse", work) for n in ("jp2", "jpeg256")}
        rounds.append((conv, crop))
        print(f"round {k + 1}: conversion s " + ", ".join(f"{n} {d['seconds']:.1f}" for n, d in conv.items())
              + "; crop s " + ", ".join(f"{n} {d['seconds']:.1f}" for n, d in crop.items()))  # fmt: skip
    share = {name: block_share(info, work / "buildings.parquet") for name, info in infos.items()}
    share_sparse = {n: block_share(infos[n], work / "buildings_sparse.parquet") for n in ("jp2", "jpeg256")}

    def med(f) -> float:
        return float(np.median([f(c, r) for c, r in rounds]))

    def breakeven(conv_s: float, saved_s: float) -> float:
        return conv_s / saved_s if saved_s > 0 else float("inf")

    conv_s = {name: med(lambda c, r, n=name: c[n]["seconds"]) for name, *_ in CONVERSIONS}
    conv_b = {name: rounds[0][0][name]["bytes"] for name, *_ in CONVERSIONS}
    crop_s = {name: med(lambda c, r, n=name: r[n]["seconds"]) for name in rounds[0][1]}
    runs = {n: med(lambda c, r, n=n: breakeven(c[n]["seconds"], r["jp2"]["seconds"] - r[n]["seconds"]))
            for n in CROPPED[1:]}  # fmt: skip
    runs_sparse = med(lambda c, r: breakeven(c["jpeg256"]["seconds"],
                                             r["jp2+sparse"]["seconds"] - r["jpeg256+sparse"]["seconds"]))  # fmt: skip
    threads2 = med(lambda c, r: c["jpeg256"]["seconds"] / c["jpeg256_t2"]["seconds"])
    rss = max(d["peak_rss_mib"] for c, _ in rounds for d in c.values())
    growth = max(d["rss_growth_mib"] for c, _ in rounds for d in c.values())
    nt = len(tiles)
    print(f"\nconversion of {nt} tiles ({mp:.0f} MP), median of {args.repeats} round(s):")
    for name, comp, block, threads in CONVERSIONS:
        print(f"  {name:11s} {comp:7s} {block} px, {threads} thread(s): {conv_s[name]:6.1f} s "
              f"({mp / conv_s[name]:4.1f} MP/s, {conv_s[name] / nt:5.1f} s/tile), {conv_b[name] / nt / 2**20:5.1f} MiB/tile"
              f" (JP2 {facts['jp2_bytes_per_tile'] / 2**20:.1f})")  # fmt: skip
    print(f"  2 threads vs 1: {threads2:.2f}x; peak RSS of a conversion process {rss:.0f} MiB, "
          f"{growth:.0f} MiB above its RSS before converting (the imports)")  # fmt: skip
    print(f"crop of {facts['buildings']:,} buildings ({facts['buildings_per_km2']:,.0f}/km²), 1 worker:")
    for name in CROPPED:
        d = rounds[0][1][name]
        extra = "" if name == "jp2" else f", break-even {runs[name]:.1f} runs"
        print(f"  from {name:11s}: {crop_s[name]:6.1f} s, {d['blocks']:,} blocks decoded "
              f"({d['area_blocks']:,} of them by areas), "
              f"{100 * share[name]:.0f} % of the tiles' blocks touched{extra}")  # fmt: skip
    print(f"sparse ({facts['buildings'] // args.sparse:,} buildings, every {args.sparse}th): from jp2 "
          f"{crop_s['jp2+sparse']:.1f} s ({100 * share_sparse['jp2']:.0f} % of blocks), from jpeg256 "
          f"{crop_s['jpeg256+sparse']:.1f} s ({100 * share_sparse['jpeg256']:.0f} %), break-even {runs_sparse:.1f} runs")  # fmt: skip
    # JPEG: a tenth of DEFLATE's bytes for a break-even within this VM's noise of it; DEFLATE is the lossless option
    best = min(("jpeg256", "jpeg512"), key=lambda n: runs[n])
    per_tile_conv = conv_s[best] / nt
    dep_h = per_tile_conv * DEPARTEMENT_TILES / 3600
    fr_h = per_tile_conv * FRANCE_TILES / 3600
    saved_tile = (crop_s["jp2"] - crop_s[best]) / nt
    extra_fr_tb = conv_b[best] / nt * FRANCE_TILES / 1e12
    print(f"France scale ({FRANCE_TILES:,} tiles, {DEPARTEMENT_TILES:,} per département), with {best}: conversion "
          f"{dep_h:.1f} core-h per département, {fr_h:,.0f} core-h for France, once per vintage; each monthly run "
          f"then saves {saved_tile * DEPARTEMENT_TILES / 3600:.1f} core-h per département at this density; "
          f"extra storage {conv_b[best] / nt * DEPARTEMENT_TILES / 1e9:.0f} GB per département, "
          f"{extra_fr_tb:.1f} TB for France")  # fmt: skip
    # per tile, in units of the crop's cost of one JP2 block: the conversion pays within a vintage if
    # a run decodes more JP2 blocks per tile than this (the COG crop's own cost is left out: it is small)
    jp2_block_s = med(lambda c, r: r["jp2"]["seconds"] / r["jp2"]["blocks"])
    conv_blocks = per_tile_conv / jp2_block_s
    min_blocks = conv_blocks / VINTAGE_MONTHS
    jp2_blocks_per_tile = math.ceil(TILE_PX / 1024) ** 2
    print(f"density: one JP2 block (1,024 px) costs the crop {jp2_block_s:.2f} s; converting a tile costs "
          f"{conv_blocks:.0f} of those ({conv_blocks / jp2_blocks_per_tile:.1f} whole-tile decodes), so break-even "
          f"≈ {conv_blocks:.0f} / (JP2 blocks a run decodes per tile): the conversion pays within {VINTAGE_MONTHS} "
          f"monthly runs on tiles where the chips touch more than {min_blocks:.1f} of their {jp2_blocks_per_tile} "
          f"JP2 blocks ({100 * min_blocks / jp2_blocks_per_tile:.0f} %)")  # fmt: skip
    pays = runs[best] < VINTAGE_MONTHS and runs_sparse < VINTAGE_MONTHS
    print(f"RECOMMENDATION: {'convert each département once to a ' + best + ' COG' if pays else 'keep decoding the JP2'}"
          f": the conversion pays for itself after {runs[best]:.1f} monthly runs at {facts['buildings_per_km2']:,.0f} "
          f"buildings/km² and {runs_sparse:.1f} at {facts['buildings_per_km2'] / args.sparse:,.0f}/km², against "
          f"{VINTAGE_MONTHS} runs per BD ORTHO vintage; lossless alternative: deflate256, break-even "
          f"{runs['deflate256']:.1f} runs for {conv_b['deflate256'] / conv_b[best]:.0f}x the bytes")  # fmt: skip
    result = {
        "bench": "convert",
        "breakeven_runs": {n: round(v, 2) for n, v in runs.items()},
        "breakeven_runs_sparse_jpeg256": round(runs_sparse, 2),
        "recommended": best if pays else "jp2",
        "conversion_s_per_tile": {n: round(v / nt, 2) for n, v in conv_s.items()},
        "conversion_mp_per_s": {n: round(mp / v, 2) for n, v in conv_s.items()},
        "conversion_two_threads_vs_one": round(threads2, 2),
        "conversion_peak_rss_mib": round(rss, 1),
        "conversion_rss_growth_mib": round(growth, 1),
        "cog_bytes_per_mp": {n: round(v / mp) for n, v in conv_b.items()},
        "jp2_block_crop_s": round(jp2_block_s, 3),
        "conversion_in_jp2_blocks_per_tile": round(conv_blocks, 1),
        "min_jp2_blocks_per_tile_to_pay_in_a_vintage": round(min_blocks, 2),
        "cog_bytes_per_tile": {n: round(v / nt) for n, v in conv_b.items()},
        "crop_s": {n: round(v, 2) for n, v in crop_s.items()},
        "crop_blocks_decoded": {n: d["blocks"] for n, d in rounds[0][1].items()},
        "block_share": {n: round(v, 3) for n, v in share.items()},
        "block_share_sparse": {n: round(v, 3) for n, v in share_sparse.items()},
        "france_conversion_core_h": round(fr_h),
        "departement_conversion_core_h": round(dep_h, 2),
        "departement_saved_core_h_per_run": round(saved_tile * DEPARTEMENT_TILES / 3600, 2),
        "france_extra_storage_tb": round(extra_fr_tb, 2),
        "rounds": [
            {
                "conversion_s": {n: round(d["seconds"], 2) for n, d in c.items()},
                "crop_s": {n: round(d["seconds"], 2) for n, d in r.items()},
            }
            for c, r in rounds
        ],  # fmt: skip
        **{f"data_{k}": v for k, v in facts.items()},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
