"""Sources of a partition's inputs: orthophoto tiles, building footprints, labels.

The default layout is the one the sample generator writes, one folder per
département: ``<root>/<dep>/ortho/*.tif``, ``<root>/<dep>/footprints/<file>``
(any OGR format) and ``<root>/<dep>/labels.csv``. A missing input is an error
naming the partition and the path that was looked at.

The imagery may instead be an OGC WMS (``wms_url``, e.g. IGN's Géoplateforme
``https://data.geopf.fr/wms-r``, layer ``ORTHOIMAGERY.ORTHOPHOTOS``): the mosaic is
then the service itself (``ops.imagery.wms``), and the chips step fetches its
GetMap blocks ahead of the crop (``ops.crop.service_prefetch``).

``root`` may be a bucket, ``gs://<bucket>/<prefix>`` (production). Tiles are
then read in place by GDAL through ``/vsigs/<bucket>/<key>`` (the mosaic VRT
points at them; GDAL authenticates with the same application default
credentials); footprints and labels, which are read whole, are copied to a
local folder first.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Literal

from dagster import ConfigurableResource
from pydantic import Field

from ops.geo.departements import native_epsg
from ops.imagery.mosaic import TILE_SUFFIXES, find_tiles, tiles_digest
from ops.imagery.remote import HTTP_TIMEOUT_S, ByPrefixReader, HttpRangeReader, RangeReader, download, is_remote
from ops.imagery.wms import GEOPLATEFORME_LAYER, LayerGrid, WmsLayer, gdal_wms_xml, open_layer, write_service_tile
from ops.imagery.wmts import WmtsLayer, gdal_wmts_xml, open_wmts_layer
from resources.gcs import GcsRangeReader, download_prefix, gcs_client, split_gs_uri

ENDPOINT_HELP = "Cloud Storage API endpoint for gs:// roots; None = Google's. http:// = an emulator (tests)"


def is_gs(root: str) -> bool:
    return root.startswith("gs://")


FOOTPRINT_SUFFIXES = (".gpkg", ".shp", ".geojson", ".json", ".parquet", ".fgb")


class MissingInputError(FileNotFoundError):
    """A partition whose input files are not where the source says."""


class OrthoImagery(ConfigurableResource):
    """Orthophoto tiles per département (COG/GeoTIFF/JP2)."""

    root: str = Field(default="data/sample", description="Folder with one sub-folder per département")
    subdir: str = Field(default="ortho", description="Sub-folder of a département holding its tiles")
    api_endpoint: str | None = Field(default=None, description=ENDPOINT_HELP)
    http_timeout_s: float = Field(
        default=HTTP_TIMEOUT_S,
        gt=0,
        description="Seconds a tile server (http(s) or Cloud Storage) may stay silent before the chips step's "
        "range request is dropped and retried (a stalled server costs a retry, never a hung step)",
    )

    wms_url: str | None = Field(
        default=None,
        description="An OGC WMS (or WMTS, see wms_protocol) endpoint serving the orthophoto instead of tile files, "
        "e.g. https://data.geopf.fr/wms-r (IGN Géoplateforme); None = tiles under root",
    )
    wms_protocol: Literal["WMS", "WMTS"] = Field(default="WMS", description="WMS (GetMap) or WMTS (GetTile, KVP)")
    wms_layer: str = Field(default=GEOPLATEFORME_LAYER, description="The layer (Géoplateforme: BD ORTHO's)")
    wms_style: str = Field(default="", description="The style ('' = the layer's default; a WMTS names one)")
    wms_format: str = Field(
        default="image/jpeg", description="Image format asked: image/jpeg (smaller, lossy) or image/png (lossless)"
    )
    wms_resolution_m: float = Field(default=0.2, gt=0, description="Metres per pixel asked (BD ORTHO: 0.2)")
    wms_block_px: int = Field(
        default=1024, ge=16, le=8192, description="WMS: width and height of each GetMap, the crop's block of the layer"
    )
    wms_max_getmap_px: int = Field(
        default=2048, ge=16, description="WMS: largest GetMap side allowed (the service's MaxWidth caps it too)"
    )
    wmts_tile_matrix_set: str = Field(
        default="", description="WMTS: the tile matrix set, in the département's CRS (e.g. a Lambert-93 set)"
    )
    wms_requests_per_s: float = Field(
        default=10.0, gt=0, description="Most GetMap/GetTile requests started per second (the service's fair use)"
    )
    wms_threads: int = Field(default=8, ge=1, description="Requests to the service in flight at once")
    wms_cache_dir: str = Field(
        default=str(Path(tempfile.gettempdir()) / "bativision-wms"), description="Local cache of the service's images"
    )
    wms_cache_mb: int = Field(default=2048, ge=16, description="Bound of that cache on local disk (MiB)")

    def service(self, departement: str) -> WmsLayer | WmtsLayer | None:
        """The layer in the département's CRS (a WMTS: its tile matrix read from the capabilities), or None (tiles).

        A wrong layer, set or resolution raises :class:`ops.imagery.wms.WmsError` naming the URL and the layer.
        """
        if not self.wms_url:
            return None
        if self.wms_protocol == "WMTS":
            return self._wmts(departement)[0]
        return WmsLayer(
            self.wms_url, self.wms_layer, self.wms_style, self.wms_format, native_epsg(departement),
            self.wms_resolution_m, self.wms_block_px,
        )  # fmt: skip

    def _wmts(self, departement: str) -> tuple[WmtsLayer, LayerGrid]:
        assert self.wms_url
        wmts = WmtsLayer(
            self.wms_url, self.wms_layer, self.wms_style, self.wms_format, self.wmts_tile_matrix_set,
            native_epsg(departement), self.wms_resolution_m,
        )  # fmt: skip
        return open_wmts_layer(wmts, HttpRangeReader(self.http_timeout_s))

    def service_tile(self, departement: str, path: Path) -> str:
        """Check the layer (at once: the error names the URL and layer) and write its GDAL description at ``path``."""
        if self.wms_protocol == "WMTS":
            wmts, grid = self._wmts(departement)
            return str(write_service_tile(gdal_wmts_xml(wmts, grid, self.http_timeout_s), path))
        wms = self.service(departement)
        assert isinstance(wms, WmsLayer)
        grid = open_layer(wms, HttpRangeReader(self.http_timeout_s), self.wms_max_getmap_px)
        return str(write_service_tile(gdal_wms_xml(wms, grid, self.http_timeout_s), path))

    def _gs_tiles(self, departement: str) -> list[tuple[str, int, int]]:
        """(GDAL path, size, generation) of the tiles under a gs:// root, sorted by name."""
        bucket, prefix = split_gs_uri(self.root)
        key = "/".join(p for p in (prefix, departement, self.subdir) if p) + "/"
        blobs = gcs_client(self.api_endpoint).list_blobs(bucket, prefix=key)
        found = [
            (f"/vsigs/{bucket}/{b.name}", b.size or 0, b.generation or 0)
            for b in blobs
            if Path(b.name).suffix.lower() in TILE_SUFFIXES and "/" not in b.name[len(key) :]
        ]
        return sorted(found)

    def tiles_and_versions(self, departement: str) -> tuple[list[str], dict[str, str]]:
        """The département's tiles, and {tile: what identifies its content} where a stat can't tell (a gs://
        tile's size and generation), from one listing of the bucket.

        Local tiles have no versions here: their size and modification time are read where needed. Why
        versions matter: a new vintage of a tile uploaded under the same name must change the mosaic's
        ``imagery_id`` (so chips are cut again) and be converted again. Why one listing: a tile uploaded
        between two listings would be in the mosaic without its version (and a département's tiles take
        a few pages of listing).
        """
        if is_gs(self.root):
            found = self._gs_tiles(departement)
            if not found:
                raise MissingInputError(
                    f"partition {departement}: no orthophoto tiles ({', '.join(TILE_SUFFIXES)}) under "
                    f"{self.root.rstrip('/')}/{departement}/{self.subdir}/"
                )
            return [t[0] for t in found], {path: f"{size}:{gen}" for path, size, gen in found}
        folder = Path(self.root) / departement / self.subdir
        if not folder.is_dir():
            raise MissingInputError(f"partition {departement}: no imagery folder at {folder.resolve()}")
        return find_tiles(folder), {}

    def download(self, tile: str, folder: Path) -> Path:
        """A remote tile copied whole to ``folder`` (retried with backoff); a local one as it is."""
        if not is_remote(tile):
            return Path(tile)
        return download(self.range_reader(), tile, folder)

    def range_reader(self) -> RangeReader:
        """Where the chips step's prefetch reads remote tiles' bytes: Cloud Storage, HTTP, or local files."""
        gcs = GcsRangeReader(self.api_endpoint, self.http_timeout_s)
        http = HttpRangeReader(self.http_timeout_s)
        return ByPrefixReader({"/vsigs/": gcs, "gs://": gcs, "/vsicurl/": http, "http://": http, "https://": http})

    def fingerprint(self, departement: str) -> str | None:
        """Changes when the département's tiles do (None: it has no imagery). Used by the sensor.

        A WMS has no files to watch: its fingerprint is its configuration (the monthly run refetches it).
        """
        if self.wms_url:
            key = (self.wms_url, self.wms_protocol, self.wms_layer, self.wms_style, self.wms_format,
                   self.wms_resolution_m, self.wms_block_px, self.wmts_tile_matrix_set)  # fmt: skip
            return hashlib.sha256(repr(key).encode()).hexdigest()[:16]
        if is_gs(self.root):
            found = self._gs_tiles(departement)
            if not found:
                return None
            return hashlib.sha256("\n".join(f"{p}:{size}:{gen}" for p, size, gen in found).encode()).hexdigest()[:16]
        folder = Path(self.root) / departement / self.subdir
        if not folder.is_dir():
            return None
        return tiles_digest(sorted(str(p) for p in folder.iterdir() if p.suffix.lower() in TILE_SUFFIXES))


