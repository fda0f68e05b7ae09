"""Writing the sample's files: footprints and panels GeoPackages, the label CSVs and the ortho tiles.

Each file is written under a temporary name and moved into place, so a reader
never sees half a file. The GeoPackages are written with a fixed
``OGR_CURRENT_DATE`` (GDAL would otherwise stamp ``gpkg_contents.last_change``
with the time of writing), so the same parameters give byte-identical files.
Tiles are rendered and written one per worker process, same bytes whatever the
number of workers, as DEFLATE GeoTIFF (default), JPEG COG or lossy JPEG 2000
(:func:`_write_tile`): the pixels rendered are the same, only the encoding differs.
"""

from __future__ import annotations

import csv
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from synthetic.footprints import footprint_geometries
from synthetic.manifest import CAT_NODATA, COUNT_KEYS, PANEL_LAYER, ROOF_CLASSES
from synthetic.plan import Plan
from synthetic.render import render_tile
from synthetic.roofs import ROOF_COLOURS, has_roof, slope_degrees
from synthetic.tiles import TileJob, tile_jobs, tile_path

#: What GDAL records as the GeoPackages' last change (``gpkg_contents.last_change``).
GPKG_DATE = "2024-01-01T00:00:00.000Z"


@contextmanager
def _fixed_gpkg_date() -> Iterator[None]:
    """Make GDAL stamp GeoPackages with :data:`GPKG_DATE` while the block runs, then restore the option.

    The option is set in pyogrio's GDAL (the one that writes the GeoPackages);
    it is process-wide for the duration of the write.
    """
    import pyogrio

    previous = pyogrio.get_gdal_config_option("OGR_CURRENT_DATE")
    pyogrio.set_gdal_config_options({"OGR_CURRENT_DATE": GPKG_DATE})
    try:
        yield
    finally:
        pyogrio.set_gdal_config_options({"OGR_CURRENT_DATE": previous})


def write_footprints(plan: Plan, path: Path) -> None:
    """Write the BD TOPO-like ``batiment`` layer (GeoPackage, native CRS, MultiPolygon).

    ``mat_toits`` (roof material code, NULL on about half the buildings) is a
    label source read straight from the footprints, as BD TOPO's MAT_TOITS is.
    """
    import geopandas as gpd
    import pandas as pd
    import pyogrio

    b = plan.b
    created = pd.Timestamp("2005-01-01") + pd.to_timedelta(b["created_s"], unit="s")
    etages = pd.array(b["etages"], dtype="Int64")
    etages[b["etages_null"]] = pd.NA
    df = pd.DataFrame(
        {
            "cleabs": b["cleabs"],
            "nature": b["nature"],
            "usage_1": b["usage_1"],
            "usage_2": b["usage_2"],
            "hauteur": b["hauteur"],
            "nombre_d_etages": etages,
            "date_creation": created.astype("datetime64[ms]"),
            "etat_de_l_objet": np.full(plan.n, "En service", dtype=object),
            "mat_toits": b["mat_toits"],  # text codes ("00" keeps its zeros), None where unset
        }
    )
    gdf = gpd.GeoDataFrame(df, geometry=footprint_geometries(plan), crs=f"EPSG:{plan.epsg}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.gpkg")
    tmp.unlink(missing_ok=True)
    with _fixed_gpkg_date():
        pyogrio.write_dataframe(gdf, tmp, layer="batiment", driver="GPKG", geometry_type="MultiPolygon")
    os.replace(tmp, path)


