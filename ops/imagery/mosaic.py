"""A virtual mosaic (GDAL VRT) over a département's orthophoto tiles.

The chips step reads one raster, not hundreds of tiles, and the VRT is cheap
to rebuild when tiles change. We write the VRT XML ourselves (the GDAL Python
bindings are not a dependency) and give it a recognised EPSG CRS, so tiles
whose CRS lacks an authority (IGN's own sample) come out as plain EPSG:2154.

Beside the VRT, :class:`MosaicInfo` records what the crop needs and the VRT
does not say: each tile's footprint (to tell ``no_imagery`` from ``nodata``),
the band rule that turns the source into 3×uint8 chips, and an ``imagery_id``
that changes when the tiles change.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import rasterio
import rasterio.errors
from pyproj import CRS
from rasterio.enums import Resampling

from ops.geo.crs import recognise_epsg
from ops.imagery.remote import gdal_http_options, is_remote

TILE_SUFFIXES = (".tif", ".tiff", ".jp2", ".vrt")
JPEG2000_SUFFIXES = (".jp2", ".j2k")


def is_jpeg2000(path: str) -> bool:
    """Whether a tile is JPEG 2000 (BD ORTHO's delivery), by its name."""
    return path.lower().endswith(JPEG2000_SUFFIXES)


_GDAL_TYPES = {"uint8": "Byte", "uint16": "UInt16", "int16": "Int16", "float32": "Float32"}
_COLOR = ("Red", "Green", "Blue", "Undefined")


class MosaicError(ValueError):
    """Tiles that cannot form one mosaic (names the offending file)."""


@dataclass
class TileInfo:
    path: str
    bounds: tuple[float, float, float, float]
    width: int
    height: int
    block: tuple[int, int]


@dataclass
class MosaicInfo:
    """What the crop needs to know about a mosaic, stored as JSON beside the VRT."""

    imagery_id: str
    epsg: int
    resolution: float
    bounds: tuple[float, float, float, float]
    width: int
    height: int
    count: int
    dtype: str
    nodata: float | None
    band_rule: str  # how source bands become 3 uint8 chip bands
    scale: tuple[float, float] | None  # (low, high) source values mapped to 0..255, non-uint8 only
    tiles: list[TileInfo] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> MosaicInfo:
        d = json.loads(text)
        d["tiles"] = [TileInfo(**{**t, "bounds": tuple(t["bounds"]), "block": tuple(t["block"])}) for t in d["tiles"]]
        d["bounds"] = tuple(d["bounds"])
        d["scale"] = tuple(d["scale"]) if d["scale"] is not None else None
        return cls(**d)

    def tile_bounds_array(self) -> np.ndarray:
        return np.array([t.bounds for t in self.tiles], dtype="float64").reshape(-1, 4)


def band_rule(count: int, dtype: str, *, what: str) -> str:
    """The documented rule from source bands to the model's 3 uint8 bands.

    - 3 bands: used as RGB; 4 or more (RGBI, IRC products): the first three;
    - 1 band (panchromatic): replicated to three;
    - 2 bands: ambiguous, rejected;
    - non-uint8 data are linearly stretched from the mosaic's 2nd-98th
      percentile to 0-255 (see :func:`band_scale`).
    """
    if count == 2 or count < 1:
        raise MosaicError(f"{what}: {count} band(s), expected 1 (replicated), 3 (RGB) or ≥4 (first three used)")
    base = "replicate" if count == 1 else "rgb" if count == 3 else "first3"
    return base if dtype == "uint8" else f"{base}+stretch"


def find_tiles(folder: str | Path) -> list[str]:
    """The orthophoto tiles of a folder, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MosaicError(f"{folder}: imagery folder not found")
    tiles = sorted(str(p.resolve()) for p in folder.iterdir() if p.suffix.lower() in TILE_SUFFIXES)
    if not tiles:
        raise MosaicError(f"{folder}: no orthophoto tiles ({', '.join(TILE_SUFFIXES)})")
    return tiles


def tiles_digest(tiles: list[str], versions: dict[str, str] | None = None) -> str:
    """A digest of the tiles' names, sizes and modification times: changes when the imagery does.

    A remote tile has no stat: ``versions`` says what identifies its content (a Cloud Storage
    object's size and generation, a converted COG's source digest).
    """
    h = hashlib.sha256()
    for t in tiles:
        p = Path(t)
        if versions and t in versions:
            h.update(f"{p.name}:{versions[t]}\n".encode())
            continue
        stat = p.stat() if p.exists() else None
        h.update(f"{p.name}:{stat.st_size if stat else ''}:{stat.st_mtime_ns if stat else ''}\n".encode())
    return h.hexdigest()[:16]


def band_scale(
    paths: list[str], nodata: float | None, max_pixels: int = 1_000_000, max_tiles: int = 8
) -> tuple[float, float]:
    """2nd and 98th percentile of the valid pixels of the mosaic, read from decimated views of its tiles.

    Sampled over up to ``max_tiles`` tiles spread along the (name-sorted) list, not the first tile
    alone: a first tile that is all nodata, or much darker than the rest, would otherwise give a
    stretch that saturates every other tile (a silent loss of the image). Deterministic for a given
    list of tiles.
    """
    picks = sorted({int(round(k)) for k in np.linspace(0, len(paths) - 1, min(len(paths), max_tiles))})
    budget = max(1, max_pixels // len(picks))
    parts = []
    for k in picks:
        try:
            with rasterio.open(paths[k]) as ds:
                f = max(1, int(math.sqrt(ds.width * ds.height / budget)))
                shape = (ds.count, max(1, ds.height // f), max(1, ds.width // f))
                a = ds.read(out_shape=shape, resampling=Resampling.nearest)
        except rasterio.errors.RasterioError as exc:  # rasterio's own message is "Read failed. See previous..."
            raise MosaicError(
                f"{paths[k]}: cannot be read to compute the stretch of non-8-bit imagery ({exc.__cause__ or exc})"
            ) from exc
        vals = a.astype("float64").ravel()
        parts.append(vals[vals != nodata] if nodata is not None else vals)
    vals = np.concatenate(parts)
    if vals.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(vals, [2, 98])
    return float(lo), float(max(hi, lo + 1))


def check_complete(ds: rasterio.io.DatasetReader, path: str) -> None:
    """Raise naming ``path`` when a local GeoTIFF's blocks end past the end of the file.

    A tile cut short (an interrupted download or copy) usually still opens, its header being at the
    start: without this check the crop would only find out block by block, quarantining the buildings
    over the missing part. GDAL's block table is read once (about 6 µs a block); remote tiles, whose
    size is not known here, are left to the crop.
    """
    if ds.driver != "GTiff" or not os.path.isfile(path):
        return
    size = os.path.getsize(path)
    bh, bw = ds.block_shapes[0]
    planes = ds.count if ds.tags(ns="IMAGE_STRUCTURE").get("INTERLEAVE") == "BAND" else 1
    end = 0
    for band in range(1, planes + 1):
        for br in range(-(-ds.height // bh)):
            for bc in range(-(-ds.width // bw)):
                off = ds.get_tag_item(f"BLOCK_OFFSET_{bc}_{br}", "TIFF", bidx=band)
                n = ds.get_tag_item(f"BLOCK_SIZE_{bc}_{br}", "TIFF", bidx=band)
                if off and n:
                    end = max(end, int(off) + int(n))
    if end > size:
        raise MosaicError(
            f"{path}: truncated: the file has {size} bytes, its image blocks need {end} "
            "(an interrupted download or copy?)"
        )


def check_no_overlap(infos: list[TileInfo], res: float) -> None:
    """Raise naming both tiles when two tiles cover the same ground (e.g. two vintages of one slab).

    Neither the VRT (last source on top) nor the crop could then say which vintage a chip shows;
    tiles that only touch along an edge are fine. Half a pixel of tolerance absorbs rounding.
    """
    if len(infos) < 2:
        return
    b = np.array([t.bounds for t in infos], dtype="float64")
    ox = np.minimum(b[:, None, 2], b[None, :, 2]) - np.maximum(b[:, None, 0], b[None, :, 0])
    oy = np.minimum(b[:, None, 3], b[None, :, 3]) - np.maximum(b[:, None, 1], b[None, :, 1])
    hit = np.triu((ox > res / 2) & (oy > res / 2), k=1)
    if hit.any():
        i, j = (int(v) for v in np.argwhere(hit)[0])
        raise MosaicError(
            f"{infos[i].path} and {infos[j].path} overlap ({ox[i, j]:.1f} m × {oy[i, j]:.1f} m): two vintages "
            f"of the same place? The mosaic must have one tile per place: keep one of them ({int(hit.sum())} "
            "overlapping pair(s) in all)"
        )


def build_mosaic(
    tiles: list[str],
    vrt_path: Path,
    *,
    name: str,
    target_epsg: int | None = None,
    versions: dict[str, str] | None = None,
    http_timeout_s: float | None = None,
) -> MosaicInfo:
    """Check that ``tiles`` agree, write the VRT at ``vrt_path`` and return its :class:`MosaicInfo`.

    Every tile must be whole (see :func:`check_complete`), have the same band
    count, data type, resolution, declared nodata value and CRS (recognised as
    ``target_epsg`` when given), sit on the same pixel grid and overlap no
    other tile (see :func:`check_no_overlap`); the first tile that does not is
    named in the error. ``versions`` identifies remote tiles' contents (see :func:`tiles_digest`).
    Remote tiles' headers are read with retries and a stall limit of ``http_timeout_s``
    (``ops.imagery.remote.gdal_http_options``).
    """
    if any(is_remote(t) for t in tiles):
        with rasterio.Env(**gdal_http_options(http_timeout_s)):
            return _build_mosaic(tiles, vrt_path, name, target_epsg, versions)
    return _build_mosaic(tiles, vrt_path, name, target_epsg, versions)


def _build_mosaic(
    tiles: list[str], vrt_path: Path, name: str, target_epsg: int | None, versions: dict[str, str] | None
) -> MosaicInfo:
    if not tiles:
        raise MosaicError(f"{name}: no tiles given")
    infos: list[TileInfo] = []
    ref: dict | None = None
    for t in tiles:
        try:
            ds = rasterio.open(t)
        except Exception as exc:
            raise MosaicError(f"{t}: cannot be opened as a raster ({exc})") from exc
        with ds:
            check_complete(ds, t)
            epsg = recognise_epsg(ds.crs, what=t)
            tr = ds.transform
            if tr.b != 0 or tr.d != 0:
                raise MosaicError(f"{t}: rotated rasters are not supported")
            this = {"epsg": epsg, "count": ds.count, "dtype": ds.dtypes[0], "res": (tr.a, -tr.e), "nodata": ds.nodata}
            if target_epsg is not None and epsg != target_epsg:
                raise MosaicError(f"{t}: CRS is EPSG:{epsg}, the département's is EPSG:{target_epsg}")
            if ref is None:
                ref = this
            else:
                for k in ("epsg", "count", "dtype"):
                    if this[k] != ref[k]:
                        raise MosaicError(f"{t}: {k} is {this[k]}, other tiles have {ref[k]}")
                if not np.allclose(this["res"], ref["res"], rtol=1e-6):
                    raise MosaicError(f"{t}: resolution {this['res']} differs from {ref['res']}")
                if None not in (this["nodata"], ref["nodata"]) and this["nodata"] != ref["nodata"]:
                    raise MosaicError(f"{t}: nodata value is {this['nodata']:g}, other tiles have {ref['nodata']:g}")
                if ref["nodata"] is None:  # the first tile that declares one sets the mosaic's
                    ref["nodata"] = this["nodata"]
            infos.append(
                TileInfo(
                    path=t, bounds=tuple(ds.bounds), width=ds.width, height=ds.height, block=tuple(ds.block_shapes[0])
                )
            )
    assert ref is not None
    # to the nanometre: a raster whose geotransform is computed (a WMTS description: 1228.8 m / 6144 px) comes out
    # as 0.19999999999999998, and chip windows on exact half-pixel ties would then snap one pixel away from the same
    # windows on tiles at 0.2 (real tiles' 0.19999999999963 is 0.2 too, for any chip)
    res = round(float(ref["res"][0]), 9)
    resy = round(float(ref["res"][1]), 9)
    b = np.array([i.bounds for i in infos])
    minx, miny, maxx, maxy = b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()
    width = int(round((maxx - minx) / res))
    height = int(round((maxy - miny) / resy))
    check_no_overlap(infos, res)
    nodata = ref["nodata"] if ref["nodata"] is not None else 0.0
    rule = band_rule(ref["count"], ref["dtype"], what=tiles[0])
    scale = band_scale(tiles, nodata) if rule.endswith("stretch") else None
    gdal_type = _GDAL_TYPES.get(ref["dtype"])
    if gdal_type is None:
        raise MosaicError(f"{tiles[0]}: data type {ref['dtype']} not supported")
    bands_xml = []
    for band in range(1, ref["count"] + 1):
        sources = []
        for ti in infos:
            xoff = (ti.bounds[0] - minx) / res
            yoff = (maxy - ti.bounds[3]) / resy
            if abs(xoff - round(xoff)) > 1e-3 or abs(yoff - round(yoff)) > 1e-3:
                raise MosaicError(
                    f"{ti.path}: not aligned on the mosaic's pixel grid (offset {xoff:.3f}, {yoff:.3f} px)"
                )
            sources.append(
                f"""    <ComplexSource>
      <SourceFilename relativeToVRT="0">{escape(ti.path)}</SourceFilename>
      <SourceBand>{band}</SourceBand>
      <SourceProperties RasterXSize="{ti.width}" RasterYSize="{ti.height}" DataType="{gdal_type}" BlockXSize="{ti.block[1]}" BlockYSize="{ti.block[0]}"/>
      <SrcRect xOff="0" yOff="0" xSize="{ti.width}" ySize="{ti.height}"/>
      <DstRect xOff="{round(xoff)}" yOff="{round(yoff)}" xSize="{ti.width}" ySize="{ti.height}"/>
      <NODATA>{nodata:g}</NODATA>
    </ComplexSource>"""
            )
        colour = _COLOR[band - 1] if ref["count"] >= 3 and band <= 3 else ("Gray" if ref["count"] == 1 else "Undefined")
        bands_xml.append(
            f"""  <VRTRasterBand dataType="{gdal_type}" band="{band}">
    <NoDataValue>{nodata:g}</NoDataValue>
    <ColorInterp>{colour}</ColorInterp>
{chr(10).join(sources)}
  </VRTRasterBand>"""
        )
    wkt = CRS.from_epsg(ref["epsg"]).to_wkt()
    xml = f"""<VRTDataset rasterXSize="{width}" rasterYSize="{height}">
  <SRS dataAxisToSRSAxisMapping="1,2">{escape(wkt)}</SRS>
  <GeoTransform>{float(minx)!r}, {res!r}, 0.0, {float(maxy)!r}, 0.0, {-resy!r}</GeoTransform>
{chr(10).join(bands_xml)}
</VRTDataset>
"""
    vrt_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = vrt_path.with_suffix(".vrt.tmp")
    tmp.write_text(xml)
    tmp.replace(vrt_path)
    return MosaicInfo(
        imagery_id=f"{name}-{tiles_digest(tiles, versions)[:10]}",
        epsg=ref["epsg"],
        resolution=res,
        bounds=(float(minx), float(miny), float(maxx), float(maxy)),
        width=width,
        height=height,
        count=ref["count"],
        dtype=ref["dtype"],
        nodata=nodata,
        band_rule=rule,
        scale=scale,
        tiles=infos,
    )
