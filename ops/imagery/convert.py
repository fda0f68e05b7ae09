"""Orthophoto tiles converted once to fast-decoding COGs, kept in step with their sources.

BD ORTHO is delivered as lossy JPEG 2000, which decodes about ten times slower than a JPEG or
DEFLATE GeoTIFF. A département reprocessed every month can either decode its JP2 tiles every time
or convert them once to Cloud Optimized GeoTIFFs and crop those: ``bench/convert.py`` measures
when the conversion pays for itself. This module does the conversion.

Why it is built this way:

- **Strips aligned on the source's blocks.** GDAL's COG writer asks its source for one output
  block (256 or 512 px) at a time, and the JP2 driver decodes a sub-block window anew at every
  request (not from the block cache): a 5,000 px tile took 105 s instead of 8 s. So the source is
  decoded once, in strips of whole source blocks (1,024 rows of a BD ORTHO tile, ~15 MB), into an
  uncompressed GeoTIFF next to the output, and the COG is copied from that. Memory stays about
  one strip plus GDAL's cache, whatever the tile size; the intermediate file (75 MB for a tile) is
  deleted as soon as the COG is written.
- **What is lost.** ``compression="deflate"`` re-encodes the decoded pixels losslessly: the
  chips are those of the JP2. ``compression="jpeg"`` (quality 85, YCbCr, as hosted orthophotos
  are) adds a second lossy step on top of the JP2's: ``tests/test_convert.py`` states how far its
  chips are from the JP2's.
- **No overviews.** The crop reads full resolution only; overviews would cost a third more bytes
  and time for nothing it reads.
- **Kept in step with the sources.** Each COG carries, in its GDAL metadata, its source's name
  and a digest of the source's name, size and modification time and of the conversion settings.
  A COG whose digest still matches is reused untouched; a changed source (or changed settings) is
  converted again; a COG of ours whose source is no longer in the list is deleted. That is how the
  converted imagery is invalidated when the tiles change. Every file is written under a ``.tmp``
  name and renamed into place, so a reader (or a resumed run) never sees half a COG.

The caller holds the partition's lock (``ops.locks``): two conversions of one folder at a time
are not guarded here.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import rasterio
import rasterio.errors
import rasterio.shutil
from rasterio.windows import Window

#: Bumped when the same source and settings would give different pixels: old COGs are then redone.
CONVERT_VERSION = "1"
#: GDAL metadata keys (default domain) that mark a COG as ours and say what it was made from.
SOURCE_TAG = "BATIVISION_SOURCE"
DIGEST_TAG = "BATIVISION_SOURCE_DIGEST"
#: JPEG quality of the converted tiles: as the hosted orthophotos (and the ``jpeg`` sample format).
JPEG_QUALITY = 85
#: Rows decoded per strip, rounded up to whole source blocks.
STRIP_ROWS = 1024
#: GDAL block cache while converting (MB): the written blocks go through it, and its default is 5 % of RAM.
GDAL_CACHE_MB = 64

Compression = Literal["jpeg", "deflate"]
_TMP_SUFFIXES = (".cog.tmp", ".raw.tmp")


class ConvertError(ValueError):
    """A source tile that cannot be converted (the message names the file)."""


@dataclass(frozen=True)
class ConvertedTile:
    """One source tile and its COG: ``reused`` when the COG already matched the source."""

    source: str
    path: Path
    reused: bool
    seconds: float
    bytes: int


def cog_options(compression: Compression, block: int, threads: int) -> dict[str, str]:
    """GDAL COG creation options for ``compression`` (see the module doc for why no overviews)."""
    opts = {"BLOCKSIZE": str(block), "OVERVIEWS": "NONE", "NUM_THREADS": str(threads), "BIGTIFF": "IF_SAFER"}
    if compression == "jpeg":  # 3-band RGB: the COG driver stores it as YCbCr
        return {**opts, "COMPRESS": "JPEG", "QUALITY": str(JPEG_QUALITY)}
    if compression == "deflate":  # level 1: ~2.5x faster to write than 6 for a few % more bytes
        return {**opts, "COMPRESS": "DEFLATE", "PREDICTOR": "2", "LEVEL": "1"}
    raise ValueError(f"compression must be 'jpeg' or 'deflate', got {compression!r}")


def source_digest(source: str | Path, compression: Compression, block: int) -> str:
    """A digest of the source's name, size and modification time, and of the settings it is converted with."""
    p = Path(source)
    st = p.stat()
    key = f"{p.name}:{st.st_size}:{st.st_mtime_ns}:{compression}:{block}:{JPEG_QUALITY}:{CONVERT_VERSION}"
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def cog_path(source: str | Path, out_dir: Path) -> Path:
    """Where the COG of ``source`` goes: ``out_dir`` / the source's stem + ``.tif``."""
    return Path(out_dir) / (Path(source).stem + ".tif")


def recorded_digest(cog: Path) -> str | None:
    """The source digest a COG of ours records; None for a file that is not ours or can't be read."""
    try:
        with rasterio.open(cog) as ds:
            return ds.tags().get(DIGEST_TAG)
    except rasterio.errors.RasterioError:
        return None


