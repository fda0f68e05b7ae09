"""The chip shard format: the contract between the crop, inference, training and the benches.

A partition's chips are stored per unit of work (a grid cell, or a part
``<cell>.pNNN`` of a big cell) as two files in one folder:

- ``<shard>.chips.npy``: a uint8 array (N, 3, S, S), the chips of the
  buildings with status ``ok``, memory-mapped by its readers;
- ``<shard>.index.parquet``: one row per building of the unit, chip or not
  (:data:`INDEX_SCHEMA`), whose file metadata holds the fingerprint used for
  resumption, the imagery id, the chip size and the EPSG code.

The index is written last (:func:`publish_shard`), so its presence marks a
complete shard: readers list shards by their index and never see half of one.
Whoever writes chips (``ops.crop``) and whoever reads them (``ops.ml``,
``bench``) go through this module only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

#: Every building of a partition gets exactly one of these in the chips index, and in ``predictions``.
STATUSES = ("ok", "no_imagery", "nodata", "invalid_geometry", "error")

INDEX_SCHEMA = pa.schema(
    [
        pa.field("building_id", pa.string(), nullable=False),
        pa.field("cell_id", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("row", pa.int32(), nullable=False),  # position in the shard's array, -1 if no chip
        pa.field("minx", pa.float64()),  # chip window in the mosaic's CRS
        pa.field("miny", pa.float64()),
        pa.field("maxx", pa.float64()),
        pa.field("maxy", pa.float64()),
        pa.field("valid_fraction", pa.float32()),
        pa.field("message", pa.string()),
    ]
)


INDEX_SUFFIX = ".index.parquet"
CHIPS_SUFFIX = ".chips.npy"


def shard_paths(folder: Path, shard_id: str) -> tuple[Path, Path]:
    """(chips array, index) of shard ``shard_id`` in ``folder``."""
    return folder / f"{shard_id}{CHIPS_SUFFIX}", folder / f"{shard_id}{INDEX_SUFFIX}"


def partial_path(path: Path) -> Path:
    """Where a shard file is written before :func:`publish_shard` moves it into place."""
    return path.with_name(path.name + ".tmp")


def publish_shard(folder: Path, shard_id: str, index: pa.Table, meta: dict[str, str]) -> None:
    """Move a shard's written chips into place, then write its index: the index's presence marks a complete shard.

    A shard cut again (new imagery) first loses its old index: a failure or a kill
    between the two moves must not leave the old index describing the new chips.
    """
    npy, idx = shard_paths(folder, shard_id)
    idx.unlink(missing_ok=True)
    partial_path(npy).replace(npy)
    table = index.replace_schema_metadata(
        {**(index.schema.metadata or {}), **{k.encode(): v.encode() for k, v in meta.items()}}
    )
    pq.write_table(table, partial_path(idx))
    partial_path(idx).replace(idx)


def shard_meta(index_path: Path) -> dict[str, str]:
    """The key/value metadata written with a shard's index (fingerprint, imagery_id, chip_size, epsg)."""
    md = pq.read_schema(index_path).metadata or {}
    return {k.decode(): v.decode() for k, v in md.items() if not k.startswith(b"ARROW")}


def list_shards(folder: Path) -> list[str]:
    """Ids of the complete shards in ``folder``, sorted."""
    if not folder.exists():
        return []
    return sorted(p.name[: -len(INDEX_SUFFIX)] for p in folder.glob(f"*{INDEX_SUFFIX}"))


def read_index(folder: Path, shard_id: str) -> pa.Table:
    return pq.read_table(shard_paths(folder, shard_id)[1])


def index_rows(folder: Path, shard_id: str) -> int:
    """Rows of a shard's index (its buildings), from the Parquet footer only."""
    return pq.ParquetFile(shard_paths(folder, shard_id)[1]).metadata.num_rows


def open_chips(folder: Path, shard_id: str) -> np.ndarray:
    """The shard's chips as a read-only memory map (nothing is loaded until sliced)."""
    return np.load(shard_paths(folder, shard_id)[0], mmap_mode="r")


def status_counts(statuses: list[str]) -> dict[str, int]:
    """{status: count} over :data:`STATUSES`, in that order (an unknown status is an error naming it)."""
    counts = dict.fromkeys(STATUSES, 0)
    for s in statuses:
        if s not in counts:
            raise ValueError(f"unknown chip status {s!r}; statuses are {STATUSES}")
        counts[s] += 1
    return counts
