"""Chips of real IGN imagery and a partition made of them, written with the project's own formats.

The CUDA tests and ``bench/cuda.py`` run on a GPU machine that has torch but
neither Dagster nor the generator's and crop's dependencies: they need chips
a real model sees (roofs of the IGN 20 cm orthophoto shipped in
``tests/data/real``), a chips folder in the shard format (``ops.shards``) and
a buildings GeoParquet (``ops.geo.footprints``), so that
``ops.ml.predict.predict_partition`` runs there exactly as the `predictions`
step calls it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import shapely

from ops.geo.footprints import BUILDINGS_SCHEMA, write_buildings_geoparquet
from ops.geo.grid import cell_ids
from ops.ml.predict import ModelRun, PartitionPredictions, predict_partition
from ops.shards import INDEX_SCHEMA, partial_path, publish_shard, shard_paths
from tests.realdata import IGN_ORTHO

MODELS = Path(__file__).parents[1] / "models"
EPSG = 2154
RES_M = 0.2  # the orthophoto's pixel: a 64 px chip covers 12.8 m


def real_chips(size: int = 64, stride: int = 8) -> np.ndarray:
    """Every ``size`` px window of the IGN orthophoto at ``stride``, in its 8 rotations and flips: (N, 3, S, S) uint8."""
    import rasterio

    with rasterio.open(IGN_ORTHO) as src:
        img = src.read()
    h, w = img.shape[1:]
    wins = [
        img[:, r : r + size, c : c + size]
        for r in range(0, h - size + 1, stride)
        for c in range(0, w - size + 1, stride)
    ]
    base = np.stack(wins)
    variants = [np.rot90(base, k, axes=(2, 3)) for k in range(4)]
    variants += [v[..., ::-1] for v in variants]
    return np.ascontiguousarray(np.concatenate(variants))


def write_partition(
    root: Path,
    bank: np.ndarray,
    n: int,
    *,
    departement: str = "33",
    per_shard: int = 4096,
    no_imagery_every: int = 50,
) -> tuple[Path, Path, list[str]]:
    """``n`` buildings on a 20 m grid in Lambert-93, building k's chip ``bank[k % len(bank)]``.

    Every ``no_imagery_every``-th building has no chip (status ``no_imagery``),
    as buildings outside the orthophoto do. Footprints are the central 8 m of
    their chip's window. Shards hold at most ``per_shard`` buildings of one
    cell, named ``<cell>.pNNN`` as the crop names them. Returns (chips folder,
    buildings GeoParquet, shard names).
    """
    size = bank.shape[-1]
    half = size * RES_M / 2
    k = np.arange(n)
    x = 600_000.0 + (k % 1000) * 20.0 + half
    y = 6_400_000.0 + (k // 1000) * 20.0 + half
    cells = cell_ids(x, y)
    ids = np.array([f"B{departement}{i:09d}" for i in range(n)], dtype=object)
    ok = (k % no_imagery_every) != no_imagery_every - 1 if no_imagery_every else np.ones(n, bool)
    foot = shapely.box(x - 4.0, y - 4.0, x + 4.0, y + 4.0)
    buildings = root / "buildings.parquet"
    batch = pa.RecordBatch.from_pydict(
        {
            "building_id": ids.tolist(),
            "departement": [departement] * n,
            "cell_id": cells.tolist(),
            "geometry": shapely.to_wkb(foot).tolist(),
            "area_m2": np.full(n, 64.0),
            "height_m": np.full(n, np.nan),
            "usage": [None] * n,
            "geometry_status": ["valid"] * n,
            "source": ["tests/realchips"] * n,
            "bbox": [{"xmin": a - 4, "ymin": b - 4, "xmax": a + 4, "ymax": b + 4} for a, b in zip(x, y, strict=True)],
        },
        schema=BUILDINGS_SCHEMA,
    )
    write_buildings_geoparquet(iter([batch]), buildings, EPSG)

    folder = root / "chips"
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[str] = []
    for cell in sorted(set(cells.tolist())):
        members = np.flatnonzero(cells == cell)
        for part, start in enumerate(range(0, len(members), per_shard)):
            sel = members[start : start + per_shard]
            shard = f"{cell}.p{part:03d}"
            has = ok[sel]
            rows = np.full(len(sel), -1, dtype=np.int32)
            rows[has] = np.arange(int(has.sum()), dtype=np.int32)
            npy, _ = shard_paths(folder, shard)
            with open(partial_path(npy), "wb") as f:  # a path not ending in .npy would get one appended
                np.save(f, bank[sel[has] % len(bank)], allow_pickle=False)
            index = pa.table(
                {
                    "building_id": ids[sel].tolist(),
                    "cell_id": [cell] * len(sel),
                    "status": np.where(has, "ok", "no_imagery").tolist(),
                    "row": rows,
                    "minx": x[sel] - half,
                    "miny": y[sel] - half,
                    "maxx": x[sel] + half,
                    "maxy": y[sel] + half,
                    "valid_fraction": np.where(has, 1.0, 0.0).astype(np.float32),
                    "message": [None] * len(sel),
                },
                schema=INDEX_SCHEMA,
            )
            meta = {
                "fingerprint": "tests-realchips",
                "imagery_id": "ign_ortho_20cm",
                "chip_size": str(size),
                "epsg": str(EPSG),
            }
            publish_shard(folder, shard, index, meta)
            shards.append(shard)
    return folder, buildings, shards


def shipped_model(name: str) -> Path:
    """The folder of a shipped model's current version (``models/<name>/CURRENT``)."""
    return MODELS / name / (MODELS / name / "CURRENT").read_text().strip()


def stage_predictions(
    root: Path, buildings: Path, shards: list[str], runs: list[ModelRun], batch: int, out: Path, pin_memory: bool
) -> tuple[PartitionPredictions, dict[str, Path]]:
    """``predict_partition`` over the partition of :func:`write_partition`: each model's rows staged under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    staged = {r.card.name: out / f"{r.card.name}.parquet" for r in runs}
    tally = predict_partition(
        root,
        shards,
        runs,
        batch,
        departement="33",
        buildings=buildings,
        staged=staged,
        scratch=out / "scratch",
        run_id=f"realchips-{out.name}",
        pin_memory=pin_memory,
    )
    return tally, staged
