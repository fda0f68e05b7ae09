"""Read building footprints from any OGR source into the `buildings` contract.

Sources differ in everything but the buildings: BD TOPO GeoPackages name the id
``cleabs``; its shapefiles truncate names to ten characters (``ID``,
``USAGE1``) and ship without a ``.cpg`` although their text is UTF-8; other
sources carry ``osm_id`` or ``id``; geometries come as Polygon Z, MultiPolygon,
empty, or self-intersecting. This module maps all of that onto one schema
(DESIGN.md, table ``buildings``) and gives every input row a
``geometry_status`` instead of dropping it, so the accounting invariant can
hold downstream.

It streams the source in Arrow batches: memory stays flat whatever the size of
the département.

pyogrio (GDAL/OGR) is imported where a vector source is opened, not with the
module: the predictions step imports it only to split the partition's GeoParquet
by cell (pyarrow alone), and its GPU image needs no second GDAL.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import shapely
from pyproj import CRS, Transformer

from ops.geo.crs import outside_area, recognise_epsg
from ops.geo.grid import DEFAULT_CELL_SIZE_M, NO_CELL, cell_ids

ID_CANDIDATES = ("cleabs", "id", "osm_id", "building_id", "fid")
HEIGHT_CANDIDATES = ("hauteur", "height", "height_m")
USAGE_CANDIDATES = ("usage_1", "usage1", "usage")

#: Every footprint gets one (docs/DESIGN.md, `buildings.geometry_status`); the usable ones can be cropped.
GEOMETRY_STATUSES = ("ok", "repaired", "invalid", "empty")
USABLE_GEOMETRY = ("ok", "repaired")

BUILDINGS_SCHEMA = pa.schema(
    [
        pa.field("building_id", pa.string(), nullable=False),
        pa.field("departement", pa.string(), nullable=False),
        pa.field("cell_id", pa.string(), nullable=False),
        pa.field("geometry", pa.binary()),
        pa.field("area_m2", pa.float64()),
        pa.field("height_m", pa.float64()),
        pa.field("usage", pa.string()),
        pa.field("geometry_status", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        # GeoParquet 1.1 "covering": per-row bounding box, so readers can skip parsing WKB
        pa.field(
            "bbox",
            pa.struct([("xmin", pa.float64()), ("ymin", pa.float64()), ("xmax", pa.float64()), ("ymax", pa.float64())]),
        ),
    ]
)


class FootprintError(ValueError):
    """A footprint source that cannot be read into the contract (names the file)."""


@dataclass
class FootprintStats:
    """What happened to the rows of one source, for logs and asset metadata."""

    rows: int = 0
    statuses: dict[str, int] = field(default_factory=lambda: dict.fromkeys(GEOMETRY_STATUSES, 0))
    generated_ids: int = 0
    source_epsg: int | None = None
    cells: set[str] = field(default_factory=set)


def _pick(columns: list[str], candidates: tuple[str, ...], explicit: str | None, path: Path, what: str) -> str | None:
    lower = {c.lower(): c for c in columns}
    if explicit is not None:
        if explicit.lower() not in lower:
            raise FootprintError(f"{path}: {what} column {explicit!r} not found; columns are {columns}")
        return lower[explicit.lower()]
    for cand in candidates:
        if cand in lower:
            return lower[cand]
    return None


def _shapefile_encoding(path: Path) -> str | None:
    """BD TOPO shapefiles come without a .cpg but are UTF-8; GDAL would assume
    Latin-1 and produce mojibake. Use UTF-8 when the DBF decodes as UTF-8."""
    if path.suffix.lower() != ".shp":
        return None
    if any(path.with_suffix(s).exists() for s in (".cpg", ".CPG")):
        return None
    dbf = next((p for p in (path.with_suffix(".dbf"), path.with_suffix(".DBF")) if p.exists()), None)
    if dbf is None:
        return None
    with open(dbf, "rb") as fh:
        header = fh.read(10)
        if len(header) < 10:
            return None
        fh.seek(int.from_bytes(header[8:10], "little"))  # records start after the header
        head = fh.read(8 << 20)
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A cut in the middle of a multi-byte character at the end is fine.
        if exc.start < len(head) - 4:
            return "ISO-8859-1"
    return "UTF-8"


@dataclass
class _Source:
    """A vector source as (fields, CRS, streamed Arrow batches with a WKB geometry column)."""

    path: Path
    fields: list[str]
    crs: object
    layer: str | int | None
    batch_size: int
    geoparquet_geom: str | None = None
    features: int = -1  # as its reader counts them without a scan; -1 when unknown
    layers: list[str] = field(default_factory=list)

    @contextmanager
    def batches(self, columns: list[str]) -> Iterator[tuple[str, Iterator[pa.RecordBatch]]]:
        if self.geoparquet_geom is not None:
            pf = pq.ParquetFile(self.path)
            yield self.geoparquet_geom, pf.iter_batches(self.batch_size, columns=[*columns, self.geoparquet_geom])
            return
        import pyogrio

        with pyogrio.raw.open_arrow(
            self.path,
            layer=self.layer,
            columns=columns,
            batch_size=self.batch_size,
            encoding=_shapefile_encoding(self.path),
            use_pyarrow=True,
        ) as (_meta, reader):
            yield next(n for n in reader.schema.names if n not in columns), reader


def _open_source(path: Path, layer: str | int | None, batch_size: int) -> _Source:
    """GeoParquet is read with pyarrow (streamed); everything else through GDAL/OGR."""
    if path.suffix.lower() in (".parquet", ".geoparquet"):
        try:
            pf = pq.ParquetFile(path)
            schema = pf.schema_arrow
            geo = json.loads((schema.metadata or {}).get(b"geo", b"null"))
        except Exception as exc:
            raise FootprintError(f"{path}: cannot be read as GeoParquet ({exc})") from exc
        if not geo:
            raise FootprintError(f"{path}: Parquet file without GeoParquet 'geo' metadata")
        geom = geo.get("primary_column")
        if geom not in schema.names or geom not in geo.get("columns", {}):
            raise FootprintError(f"{path}: GeoParquet primary geometry column {geom!r} not among {schema.names}")
        if geo["columns"][geom].get("encoding", "WKB").upper() != "WKB":
            raise FootprintError(
                f"{path}: geometry encoding {geo['columns'][geom]['encoding']} not supported (WKB only)"
            )
        crs = geo["columns"][geom].get("crs", "OGC:CRS84")  # GeoParquet: absent crs means lon/lat
        fields = [n for n in schema.names if n != geom]
        crs = json.dumps(crs) if isinstance(crs, dict) else crs
        return _Source(path, fields, crs, layer, batch_size, geom, pf.metadata.num_rows)
    import pyogrio

    try:
        info = pyogrio.read_info(path, layer=layer)
        layers = [str(name) for name, _kind in pyogrio.list_layers(path)]
    except Exception as exc:
        raise FootprintError(f"{path}: cannot be read as a vector layer ({exc})") from exc
    return _Source(path, list(info["fields"]), info["crs"], layer, batch_size, None, int(info["features"]), layers)


def _no_buildings(source: _Source) -> FootprintError:
    """A file or layer without a feature: a wrong input (file, layer), never an empty partition that looks done."""
    which = f"layer {source.layer!r}" if source.layer is not None else "its first layer"
    which = "the file" if source.geoparquet_geom else which
    others = f"; the file's layers are {source.layers}" if len(source.layers) > 1 else ""
    return FootprintError(
        f"{source.path}: {which} has no features{others}. A département without buildings is a wrong "
        "input (another file, or the `buildings` config `layer`), not an empty partition"
    )


def _polygons_of(geom: shapely.Geometry) -> list[shapely.Geometry]:
    """The polygonal members of ``geom``, looking inside (nested) collections."""
    if geom.geom_type in ("Polygon", "MultiPolygon"):
        return [geom]
    if geom.geom_type == "GeometryCollection":
        return [p for g in geom.geoms for p in _polygons_of(g)]
    return []  # a point or a line is not a footprint


def _repair(geom: shapely.Geometry) -> shapely.Geometry | None:
    """A valid (Multi)Polygon of positive area from ``geom``'s polygons, or None when it holds none.

    A collection keeps its polygons (a GeometryCollection of a footprint and a stray point is a
    footprint); ``make_valid`` may itself return a collection (a bow-tie's lines), whose polygons we keep.
    """
    parts = [p for g in _polygons_of(geom) for p in _polygons_of(shapely.make_valid(g))]
    if not parts:
        return None
    fixed = shapely.union_all(parts) if len(parts) > 1 else parts[0]
    if fixed.geom_type in ("Polygon", "MultiPolygon") and fixed.area > 0:
        return fixed
    return None


def _clean_geometries(geoms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """2D, valid, polygonal geometries and their status, one per input."""
    status = np.full(len(geoms), "ok", dtype=object)
    missing = shapely.is_missing(geoms)
    empty = missing | shapely.is_empty(np.where(missing, shapely.Point(), geoms))
    status[empty] = "empty"
    out = np.where(empty, None, geoms)
    present = ~empty
    out[present] = shapely.force_2d(out[present])
    polygonal = np.isin(shapely.get_type_id(out), (3, 6))  # Polygon, MultiPolygon
    valid = shapely.is_valid(out)
    bad = present & ~(polygonal & valid)
    for i in np.flatnonzero(bad):
        fixed = _repair(out[i])
        if fixed is not None:
            out[i] = fixed
            status[i] = "repaired"
        else:
            status[i] = "invalid"  # keep the source geometry so an analyst can see it
    return out, status


def iter_building_batches(
    path: str | Path,
    departement: str,
    target_epsg: int,
    *,
    layer: str | int | None = None,
    id_column: str | None = None,
    generate_ids: bool = False,
    batch_size: int = 50_000,
    cell_size_m: float = DEFAULT_CELL_SIZE_M,
    stats: FootprintStats | None = None,
) -> Iterator[pa.RecordBatch]:
    """Yield record batches in :data:`BUILDINGS_SCHEMA` (geometry as WKB in ``target_epsg``).

    Raises :class:`FootprintError` naming the file for an unreadable source, a source without
    features, a missing id column (unless ``generate_ids``: ``<file stem>#<feature index>``),
    features with no id in the id column (with their positions), a missing CRS, duplicate
    building ids, buildings outside the area where ``target_epsg`` is valid (coordinates not in
    the declared CRS, lat/lon swapped), text that cannot be decoded (with the column).
    """
    path = Path(path)
    stats = stats if stats is not None else FootprintStats()
    if not path.exists():
        raise FootprintError(f"{path}: footprint file not found")
    source = _open_source(path, layer, batch_size)
    if source.features == 0:
        raise _no_buildings(source)
    fields = source.fields
    id_col = _pick(fields, ID_CANDIDATES, id_column, path, "id")
    if id_col is None and not generate_ids:
        # ids key every prediction and must stay the same from one month's run to the next: never
        # invented from row positions (which change when the file does) unless the user says so
        raise FootprintError(
            f"{path}: no building id column (looked for {', '.join(ID_CANDIDATES)}); its columns are "
            f"{[f for f in fields]}. Set the `buildings` config `id_column` to the one holding stable ids, "
            "or `generate_ids: true` to number features by position (ids then change whenever the file does)"
        )
    height_col = _pick(fields, HEIGHT_CANDIDATES, None, path, "height")
    usage_col = _pick(fields, USAGE_CANDIDATES, None, path, "usage")
    if source.crs is None:
        raise FootprintError(f"{path}: layer has no CRS; cannot place its buildings")
    src_epsg = recognise_epsg(CRS.from_user_input(source.crs), what=str(path))
    stats.source_epsg = src_epsg
    transformer = None if src_epsg == target_epsg else Transformer.from_crs(src_epsg, target_epsg, always_xy=True)
    columns = [c for c in (id_col, height_col, usage_col) if c is not None]
    source_name = path.name
    seen: set[str] = set()
    no_id: list[int] = []  # feature indexes whose id is null or blank: the whole file is scanned to list them
    offset = 0
    with source.batches(columns) as (geom_name, reader):
        for batch in reader:
            n = batch.num_rows
            offset += n
            if id_col is not None:
                ids = [
                    None if v is None else v.strip()
                    for v in _cast(batch, id_col, pa.string(), path, offset - n).to_pylist()
                ]
                no_id += [offset - n + k for k, v in enumerate(ids) if not v]
                if no_id:
                    continue  # the file fails: only its ids are still read, to name every culprit
            else:
                ids = [f"{path.stem}#{offset - n + k}" for k in range(n)]  # asked for: feature index
                stats.generated_ids += n
            batch_seen: set[str] = set()
            dups = {i for i in ids if i in seen or i in batch_seen or batch_seen.add(i)}
            seen |= batch_seen
            if dups:
                uniq = sorted(dups)
                raise FootprintError(
                    f"{path}: {len(uniq)} duplicate building id(s) in column {id_col!r}, e.g. {uniq[:5]}"
                )
            wkb = batch.column(geom_name).to_numpy(zero_copy_only=False)
            geoms = shapely.from_wkb(wkb, on_invalid="fix")
            geoms, status = _clean_geometries(geoms)
            src_bounds = shapely.bounds(geoms)
            if transformer is not None:
                present = ~shapely.is_missing(geoms)
                geoms[present] = shapely.transform(
                    geoms[present], lambda xy: np.column_stack(transformer.transform(xy[:, 0], xy[:, 1]))
                )
            if msg := outside_area(ids, src_bounds, shapely.bounds(geoms), src_epsg, target_epsg):
                raise FootprintError(f"{path}: {msg}")
            centroids = shapely.centroid(geoms)
            cx = np.where(shapely.is_missing(centroids), np.nan, shapely.get_x(centroids))
            cy = np.where(shapely.is_missing(centroids), np.nan, shapely.get_y(centroids))
            cells = cell_ids(cx, cy, cell_size_m)
            stats.cells.update(c for c in set(cells) if c != NO_CELL)
            areas = shapely.area(geoms).astype("float64")
            areas[status == "empty"] = np.nan
            heights = (
                _cast(batch, height_col, pa.float64(), path, offset - n) if height_col else pa.nulls(n, pa.float64())
            )
            usages = _cast(batch, usage_col, pa.string(), path, offset - n) if usage_col else pa.nulls(n, pa.string())
            for s in GEOMETRY_STATUSES:
                stats.statuses[s] += int((status == s).sum())
            stats.rows += n
            yield pa.RecordBatch.from_arrays(
                [
                    pa.array(ids, pa.string()),
                    pa.array([departement] * n, pa.string()),
                    pa.array(cells.tolist(), pa.string()),
                    pa.array(shapely.to_wkb(geoms).tolist(), pa.binary()),
                    pa.array(areas, pa.float64(), from_pandas=True),
                    heights,
                    usages,
                    pa.array(status.tolist(), pa.string()),
                    pa.array([source_name] * n, pa.string()),
                    _bbox_array(geoms),
                ],
                schema=BUILDINGS_SCHEMA,
            )
    if no_id:
        # a position is not an id (it changes when the file does): numbering some features silently
        # would key their predictions on sand
        raise FootprintError(
            f"{path}: {len(no_id)} feature(s) have no id (null or blank) in column {id_col!r}, at feature "
            f"index(es) {no_id[:20]}{' ...' if len(no_id) > 20 else ''} (0-based, file order). Every building "
            "needs its source id: fix the file, or set the `buildings` config `id_column` to a complete id column"
        )
    if offset == 0:
        raise _no_buildings(source)


def _cast(batch: pa.RecordBatch, column: str, to: pa.DataType, path: Path, first: int) -> pa.Array:
    """``column`` as ``to``, or an error naming the file, the column and the feature.

    A height of 'n/a' does not convert; text that is not UTF-8 (GDAL passes a GeoPackage's or a
    GeoJSON's bytes through unchecked) would otherwise fail far downstream, in the warehouse's
    loader, naming neither. ``first`` is the batch's first feature index.
    """
    try:
        out = batch.column(column).cast(to)
        if to == pa.string():
            out.validate(full=True)  # checks the UTF-8
        return out
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        if to == pa.string():
            for k, raw in enumerate(batch.column(column).cast(pa.binary()).to_pylist()):
                try:
                    _ = raw is None or raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise FootprintError(
                        f"{path}: column {column!r} holds text that is not UTF-8 at feature index {first + k} "
                        f"({raw!r}); re-encode the file as UTF-8 (a Shapefile: add a .cpg naming its encoding)"
                    ) from exc
        raise FootprintError(f"{path}: column {column!r} cannot be read as {to} ({exc})") from exc


def _bbox_array(geoms: np.ndarray) -> pa.StructArray:
    b = shapely.bounds(geoms)  # NaN for missing/empty geometries
    return pa.StructArray.from_arrays(
        [pa.array(b[:, k], pa.float64(), from_pandas=True) for k in range(4)], names=["xmin", "ymin", "xmax", "ymax"]
    )


def geoparquet_metadata(epsg: int) -> dict[bytes, bytes]:
    """GeoParquet 1.1 file metadata for a WKB ``geometry`` column in ``epsg``."""
    geo = {
        "version": "1.1.0",
        "primary_column": "geometry",
        "columns": {
            "geometry": {
                "encoding": "WKB",
                "geometry_types": ["Polygon", "MultiPolygon"],
                "crs": json.loads(CRS.from_epsg(epsg).to_json()),
                "covering": {
                    "bbox": {
                        "xmin": ["bbox", "xmin"],
                        "ymin": ["bbox", "ymin"],
                        "xmax": ["bbox", "xmax"],
                        "ymax": ["bbox", "ymax"],
                    }
                },
            }
        },
    }
    return {b"geo": json.dumps(geo).encode()}


SOURCE_KEY = b"bativision:source"  # GeoParquet file metadata: the footprint source the rows were read from


def write_buildings_geoparquet(
    batches: Iterator[pa.RecordBatch],
    out: Path,
    epsg: int,
    *,
    source: Path | None = None,
    layer: str | int | None = None,
) -> int:
    """Stream batches into one GeoParquet file; returns the row count.

    ``source`` and ``layer`` (where the rows come from) are kept in the file's
    metadata, so a later check can count the source's features (:func:`read_source`).
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    meta = geoparquet_metadata(epsg)
    if source is not None:
        meta[SOURCE_KEY] = json.dumps({"path": str(source), "layer": layer}).encode()
    schema = BUILDINGS_SCHEMA.with_metadata(meta)
    rows = 0
    try:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for b in batches:
                writer.write_batch(b.replace_schema_metadata(schema.metadata))
                rows += b.num_rows
    except BaseException:
        tmp.unlink(missing_ok=True)  # a source that fails half-way leaves neither a partial file nor litter
        raise
    tmp.replace(out)  # readers never see a half-written file
    return rows


def read_source(buildings_parquet: Path) -> tuple[Path, str | int | None] | None:
    """(source file, layer) a buildings GeoParquet was read from, if it says."""
    raw = (pq.read_schema(buildings_parquet).metadata or {}).get(SOURCE_KEY)
    if raw is None:
        return None
    d = json.loads(raw)
    return Path(d["path"]), d["layer"]


def count_features(path: Path, layer: str | int | None = None) -> int:
    """How many features (rows) a footprint source holds, counted by its reader, not by ours."""
    if path.suffix.lower() in (".parquet", ".geoparquet"):
        return pq.ParquetFile(path).metadata.num_rows
    import pyogrio

    try:
        return int(pyogrio.read_info(path, layer=layer, force_feature_count=True)["features"])
    except Exception as exc:
        raise FootprintError(f"{path}: cannot count its features ({exc})") from exc


def split_by_cell(buildings_parquet: Path, out_dir: Path, batch_size: int = 65_536) -> dict[str, Path]:
    """Copy (building_id, geometry) of a buildings GeoParquet into one small file per cell.

    One streaming pass, one open writer per cell: steps that need the
    footprints of one cell at a time (clipping segmentation polygons) then read
    a few kilobytes instead of the whole partition, and memory does not grow
    with the partition.
    """
    import pyarrow.compute as pc

    out_dir.mkdir(parents=True, exist_ok=True)
    writers: dict[str, pq.ParquetWriter] = {}
    paths: dict[str, Path] = {}
    schema = pa.schema([("building_id", pa.string()), ("geometry", pa.binary())])
    try:
        for batch in pq.ParquetFile(buildings_parquet).iter_batches(
            batch_size=batch_size, columns=["building_id", "cell_id", "geometry"]
        ):
            table = pa.Table.from_batches([batch])
            for cell in pc.unique(table.column("cell_id")).to_pylist():
                part = table.filter(pc.equal(table.column("cell_id"), cell)).select(["building_id", "geometry"])
                if cell not in writers:
                    paths[cell] = out_dir / f"{cell}.parquet"
                    writers[cell] = pq.ParquetWriter(paths[cell], schema)
                writers[cell].write_table(part.cast(schema))
    finally:
        for w in writers.values():
            w.close()
    return paths
