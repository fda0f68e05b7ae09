"""JP2 → COG conversion (``ops.imagery.convert``): same chips as the JP2, kept in step with the source tiles.

Issue 17: a département reprocessed every month may convert its BD ORTHO JPEG 2000 tiles once to
fast-decoding COGs (``bench/convert.py`` measures when that pays). What a user checks: the crop gives
every building the same status from the COGs as from the JP2, and chips equal within a stated
tolerance; an unchanged tile is not rewritten, a changed one is, a vanished one's COG is deleted; a
corrupt tile fails naming it.

One synthetic ``jp2`` département (seed 3, 300 buildings, 500 px tiles: 42 tiles, with a nodata hole).
Tolerance, in grey levels (0-255) over the 64 × 64 × 3 chips, measured on this sample (289 chips):

* DEFLATE COG: a lossless re-encode of the decoded JP2: chips identical, bit for bit.
* JPEG COG, q85 YCbCr: a second lossy step on top of the JP2's (the extra loss of the conversion):
  mean absolute difference per chip 1.43 on average, 2.64 at worst; 99th percentile of |difference|
  in a chip 7 (median chip), 15 at worst; the valid fraction of a chip at the hole's edge moves by up
  to 0.11, no status changes. Bounds: per chip mean ≤ 4 and 99th percentile ≤ 20; over all chips,
  mean ≤ 2 (and ≥ 0.05: a conversion that silently stored DEFLATE would fail here), valid fraction
  within 0.15. The same as the JPEG sample's own distance to lossless tiles (``tests/test_formats.py``):
  the second encoding costs about what the first JPEG encoding does.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.shutil

from ops.crop.partition import crop_partition
from ops.crop.spec import ChipSpec
from ops.geo.footprints import iter_building_batches, write_buildings_geoparquet
from ops.imagery.convert import DIGEST_TAG, SOURCE_TAG, ConvertError, convert_tiles
from ops.imagery.mosaic import build_mosaic, find_tiles
from synthetic import SampleManifest, generate_departement
from tests.shardfiles import read_chips

pytestmark = pytest.mark.reliability

DEP, N, SEED, TILE_PX = "12", 300, 3, 500
#: (per-chip mean |Δ|, per-chip 99th percentile of |Δ|, mean over all chips) the JPEG COG may not exceed.
JPEG_TOLERANCE = (4.0, 20.0, 2.0)


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> SampleManifest:
    return generate_departement(tmp_path_factory.mktemp("convert"), DEP, N, SEED, tile_px=TILE_PX, imagery_format="jp2")


def _crop(tiles: list[str], buildings: Path, work: Path) -> tuple[dict[str, np.ndarray], dict[str, tuple[str, float]]]:
    """Chips (by building id) and (status, valid fraction) of every building, cut by the project's crop."""
    info = build_mosaic(tiles, work / "mosaic.vrt", name=work.name)
    out = work / "chips"
    list(crop_partition(buildings, info, out, ChipSpec(), buildings_fingerprint="f", workers=1, resume=False))
    return read_chips(out)


