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
  and a digest of the source's name, version (size and modification time of a file, size and
  generation of a Cloud Storage object) and of the conversion settings.
  A COG whose digest still matches is reused untouched; a changed source (or changed settings) is
  converted again; a COG of ours whose source is no longer in the list is deleted. That is how the
  converted imagery is invalidated when the tiles change. Every file is written under a ``.tmp``
  name and renamed into place, so a reader (or a resumed run) never sees half a COG.

- **Where they live.** A :class:`CogDestination`: a local folder (:class:`LocalCogs`), or in
  production a prefix of the object store's bucket (``resources.gcs.GcsCogs``) whose objects
  record the digest in their metadata, so that deciding what to reuse lists the prefix and
  downloads nothing. Remote sources (``/vsigs/``) are copied whole to a local file for their
  conversion (a JPEG 2000 tile is decoded whole anyway) and the copy deleted; the mosaic then
  names the COGs by their ``/vsigs/`` path and the chips pods read them in place, as they read
  source tiles.

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
from typing import Literal, Protocol

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
    location: str
    reused: bool
    seconds: float
    bytes: int
    digest: str  # of the source and settings: identifies the COG's content wherever it is stored

    @property
    def path(self) -> Path:
        """The COG as a local path (meaningful for a local destination)."""
        return Path(self.location)


def cog_options(compression: Compression, block: int, threads: int) -> dict[str, str]:
    """GDAL COG creation options for ``compression`` (see the module doc for why no overviews)."""
    opts = {"BLOCKSIZE": str(block), "OVERVIEWS": "NONE", "NUM_THREADS": str(threads), "BIGTIFF": "IF_SAFER"}
    if compression == "jpeg":  # 3-band RGB: the COG driver stores it as YCbCr
        return {**opts, "COMPRESS": "JPEG", "QUALITY": str(JPEG_QUALITY)}
    if compression == "deflate":  # level 1: ~2.5x faster to write than 6 for a few % more bytes
        return {**opts, "COMPRESS": "DEFLATE", "PREDICTOR": "2", "LEVEL": "1"}
    raise ValueError(f"compression must be 'jpeg' or 'deflate', got {compression!r}")


def local_version(source: str | Path) -> str:
    """What identifies a local tile's content: its size and modification time (``OSError`` if it is not there)."""
    st = Path(source).stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def source_digest(source: str | Path, compression: Compression, block: int, version: str | None = None) -> str:
    """A digest of the source's name and version, and of the settings it is converted with.

    ``version`` says what identifies the source's content: its size and modification time for a
    local file (the default, :func:`local_version`), its size and generation for a Cloud Storage
    object (``resources.imagery.OrthoImagery.tiles_and_versions``).
    """
    version = local_version(source) if version is None else version
    key = f"{Path(source).name}:{version}:{compression}:{block}:{JPEG_QUALITY}:{CONVERT_VERSION}"
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def cog_name(source: str | Path) -> str:
    """The COG's file name: the source's stem + ``.tif``."""
    return Path(source).stem + ".tif"


def recorded_digest(cog: Path) -> str | None:
    """The source digest a COG of ours records; None for a file that is not ours or can't be read."""
    try:
        with rasterio.open(cog) as ds:
            return ds.tags().get(DIGEST_TAG)
    except rasterio.errors.RasterioError:
        return None


class CogDestination(Protocol):
    """Where converted COGs are kept, and how the crop will read them: a local folder or a bucket prefix.

    Why a protocol: production keeps the COGs in the object store's bucket, where the chips pods
    read them in place (``resources.gcs.GcsCogs``); the embedded default in a folder
    (:class:`LocalCogs`). The conversion, its reuse and its invalidation are the same for both.
    """

    def recorded(self) -> dict[str, str]:
        """{COG name: the source digest it records} for every COG of ours there (foreign files left out)."""
        ...

    def scratch(self) -> Path:
        """A local folder to write a COG in before :meth:`put` (and to download a remote source to)."""
        ...

    def put(self, name: str, cog: Path, digest: str, source: str) -> str:
        """Keep the finished local ``cog`` as ``name`` (replacing any older one at once) and return its location."""
        ...

    def location(self, name: str) -> str:
        """What GDAL opens to read the COG ``name`` (a local path, ``/vsigs/<bucket>/<key>``)."""
        ...

    def size(self, name: str) -> int:
        """The stored COG's size in bytes."""
        ...

    def remove(self, name: str) -> None:
        """Delete the COG ``name`` (its source is gone)."""
        ...


