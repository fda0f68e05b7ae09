"""Kills and full disks (issue 16): a step killed or out of space loses nothing and leaves nothing half-made.

Each kill runs the real work in its own process group, started with ``start_new_session``, and
SIGKILLs the whole group at a point seen from outside (a shard's file half-written, a warehouse
batch printed, a staged row file begun); a re-run in another process must then account for every
building exactly once, reusing what was finished and never taking a half-written file as complete.

A full disk is a small tmpfs mounted over the output folder (we are root in the container), grown
afterwards with ``mount -o remount``. Where ``mount`` is not permitted, ``RLIMIT_FSIZE`` with SIGXFSZ
ignored stands in for it: writes past the limit fail with EFBIG ("File too large") instead of ENOSPC,
and "freeing space" lifts the limit.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import resource
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import rasterio
import torch
from rasterio.transform import from_origin
from shapely.geometry import box

from ops.crop.partition import crop_partition
from ops.crop.spec import ChipSpec
from ops.geo.footprints import iter_building_batches, write_buildings_geoparquet
from ops.geo.reproject import wgs84_batches
from ops.imagery.mosaic import MosaicInfo, build_mosaic, find_tiles
from ops.ml.card import ModelCard, build_model
from ops.ml.inference import BatchRunner, forward_fn
from ops.ml.predict import ModelRun, PartitionPredictions, predict_partition
from ops.shards import list_shards, open_chips, read_index, shard_paths
from resources.warehouse import DuckDBWarehouse
from tests.rowfiles import buildings_parquet

pytestmark = pytest.mark.reliability

REPO = Path(__file__).resolve().parent.parent
X0, Y0, RES = 700_000.0, 6_600_400.0, 0.2  # upper-left corner of the 1000 × 1000 px test raster
FINGERPRINT = "kills"  # the buildings fingerprint every crop here uses, so that a re-run resumes


# --- inputs ---------------------------------------------------------------------------------------


def _scene(root: Path, n: int, seed: int = 0) -> tuple[Path, Path]:
    """A 200 m × 200 m RGB tile and ``n`` buildings on it: (tiles folder, buildings GeoParquet of '12')."""
    rng = np.random.default_rng(seed)
    tiles = _tile(root / "tiles", seed)
    geoms = []
    for _ in range(n):
        cx, cy = X0 + rng.uniform(5, 195), Y0 - rng.uniform(5, 195)
        w, h = rng.uniform(4, 25, 2)
        geoms.append(box(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
    ids = [f"b{k:05d}" for k in range(n)]
    gpd.GeoDataFrame({"cleabs": ids}, geometry=geoms, crs=2154).to_file(root / "b.gpkg", layer="batiment")
    write_buildings_geoparquet(iter_building_batches(root / "b.gpkg", "12", 2154), root / "b.parquet", 2154)
    return tiles, root / "b.parquet"


def _tile(folder: Path, seed: int) -> Path:
    """``folder`` holding one random 1000 × 1000 px RGB tile at (X0, Y0), 20 cm pixels."""
    folder.mkdir(parents=True)
    with rasterio.open(
        folder / "t.tif", "w", driver="GTiff", width=1000, height=1000, count=3, dtype="uint8",
        crs="EPSG:2154", transform=from_origin(X0, Y0, RES, RES), nodata=0, tiled=True,
        blockxsize=128, blockysize=128,
    ) as dst:  # fmt: skip
        dst.write(np.random.default_rng(seed).integers(1, 256, (3, 1000, 1000), dtype="uint8"))
    return folder


def _building_ids(buildings: Path) -> list[str]:
    return sorted(pq.read_table(buildings, columns=["building_id"]).column("building_id").to_pylist())


def _mosaic(tiles: Path) -> MosaicInfo:
    """The mosaic every crop of a scene uses (same tiles, same name: same imagery id, so a re-run resumes)."""
    return build_mosaic(find_tiles(tiles), tiles.parent / "mosaic.vrt", name="kills")


def _crop(tiles: Path, buildings: Path, out: Path, part_size: int) -> list:
    return list(
        crop_partition(
            buildings, _mosaic(tiles), out, ChipSpec(), buildings_fingerprint=FINGERPRINT, part_size=part_size
        )
    )


def _complete_shards(folder: Path) -> dict[str, int]:
    """Shards that look complete (an index), each checked whole: {shard: mtime of its index}.

    A shard taken as complete must have an index that reads, and a chips array that loads and holds
    exactly one chip per ``ok`` row of the index, rows 0..n-1.
    """
    found = {}
    for shard in list_shards(folder):
        idx = read_index(folder, shard)
        arr = open_chips(folder, shard)
        ok_rows = sorted(
            r for r, s in zip(idx.column("row").to_pylist(), idx.column("status").to_pylist(), strict=True) if s == "ok"
        )
        assert ok_rows == list(range(len(arr))), f"{shard}: index rows do not match its chips array"
        del arr
        found[shard] = shard_paths(folder, shard)[1].stat().st_mtime_ns
    return found


def _ids_across_shards(folder: Path) -> list[str]:
    return [b for s in list_shards(folder) for b in read_index(folder, s).column("building_id").to_pylist()]


# --- processes ------------------------------------------------------------------------------------


def _start(script: str, *args: object, log: Path) -> subprocess.Popen:
    """``python -c script args`` from the repository, in its own process group (so the kill takes its workers too)."""
    return subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)],
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
    )


def _kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def _wait_for_line(proc: subprocess.Popen, pattern: str, log: Path, timeout: float = 120) -> str:
    """The first line of the child's output matching ``pattern`` (fails, with the child's log, if it ends first)."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sel.select(timeout=0.5):
            line = proc.stdout.readline()
            if not line:
                break
            if re.match(pattern, line):
                return line
    proc.kill()
    pytest.fail(f"the child never printed {pattern!r}; exit {proc.poll()}; log:\n{log.read_text()[-3000:]}")