@pytest.mark.slow
def test_chips_from_the_cogs_equal_the_jp2_chips_within_tolerance_same_statuses(sample, tmp_path):
    buildings = tmp_path / "buildings.parquet"
    write_buildings_geoparquet(iter_building_batches(sample.footprints, DEP, sample.epsg), buildings, sample.epsg)
    jp2 = find_tiles(sample.ortho_dir)
    ref_chips, ref_status = _crop(jp2, buildings, tmp_path / "jp2")
    assert len(ref_status) == N and len(ref_chips) > 250
    assert {"ok", "nodata", "no_imagery"} <= {s for s, _ in ref_status.values()}  # the hole and the edges

    for compression in ("deflate", "jpeg"):
        seen: list[tuple[int, int]] = []
        done = convert_tiles(jp2, tmp_path / f"cog_{compression}", compression=compression,
                             progress=lambda k, n, _, seen=seen: seen.append((k, n)))  # fmt: skip
        assert seen == [(k, len(jp2)) for k in range(1, len(jp2) + 1)]
        assert [Path(c.source) for c in done] == [Path(t) for t in jp2] and not any(c.reused for c in done)
        cogs = find_tiles(tmp_path / f"cog_{compression}")
        assert [Path(c).name for c in cogs] == [Path(t).stem + ".tif" for t in jp2]  # nothing else left there
        for src, cog in zip(jp2, cogs, strict=True):
            with rasterio.open(src) as s, rasterio.open(cog) as d:
                assert (d.transform, d.crs, d.shape, d.count, d.dtypes, d.nodata) == (
                    s.transform, s.crs, s.shape, s.count, s.dtypes, s.nodata)  # fmt: skip
                tags = d.tags(ns="IMAGE_STRUCTURE")
                assert tags["LAYOUT"] == "COG" and d.block_shapes[0] == (256, 256) and d.overviews(1) == []
                assert d.tags()[SOURCE_TAG] == Path(src).name and d.tags()[DIGEST_TAG]
                if compression == "jpeg":
                    assert (tags["COMPRESSION"], tags["JPEG_QUALITY"]) == ("YCbCr JPEG", "85")
                else:
                    assert tags["COMPRESSION"] == "DEFLATE"
                    assert np.array_equal(d.read(), s.read())  # lossless re-encode of the decoded JP2

        chips, status = _crop(cogs, buildings, tmp_path / compression)
        assert status.keys() == ref_status.keys()
        moved = {b: (ref_status[b][0], status[b][0]) for b in ref_status if ref_status[b][0] != status[b][0]}
        assert moved == {}, f"{compression}: statuses differ from the JP2's"
        assert chips.keys() == ref_chips.keys()
        near = [abs(status[b][1] - v) for b, (_, v) in ref_status.items() if v == v]  # lossy pixels at the hole
        assert max(near) < (0.15 if compression == "jpeg" else 1e-9), compression
        diff = {b: np.abs(chips[b] - ref_chips[b]) for b in ref_chips}
        if compression == "deflate":
            assert max(int(d.max()) for d in diff.values()) == 0
            continue
        mad = {b: float(d.mean()) for b, d in diff.items()}
        p99 = {b: float(np.percentile(d, 99)) for b, d in diff.items()}
        max_mad, max_p99, max_mean = JPEG_TOLERANCE
        assert max(mad.values()) <= max_mad, (max(mad, key=mad.get), max(mad.values()))
        assert max(p99.values()) <= max_p99, (max(p99, key=p99.get), max(p99.values()))
        assert 0.05 <= np.mean(list(mad.values())) <= max_mean, np.mean(list(mad.values()))


def _rewrite_inverted(path: Path) -> None:
    """A new vintage of a tile: same grid and name, other pixels (255 - the old ones), written as lossy JP2."""
    with rasterio.open(path) as s:
        profile = {**s.profile, "driver": "GTiff", "tiled": False}
        pixels = 255 - s.read()
    mem = f"/vsimem/{path.stem}.tif"
    with rasterio.open(mem, "w", **profile) as m:
        m.write(pixels)
    tmp = path.with_name(path.name + ".tmp")
    rasterio.shutil.copy(mem, str(tmp), driver="JP2OpenJPEG", CODEC="JP2", QUALITY="20", REVERSIBLE="NO", YCC="YES")
    rasterio.shutil.delete(mem)
    os.replace(tmp, path)


def test_unchanged_tiles_are_reused_changed_ones_reconverted_vanished_ones_removed(sample, tmp_path):
    src = tmp_path / "ortho"
    src.mkdir()
    for p in find_tiles(sample.ortho_dir)[:4]:
        shutil.copy2(p, src / Path(p).name)
    tiles = find_tiles(src)
    out = tmp_path / "cog"
    first = convert_tiles(tiles, out)
    stamps = {c.path: c.path.stat().st_mtime_ns for c in first}
    foreign = out / "someone-else.tif"  # a GeoTIFF that is not ours: never deleted
    with rasterio.open(foreign, "w", driver="GTiff", width=8, height=8, count=1, dtype="uint8",
                       crs="EPSG:2154", transform=rasterio.Affine(0.2, 0, 0, 0, -0.2, 0)) as f:  # fmt: skip
        f.write(np.zeros((1, 8, 8), dtype="uint8"))
    stamps_foreign = foreign.stat().st_mtime_ns

    again = convert_tiles(tiles, out)
    assert all(c.reused for c in again)
    assert {c.path: c.path.stat().st_mtime_ns for c in again} == stamps  # not rewritten

    changed = Path(tiles[1])
    with rasterio.open(first[1].path) as d:
        before = d.read().astype(np.int16)
    _rewrite_inverted(changed)
    gone = Path(tiles[3])
    gone.unlink()
    third = convert_tiles(find_tiles(src), out)
    assert [c.reused for c in third] == [True, False, True]
    assert third[1].path.stat().st_mtime_ns != stamps[third[1].path]
    assert {c.path: c.path.stat().st_mtime_ns for c in third if c.reused} == {
        p: s for p, s in stamps.items() if p in (third[0].path, third[2].path)
    }
    with rasterio.open(third[1].path) as d, rasterio.open(changed) as s:
        after, new = d.read().astype(np.int16), s.read().astype(np.int16)
    assert np.abs(after - new).mean() < 3 < np.abs(after - before).mean()  # the new vintage's pixels
    assert not (out / (gone.stem + ".tif")).exists()
    assert foreign.exists() and foreign.stat().st_mtime_ns == stamps_foreign
    assert sorted(p.name for p in out.iterdir()) == sorted([*(c.path.name for c in third), foreign.name])

    deflated = convert_tiles(find_tiles(src), out, compression="deflate")  # other settings: converted again
    assert not any(c.reused for c in deflated)