def _decode_to_raw(source: str, raw: Path, tags: dict[str, str]) -> None:
    """Decode ``source`` once, in strips of whole source blocks, into an uncompressed tiled GeoTIFF."""
    try:
        src = rasterio.open(source)
    except rasterio.errors.RasterioError as exc:
        raise ConvertError(f"{source}: cannot be opened as a raster ({exc})") from exc
    with src:
        bh = src.block_shapes[0][0]
        step = bh * max(1, -(-STRIP_ROWS // bh))
        profile = {
            "driver": "GTiff",
            "width": src.width,
            "height": src.height,
            "count": src.count,
            "dtype": src.dtypes[0],
            "crs": src.crs,
            "transform": src.transform,
            "nodata": src.nodata,
            "tiled": True,
            "blockxsize": 256,
            "blockysize": 256,
            "interleave": "pixel",
            "bigtiff": "if_safer",
        }
        if src.count == 3 and src.dtypes[0] == "uint8":
            profile["photometric"] = "RGB"
        with rasterio.open(raw, "w", **profile) as dst:
            dst.update_tags(**{**src.tags(), **tags})
            dst.colorinterp = src.colorinterp
            for r0 in range(0, src.height, step):
                win = Window(0, r0, src.width, min(step, src.height - r0))
                try:
                    strip = src.read(window=win)
                except rasterio.errors.RasterioError as exc:  # rasterio's message alone: "Read failed. See previous"
                    why = exc.__cause__ or exc
                    raise ConvertError(f"{source}: rows {r0}-{r0 + win.height} could not be decoded: {why}") from exc
                dst.write(strip, window=win)


def convert_tile(
    source: str, out_dir: Path, *, compression: Compression = "jpeg", block: int = 256, threads: int = 1
) -> ConvertedTile:
    """Convert one tile to ``out_dir``/<stem>.tif, or reuse the COG already there if it was made from this source.

    Raises :class:`ConvertError` naming ``source`` when it cannot be read or decoded; nothing is
    left behind then (the previous COG, if any, stays until a good one replaces it).
    """
    t0 = time.perf_counter()
    dst = cog_path(source, out_dir)
    try:
        digest = source_digest(source, compression, block)
    except OSError as exc:
        raise ConvertError(f"{source}: cannot be read ({exc})") from exc
    if dst.exists() and recorded_digest(dst) == digest:
        return ConvertedTile(source, dst, True, time.perf_counter() - t0, dst.stat().st_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / f"{dst.stem}.{os.getpid()}.raw.tmp"
    tmp = out_dir / f"{dst.stem}.{os.getpid()}.cog.tmp"
    options = cog_options(compression, block, threads)
    try:
        with rasterio.Env(GDAL_NUM_THREADS=str(threads), GDAL_CACHEMAX=GDAL_CACHE_MB << 20):  # bytes, in an Env
            _decode_to_raw(source, raw, {SOURCE_TAG: Path(source).name, DIGEST_TAG: digest})
            try:
                rasterio.shutil.copy(str(raw), str(tmp), driver="COG", **options)
            except rasterio.errors.RasterioError as exc:  # e.g. 16-bit pixels, which JPEG cannot hold
                raise ConvertError(f"{source}: cannot be written as a {compression} COG: {exc}") from exc
        os.replace(tmp, dst)
    finally:
        raw.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    return ConvertedTile(source, dst, False, time.perf_counter() - t0, dst.stat().st_size)


def remove_orphans(out_dir: Path, keep: set[Path]) -> list[Path]:
    """Delete the COGs of ours in ``out_dir`` not in ``keep`` (their source is gone) and leftover temporaries.

    Only files that carry our metadata tag are deleted: a foreign ``.tif`` in the folder is left alone.
    """
    removed: list[Path] = []
    if not out_dir.is_dir():
        return removed
    for p in sorted(out_dir.iterdir()):
        if p.name.endswith(_TMP_SUFFIXES) or (p.suffix == ".tif" and p not in keep and recorded_digest(p)):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def convert_tiles(
    tiles: list[str],
    out_dir: Path,
    *,
    compression: Compression = "jpeg",
    block: int = 256,
    threads: int = 1,
    progress: Callable[[int, int, ConvertedTile], None] | None = None,
) -> list[ConvertedTile]:
    """Bring ``out_dir`` in step with ``tiles``: one COG per tile, converted or reused, orphans deleted.

    ``threads`` is handed to GDAL for both the decoding (``GDAL_NUM_THREADS``) and the encoding
    (``NUM_THREADS``). ``progress(done, total, tile)`` is called after each tile. Returns the
    tiles in the order given; a tile that cannot be read raises :class:`ConvertError` naming it.
    """
    out_dir = Path(out_dir)
    cog_options(compression, block, threads)  # bad settings fail before any work
    targets = [cog_path(t, out_dir) for t in tiles]
    seen: dict[Path, str] = {}
    for t, d in zip(tiles, targets, strict=True):
        if d in seen:
            raise ConvertError(f"{t} and {seen[d]} would both be converted to {d.name}")
        seen[d] = t
    remove_orphans(out_dir, set(targets))
    done: list[ConvertedTile] = []
    for t in tiles:
        c = convert_tile(t, out_dir, compression=compression, block=block, threads=threads)
        done.append(c)
        if progress is not None:
            progress(len(done), len(tiles), c)
    return done
