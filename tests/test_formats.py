"""Imagery formats: BD ORTHO's lossy JPEG 2000 and JPEG COGs give the chips of the lossless GeoTIFF.

Issue 17, first piece. One synthetic département (seed 3, 300 buildings, 500 px tiles of 100 m at
20 cm, 42 tiles) is generated three times, once per ``imagery_format``: ``deflate`` (lossless tiled
GeoTIFF, the default), ``jpeg`` (JPEG-compressed tiled COG, YCbCr, quality 85) and ``jp2`` (lossy
JPEG 2000 named like IGN's ``...-LA93-0M20-E080.jp2``). What a user checks: the ground truth
(footprints, labels, panels, counts) is the same file whatever the format, the tiles really are in
the format asked for, and the project's own crop (``ops.crop.partition.crop_partition``) gives every
building the same status and a chip equal to the lossless one within the compression's tolerance.

Tolerance, in grey levels (0-255) over the 64 × 64 × 3 chips, measured on this sample (289 chips):

* JPEG COG, q85: mean absolute difference per chip 1.49 on average, 2.86 at worst; the 99th
  percentile of |difference| in a chip is 7 (median chip) and 15 at worst. Bounds: per chip mean
  ≤ 4 and 99th percentile ≤ 20; over all chips, mean ≤ 2.
* JPEG 2000 (QUALITY 20, irreversible 9/7 wavelet): per chip mean 0.28 on average, 0.40 at worst;
  99th percentile 1 (median chip), 2 at worst. Bounds: per chip mean ≤ 1 and 99th percentile ≤ 4;
  over all chips, mean ≤ 0.5.

The crop's 64 px chips are anti-aliased down-samplings of windows of 50-200 px, which averages the
compression's 8 × 8 (JPEG) or wavelet noise: the differences above are what is left after that.
Both lossy formats must also differ from the lossless chips (mean over chips ≥ 0.05): a generator
that silently wrote DEFLATE for every format would fail here, not pass.
"""

from __future__ import annotations

import filecmp
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio

from ops.crop.partition import crop_partition
from ops.crop.spec import ChipSpec
from ops.geo.footprints import iter_building_batches, write_buildings_geoparquet
from ops.imagery.mosaic import MosaicInfo, build_mosaic, find_tiles
from ops.shards import list_shards, read_index
from synthetic import SampleManifest, generate_departement, load_manifest
from synthetic.cli import main as synthetic_cli
from tests.shardfiles import read_chips

pytestmark = pytest.mark.reliability

DEP, N, SEED, TILE_PX = "12", 300, 3, 500
FORMATS = ("deflate", "jpeg", "jp2")
#: (per-chip mean |Δ|, per-chip 99th percentile of |Δ|, mean over all chips) that a lossy format may not exceed.
TOLERANCE = {"jpeg": (4.0, 20.0, 2.0), "jp2": (1.0, 4.0, 0.5)}
IGN_JP2_NAME = re.compile(r"^12-2024-\d{4}\.\d{3}-\d{4}\.\d{3}-LA93-0M20-E080\.jp2$")


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> dict[str, SampleManifest]:
    """The same département in the three formats, each in its own folder."""
    root = tmp_path_factory.mktemp("formats")
    return {f: generate_departement(root / f, DEP, N, SEED, tile_px=TILE_PX, imagery_format=f) for f in FORMATS}


def _partition(m: SampleManifest, work: Path, ortho: Path | None = None) -> tuple[Path, MosaicInfo]:
    """The sample's buildings GeoParquet and its mosaic (over ``ortho``, default the sample's tiles), in ``work``."""
    buildings = work / "buildings.parquet"
    write_buildings_geoparquet(iter_building_batches(m.footprints, DEP, m.epsg), buildings, m.epsg)
    return buildings, build_mosaic(find_tiles(ortho or m.ortho_dir), work / "mosaic.vrt", name=m.imagery_format)


def _assert_same_crop(got: tuple[dict, dict], ref: tuple[dict, dict]) -> None:
    """Two crops (:func:`read_chips`) give every building the same status and valid fraction, and the same chips."""
    (chips, status), (ref_chips, ref_status) = got, ref
    assert status.keys() == ref_status.keys() and chips.keys() == ref_chips.keys()
    for b, (s, v) in ref_status.items():
        assert status[b][0] == s and (status[b][1] == v or v != v), b
    for b, chip in ref_chips.items():
        np.testing.assert_array_equal(chips[b], chip, err_msg=b)


def _crop(m: SampleManifest, work: Path) -> tuple[dict[str, np.ndarray], dict[str, tuple[str, float]]]:
    """Chips (by building id) and (status, valid fraction) of every building, cut by the project's crop."""
    work.mkdir()
    buildings, info = _partition(m, work)
    out = work / "chips"
    list(crop_partition(buildings, info, out, ChipSpec(), buildings_fingerprint="f", workers=1, resume=False))
    return read_chips(out)


