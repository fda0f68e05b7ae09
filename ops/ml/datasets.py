"""Training sets: labelled chips gathered across départements, for the classifier and the segmenter.

Ground truth comes per département: labels read from an attribute's
declared source (``ops.ml.label_sources``), or polygons (a segmentation's). Each is aligned with the département's
``ok`` chips (read through ``ops.shards``) into arrays, along with the chips'
cells: the held-out split is by cell (``ops.ml.training.split_by_group``).
Across départements, :func:`gather` concatenates, caps the sample
deterministically and names what is missing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyogrio
import shapely

from ops.ml.vectorize import rasterize_masks
from ops.shards import list_shards, open_chips, read_index


def ok_chips(folder: Path) -> Iterator[tuple[str, pd.DataFrame, np.ndarray]]:
    """Per shard of a partition's chips folder: (shard id, index rows with status ok, the chip array)."""
    for shard in list_shards(folder):
        idx = read_index(folder, shard).to_pandas()
        idx = idx[idx["status"] == "ok"]
        if not idx.empty:
            yield shard, idx, open_chips(folder, shard)


def labelled_chips(
    folder: Path,
    dep: str,
    labels: pd.Series,
    classes: Sequence[str] | None,
    log: Callable[[str], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A partition's ok chips that have a label: (chips, label indices into ``classes``, cell ids).

    ``classes`` None: a regression's labels, returned as float values.

    Labels that train nothing are counted, not dropped silently: ``log`` gets how
    many are on buildings without an ok chip, and how many name no building of
    the partition (a stale id, another département's, a typo), with examples.
    """
    xs, ys, gs = [], [], []
    known: set[str] = set()
    for shard in list_shards(folder):
        index = read_index(folder, shard).to_pandas()
        known.update(index["building_id"])
        idx = index[(index["status"] == "ok") & index["building_id"].isin(labels.index)]
        if idx.empty:
            continue
        arr = open_chips(folder, shard)
        xs.append(np.asarray(arr[idx["row"].to_numpy()]))
        got = labels.loc[idx["building_id"]]
        ys.append(got.to_numpy("float64") if classes is None else got.map(list(classes).index).to_numpy())
        gs.append(np.array([f"{dep}/{shard}"] * len(idx), dtype=object))
    used = sum(len(x) for x in xs)
    unknown = sorted(set(labels.index) - known)
    if log is not None:
        line = f"partition {dep}: {len(labels):,} labels: {used:,} on ok chips, {len(labels) - used - len(unknown):,} on buildings without a chip"
        if unknown:
            line += f", {len(unknown):,} naming no building of the partition (e.g. {unknown[:5]})"
        log(line)
    dtype = "float64" if classes is None else "int64"
    if not xs:
        return np.zeros((0, 3, 1, 1), "uint8"), np.zeros(0, dtype), np.zeros(0, object)
    return np.concatenate(xs), np.concatenate(ys).astype(dtype), np.concatenate(gs)


def read_polygons(path: Path) -> np.ndarray:
    """Ground-truth polygons (any OGR format, the département's native CRS) as a geometry array."""
    return pyogrio.read_dataframe(path).geometry.to_numpy()


def panel_training_set(folder: Path, dep: str, panels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every ok chip of a partition with its panel mask: (chips, masks, cell ids).

    The masks are drawn from the polygons through each chip's own transform,
    so the training target is exactly the geometry inference has to give back.
    """
    tree = shapely.STRtree(panels)
    xs, ms, gs = [], [], []
    for cell, idx, arr in ok_chips(folder):
        x = np.asarray(arr[idx["row"].to_numpy()])
        windows = idx[["minx", "miny", "maxx", "maxy"]].to_numpy()
        xs.append(x)
        ms.append(rasterize_masks(windows, panels, x.shape[-1], tree))
        gs.append(np.array([f"{dep}/{cell.split('.')[0]}"] * len(x), dtype=object))
    if not xs:
        return np.zeros((0, 3, 1, 1), "uint8"), np.zeros((0, 1, 1), "uint8"), np.zeros(0, object)
    return np.concatenate(xs), np.concatenate(ms), np.concatenate(gs)


def gather(
    deps: Sequence[str],
    truth_of: Callable[[str], Path | None],
    arrays_of: Callable[[str, Path], tuple[np.ndarray, ...]],
    what: str,
    *,
    required: bool,
    max_samples: int,
    seed: int,
    log: Callable[[str], None],
    where: str = "",
) -> tuple[tuple[np.ndarray, ...], list[str]]:
    """Concatenated training arrays (chips first, cell groups last) and the départements used.

    ``truth_of(dep)`` is the ground-truth file or None; ``arrays_of(dep, path)``
    returns aligned arrays for that département. With ``required`` (départements
    named by the user) each must have ground truth. More than ``max_samples``
    chips are cut to a sample drawn with ``seed``. ``where`` names the chips' folder in errors.
    """
    parts, used = [], []
    for dep in deps:
        path = truth_of(dep)
        if path is None:
            if required:
                raise FileNotFoundError(f"partition {dep}: no {what} for training")
            continue
        arrays = arrays_of(dep, path)
        log(f"partition {dep}: {len(arrays[0]):,} chips with {what}")
        if len(arrays[0]):
            parts.append(arrays)
            used.append(dep)
    if not parts:
        raise RuntimeError(
            f"no chips with {what}{' under ' + where if where else ''} for {list(deps) or 'any département'}: "
            "materialize chips first"
        )
    out = tuple(np.concatenate(col) for col in zip(*parts, strict=True))
    if len(out[0]) > max_samples:
        keep = np.sort(np.random.default_rng(seed).choice(len(out[0]), max_samples, replace=False))
        out = tuple(a[keep] for a in out)
    return out, used