# --- 1. SIGKILL mid-crop --------------------------------------------------------------------------

CROP = """
import sys
from pathlib import Path
from ops.crop.partition import crop_partition
from ops.crop.spec import ChipSpec
from ops.imagery.mosaic import build_mosaic, find_tiles
tiles, buildings, out, part_size = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
info = build_mosaic(find_tiles(tiles), tiles.parent / "mosaic.vrt", name="kills")
print("cropping", flush=True)
for r in crop_partition(buildings, info, out, ChipSpec(), buildings_fingerprint="kills", part_size=part_size):
    print("shard", r.shard_id, flush=True)
print("done", flush=True)
"""


@pytest.mark.slow
def test_a_crop_killed_while_a_shard_is_half_written_resumes_with_every_building_once(tmp_path):
    """Killed with one shard complete and the next one's chips half on disk: the re-run cuts only what is missing.

    The chips of a shard stream to ``<shard>.chips.npy.tmp`` and its index is written last
    (temp name, then rename), so a shard with no index is not complete whatever its chips file holds.
    """
    tiles, buildings = _scene(tmp_path, 6000, seed=1)
    out = tmp_path / "chips"
    log = tmp_path / "crop.log"
    proc = _start(CROP, tiles, buildings, out, 2000, log=log)  # 3 shards of ~24 MB: each streams in 4 MB chunks
    try:
        _wait_for_line(proc, "cropping", log)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            done = set(list_shards(out)) if out.exists() else set()
            half = [p for p in out.glob("*.chips.npy.tmp") if p.name.removesuffix(".chips.npy.tmp") not in done]
            if done and half and half[0].stat().st_size > 0:
                break
            time.sleep(0.001)
        assert proc.poll() is None, f"the crop ended before the kill; log:\n{log.read_text()[-3000:]}"
    finally:
        _kill(proc)
    half_written = [p.name.removesuffix(".chips.npy.tmp") for p in out.glob("*.chips.npy.tmp")]
    finished = _complete_shards(out)
    assert finished and half_written, "the kill should land with a shard finished and one half-written"
    assert not set(half_written) & set(finished), "a half-written shard must not look complete"
    all_ids = _building_ids(buildings)
    assert len(_ids_across_shards(out)) < len(all_ids)  # the kill did land mid-crop

    again = _crop(tiles, buildings, out, 2000)  # a new process: this one

    assert {r.shard_id for r in again if r.reused} == set(finished)  # finished shards are not cut again...
    assert all(shard_paths(out, s)[1].stat().st_mtime_ns == t for s, t in finished.items())  # ...nor rewritten
    assert {r.shard_id for r in again if not r.reused} >= set(half_written)
    _complete_shards(out)
    ids = _ids_across_shards(out)
    assert sorted(ids) == all_ids, "every building exactly once across the shards' indexes"
    assert not list(out.glob("*.tmp")), "a re-run leaves no partial file behind"


