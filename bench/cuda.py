"""The `predictions` compute on a GPU against the model alone: images/s and the fraction of forward-only.

    python -m bench.cuda [--buildings 50000] [--repeats 3]    # or: make bench-cuda

``make bench-infer`` times the step through Dagster's ``materialize`` on a
generated, cropped département. A GPU machine lent for a few minutes has torch
but not the rest of the stack (Dagster, DuckDB, the generator's and the crop's
libraries), so this runs what the step runs between its start and the
warehouse load, framework-free, on a partition of real IGN chips
(``tests/realchips.py``: windows of the 20 cm orthophoto, every 50th building
without imagery):

- **forward-only**: the model alone on uint8 chips already on the device, at
  its best batch size among ``--candidates`` (``bench.infer.forward_only``);
- **ours**: from the model's loading to the staged Parquet rows: weights
  loaded and checked, the partition's chips checked against the card, the
  batch size the step chooses on this device, then
  ``ops.ml.predict.predict_partition`` (shards read by a background thread
  into pinned memory, fp16 autocast forward, post-processing, polygon tracing
  for the segmenter, one row per building) — the step's own calls, in its
  order. What it leaves out is Dagster's bookkeeping and the warehouse's load.

Each model alone, then both together (the step's default: chips read once,
each batch through both). forward-only and ours run as ``--repeats`` adjacent
pairs; each one's images/s is its best run, ours/forward-only the median of
the pairs' ratios. Runs on CPU too (smaller numbers). Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from bench.infer import forward_only
from ops.cpus import available_cpus
from ops.ml.batch_size import choose_batch_size
from ops.ml.card import check_outputs, load_model
from ops.ml.inference import BatchRunner, forward_fn, pick_device, reuse_freed_memory
from ops.ml.predict import ModelRun, check_partition
from ops.shards import list_shards
from tests.realchips import real_chips, shipped_model, stage_predictions, write_partition

DEP = "33"


def ours(names: list[str], folder: Path, buildings: Path, out: Path, device: torch.device) -> tuple[float, dict]:
    """The step's calls from model loading to staged rows; images/s over the partition's chips."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    runs = []
    for name in names:
        model, card = load_model(shipped_model(name), device)
        check_outputs(model, card, device)
        runs.append(ModelRun(card, BatchRunner(forward_fn(model, device, card.task), 1 << 30)))
    shards = list_shards(folder)
    expected = pq.ParquetFile(buildings).metadata.num_rows
    n_chips = check_partition(folder, shards, [r.card for r in runs], expected, DEP)
    batch = choose_batch_size(0, device, [r.runner.forward for r in runs], folder, shards, n_chips, None, print)
    for r in runs:
        r.runner.max_batch = batch.size
    shutil.rmtree(out, ignore_errors=True)
    tally, staged = stage_predictions(folder, buildings, shards, runs, batch.size, out, device.type == "cuda")
    seconds = time.perf_counter() - t0
    rows = {n: pq.ParquetFile(p).metadata.num_rows for n, p in staged.items()}
    if any(v != expected for v in rows.values()):
        raise SystemExit(f"rows {rows} != {expected} buildings")
    return tally.chips / seconds, {"seconds": seconds, "batch": batch.size, "chips": tally.chips, "rows": rows}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--buildings", type=int, default=50_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--candidates", default="64,128,256,512,1024,2048,4096")
    ap.add_argument("--out", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args(argv)
    device = pick_device("auto")
    torch.set_num_threads(available_cpus())
    reuse_freed_memory()
    root = Path(args.out or tempfile.mkdtemp(prefix="bench-cuda-"))
    bank = real_chips()
    folder, buildings, shards = write_partition(root / "part", bank, args.buildings)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"{args.buildings:,} buildings in {len(shards)} shards, {len(bank):,} distinct real chips; "
        f"torch {torch.__version__} on {device} ({gpu}), {available_cpus()} CPUs"
    )
    chips = bank[np.arange(args.buildings) % len(bank)]
    candidates = [int(c) for c in args.candidates.split(",")]
    results = {}
    for names in (["roof_type"], ["solar_panels"], ["roof_type", "solar_panels"]):
        key = "+".join(names)
        models = [load_model(shipped_model(n), device)[0] for n in names]
        pairs = []
        for _ in range(args.repeats):
            fo = [forward_only(m, chips, candidates, 1, device) for m in models]
            f_rate = 1 / sum(1 / r for r, _b, _rates in fo)  # both models on each chip: their times add up
            o_rate, meta = ours(names, folder, buildings, root / "staged", device)
            pairs.append((f_rate, o_rate, [b for _r, b, _ in fo], meta))
            print(
                f"  {key}: forward-only {f_rate:,.0f}/s (batch {pairs[-1][2]}), ours {o_rate:,.0f}/s "
                f"(batch {meta['batch']}, {meta['seconds']:.2f} s)"
            )
        fraction = float(np.median([o / f for f, o, _b, _m in pairs]))
        best_f = max(pairs, key=lambda p: p[0])
        best_o = max(pairs, key=lambda p: p[1])
        results[key] = {
            "images_per_s": round(best_o[1], 1),
            "forward_only_images_per_s": round(best_f[0], 1),
            "forward_only_batch": best_f[2],
            "batch_size": best_o[3]["batch"],
            "fraction_of_forward_only": round(fraction, 3),
            "chips": best_o[3]["chips"],
        }
        print(
            f"{key}: ours {best_o[1]:,.0f} images/s, forward-only {best_f[0]:,.0f} images/s "
            f"→ ours / forward-only = {fraction:.2f} (median of {len(pairs)} pairs)"
        )
        del models
        if device.type == "cuda":
            torch.cuda.empty_cache()
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    print(
        json.dumps(
            {
                "bench": "cuda",
                "device": gpu,
                "torch": torch.__version__,
                "buildings": args.buildings,
                "peak_gpu_mib": round(peak) if peak is not None else None,
                "models": results,
            }
        )
    )
    if args.out is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
