"""An OGC Web Map Service as a département's imagery: the service is the mosaic.

Why: France's 20 cm orthophoto is about 4 TB of JPEG 2000; a team without that
disk reads it from IGN's Géoplateforme instead (``https://data.geopf.fr/wms-r``,
layer ``ORTHOIMAGERY.ORTHOPHOTOS``, EPSG:2154). The layer becomes one virtual
tile of the mosaic: a GDAL WMS description (:func:`gdal_wms_xml`) whose blocks
are GetMap requests of ``block_px`` × ``block_px`` pixels on the layer's pixel
grid, so

- GDAL opens it like any raster (the mosaic VRT, and the crop's reads without
  prefetch: one GetMap per block, when the crop asks for it);
- the prefetch (``ops.crop.service_prefetch``) computes the *same* GetMap for
  every block the crop will decode (one enumeration, :meth:`ops.crop.tiles.TileSet.blocks`),
  fetches them in parallel, and leaves them in a bounded local cache
  (:class:`BlockCache`) that the crop reads through :class:`CachedBlockReader`.

Blocks are requested at the layer's native resolution with an aligned bounding
box: a server that does not resample (MapServer with nearest neighbour over
the same tiles, tested) returns the source's pixels exactly in PNG; JPEG
output adds its own compression loss.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
import warnings
import xml.etree.ElementTree as ET
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlencode
from xml.sax.saxutils import escape

import numpy as np
import rasterio
import rasterio.errors
from rasterio.errors import NotGeoreferencedWarning
from rasterio.io import MemoryFile

from ops.imagery.blocks import BlockReadError
from ops.imagery.remote import DEFAULT_RETRY, FetchError, GaveUpError, HttpRangeReader, RetryPolicy

#: Suffix of a block-cache folder: a tile path ending with it is read by :class:`CachedBlockReader`.
CACHE_SUFFIX = ".getmap"
GEOPLATEFORME_URL = "https://data.geopf.fr/wms-r"  # the documented example (docs, README)
GEOPLATEFORME_LAYER = "ORTHOIMAGERY.ORTHOPHOTOS"
_EXT = {"image/png": "png", "image/jpeg": "jpg", "image/tiff": "tif"}


class WmsError(ValueError):
    """A service or layer that cannot serve the département: names the URL and the layer."""


@dataclass(frozen=True)
class WmsLayer:
    """Which WMS layer, and how the crop asks for it."""

    url: str  # the service endpoint, e.g. https://data.geopf.fr/wms-r (may carry its own query, e.g. ?map=...)
    layer: str
    style: str = ""
    format: str = "image/png"
    epsg: int = 2154
    resolution: float = 0.2  # metres per pixel requested (BD ORTHO: 0.2)
    block_px: int = 1024  # GetMap width and height: the crop's block
    version: str = "1.3.0"

    def __post_init__(self) -> None:
        if self.format not in _EXT:
            raise WmsError(f"{self.url}: format {self.format!r} not supported (one of {', '.join(_EXT)})")
        if not 16 <= self.block_px <= 8192:
            raise WmsError(f"{self.url}: block_px must be within 16..8192, got {self.block_px}")

    @property
    def ext(self) -> str:
        return _EXT[self.format]

    def getmap_url(self, bbox: tuple[float, float, float, float], width: int, height: int) -> str:
        """The GetMap request of ``bbox`` (minx, miny, maxx, maxy, in the layer's CRS) at ``width`` × ``height`` px.

        Projected CRSs only (easting first, as EPSG:2154): WMS 1.3.0 would swap the axes of a geographic one.
        """
        crs_key = "CRS" if self.version.startswith("1.3") else "SRS"
        params = {
            "SERVICE": "WMS", "VERSION": self.version, "REQUEST": "GetMap", "LAYERS": self.layer,
            "STYLES": self.style, crs_key: f"EPSG:{self.epsg}", "BBOX": ",".join(f"{v:.3f}" for v in bbox),
            "WIDTH": str(width), "HEIGHT": str(height), "FORMAT": self.format, "TRANSPARENT": "FALSE",
        }  # fmt: skip
        return f"{self.url}{'&' if '?' in self.url else '?'}{urlencode(params)}"

    def block_url(self, grid: LayerGrid, br: int, bc: int) -> str:
        """The request of block (``br``, ``bc``) of ``grid``: what the prefetch fetches (WMTS has the same method)."""
        return self.getmap_url(grid.block_bbox(br, bc), grid.block_px, grid.block_px)

    def capabilities_url(self) -> str:
        q = urlencode({"SERVICE": "WMS", "VERSION": self.version, "REQUEST": "GetCapabilities"})
        return f"{self.url}{'&' if '?' in self.url else '?'}{q}"


@dataclass(frozen=True)
class LayerGrid:
    """The layer's pixel grid over its extent, cut in GetMap blocks (what GDAL and the prefetch both use)."""

    bounds: tuple[float, float, float, float]  # snapped outwards to whole pixels
    width: int
    height: int
    block_px: int
    resolution: float

    def block_bbox(self, br: int, bc: int) -> tuple[float, float, float, float]:
        """Ground bbox of block (``br``, ``bc``): always ``block_px`` pixels (GDAL asks edge blocks whole too)."""
        minx, _, _, maxy = self.bounds
        side = self.block_px * self.resolution
        return (minx + bc * side, maxy - (br + 1) * side, minx + (bc + 1) * side, maxy - br * side)

    def block_shape(self, br: int, bc: int) -> tuple[int, int]:
        """(rows, cols) of block (``br``, ``bc``) inside the raster (edge blocks are cut)."""
        b = self.block_px
        return min(b, self.height - br * b), min(b, self.width - bc * b)


def _strip(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def parse_capabilities(xml: bytes, wms: WmsLayer) -> tuple[tuple[float, float, float, float], int | None]:
    """The layer's extent in EPSG:``wms.epsg`` and the service's GetMap size limit (None: not stated).

    Raises :class:`WmsError` naming the URL and the layer when the layer is not offered, or not in that CRS.
    """
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise WmsError(f"{wms.capabilities_url()}: not a WMS capabilities document ({exc})") from exc
    if _strip(root.tag) in {"ServiceExceptionReport", "ExceptionReport"}:
        text = " ".join(t.strip() for t in root.itertext() if t.strip())
        raise WmsError(f"{wms.url}: the service refused GetCapabilities: {text[:300]}")
    max_size = None
    for el in root.iter():
        if _strip(el.tag) in {"MaxWidth", "MaxHeight"} and (el.text or "").strip().isdigit():
            v = int(el.text.strip())
            max_size = v if max_size is None else min(max_size, v)
    names: list[str] = []
    crs = f"EPSG:{wms.epsg}"
    for layer in root.iter():
        if _strip(layer.tag) != "Layer":
            continue
        name = next((c.text for c in layer if _strip(c.tag) == "Name"), None)
        if name is None:
            continue
        names.append(name)
        if name != wms.layer:
            continue
        for bb in layer.iter():
            if _strip(bb.tag) == "BoundingBox" and (bb.get("CRS") or bb.get("SRS")) == crs:
                return tuple(float(bb.get(k)) for k in ("minx", "miny", "maxx", "maxy")), max_size  # type: ignore[return-value]
        raise WmsError(f"{wms.url}: layer {wms.layer!r} has no bounding box in {crs} (is the CRS offered?)")
    shown = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")
    raise WmsError(f"{wms.url}: no layer {wms.layer!r} in the service's capabilities (layers: {shown or 'none'})")


def layer_grid(wms: WmsLayer, extent: tuple[float, float, float, float]) -> LayerGrid:
    """The pixel grid over ``extent`` at ``wms.resolution``, snapped outwards to whole pixels of a grid anchored at 0."""
    r = wms.resolution
    minx, miny = math.floor(extent[0] / r) * r, math.floor(extent[1] / r) * r
    maxx, maxy = math.ceil(extent[2] / r) * r, math.ceil(extent[3] / r) * r
    width, height = round((maxx - minx) / r), round((maxy - miny) / r)
    return LayerGrid((minx, miny, maxx, maxy), width, height, wms.block_px, r)


def open_layer(
    wms: WmsLayer, http: HttpRangeReader, max_size: int | None = None, retry: RetryPolicy = DEFAULT_RETRY
) -> LayerGrid:
    """Check the layer against the service's capabilities (at once, naming URL and layer) and give its grid.

    ``max_size``: the most pixels a side the configuration allows a GetMap; the
    service's own MaxWidth/MaxHeight, when it states one, caps it too.
    """
    url = wms.capabilities_url()
    try:
        xml = retry.call(url, lambda: http.get(url))
    except GaveUpError:
        raise  # a service down or overloaded: an I/O error, retried by the step's policy
    except FetchError as exc:  # a refusal (404, 403): the URL is wrong, no retry will help
        raise WmsError(f"{wms.url}: GetCapabilities failed for layer {wms.layer!r}: {exc}") from exc
    extent, service_max = parse_capabilities(xml, wms)
    for limit, who in ((max_size, "the configured maximum GetMap size"), (service_max, "the service's MaxWidth")):
        if limit is not None and wms.block_px > limit:
            raise WmsError(f"{wms.url}: block_px {wms.block_px} exceeds {who} ({limit}) for layer {wms.layer!r}")
    return layer_grid(wms, extent)


def corners_xml(grid: LayerGrid) -> str:
    """The corners of a GDAL WMS ``DataWindow`` (also used by ``ops.imagery.wmts``)."""
    minx, miny, maxx, maxy = grid.bounds
    return (
        f"    <UpperLeftX>{minx!r}</UpperLeftX>\n    <UpperLeftY>{maxy!r}</UpperLeftY>\n"
        f"    <LowerRightX>{maxx!r}</LowerRightX>\n    <LowerRightY>{miny!r}</LowerRightY>"
    )


def gdal_wms_xml(wms: WmsLayer, grid: LayerGrid, timeout_s: float = 60.0) -> str:
    """The GDAL WMS description of the layer: a raster whose blocks are this module's GetMap requests."""
    server = wms.url + ("&" if "?" in wms.url else "?")
    return f"""<GDAL_WMS>
  <Service name="WMS">
    <Version>{escape(wms.version)}</Version>
    <ServerUrl>{escape(server)}</ServerUrl>
    <CRS>EPSG:{wms.epsg}</CRS>
    <ImageFormat>{escape(wms.format)}</ImageFormat>
    <Layers>{escape(wms.layer)}</Layers>
    <Styles>{escape(wms.style)}</Styles>
    <Transparent>FALSE</Transparent>
  </Service>
  <DataWindow>
{corners_xml(grid)}
    <SizeX>{grid.width}</SizeX>
    <SizeY>{grid.height}</SizeY>
  </DataWindow>
  <Projection>EPSG:{wms.epsg}</Projection>
  <BandsCount>3</BandsCount>
  <BlockSizeX>{grid.block_px}</BlockSizeX>
  <BlockSizeY>{grid.block_px}</BlockSizeY>
  <Timeout>{max(1, round(timeout_s))}</Timeout>
  <MaxConnections>1</MaxConnections>
</GDAL_WMS>
"""


def write_service_tile(xml: str, path: Path) -> Path:
    """Write a service's GDAL description at ``path``, only when it changes (its date is the imagery's id)."""
    if not (path.exists() and path.read_text() == xml):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(xml)
        tmp.replace(path)
    return path


def decode_image(data: bytes, what: str) -> np.ndarray:
    """A GetMap answer (PNG, JPEG, TIFF) as (rows, cols, bands) uint8; the error names ``what`` (the request)."""
    try:
        with warnings.catch_warnings(), MemoryFile(data) as mf:
            warnings.simplefilter("ignore", NotGeoreferencedWarning)  # a GetMap image has no georeferencing: we know it
            with mf.open() as ds:
                arr = ds.read()
    except rasterio.errors.RasterioError as exc:
        raise BlockReadError(f"{what}: the answer is not a decodable image ({len(data)} bytes): {exc}") from exc
    return np.ascontiguousarray(arr.transpose(1, 2, 0))


class RequestRate:
    """At most ``per_s`` requests started per second, across threads (a service's fair-use limit)."""

    def __init__(self, per_s: float | None) -> None:
        self.interval = 1.0 / per_s if per_s else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            time.sleep(start - now)


@dataclass(frozen=True)
class CacheGrid:
    """What a cache folder's reader needs to know, stored in it as ``grid.json``."""

    width: int
    height: int
    block_px: int
    bands: int
    ext: str


class BlockCache:
    """GetMap answers on local disk, one file per block, bounded to ``max_bytes`` (least recently used go first).

    The folder is named after the layer and its grid (:func:`cache_folder`), so
    a later run of the same layer reuses what is still there. Blocks that a
    unit being cut still needs are *pinned* and never evicted; the bound may be
    exceeded by pinned blocks alone (a few units' worth).
    """

    def __init__(self, folder: Path, grid: CacheGrid, max_bytes: int) -> None:
        self.folder, self.max_bytes = folder, max_bytes
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "grid.json").write_text(json.dumps(asdict(grid)))
        self.ext = grid.ext
        self._lock = threading.Lock()
        self._pins: dict[tuple[int, int], int] = {}
        self._sizes: OrderedDict[tuple[int, int], int] = OrderedDict()  # oldest use first
        found = []
        for p in folder.glob(f"r*_c*.{self.ext}"):
            br, bc = (int(v[1:]) for v in p.stem.split("_"))
            st = p.stat()
            found.append((st.st_mtime, (br, bc), st.st_size))
        for _, key, size in sorted(found):
            self._sizes[key] = size
        self.bytes = sum(self._sizes.values())

    def path(self, br: int, bc: int) -> Path:
        return self.folder / f"r{br}_c{bc}.{self.ext}"

    def error_path(self, br: int, bc: int) -> Path:
        return self.folder / f"r{br}_c{bc}.err"

    def holds(self, key: tuple[int, int]) -> bool:
        """Whether block ``key`` is cached, from the cache's own index (no file touched, no use recorded)."""
        with self._lock:
            return key in self._sizes

    def has(self, key: tuple[int, int]) -> bool:
        with self._lock:
            if key in self._sizes:
                self._sizes.move_to_end(key)
                return True
            return False

    def put(self, key: tuple[int, int], data: bytes) -> None:
        path = self.path(*key)
        tmp = path.with_name(f"{path.name}.{threading.get_ident()}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
        self.error_path(*key).unlink(missing_ok=True)
        with self._lock:
            self.bytes += len(data) - self._sizes.pop(key, 0)
            self._sizes[key] = len(data)

    def put_error(self, key: tuple[int, int], message: str) -> None:
        """Record why a block could not be fetched: the crop's reader raises it, naming the request."""
        self.error_path(*key).write_text(message)

    def pin(self, keys: set[tuple[int, int]]) -> None:
        with self._lock:
            for k in keys:
                self._pins[k] = self._pins.get(k, 0) + 1

    def unpin(self, keys: set[tuple[int, int]]) -> None:
        with self._lock:
            for k in keys:
                n = self._pins.get(k, 0) - 1
                if n > 0:
                    self._pins[k] = n
                else:
                    self._pins.pop(k, None)
            self._trim()

    def _trim(self) -> None:
        for key in list(self._sizes):
            if self.bytes <= self.max_bytes:
                return
            if key in self._pins:
                continue
            self.bytes -= self._sizes.pop(key)
            self.path(*key).unlink(missing_ok=True)


def cache_folder(root: Path, wms: WmsLayer, grid: LayerGrid) -> Path:
    """The cache folder of one layer on one grid: a new configuration or grid never reads another's blocks."""
    key = json.dumps([asdict(wms), asdict(grid)], sort_keys=True)
    return root / f"{wms.layer.replace('/', '_')[:40]}-{hashlib.sha256(key.encode()).hexdigest()[:12]}{CACHE_SUFFIX}"


def is_cache_folder(path: str) -> bool:
    return path.endswith(CACHE_SUFFIX)


class CachedBlockReader:
    """The crop's reader of a prefetched layer: block (``br``, ``bc``) from its cached GetMap answer.

    Same interface as :class:`ops.imagery.blocks.BlockReader`. A block the
    prefetch gave up on raises its recorded error (the GetMap URL and the
    cause), so the buildings over it are quarantined with that message.
    """

    decodes_areas = False  # a GetMap answer is decoded whole

    def __init__(self, folder: str) -> None:
        self.path = folder
        self.folder = Path(folder)
        try:
            self.grid = CacheGrid(**json.loads((self.folder / "grid.json").read_text()))
        except OSError as exc:
            raise BlockReadError(f"{folder}: not a GetMap cache folder ({exc})") from exc
        self.block = (self.grid.block_px, self.grid.block_px)
        self.fallbacks = 0

    def read(self, br: int, bc: int) -> np.ndarray:
        g = self.grid
        p = self.folder / f"r{br}_c{bc}.{g.ext}"
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            err = self.folder / f"r{br}_c{bc}.err"
            why = err.read_text() if err.exists() else "not fetched by the prefetch (evicted from the cache?)"
            raise BlockReadError(f"GetMap block ({br}, {bc}): {why}") from None
        arr = decode_image(data, f"GetMap block ({br}, {bc})")
        h, w = min(g.block_px, g.height - br * g.block_px), min(g.block_px, g.width - bc * g.block_px)
        if arr.shape[0] < h or arr.shape[1] < w or arr.shape[2] < g.bands:
            raise BlockReadError(
                f"GetMap block ({br}, {bc}): answer of {arr.shape} px, expected {g.block_px}² × {g.bands}"
            )
        return np.ascontiguousarray(arr[:h, :w, : g.bands])

    def close(self) -> None:
        pass


def cache_bytes(folder: Path) -> int:
    """Bytes of cached GetMap answers in ``folder`` (what the bound applies to)."""
    return sum(p.stat().st_size for p in folder.glob("r*_c*.*") if p.suffix != ".err" and not p.name.endswith(".tmp"))