def write_panels(plan: Plan, path: Path) -> int:
    """The drawn solar-panel arrays as Polygons (native CRS) with their building's ``cleabs``."""
    import geopandas as gpd
    import pyogrio
    import shapely

    b = plan.b
    idx = np.flatnonzero(b["has_panel"])
    gdf = gpd.GeoDataFrame(
        {"cleabs": b["cleabs"][idx]}, geometry=shapely.polygons(b["panel"][idx]), crs=f"EPSG:{plan.epsg}"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.gpkg")
    tmp.unlink(missing_ok=True)
    with _fixed_gpkg_date():
        pyogrio.write_dataframe(gdf, tmp, layer=PANEL_LAYER, driver="GPKG", geometry_type="Polygon")
    os.replace(tmp, path)
    return int(idx.size)


def write_labels(plan: Plan, path: Path) -> None:
    """One row per footprint: the roof class drawn (random for buildings that are not drawn)."""
    b = plan.b
    hole = b["category"] == CAT_NODATA
    orient = np.round(np.degrees(b["theta"]) % 180.0, 1)
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        wr = csv.writer(fh)
        wr.writerow(["cleabs", "roof_type", "orientation_deg", "roof_colour", "in_nodata_hole", "category"])
        for i in range(plan.n):
            wr.writerow(
                [
                    b["cleabs"][i],
                    ROOF_CLASSES[b["roof"][i]],
                    f"{orient[i]:.1f}",
                    ROOF_COLOURS[b["colour"][i]][0],
                    int(hole[i]),
                    COUNT_KEYS[b["category"][i]],
                ]
            )
    os.replace(tmp, path)


def write_roof_slope(plan: Plan, path: Path) -> int:
    """``cleabs,slope_deg`` for every building with a roof (one decimal); returns the number of rows.

    A regression target delivered as a CSV keyed by building id rather than a
    footprint column. Flat roofs are 0.0 (drawn flat); gable and hip roofs carry
    the pitch their planes were lit with, so it can be read from the shading.
    Empty and unrepairable footprints have no drawn roof and no row.
    """
    b = plan.b
    slope = slope_degrees(plan)
    rows = np.flatnonzero(has_roof(plan))
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        wr = csv.writer(fh)
        wr.writerow(["cleabs", "slope_deg"])
        for i in rows:
            wr.writerow([b["cleabs"][i], f"{slope[i]:.1f}"])
    os.replace(tmp, path)
    return int(rows.size)


#: JPEG 2000 as BD ORTHO delivers it: lossy (irreversible 9/7 wavelet, YCC), 1024 px codestream tiles.
#: QUALITY is the JP2OpenJPEG driver's size cap in % of the raw pixels: 20 allows 15 MB per 5,000 × 5,000 px
#: tile, as BD ORTHO's 10-20 MB (this generator's smoother pixels need less: 8.2 MiB measured). CODEC is set
#: because the driver picks it from the extension, and the file is written under ``.jp2.tmp`` (without it: a
#: bare codestream, no georeferencing).
JP2_OPTIONS: dict[str, str] = {
    "CODEC": "JP2",
    "QUALITY": "20",
    "REVERSIBLE": "NO",
    "YCC": "YES",
    "BLOCKXSIZE": "1024",
    "BLOCKYSIZE": "1024",
}
#: JPEG-compressed tiled COG (YCbCr, quality 85, 256 px blocks, overviews), as hosted orthophotos are.
COG_JPEG_OPTIONS: dict[str, str] = {"COMPRESS": "JPEG", "QUALITY": "85", "BLOCKSIZE": "256"}


def _tile_geo(plan: Plan, ix: int, iy: int) -> dict[str, Any]:
    """The raster profile every format shares: RGB uint8 in the plan's CRS, 20 cm grid, nodata 0."""
    from rasterio.transform import from_origin

    x0, ytop = plan.tile_origin(ix, iy)
    tp = plan.tile_px
    return {
        "width": tp,
        "height": tp,
        "count": 3,
        "dtype": "uint8",
        "crs": f"EPSG:{plan.epsg}",
        "transform": from_origin(x0, ytop, plan.resolution, plan.resolution),
        "nodata": 0,
        "interleave": "pixel",
        "photometric": "RGB",
    }


def _write_rows(ds: Any, arr: np.ndarray) -> None:
    """Write an (h, w, 3) tile in bands of 1,024 rows (bands-first copies of a slice, not of the tile)."""
    from rasterio.windows import Window

    tp = arr.shape[1]
    step = 1024
    for r0 in range(0, arr.shape[0], step):
        r1 = min(arr.shape[0], r0 + step)
        ds.write(np.ascontiguousarray(np.moveaxis(arr[r0:r1], 2, 0)), window=Window(0, r0, tp, r1 - r0))


def _write_tile(
    plan: Plan, arr: np.ndarray, path: Path, ix: int, iy: int, threads: str, imagery_format: str = "deflate"
) -> None:
    """Write one tile in ``imagery_format`` (see :data:`synthetic.manifest.IMAGERY_FORMATS`).

    ``deflate``: a BD ORTHO-like GeoTIFF, 256x256 tiles, DEFLATE + predictor 2, nodata 0, written
    block by block. ``jpeg`` and ``jp2``: GDAL writes those formats only as a copy of a whole
    raster, so the tile goes through an uncompressed in-memory GeoTIFF first (one more tile in
    memory, 75 MB at 5,000 px). The JPEG COG declares nodata 0; the JPEG 2000 declares none, like
    IGN's (the mosaic then takes 0 as nodata). No ``.aux.xml`` sidecar is left behind.
    """
    import rasterio

    tmp = path.with_name(path.name + ".tmp")
    profile = _tile_geo(plan, ix, iy)
    if imagery_format == "deflate":
        profile.update(
            driver="GTiff",
            tiled=True,
            blockxsize=256,
            blockysize=256,
            compress="deflate",
            predictor=2,
            zlevel=1,  # ~2.5x faster than the default 6 for a ~4 % larger file
            num_threads=threads,
        )
        with rasterio.open(tmp, "w", **profile) as ds:
            _write_rows(ds, arr)
        os.replace(tmp, path)
        return
    if imagery_format == "jpeg":
        driver, options = "COG", {**COG_JPEG_OPTIONS, "NUM_THREADS": threads}
    elif imagery_format == "jp2":
        driver, options = "JP2OpenJPEG", dict(JP2_OPTIONS)
    else:
        raise ValueError(f"imagery_format must be one of deflate, jpeg, jp2; got {imagery_format!r}")
    import rasterio.shutil
    from rasterio.io import MemoryFile

    profile.update(driver="GTiff", tiled=True, blockxsize=256, blockysize=256)
    # PAM off: GDAL would otherwise write the georeferencing into a ``.tmp.aux.xml`` that the rename leaves behind
    with rasterio.Env(GDAL_PAM_ENABLED="NO", GDAL_NUM_THREADS=threads), MemoryFile() as mem:
        with mem.open(**profile) as ds:
            _write_rows(ds, arr)
        with mem.open() as src:
            rasterio.shutil.copy(src, tmp, driver=driver, **options)
    os.replace(tmp, path)


_WORKER_PLAN: Plan | None = None


def _worker_init(plan: Plan) -> None:
    """Give a worker process the plan once (inherited by fork, not re-sent per tile)."""
    global _WORKER_PLAN
    _WORKER_PLAN = plan


def _worker_tile(job: TileJob, path: Path, threads: str, imagery_format: str) -> str:
    """Render and write one tile in a worker process."""
    assert _WORKER_PLAN is not None
    _write_tile(_WORKER_PLAN, render_tile(_WORKER_PLAN, job), path, job.ix, job.iy, threads, imagery_format)
    return path.name


def write_tiles(plan: Plan, ortho: Path, workers: int, log: Any = None, imagery_format: str = "deflate") -> list[str]:
    """Render and write every kept tile in ``imagery_format``, one tile in memory per worker."""
    ortho.mkdir(parents=True, exist_ok=True)
    jobs = tile_jobs(plan)
    paths = [tile_path(plan, ortho, j.ix, j.iy, imagery_format) for j in jobs]
    t0 = time.perf_counter()
    if workers <= 1 or len(jobs) <= 1:
        for k, (job, path) in enumerate(zip(jobs, paths, strict=True)):
            _write_tile(plan, render_tile(plan, job), path, job.ix, job.iy, "ALL_CPUS", imagery_format)
            if log:
                log(f"tile {k + 1}/{len(jobs)} {path.name} ({time.perf_counter() - t0:.1f}s)")
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(plan,)) as pool:
            futs = [
                pool.submit(_worker_tile, job, path, "1", imagery_format) for job, path in zip(jobs, paths, strict=True)
            ]
            for k, fut in enumerate(futs):
                name = fut.result()
                if log:
                    log(f"tile {k + 1}/{len(jobs)} {name} ({time.perf_counter() - t0:.1f}s)")
    return [p.name for p in paths]
