"""An OGC WMTS as a département's imagery: one tile matrix of the service is the mosaic.

Same design as ``ops.imagery.wms`` (read its doc first): the layer becomes the
mosaic's one virtual tile, a GDAL WMTS description (:func:`gdal_wmts_xml`)
over the part of the tile matrix that the layer covers, whose blocks are the
service's own tiles, so GDAL can read it directly and the prefetch
(``ops.crop.service_prefetch``) asks the same GetTile for every block the crop
needs, into the same bounded cache.

The tile matrix is the one of ``tile_matrix_set`` whose resolution is the
configured one (within 1 %), taken whole (tiles outside the layer's coverage
are never asked: only the blocks under buildings are); its CRS must be the département's: the crop cuts
chips on the native pixel grid, and a Web Mercator set (``PM``) would need a
reprojection, which is refused naming the set's CRS.
"""

from __future__ import annotations

import dataclasses
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from urllib.parse import urlencode
from xml.sax.saxutils import escape

from ops.imagery.remote import DEFAULT_RETRY, FetchError, GaveUpError, HttpRangeReader, RetryPolicy
from ops.imagery.wms import _EXT, LayerGrid, WmsError, corners_xml

PIXEL_M = 0.28e-3  # OGC's standardised rendering pixel: resolution = scale denominator × 0.28 mm (metric CRSs)


@dataclass(frozen=True)
class WmtsLayer:
    """Which WMTS layer and tile matrix set; ``tile_matrix`` and ``top_left`` are found in the capabilities."""

    url: str  # the service endpoint (KVP), e.g. https://data.geopf.fr/wmts
    layer: str
    style: str = ""
    format: str = "image/png"
    tile_matrix_set: str = ""
    epsg: int = 2154
    resolution: float = 0.2
    tile_matrix: str = ""  # set by open_wmts_layer
    top_left: tuple[float, float] = (0.0, 0.0)  # the matrix's TopLeftCorner (x, y)

    def __post_init__(self) -> None:
        if self.format not in _EXT:
            raise WmsError(f"{self.url}: format {self.format!r} not supported (one of {', '.join(_EXT)})")

    @property
    def ext(self) -> str:
        return _EXT[self.format]

    def capabilities_url(self) -> str:
        q = urlencode({"SERVICE": "WMTS", "VERSION": "1.0.0", "REQUEST": "GetCapabilities"})
        return f"{self.url}{'&' if '?' in self.url else '?'}{q}"

    def block_url(self, grid: LayerGrid, br: int, bc: int) -> str:
        """The GetTile of block (``br``, ``bc``) of ``grid`` (whose blocks are the matrix's tiles)."""
        span = grid.block_px * grid.resolution
        row0 = round((self.top_left[1] - grid.bounds[3]) / span)
        col0 = round((grid.bounds[0] - self.top_left[0]) / span)
        params = {
            "SERVICE": "WMTS", "REQUEST": "GetTile", "VERSION": "1.0.0", "LAYER": self.layer, "STYLE": self.style,
            "FORMAT": self.format, "TILEMATRIXSET": self.tile_matrix_set, "TILEMATRIX": self.tile_matrix,
            "TILEROW": str(row0 + br), "TILECOL": str(col0 + bc),
        }  # fmt: skip
        return f"{self.url}{'&' if '?' in self.url else '?'}{urlencode(params)}"