def test_a_shard_recut_for_new_imagery_that_fails_before_its_index_does_not_pair_old_index_and_new_chips(tmp_path):
    """Re-cropped over new imagery, a shard whose index cannot be written must not look complete with the old index.

    The window a kill can land in (chips renamed into place, index not yet written) is held open here
    by a directory where the index's temporary file would go.
    """
    tiles, buildings = _scene(tmp_path, 300, seed=4)
    out = tmp_path / "chips"
    _crop(tiles, buildings, out, 50)
    shard = list_shards(out)[2]
    old_chips = shard_paths(out, shard)[0].read_bytes()
    blocked = shard_paths(out, shard)[1].with_name(shard_paths(out, shard)[1].name + ".tmp")
    blocked.mkdir()
    new_tiles = _tile(tmp_path / "new_tiles", seed=5)  # a new vintage: same place, other pixels
    info = build_mosaic(find_tiles(new_tiles), tmp_path / "new.vrt", name="kills")
    with pytest.raises(OSError, match=re.escape(shard)):
        list(crop_partition(buildings, info, out, ChipSpec(), buildings_fingerprint=FINGERPRINT, part_size=50))
    if shard in list_shards(out):  # still listed: then under its old index, with its old chips
        assert shard_paths(out, shard)[0].read_bytes() == old_chips, f"{shard}: old index over new chips"


# --- 2. SIGKILL mid-warehouse-write ---------------------------------------------------------------

WAREHOUSE = """
import sys, time
from pathlib import Path
from ops.geo.reproject import wgs84_batches
from resources.warehouse import DuckDBWarehouse
db, parquet = sys.argv[1], Path(sys.argv[2])
def batches():
    for k, batch in enumerate(wgs84_batches(parquet, 2154, batch_size=50)):
        print("batch", k, flush=True)
        time.sleep(0.05)
        yield batch
print("done", DuckDBWarehouse(path=db).replace_partition("buildings", "12", batches()), flush=True)
"""


def _partition_rows(db: Path) -> dict[str, tuple[int, int, set[str]]]:
    """{departement: (rows, distinct ids, id prefixes)} as a fresh connection sees them."""
    got = DuckDBWarehouse(path=str(db)).query("select departement, building_id from buildings")
    return {
        dep: (len(g), g.building_id.nunique(), {b.rsplit("-", 1)[0] for b in g.building_id})
        for dep, g in got.groupby("departement")
    }


@pytest.mark.slow
def test_a_warehouse_write_killed_mid_transaction_leaves_the_old_partition_whole(tmp_path):
    """The delete and the inserts are one transaction: killed after some batches, the old rows are all there."""
    db = tmp_path / "w.duckdb"
    wh = DuckDBWarehouse(path=str(db))
    wh.replace_partition("buildings", "12", wgs84_batches(buildings_parquet(tmp_path, "12", 300, "old"), 2154))
    wh.replace_partition("buildings", "81", wgs84_batches(buildings_parquet(tmp_path, "81", 100, "other"), 2154))
    new = buildings_parquet(tmp_path, "12", 2000, "new")  # 40 batches of 50, 0.05 s each
    log = tmp_path / "warehouse.log"
    proc = _start(WAREHOUSE, db, new, log=log)
    try:
        _wait_for_line(proc, r"batch 10\b", log)  # the old rows deleted and 500 new ones inserted, uncommitted
    finally:
        _kill(proc)

    assert _partition_rows(db) == {"12": (300, 300, {"old"}), "81": (100, 100, {"other"})}

    assert wh.replace_partition("buildings", "12", wgs84_batches(new, 2154, batch_size=50)) == 2000
    assert _partition_rows(db) == {"12": (2000, 2000, {"new"}), "81": (100, 100, {"other"})}


# --- 3. SIGKILL mid-inference ---------------------------------------------------------------------