class LocalCogs:
    """COGs in a local folder (the embedded default); temporaries are written beside them and renamed."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def recorded(self) -> dict[str, str]:
        found: dict[str, str] = {}
        if not self.folder.is_dir():
            return found
        for p in sorted(self.folder.iterdir()):
            if p.name.endswith(_TMP_SUFFIXES):  # left by a killed conversion
                p.unlink(missing_ok=True)
            elif p.suffix == ".tif" and (digest := recorded_digest(p)):
                found[p.name] = digest
        return found

    def scratch(self) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        return self.folder

    def put(self, name: str, cog: Path, digest: str, source: str) -> str:
        os.replace(cog, self.folder / name)
        return self.location(name)

    def location(self, name: str) -> str:
        return str(self.folder / name)

    def size(self, name: str) -> int:
        return (self.folder / name).stat().st_size

    def remove(self, name: str) -> None:
        (self.folder / name).unlink(missing_ok=True)


def _decode_to_raw(source: str, raw: Path, tags: dict[str, str], label: str) -> None:
    """Decode ``source`` once, in strips of whole source blocks, into an uncompressed tiled GeoTIFF.

    ``label`` is how errors name the tile (the gs:// object rather than its local copy).
    """
    try:
        src = rasterio.open(source)
    except rasterio.errors.RasterioError as exc:
        raise ConvertError(f"{label}: cannot be opened as a raster ({exc})") from exc
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
                    raise ConvertError(f"{label}: rows {r0}-{r0 + win.height} could not be decoded: {why}") from exc
                dst.write(strip, window=win)


def _convert_one(
    source: str, label: str, cog: Path, digest: str, compression: Compression, block: int, threads: int
) -> None:
    """Decode ``source`` (a local file; ``label`` names it in errors) and write its COG at ``cog``."""
    raw = cog.with_name(f"{Path(label).stem}.{os.getpid()}.raw.tmp")
    options = cog_options(compression, block, threads)
    try:
        with rasterio.Env(GDAL_NUM_THREADS=str(threads), GDAL_CACHEMAX=GDAL_CACHE_MB << 20):  # bytes, in an Env
            _decode_to_raw(source, raw, {SOURCE_TAG: Path(label).name, DIGEST_TAG: digest}, label)
            try:
                rasterio.shutil.copy(str(raw), str(cog), driver="COG", **options)
            except rasterio.errors.RasterioError as exc:  # e.g. 16-bit pixels, which JPEG cannot hold
                raise ConvertError(f"{label}: cannot be written as a {compression} COG: {exc}") from exc
    except BaseException:
        cog.unlink(missing_ok=True)
        raise
    finally:
        raw.unlink(missing_ok=True)


def convert_tiles(
    tiles: list[str],
    destination: Path | CogDestination,
    *,
    compression: Compression = "jpeg",
    block: int = 256,
    threads: int = 1,
    versions: dict[str, str] | None = None,
    fetch: Callable[[str, Path], Path] | None = None,
    progress: Callable[[int, int, ConvertedTile], None] | None = None,
) -> list[ConvertedTile]:
    """Bring ``destination`` in step with ``tiles``: one COG per tile, converted or reused, orphans deleted.

    ``destination`` is a local folder or a :class:`CogDestination` (a bucket prefix). ``versions``
    gives what identifies each source's content where a stat can't (remote tiles: size and
    generation); ``fetch(source, folder)`` copies a remote source to a local file, deleted once
    converted. ``threads`` is handed to GDAL for both the decoding (``GDAL_NUM_THREADS``) and the
    encoding (``NUM_THREADS``). ``progress(done, total, tile)`` is called after each tile. Returns
    the tiles in the order given; a tile that cannot be read raises :class:`ConvertError` naming it
    (the COGs already done stay, a previous COG of that tile stays until a good one replaces it).
    """
    dest = LocalCogs(destination) if isinstance(destination, (str, Path)) else destination
    cog_options(compression, block, threads)  # bad settings fail before any work
    names: dict[str, str] = {}
    for t in tiles:
        name = cog_name(t)
        if name in names:
            raise ConvertError(f"{t} and {names[name]} would both be converted to {name}")
        names[name] = t
    have = dest.recorded()
    for orphan in sorted(have.keys() - names.keys()):  # its source is gone
        dest.remove(orphan)
    done: list[ConvertedTile] = []
    for t, name in zip(tiles, names, strict=True):
        t0 = time.perf_counter()
        try:
            digest = source_digest(t, compression, block, (versions or {}).get(t))
        except OSError as exc:
            raise ConvertError(f"{t}: cannot be read ({exc})") from exc
        if have.get(name) == digest:
            c = ConvertedTile(t, dest.location(name), True, time.perf_counter() - t0, dest.size(name), digest)
        else:
            scratch = dest.scratch()
            local = fetch(t, scratch) if fetch is not None else Path(t)
            tmp = scratch / f"{Path(t).stem}.{os.getpid()}.cog.tmp"
            try:
                _convert_one(str(local), t, tmp, digest, compression, block, threads)
                size = tmp.stat().st_size
                where = dest.put(name, tmp, digest, Path(t).name)
            finally:
                tmp.unlink(missing_ok=True)
                if local != Path(t):
                    local.unlink(missing_ok=True)
            c = ConvertedTile(t, where, False, time.perf_counter() - t0, size, digest)
        done.append(c)
        if progress is not None:
            progress(len(done), len(tiles), c)
    return done