@pytest.mark.slow
def test_every_format_has_the_same_ground_truth_and_only_the_tiles_differ(samples):
    ref = samples["deflate"]
    tifs = sorted(p.name for p in ref.ortho_dir.iterdir())
    assert len(tifs) == ref.n_tiles > 4 and all(n.endswith(".tif") for n in tifs)
    for f, m in samples.items():
        assert m.imagery_format == f and load_manifest(m.root).imagery_format == f
        for path in ("footprints/batiment.gpkg", "labels.csv", "solar_panels.gpkg"):
            assert filecmp.cmp(ref.root / path, m.root / path, shallow=False), f"{f}: {path} differs"
        saved, saved_ref = json.loads((m.root / "manifest.json").read_text()), ref.to_json()
        assert saved["imagery_format"] == f
        # the manifest differs in the format and the name of the tile with the hole, nothing else
        same = {k: v for k, v in saved.items() if k not in ("imagery_format", "nodata_hole")}
        assert same == {k: v for k, v in saved_ref.items() if k not in ("imagery_format", "nodata_hole")}
        assert saved["nodata_hole"]["pixels"] == saved_ref["nodata_hole"]["pixels"]
        assert (m.ortho_dir / saved["nodata_hole"]["tile"]).is_file()
        names = sorted(p.name for p in m.ortho_dir.iterdir())  # tiles only: no .aux.xml, no .tmp left
        if f == "jp2":
            assert names == [n.removesuffix(".tif") + "-E080.jp2" for n in tifs]
            assert all(IGN_JP2_NAME.match(n) for n in names), names[:3]
        else:
            assert names == tifs

    name = tifs[len(tifs) // 2]
    with rasterio.open(ref.ortho_dir / name) as d:
        grid, crs = d.transform, d.crs
        assert d.compression.name.lower() == "deflate"
    with rasterio.open(samples["jpeg"].ortho_dir / name) as j:
        tags = j.tags(ns="IMAGE_STRUCTURE")
        assert (tags["COMPRESSION"], tags["JPEG_QUALITY"], tags["LAYOUT"]) == ("YCbCr JPEG", "85", "COG")
        assert j.block_shapes[0] == (256, 256) and j.overviews(1) and j.nodata == 0
        assert (j.transform, j.crs, j.count, j.dtypes[0]) == (grid, crs, 3, "uint8")
    with rasterio.open(samples["jp2"].ortho_dir / (name.removesuffix(".tif") + "-E080.jp2")) as k:
        assert k.driver == "JP2OpenJPEG"
        assert k.tags(ns="IMAGE_STRUCTURE")["COMPRESSION_REVERSIBILITY"] == "LOSSY"
        assert (k.transform, k.crs, k.count, k.dtypes[0]) == (grid, crs, 3, "uint8")
        assert k.nodata is None  # as IGN's: the mosaic takes 0 as nodata
    raw = 3 * TILE_PX * TILE_PX * ref.n_tiles
    size = {f: sum(p.stat().st_size for p in m.ortho_dir.iterdir()) for f, m in samples.items()}
    assert size["jp2"] < 0.25 * raw and size["jpeg"] < 0.25 * raw < size["deflate"], size


@pytest.mark.slow
def test_chips_from_jpeg_and_jp2_equal_the_lossless_chips_within_tolerance_same_statuses(samples, tmp_path):
    ref_chips, ref_status = _crop(samples["deflate"], tmp_path / "deflate")
    assert len(ref_status) == N
    kinds = {s for s, _ in ref_status.values()}
    assert {"ok", "nodata", "no_imagery", "invalid_geometry"} <= kinds  # the hole and the edges are exercised
    assert len(ref_chips) > 250
    for f in ("jpeg", "jp2"):
        chips, status = _crop(samples[f], tmp_path / f)
        moved = {b: (ref_status[b][0], status.get(b, ("missing",))[0]) for b in ref_status}
        assert {b: s for b, s in moved.items() if s[0] != s[1]} == {}, f"{f}: statuses differ from deflate's"
        assert set(chips) == set(ref_chips)
        # the valid fraction of a chip near nodata moves a little (lossy pixels at a hole's edge), not its status
        near = [abs(status[b][1] - v) for b, (_, v) in ref_status.items() if v == v]
        assert max(near) < 0.15, f
        diff = {b: np.abs(chips[b] - ref_chips[b]) for b in ref_chips}
        mad = {b: float(d.mean()) for b, d in diff.items()}
        p99 = {b: float(np.percentile(d, 99)) for b, d in diff.items()}
        max_mad, max_p99, max_mean = TOLERANCE[f]
        assert max(mad.values()) <= max_mad, (f, max(mad, key=mad.get), max(mad.values()))
        assert max(p99.values()) <= max_p99, (f, max(p99, key=p99.get), max(p99.values()))
        assert 0.05 <= np.mean(list(mad.values())) <= max_mean, (f, np.mean(list(mad.values())))


def test_the_format_is_in_the_cli_and_the_manifest_and_a_sample_of_another_is_regenerated(tmp_path, capsys):
    """A JPEG 2000 sample asked for as DEFLATE is rewritten (its .jp2 removed), not reused; same format: reused."""
    args = ["--out", str(tmp_path), "--departement", DEP, "--buildings", "40", "--seed", "1", "--tile-px", "256"]
    assert synthetic_cli([*args, "--format", "jp2", "--quiet"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["imagery_format"] == "jp2"
    root = tmp_path / DEP
    jp2 = sorted((root / "ortho").iterdir())
    assert jp2 and all(p.name.endswith("-E080.jp2") for p in jp2)

    m = generate_departement(tmp_path, DEP, 40, 1, tile_px=256)  # default: deflate
    assert m.imagery_format == "deflate" == load_manifest(root).imagery_format
    tifs = sorted((root / "ortho").iterdir())
    assert [p.name for p in tifs] == [p.name.removesuffix("-E080.jp2") + ".tif" for p in jp2]
    assert [Path(t).suffix for t in find_tiles(root / "ortho")] == [".tif"] * len(tifs)

    stamp = [p.stat().st_mtime_ns for p in tifs]
    again = generate_departement(tmp_path, DEP, 40, 1, tile_px=256, imagery_format="deflate")
    assert again.imagery_format == "deflate" and [p.stat().st_mtime_ns for p in tifs] == stamp

    with pytest.raises(ValueError, match="imagery_format must be one of deflate, jpeg, jp2; got 'png'"):
        generate_departement(tmp_path, DEP, 40, 1, tile_px=256, imagery_format="png")  # type: ignore[arg-type]


def test_jp2_blocks_decoded_by_areas_give_the_chips_of_whole_blocks(samples, tmp_path, monkeypatch):
    """A JPEG 2000 block that few windows touch is decoded by areas only (``ops.imagery.openjpeg``): same chips.

    Cut in parts of 40 buildings, so that a block decoded by areas for one part and kept for the next
    must be decoded again where the next part needs more of it than was decoded.
    """
    import ops.imagery.openjpeg as oj

    m = samples["jp2"]
    buildings, info = _partition(m, tmp_path)

    def crop(name: str, budget: float):
        monkeypatch.setattr(oj, "AREA_BUDGET", budget)
        out = tmp_path / name
        done = list(crop_partition(buildings, info, out, ChipSpec(), buildings_fingerprint="f", workers=1,
                                   resume=False, part_size=40))  # fmt: skip
        assert any(".p" in r.shard_id for r in done)  # cells really were cut in parts
        return sum(r.area_blocks for r in done), sum(r.blocks for r in done), read_chips(out)

    by_areas, blocks, got = crop("areas", oj.AREA_BUDGET)
    none, blocks_whole, ref = crop("whole", 0.0)
    assert none == 0 and 0 < by_areas <= blocks and blocks_whole > 0
    assert len(ref[0]) > 250
    _assert_same_crop(got, ref)


def _crop_with_cpus(monkeypatch, buildings: Path, info, out: Path, cpus: int) -> list:
    """The crop given ``cpus`` CPUs on a machine of as many, in parts of 40 buildings: on JPEG 2000, one
    worker whose decode threads they are."""
    import ops.crop.partition as partition

    monkeypatch.setattr(partition, "available_cpus", lambda: cpus)
    return list(crop_partition(buildings, info, out, ChipSpec(), buildings_fingerprint="f", workers=cpus,
                               resume=False, part_size=40))  # fmt: skip


@pytest.mark.parametrize("damaged", [False, True], ids=["intact", "one_tile_cut_short"])
def test_jp2_blocks_decoded_ahead_on_a_workers_spare_cpus_give_the_same_chips_and_statuses(
    samples, tmp_path, monkeypatch, damaged
):
    """A worker with two CPUs decodes the JPEG 2000 blocks of its unit of work ahead, two at a time
    (``ops.crop.tiles.TileSet``): every chip and status is the one-thread crop's, bit for bit, and a tile
    cut short still quarantines exactly its own buildings, with the error naming the file.
    """
    m = samples["jp2"]
    ortho = tmp_path / "ortho"
    shutil.copytree(m.ortho_dir, ortho)
    if damaged:
        victim = sorted(ortho.glob("*.jp2"))[len(list(ortho.glob("*.jp2"))) // 2]
        data = victim.read_bytes()
        victim.write_bytes(data[: len(data) * 2 // 3])
    buildings, info = _partition(m, tmp_path, ortho)
    one = _crop_with_cpus(monkeypatch, buildings, info, tmp_path / "one", 1)
    two = _crop_with_cpus(monkeypatch, buildings, info, tmp_path / "two", 2)
    assert sum(r.ahead_blocks for r in one) == 0
    assert sum(r.ahead_blocks for r in two) > sum(r.blocks for r in two) // 2  # most blocks came from the pool
    assert sum(r.blocks for r in two) == sum(r.blocks for r in one)  # still each block once per unit of work
    (chips, status), ref = read_chips(tmp_path / "two"), read_chips(tmp_path / "one")
    assert len(ref[0]) > 200
    _assert_same_crop((chips, status), ref)
    errors = [b for b, (s, _) in status.items() if s == "error"]
    assert bool(errors) == damaged
    if damaged:
        rows = [r for sh in list_shards(tmp_path / "two") for r in read_index(tmp_path / "two", sh).to_pylist()]
        said = {r["message"] for r in rows if r["status"] == "error"}
        assert said and all(victim.name in s for s in said), said


def _open_tiles(ortho: Path) -> set[str]:
    """Tiles of ``ortho`` this process holds a file descriptor on (GDAL's or the block reader's)."""
    out = set()
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = Path(fd.readlink())
        except OSError:  # closed since listed
            continue
        if target.parent == ortho:
            out.add(target.name)
    return out


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts file descriptors in /proc")
def test_a_crop_keeps_a_bounded_number_of_tiles_open_whatever_the_partitions_size(samples, tmp_path, monkeypatch):
    """A worker cuts cells all over its partition: it must not keep every tile it met open (a département of
    BD ORTHO is thousands of tiles: file descriptors and memory would grow with it). Bounded to 3 here on the
    42 tiles of the sample, the crop holds at most 3 tiles open after any shard, and cuts the same chips.
    """
    import ops.crop.tiles as tiles

    m = samples["jp2"]
    ortho = m.ortho_dir.resolve()
    buildings, info = _partition(m, tmp_path, ortho)

    def crop(bound: int, out: Path) -> int:
        monkeypatch.setattr(tiles, "MAX_OPEN_TILES", bound)
        seen: list[int] = []
        list(crop_partition(buildings, info, out, ChipSpec(), buildings_fingerprint="f", workers=1, resume=False,
                            part_size=40, progress=lambda *_: seen.append(len(_open_tiles(ortho)))))  # fmt: skip
        return max(seen)

    assert crop(10**6, tmp_path / "unbounded") > 6  # the sample does make a worker meet many tiles
    assert 0 < crop(3, tmp_path / "bounded") <= 3
    _assert_same_crop(read_chips(tmp_path / "bounded"), read_chips(tmp_path / "unbounded"))


def test_on_jpeg2000_a_crop_asked_for_two_workers_on_two_cpus_runs_one_that_decodes_on_both(
    samples, tmp_path, monkeypatch
):
    """On JPEG 2000, one worker process per two CPUs: it decodes blocks ahead on two threads while it
    resamples (1,087-1,106 chips/s on the 2-core VM against 886-909 for two one-CPU processes). The
    other formats keep a process per CPU. Same chips and statuses either way.
    """
    from ops.crop.partition import worker_processes

    buildings, jp2 = _partition(samples["jp2"], tmp_path)
    deflate = build_mosaic(find_tiles(samples["deflate"].ortho_dir), tmp_path / "deflate.vrt", name="deflate")
    assert worker_processes(jp2, 2, 10, 2) == (1, 2) and worker_processes(deflate, 2, 10, 2) == (2, 1)
    assert worker_processes(jp2, 6, 10, 6) == (3, 2) and worker_processes(deflate, 6, 10, 6) == (6, 1)
    assert worker_processes(jp2, 4, 1, 4) == (1, 4)  # one unit of work: one process, the budget as threads
    # the budget is the CPUs asked for, not the machine's: one worker decodes on one thread
    assert worker_processes(jp2, 1, 10, 6) == (1, 1) and worker_processes(jp2, 3, 10, 6) == (1, 3)
    assert worker_processes(jp2, 8, 10, 6) == (3, 2)  # never more than the CPUs there are

    import ops.crop.partition as partition

    monkeypatch.setattr(partition, "available_cpus", lambda: 2)
    runs = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        done = list(crop_partition(buildings, jp2, out, ChipSpec(), buildings_fingerprint="f", workers=workers,
                                   resume=False))  # fmt: skip
        assert {os.getpid()} == {r.pid for r in done if not r.reused}  # cut in this process, no forked worker
        # one worker is one CPU: no decode thread beside the sweep; two share one process's pool
        assert (sum(r.ahead_blocks for r in done) > 0) == (workers == 2)
        runs[workers] = read_chips(out)
    _assert_same_crop(runs[2], runs[1])