PREDICT = """
import sys, time
from pathlib import Path
import torch
from ops.ml.card import ModelCard, build_model
from ops.ml.inference import BatchRunner, forward_fn
from ops.ml.predict import ModelRun, predict_partition
from ops.shards import list_shards
chips, buildings, staged, scratch = (Path(a) for a in sys.argv[1:5])
torch.manual_seed(0)
card = ModelCard("roof_type", "classification", ["flat", "gable", "hip"], 64, 3, [0.5] * 3, [0.2] * 3, "RoofNet", [8],
                 version="v1")
run = ModelRun(card, BatchRunner(forward_fn(build_model(card).eval(), torch.device("cpu")), 64))
def progress(res, k, tally, seconds):
    print("shard", k, res.shard, flush=True)
    time.sleep(0.5)
predict_partition(chips, list_shards(chips), [run], 32, departement="12", buildings=buildings,
                  staged={"roof_type": staged}, scratch=scratch, run_id=sys.argv[5], progress=progress)
print("done", flush=True)
"""


def _roof_run() -> ModelRun:
    """The child's model, in this process: a RoofNet with seeded weights (what it predicts does not matter here)."""
    torch.manual_seed(0)
    card = ModelCard("roof_type", "classification", ["flat", "gable", "hip"], 64, 3, [0.5] * 3, [0.2] * 3,
                     "RoofNet", [8], version="v1")  # fmt: skip
    return ModelRun(card, BatchRunner(forward_fn(build_model(card).eval(), torch.device("cpu")), 64))


def _predict(chips: Path, buildings: Path, staged: Path, scratch: Path, run_id: str) -> PartitionPredictions:
    return predict_partition(
        chips, list_shards(chips), [_roof_run()], 32, departement="12", buildings=buildings,
        staged={"roof_type": staged}, scratch=scratch, run_id=run_id,
    )  # fmt: skip


@pytest.fixture(scope="module")
def cropped(tmp_path_factory) -> tuple[Path, Path, Path]:
    """300 buildings cropped into 6 shards: (tiles, buildings, chips folder)."""
    root = tmp_path_factory.mktemp("kills")
    tiles, buildings = _scene(root, 300, seed=2)
    _crop(tiles, buildings, root / "chips", 50)
    assert len(list_shards(root / "chips")) == 6
    return tiles, buildings, root / "chips"


def _staged_rows(staged: Path) -> tuple[list[str], set[str]]:
    """(sorted building ids, run ids) of a staged predictions file."""
    t = pq.read_table(staged, columns=["building_id", "run_id"])
    return sorted(t.column("building_id").to_pylist()), set(t.column("run_id").to_pylist())


@pytest.mark.slow
def test_an_inference_killed_mid_partition_leaves_the_last_complete_staged_file(cropped, tmp_path):
    """Rows stream to ``<staged>.tmp``, moved into place only once every building has its row.

    Killed after two of six shards, the staged file is still the previous run's, whole; the
    half-written temp file is not a readable Parquet file; a re-run stages one row per building.
    """
    _, buildings, chips = cropped
    staged, scratch = tmp_path / "predictions" / "roof_type-v1.parquet", tmp_path / "scratch"
    staged.parent.mkdir()
    ids = _building_ids(buildings)
    _predict(chips, buildings, staged, scratch, "run-1")
    assert _staged_rows(staged) == (ids, {"run-1"})
    before = staged.read_bytes()

    log = tmp_path / "predict.log"
    proc = _start(PREDICT, chips, buildings, staged, scratch, "run-2", log=log)
    try:
        _wait_for_line(proc, "shard 2 ", log)
    finally:
        _kill(proc)

    assert staged.read_bytes() == before, "the staged file is the last complete run's, untouched"
    partial = staged.with_suffix(".tmp")
    assert partial.exists() and partial.stat().st_size > 0  # rows of run-2 had started
    with pytest.raises(pa.ArrowInvalid):  # no footer: nothing can read it as a finished file
        pq.ParquetFile(partial)

    tally = _predict(chips, buildings, staged, scratch, "run-3")
    assert tally.rows == {"roof_type": 300} and sum(tally.statuses.values()) == 300
    assert _staged_rows(staged) == (ids, {"run-3"}), "one row per building, all from the re-run"
    assert not partial.exists()


