"""The command line: ``python -m synthetic`` (or ``bativision-sample``) generates one département.

It prints the manifest as JSON, with the absolute ``root`` and the seconds taken.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import synthetic
from synthetic.generate import generate_departement
from synthetic.manifest import IMAGERY_FORMATS


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m synthetic``: generate one département and print its manifest."""
    description = (synthetic.__doc__ or "").split("\n\n")[0]
    ap = argparse.ArgumentParser(prog="python -m synthetic", description=description)
    ap.add_argument("--out", type=Path, required=True, help="output folder; the département goes in OUT/<dep>")
    ap.add_argument("--departement", default="12", help="INSEE code (01-95, 2A, 2B, 971-976)")
    ap.add_argument("--buildings", type=int, default=3000, help="number of footprints")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--tile-px", type=int, default=2500, help="ortho tile side in pixels (BD ORTHO's real layout: 5000, 1 km)"
    )
    ap.add_argument(
        "--format",
        dest="imagery_format",
        choices=IMAGERY_FORMATS,
        default="deflate",
        help="how tiles are encoded: deflate (lossless GeoTIFF), jpeg (JPEG COG, YCbCr q85), "
        "jp2 (lossy JPEG 2000 named like BD ORTHO's); the ground truth is the same",
    )
    ap.add_argument("--resolution", type=float, default=0.2, help="ground sampling distance in metres")
    ap.add_argument("--workers", type=int, default=1, help="processes rendering tiles")
    ap.add_argument("--overwrite", action="store_true", help="regenerate even if a matching sample exists")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    m = generate_departement(
        args.out,
        args.departement,
        args.buildings,
        args.seed,
        tile_px=args.tile_px,
        resolution=args.resolution,
        overwrite=args.overwrite,
        workers=args.workers,
        verbose=not args.quiet,
        imagery_format=args.imagery_format,
    )
    out = m.to_json()
    out["root"] = str(m.root)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    print(json.dumps(out, indent=2, ensure_ascii=False))
    return 0