class FootprintSource(ConfigurableResource):
    """Building footprints per département, and the files next to them that label buildings (training only)."""

    root: str = Field(default="data/sample", description="Folder with one sub-folder per département")
    subdir: str = Field(default="footprints", description="Sub-folder holding the footprint file")
    api_endpoint: str | None = Field(default=None, description=ENDPOINT_HELP)
    cache_dir: str = Field(
        default=str(Path(tempfile.gettempdir()) / "bativision-sources"), description="Local copy of gs:// sources"
    )

    def _local_dep(self, departement: str, *, footprints: bool = True, file: str | None = None) -> Path:
        """The département's folder: ``root/<dep>``, or a fresh local copy of it (footprints, or ``file``) for gs://."""
        if not is_gs(self.root):
            return Path(self.root) / departement
        bucket, prefix = split_gs_uri(self.root)
        Path(self.cache_dir).mkdir(parents=True, exist_ok=True)
        dest = Path(tempfile.mkdtemp(prefix=f"{departement}-", dir=self.cache_dir))
        key = "/".join(p for p in (prefix, departement) if p)
        client = gcs_client(self.api_endpoint)
        if footprints:
            download_prefix(client, bucket, f"{key}/{self.subdir}", dest / self.subdir)
            return dest
        name = file or ""
        blob = client.bucket(bucket).blob(f"{key}/{name}")
        if blob.exists():
            blob.download_to_filename(str(dest / name))
        return dest

    def fingerprint(self, departement: str) -> str | None:
        """Changes when the département's footprint files do (None: it has none); read without downloading them."""
        if is_gs(self.root):
            bucket, prefix = split_gs_uri(self.root)
            key = "/".join(p for p in (prefix, departement, self.subdir) if p) + "/"
            blobs = gcs_client(self.api_endpoint).list_blobs(bucket, prefix=key)
            found = sorted(f"{b.name}:{b.size}:{b.generation}" for b in blobs if not b.name.endswith("/"))
        else:
            folder = Path(self.root) / departement / self.subdir
            files = sorted(folder.iterdir()) if folder.is_dir() else []
            found = [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files if f.is_file()]
        return hashlib.sha256("\n".join(found).encode()).hexdigest()[:16] if found else None

    def footprints(self, departement: str) -> Path:
        folder = self._local_dep(departement) / self.subdir
        files = sorted(p for p in folder.glob("*") if p.suffix.lower() in FOOTPRINT_SUFFIXES) if folder.is_dir() else []
        if not files:
            raise MissingInputError(
                f"partition {departement}: no footprint file ({', '.join(FOOTPRINT_SUFFIXES)}) in {folder.resolve()}"
            )
        if len(files) > 1:
            raise MissingInputError(
                f"partition {departement}: several footprint files in {folder}: {[f.name for f in files]}"
            )
        return files[0].resolve()

    def source_file(self, departement: str, name: str) -> Path | None:
        """A file of the département's folder, next to its footprints (label files, ground-truth polygons), if any.

        Which files: the label sources of ``models/attributes.yaml`` (training only).
        """
        p = self._local_dep(departement, footprints=False, file=name) / name
        return p.resolve() if p.exists() else None