# --- 4. disk full ---------------------------------------------------------------------------------


@dataclass
class SmallDisk:
    """A folder with little room: a tmpfs of ``size`` bytes, or (mount refused) files limited to ``file_limit`` bytes."""

    folder: Path
    size: int
    file_limit: int
    mounted: bool

    @contextlib.contextmanager
    def full(self) -> Iterator[None]:
        """While inside, writes past the room fail (tmpfs: always, until :meth:`grow`)."""
        if self.mounted:
            yield
            return
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.file_limit, hard))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, old)

    def grow(self) -> None:
        """Space is freed: the tmpfs grows to 256 MB (the size limit is already lifted outside :meth:`full`)."""
        if self.mounted:
            subprocess.run(["mount", "-o", "remount,size=256m", str(self.folder)], check=True)


@contextlib.contextmanager
def small_disk(folder: Path, size: int, file_limit: int) -> Iterator[SmallDisk]:
    """``folder`` as a tmpfs of ``size`` bytes, unmounted at the end; or the RLIMIT_FSIZE stand-in where mount is refused."""
    folder.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True
    )
    try:
        yield SmallDisk(folder, size, file_limit, mounted=mount.returncode == 0)
    finally:
        if mount.returncode == 0:
            subprocess.run(["umount", "-l", str(folder)], check=True)


FULL = (errno.ENOSPC, errno.EFBIG)


def test_a_crop_out_of_disk_names_the_shard_file_and_a_rerun_with_space_completes(tmp_path):
    """300 buildings in 6 shards of ~0.6 MB on a 2 MB disk: the step fails naming the file it was writing.

    With the RLIMIT_FSIZE stand-in (256 KB a file) no shard fits, so none may be finished before the failure.
    """
    tiles, buildings = _scene(tmp_path, 300, seed=3)
    with small_disk(tmp_path / "chips", 2 << 20, file_limit=256 << 10) as disk:
        with disk.full(), pytest.raises(OSError) as err:
            _crop(tiles, buildings, disk.folder, 50)
        assert err.value.errno in FULL
        written = re.search(r"(\S+\.chips\.npy)\.tmp", str(err.value))
        assert written and Path(written[1]).parent == disk.folder, str(err.value)  # the file, in full
        failed = Path(written[1]).name.removesuffix(".chips.npy")
        finished = _complete_shards(disk.folder)
        assert failed not in finished, "the shard that did not fit must not look complete"
        assert len(finished) < 6
        if disk.mounted:
            assert finished, "the shards that fitted before the disk was full are complete"

        disk.grow()
        again = _crop(tiles, buildings, disk.folder, 50)

        assert {r.shard_id for r in again if r.reused} == set(finished)
        _complete_shards(disk.folder)
        assert sorted(_ids_across_shards(disk.folder)) == _building_ids(buildings)
        assert not list(disk.folder.glob("*.tmp"))


def test_staging_predictions_out_of_disk_fails_and_a_rerun_with_space_completes(cropped, tmp_path):
    """The staged rows' folder has 8 KB: ENOSPC naming the file; nothing looks complete; a re-run completes."""
    _, buildings, chips = cropped
    with small_disk(tmp_path / "predictions", 8 << 10, file_limit=8 << 10) as disk:
        staged = disk.folder / "roof_type-v1.parquet"
        with disk.full(), pytest.raises(OSError) as err:
            _predict(chips, buildings, staged, tmp_path / "scratch", "run-1")
        assert err.value.errno in FULL
        # what the user reads: which file of which partition could not be written
        assert staged.name.removesuffix(".parquet") in str(err.value) and "partition 12" in str(err.value), err.value
        assert not staged.exists(), "no staged file may look complete after a failed run"
        assert not list(disk.folder.glob("*.tmp")), "the half-written staged file is removed, not left holding the disk"

        disk.grow()
        tally = _predict(chips, buildings, staged, tmp_path / "scratch", "run-2")
        assert tally.rows == {"roof_type": 300}
        assert _staged_rows(staged) == (_building_ids(buildings), {"run-2"})
        assert not staged.with_suffix(".tmp").exists()