def _strip(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _child(el: ET.Element, name: str) -> ET.Element | None:
    return next((c for c in el if _strip(c.tag) == name), None)


def _text(el: ET.Element, name: str) -> str:
    c = _child(el, name)
    return (c.text or "").strip() if c is not None else ""


def _epsg(crs: str) -> int | None:
    """The EPSG code of ``urn:ogc:def:crs:EPSG:6.3:2154``, ``EPSG:2154`` or ``.../EPSG/0/2154``."""
    m = re.search(r"EPSG[:/](?:[\d.]*[:/])*(\d+)$", crs.strip())
    return int(m.group(1)) if m else None


def _corners(bb: ET.Element) -> tuple[float, float, float, float]:
    lo = [float(v) for v in _text(bb, "LowerCorner").split()]
    hi = [float(v) for v in _text(bb, "UpperCorner").split()]
    return lo[0], lo[1], hi[0], hi[1]


def parse_wmts_capabilities(xml: bytes, wmts: WmtsLayer) -> tuple[WmtsLayer, LayerGrid]:
    """The layer with its tile matrix resolved, and that matrix as a grid of blocks (its tiles).

    Raises :class:`ops.imagery.wms.WmsError` naming the URL and layer when the
    layer, the set, or a matrix at the configured resolution is missing, or when
    the set is not in the département's CRS.
    """
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise WmsError(f"{wmts.capabilities_url()}: not a WMTS capabilities document ({exc})") from exc
    contents = next((e for e in root.iter() if _strip(e.tag) == "Contents"), None)
    if contents is None:
        text = " ".join(t.strip() for t in root.itertext() if t.strip())
        raise WmsError(f"{wmts.url}: no WMTS contents in the capabilities: {text[:300]}")
    layers = {_text(e, "Identifier"): e for e in contents if _strip(e.tag) == "Layer"}
    if wmts.layer not in layers:
        raise WmsError(f"{wmts.url}: no layer {wmts.layer!r} in the WMTS capabilities (layers: {', '.join(layers)})")
    layer = layers[wmts.layer]
    links = [_text(link, "TileMatrixSet") for link in layer if _strip(link.tag) == "TileMatrixSetLink"]
    if wmts.tile_matrix_set not in links:
        raise WmsError(
            f"{wmts.url}: layer {wmts.layer!r} has no tile matrix set {wmts.tile_matrix_set!r} (sets: {', '.join(links)})"
        )
    sets = {_text(e, "Identifier"): e for e in contents if _strip(e.tag) == "TileMatrixSet"}
    tms = sets[wmts.tile_matrix_set]
    crs = _epsg(_text(tms, "SupportedCRS"))
    if crs != wmts.epsg:
        raise WmsError(
            f"{wmts.url}: tile matrix set {wmts.tile_matrix_set!r} of layer {wmts.layer!r} is in "
            f"{_text(tms, 'SupportedCRS')}, the département's CRS is EPSG:{wmts.epsg}: choose a set in that CRS "
            "(chips are cut on the native pixel grid, not reprojected)"
        )
    matrices = [m for m in tms if _strip(m.tag) == "TileMatrix"]
    # rounded to the nanometre: 714.2857142857143 × 0.28 mm is 0.19999999999999998, and a resolution a hair off
    # 0.2 m would snap some chip windows one pixel away from the same windows on the tiles
    res = {_text(m, "Identifier"): round(float(_text(m, "ScaleDenominator")) * PIXEL_M, 9) for m in matrices}
    pick = next((m for m in matrices if abs(res[_text(m, "Identifier")] / wmts.resolution - 1) < 0.01), None)
    if pick is None:
        shown = ", ".join(f"{k}: {v:.3g} m" for k, v in res.items())
        raise WmsError(
            f"{wmts.url}: tile matrix set {wmts.tile_matrix_set!r} has no matrix at {wmts.resolution} m ({shown})"
        )
    size = int(_text(pick, "TileWidth"))
    if int(_text(pick, "TileHeight")) != size:
        raise WmsError(f"{wmts.url}: tile matrix {_text(pick, 'Identifier')!r} has tiles that are not square")
    tlx, tly = (float(v) for v in _text(pick, "TopLeftCorner").split())
    mw, mh = int(_text(pick, "MatrixWidth")), int(_text(pick, "MatrixHeight"))
    r = res[_text(pick, "Identifier")]
    span = size * r
    # the whole matrix: GDAL's tile minidriver numbers tiles from the matrix's corner, as GetTile does
    bounds = (tlx, round(tly - mh * span, 6), round(tlx + mw * span, 6), tly)
    resolved = dataclasses.replace(wmts, tile_matrix=_text(pick, "Identifier"), top_left=(tlx, tly), resolution=r)
    return resolved, LayerGrid(bounds, mw * size, mh * size, size, r)


def open_wmts_layer(
    wmts: WmtsLayer, http: HttpRangeReader, retry: RetryPolicy = DEFAULT_RETRY
) -> tuple[WmtsLayer, LayerGrid]:
    """Read the service's capabilities (retrying transient failures) and resolve the layer's tile matrix and grid."""
    url = wmts.capabilities_url()
    try:
        xml = retry.call(url, lambda: http.get(url))
    except GaveUpError:
        raise
    except FetchError as exc:
        raise WmsError(f"{wmts.url}: GetCapabilities failed for layer {wmts.layer!r}: {exc}") from exc
    return parse_wmts_capabilities(xml, wmts)


def gdal_wmts_xml(wmts: WmtsLayer, grid: LayerGrid, timeout_s: float = 60.0) -> str:
    """A GDAL description of the layer's matrix whose blocks are the service's tiles, read without capabilities.

    GDAL's tile ("TMS") minidriver with a KVP GetTile template: the raster is the
    whole matrix at level 0 of a one-level pyramid, ``${x}``/``${y}`` the tile's
    column and row from the matrix's top-left corner. (GDAL's own WMTS driver
    reads the capabilities at every open and reads in 128 px blocks, not tiles.)
    """
    params = {
        "SERVICE": "WMTS", "REQUEST": "GetTile", "VERSION": "1.0.0", "LAYER": wmts.layer, "STYLE": wmts.style,
        "FORMAT": wmts.format, "TILEMATRIXSET": wmts.tile_matrix_set, "TILEMATRIX": wmts.tile_matrix,
    }  # fmt: skip
    template = f"{wmts.url}{'&' if '?' in wmts.url else '?'}{urlencode(params)}&TILEROW=${{y}}&TILECOL=${{x}}"
    return f"""<GDAL_WMS>
  <Service name="TMS">
    <ServerUrl>{escape(template)}</ServerUrl>
  </Service>
  <DataWindow>
{corners_xml(grid)}
    <TileLevel>0</TileLevel>
    <TileCountX>{grid.width // grid.block_px}</TileCountX>
    <TileCountY>{grid.height // grid.block_px}</TileCountY>
    <YOrigin>top</YOrigin>
  </DataWindow>
  <Projection>EPSG:{wmts.epsg}</Projection>
  <BlockSizeX>{grid.block_px}</BlockSizeX>
  <BlockSizeY>{grid.block_px}</BlockSizeY>
  <BandsCount>3</BandsCount>
  <Timeout>{max(1, round(timeout_s))}</Timeout>
  <MaxConnections>1</MaxConnections>
</GDAL_WMS>
"""