def test_a_corrupt_tile_fails_naming_it_and_leaves_nothing_behind(sample, tmp_path):
    src = tmp_path / "ortho"
    src.mkdir()
    good, bad = (Path(p) for p in find_tiles(sample.ortho_dir)[:2])
    shutil.copy2(good, src / good.name)
    data = bad.read_bytes()
    (src / bad.name).write_bytes(data[: len(data) // 2])  # cut short: an interrupted download
    out = tmp_path / "cog"
    with pytest.raises(ConvertError, match=bad.name):
        convert_tiles(find_tiles(src), out)
    assert sorted(p.name for p in out.iterdir()) == [good.stem + ".tif"]  # the good one done, no temporary left

    (src / bad.name).write_text("not an image")
    with pytest.raises(ConvertError, match=f"{bad.name}: cannot be opened"):
        convert_tiles(find_tiles(src), out)
    with pytest.raises(ConvertError, match="missing.jp2"):
        convert_tiles([str(src / "missing.jp2")], out)
    with pytest.raises(ValueError, match="compression must be 'jpeg' or 'deflate'"):
        convert_tiles(find_tiles(src), out, compression="png")  # type: ignore[arg-type]


@pytest.mark.slow
def test_the_monthly_run_converts_once_and_the_next_month_reuses_the_cogs(sample, tmp_path, monkeypatch):
    """`ortho_mosaic` with the monthly schedule's config: the JP2 tiles become COGs once, the mosaic is over them."""
    from dagster import DagsterInstance, materialize

    from orchestration.definitions import all_assets
    from orchestration.environment import local_resources
    from orchestration.schedules import MONTHLY

    monkeypatch.setenv("BATIVISION_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("BATIVISION_SOURCE_DIR", str(sample.root.parent))
    resources = local_resources()

    def month() -> tuple[dict, dict]:
        r = materialize(all_assets, selection=["ortho_mosaic"], partition_key=DEP, resources=resources,
                        instance=DagsterInstance.ephemeral(), run_config=MONTHLY)  # fmt: skip
        assert r.success
        md = r.asset_materializations_for_node("ortho_mosaic")[0].metadata
        info = (tmp_path / "store" / "mosaic" / DEP / "mosaic.json").read_text()
        return md, json.loads(info)

    jp2 = sorted(p.name for p in sample.ortho_dir.glob("*.jp2"))
    first, info = month()
    cogs = tmp_path / "store" / "mosaic" / DEP / "cog"
    assert sorted(Path(t["path"]).name for t in info["tiles"]) == sorted(n.replace(".jp2", ".tif") for n in jp2)
    assert all(Path(t["path"]).parent == cogs for t in info["tiles"])
    assert first["tiles_converted"].value == f"{len(jp2)} JPEG 2000 → jpeg COG"
    mtimes = {p.name: p.stat().st_mtime_ns for p in cogs.glob("*.tif")}
    second, info2 = month()
    assert {p.name: p.stat().st_mtime_ns for p in cogs.glob("*.tif")} == mtimes  # reused, not rewritten
    assert info2["imagery_id"] == info["imagery_id"]  # so the chips of last month are reused too
