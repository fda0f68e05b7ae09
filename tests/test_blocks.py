"""The crop's block decoder gives GDAL's pixels, block by block, on every layout it meets.

The direct paths (DEFLATE or uncompressed GeoTIFF; JPEG GeoTIFF and JPEG COG; JPEG 2000) must be
taken where they apply (it is where the crop's speed comes from) and must agree with GDAL, edge
blocks and short last strips included: exactly, except for YCbCr JPEG, whose chroma upsampling the
JPEG standard leaves to the decoder (libjpeg-turbo here, IJG libjpeg 9 in rasterio's GDAL): there
ours must be as faithful to the source pixels as GDAL's and differ from GDAL's by much less than the
compression's own error. Every other layout goes through GDAL and must say why; a damaged block
raises naming the file and the block.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.shutil
from rasterio.io import MemoryFile
from rasterio.transform import from_origin
from rasterio.windows import Window

from ops.imagery.blocks import BlockReader, BlockReadError, block_range
from tests.realdata import IGN_ORTHO, SPACENET_TIF


def _texture(bands: int, h: int, w: int, dtype: str = "uint8") -> np.ndarray:
    rng = np.random.default_rng(7)
    ramp = (np.arange(w)[None, :] * 3 + np.arange(h)[:, None] * 5) % 251
    return (ramp[None] + rng.integers(0, 5, (bands, h, w))).astype(dtype)


def _photo(bands: int, h: int, w: int) -> np.ndarray:
    """An orthophoto-like picture: smooth ground, sharp-edged roofs of saturated colours, sensor noise."""
    rng = np.random.default_rng(11)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([90 + 60 * np.sin(x / 37 + k) * np.cos(y / 53 - k) for k in range(bands)])
    for _ in range(h * w // 900):
        r0, c0, rh, rw = rng.integers(0, h), rng.integers(0, w), rng.integers(4, 30), rng.integers(4, 30)
        img[:, r0 : r0 + rh, c0 : c0 + rw] = rng.integers(20, 240, (bands, 1, 1))
    return np.clip(img + rng.normal(0, 4, img.shape), 1, 255).astype("uint8")


_PROFILE = dict(crs="EPSG:2154", transform=from_origin(700_000, 6_600_000, 0.2, 0.2))


def _write(path: Path, bands: int = 3, h: int = 300, w: int = 410, dtype: str = "uint8", **profile) -> Path:
    with rasterio.open(
        path, "w", driver="GTiff", width=w, height=h, count=bands, dtype=dtype, **_PROFILE, **profile
    ) as dst:
        dst.write(_texture(bands, h, w, dtype))
    return path


def _copy(path: Path, driver: str, pixels: np.ndarray, **options) -> Path:
    """``pixels`` (bands, h, w) written by ``driver``, which only copies a whole raster (JPEG 2000, COG)."""
    bands, h, w = pixels.shape
    with MemoryFile() as mem:
        with mem.open(driver="GTiff", width=w, height=h, count=bands, dtype="uint8", **_PROFILE) as ds:
            ds.write(pixels)
        with mem.open() as src:
            rasterio.shutil.copy(src, path, driver=driver, **options)
    return path


def _gdal_blocks(path: Path, block: tuple[int, int]):
    """((br, bc), GDAL's windowed read of that block, bands last) for every block of ``path``."""
    bh, bw = block
    with rasterio.open(path) as ds:
        for br in range(-(-ds.height // bh)):
            for bc in range(-(-ds.width // bw)):
                ref = ds.read(
                    window=Window(bc * bw, br * bh, min(bw, ds.width - bc * bw), min(bh, ds.height - br * bh))
                )
                yield (br, bc), ref.transpose(1, 2, 0)


def _assert_same_as_gdal(path: Path, threads: int = 1) -> BlockReader:
    r = BlockReader(str(path), threads)
    for (br, bc), ref in _gdal_blocks(path, r.block):
        np.testing.assert_array_equal(r.read(br, bc), ref, err_msg=f"{path.name} {br},{bc}")
    r.close()
    return r


FAST = {
    "deflate_predictor2_tiled": dict(tiled=True, blockxsize=128, blockysize=64, compress="deflate", predictor=2),
    "deflate_tiled": dict(tiled=True, blockxsize=64, blockysize=64, compress="deflate"),
    "raw_tiled": dict(tiled=True, blockxsize=64, blockysize=128),
    "deflate_predictor2_strips": dict(compress="deflate", predictor=2, blockysize=7),  # 300 rows: a short last strip
    "raw_strips": dict(blockysize=11),
    "one_band_deflate": dict(bands=1, tiled=True, blockxsize=64, blockysize=64, compress="deflate", predictor=2),
    "four_bands_deflate": dict(bands=4, tiled=True, blockxsize=64, blockysize=64, compress="deflate"),
}


@pytest.mark.parametrize("name", FAST)
def test_direct_decoding_equals_gdal(tmp_path, name):
    opts = dict(FAST[name])
    bands = opts.pop("bands", 3)
    r = _assert_same_as_gdal(_write(tmp_path / f"{name}.tif", bands=bands, **opts))
    assert r.refusal is None and r.fallbacks == 0  # every block went the direct way


@pytest.mark.parametrize(
    ("name", "opts", "why"),
    [
        ("lzw", dict(tiled=True, blockxsize=64, blockysize=64, compress="lzw"), "compression LZW"),
        ("band_interleaved", dict(tiled=True, blockxsize=64, blockysize=64, interleave="band"), "interleave BAND"),
        ("uint16", dict(dtype="uint16", tiled=True, blockxsize=64, blockysize=64, compress="deflate"), "dtype uint16"),
    ],
)
def test_other_layouts_go_through_gdal_and_say_why(tmp_path, name, opts, why):
    r = _assert_same_as_gdal(_write(tmp_path / f"{name}.tif", **opts))
    assert r.refusal == why


def test_sparse_blocks_are_filled_by_gdal(tmp_path):
    path = tmp_path / "sparse.tif"
    with rasterio.open(
        path, "w", driver="GTiff", width=256, height=256, count=3, dtype="uint8", nodata=0, tiled=True, crs="EPSG:2154",
        transform=from_origin(700_000, 6_600_000, 0.2, 0.2),
        blockxsize=64, blockysize=64, compress="deflate", sparse_ok=True,
    ) as dst:  # fmt: skip
        dst.write(_texture(3, 64, 64), window=Window(64, 64, 64, 64))  # one block of sixteen written
    r = _assert_same_as_gdal(path)
    assert r.refusal is None and r.fallbacks == 15


def test_real_files_decode_like_gdal():
    """IGN's uncompressed RGB strips take the direct path; SpaceNet's 16-bit band-interleaved raster does not."""
    assert _assert_same_as_gdal(IGN_ORTHO).refusal is None
    assert _assert_same_as_gdal(SPACENET_TIF).refusal == "dtype uint16"


# --- JPEG: libjpeg-turbo on the tile's bytes ------------------------------------------------------------------------

JPEG_EXACT = {
    "jpeg_rgb_tiled": dict(tiled=True, blockxsize=64, blockysize=64, compress="jpeg", photometric="rgb"),
    "jpeg_grey_tiled": dict(bands=1, tiled=True, blockxsize=64, blockysize=64, compress="jpeg"),
    "jpeg_rgb_strips": dict(compress="jpeg", photometric="rgb", blockysize=16),  # 300 rows: a short last strip
}


@pytest.mark.parametrize("name", JPEG_EXACT)
def test_rgb_and_grey_jpeg_are_decoded_by_libjpeg_turbo_exactly_like_gdal(tmp_path, name):
    """Without subsampled chroma, libjpeg-turbo and GDAL's libjpeg 9 compute the same integer inverse DCT."""
    opts = dict(JPEG_EXACT[name])
    bands = opts.pop("bands", 3)
    r = _assert_same_as_gdal(_write(tmp_path / f"{name}.tif", bands=bands, **opts))
    assert r.decoder == "libjpeg-turbo" and r.refusal is None and r.fallbacks == 0


YCBCR = {
    "ycbcr_tiled": ("GTiff", dict(COMPRESS="JPEG", PHOTOMETRIC="YCBCR", TILED="YES", BLOCKXSIZE="64", BLOCKYSIZE="64")),
    "ycbcr_strips": ("GTiff", dict(COMPRESS="JPEG", PHOTOMETRIC="YCBCR", BLOCKYSIZE="16")),
    "cog_q85": ("COG", dict(COMPRESS="JPEG", QUALITY="85", BLOCKSIZE="128")),  # as synthetic.writers writes them
}


@pytest.mark.parametrize("name", YCBCR)
def test_ycbcr_jpeg_is_decoded_by_libjpeg_turbo_as_faithfully_as_gdal(tmp_path, name):
    """YCbCr JPEG (GDAL's default, chroma at half resolution) is the one case where GDAL's pixels are not ours.

    GDAL's libjpeg 9 brings the chroma back to full resolution by a scaled inverse DCT, libjpeg-turbo
    by a triangle filter; the JPEG standard leaves that step to the decoder. On this noisy picture the
    two differ by 1.6-1.9 grey levels on average (about 80 % of samples within 2, more at sharp colour
    edges), while JPEG itself is off the source by about 6; on the synthetic orthophotos, 0.22 against
    1.56 (99 % within 2). Bounds: ours is no further from the source than GDAL's (2 % slack), the two
    differ by at most 40 % of GDAL's own error, and by at most 1 grey level for half the samples.
    """
    driver, options = YCBCR[name]
    src = _photo(3, 300, 410)
    path = _copy(tmp_path / f"{name}.tif", driver, src, **options)
    r = BlockReader(str(path))
    bh, bw = r.block
    truth = src.transpose(1, 2, 0).astype(np.int16)
    ours, gdal = np.zeros_like(truth), np.zeros_like(truth)
    for (br, bc), ref in _gdal_blocks(path, r.block):
        blk = r.read(br, bc)
        assert blk.shape == ref.shape, (br, bc)  # edge blocks clipped like GDAL's
        ours[br * bh : br * bh + blk.shape[0], bc * bw : bc * bw + blk.shape[1]] = blk
        gdal[br * bh : br * bh + ref.shape[0], bc * bw : bc * bw + ref.shape[1]] = ref
    assert r.decoder == "libjpeg-turbo" and r.fallbacks == 0
    err_ours, err_gdal = np.abs(ours - truth).mean(), np.abs(gdal - truth).mean()
    between = np.abs(ours - gdal)
    assert err_ours <= 1.02 * err_gdal
    assert between.mean() <= 0.4 * err_gdal
    assert np.median(between) <= 1


def test_a_damaged_jpeg_block_raises_naming_the_file_and_the_block(tmp_path):
    """A tile damaged mid-stream (GDAL's libjpeg only warns about it, and hands out what it decoded)."""
    path = _copy(
        tmp_path / "damaged.tif", "GTiff", _photo(3, 300, 410),
        COMPRESS="JPEG", PHOTOMETRIC="YCBCR", TILED="YES", BLOCKXSIZE="64", BLOCKYSIZE="64",
    )  # fmt: skip
    with rasterio.open(path) as ds:
        offset, size = block_range(ds, 1, 2)
    data = bytearray(path.read_bytes())
    data[offset + size // 2 : offset + size // 2 + 8] = b"\xff\x9e" * 4  # a marker no JPEG stream may hold
    path.write_bytes(bytes(data))
    r = BlockReader(str(path))
    with pytest.raises(BlockReadError, match=re.escape(f"{path}: block (1, 2): corrupt JPEG data")):
        r.read(1, 2)
    assert r.read(1, 1).shape == (64, 64, 3)  # its neighbours still read


# --- JPEG 2000: OpenJPEG on one codestream tile at a time ----------------------------------------------------------

JP2_LIKE_BD_ORTHO = dict(CODEC="JP2", QUALITY="20", REVERSIBLE="NO", YCC="YES", BLOCKXSIZE="128", BLOCKYSIZE="128")
JP2 = {
    "bd_ortho_like": dict(JP2_LIKE_BD_ORTHO),  # synthetic.writers.JP2_OPTIONS on 128 px tiles: edge tiles of 26 × 44 px
    "one_band": dict(bands=1, CODEC="JP2", QUALITY="20", BLOCKXSIZE="128", BLOCKYSIZE="96"),
    "lossless_bare_codestream_one_tile": dict(CODEC="J2K", REVERSIBLE="YES"),  # .j2k, the whole image one tile
    "tile_index_and_rpcl": dict(JP2_LIKE_BD_ORTHO, TLM="YES", PLT="YES", PROGRESSION="RPCL", RESOLUTIONS="2"),
}


def _jp2(path: Path, bands: int = 3, **options) -> Path:
    return _copy(
        path.with_suffix(".j2k" if options["CODEC"] == "J2K" else ".jp2"),
        "JP2OpenJPEG",
        _photo(bands, 300, 410),
        **options,
    )


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name", JP2)
def test_jpeg2000_tiles_are_decoded_by_openjpeg_exactly_like_gdal(tmp_path, name, threads):
    r = _assert_same_as_gdal(_jp2(tmp_path / name, **JP2[name]), threads)
    assert r.decoder == "openjpeg" and r.refusal is None and r.fallbacks == 0


def test_a_jpeg2000_with_channel_definitions_goes_through_gdal_and_says_why(tmp_path):
    """An alpha band (a ``cdef`` box): GDAL decides which component is which band."""
    r = _assert_same_as_gdal(_jp2(tmp_path / "alpha", bands=4, CODEC="JP2", QUALITY="20", ALPHA="YES"))
    assert r.decoder == "gdal" and r.refusal == "JPEG 2000 palette or channel definitions"


def _tile_parts(data: bytes) -> dict[int, tuple[int, int]]:
    """{tile: (offset, length)} of each SOT marker segment (FF90 cannot occur inside coded data)."""
    out, pos = {}, data.find(b"\xff\x90\x00\x0a")
    while pos >= 0:
        out[int.from_bytes(data[pos + 4 : pos + 6], "big")] = (pos, int.from_bytes(data[pos + 6 : pos + 10], "big"))
        pos = data.find(b"\xff\x90\x00\x0a", pos + 1)
    return out


def test_a_damaged_or_cut_jpeg2000_raises_naming_the_file_and_the_block(tmp_path):
    """Tile k is block (k // 4, k % 4): 410 px wide in 128 px tiles makes 4 tiles a row."""
    path = _jp2(tmp_path / "good", **JP2_LIKE_BD_ORTHO)
    data = path.read_bytes()
    parts = _tile_parts(data)
    damaged = tmp_path / "damaged.jp2"  # tile 4's tile-part header gives a wrong length: the tiles after it are lost
    pos, length = parts[4]
    damaged.write_bytes(data[: pos + 6] + (length + 1000).to_bytes(4, "big") + data[pos + 10 :])
    cut = tmp_path / "cut.jp2"  # the file ends inside tile 5
    pos, length = parts[5]
    cut.write_bytes(data[: pos + length // 2])
    for bad, why, whole in ((damaged, "not in the JPEG 2000 codestream", (0, 3)), (cut, "the file ends at", (1, 0))):
        r = BlockReader(str(bad))
        assert r.decoder == "openjpeg"
        with pytest.raises(BlockReadError, match=re.escape(f"{bad}: block (1, 1)") + f".*{why}"):
            r.read(1, 1)
        with pytest.raises(BlockReadError, match=re.escape(f"{bad}: block (1, 1)") + f".*{why}"):
            r.read(1, 1, [(0, 8, 0, 8)])  # decoded by areas: the same error
        with rasterio.open(path) as ds:  # a tile before the damage is whole
            ref = ds.read(window=Window(whole[1] * 128, whole[0] * 128, 128, 128)).transpose(1, 2, 0)
        np.testing.assert_array_equal(r.read(*whole), ref)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name", JP2)
def test_jpeg2000_areas_decoded_alone_are_the_whole_blocks_pixels(tmp_path, name, threads):
    """What the crop decodes of a block few windows touch: random areas, and a one-pixel edge column."""
    path = _jp2(tmp_path / name, **JP2[name])
    r = BlockReader(str(path), threads)
    assert r.decodes_areas
    rng = np.random.default_rng(3)
    for (br, bc), ref in _gdal_blocks(path, r.block):
        h, w = ref.shape[:2]
        areas = [(0, h, w - 1, w)]
        for _ in range(4):
            r0, c0 = int(rng.integers(0, h)), int(rng.integers(0, w))
            areas.append((r0, int(rng.integers(r0 + 1, h + 1)), c0, int(rng.integers(c0 + 1, w + 1))))
        got = r.read(br, bc, areas)
        for a0, a1, b0, b1 in areas:
            np.testing.assert_array_equal(got[a0:a1, b0:b1], ref[a0:a1, b0:b1], err_msg=f"{name} {br},{bc}")
    r.close()


def test_areas_are_merged_where_cheaper_and_a_busy_block_is_decoded_whole():
    from ops.imagery.openjpeg import AREA_BUDGET, MAX_AREAS, area_cost, covers, plan_areas

    one = [(100, 180, 200, 280)]
    assert plan_areas(one, 1024, 1024) == one
    near = [(100, 180, 200, 280), (120, 200, 230, 300)]  # overlapping windows: one box is cheaper than two
    assert plan_areas(near, 1024, 1024) == [(100, 200, 200, 300)]
    far = [(0, 64, 0, 64), (900, 964, 900, 964)]  # a box over the whole tile would cost more than both
    assert sorted(plan_areas(far, 1024, 1024)) == far
    rng = np.random.default_rng(5)
    for n in (3, 8, 12):
        areas = []
        for _ in range(n):
            r0, c0 = (int(v) for v in rng.integers(0, 960, 2))
            areas.append((r0, r0 + 64, c0, c0 + 64))
        planned = plan_areas(areas, 1024, 1024)
        if planned is not None:  # whatever was merged still covers every window, within the budget
            assert all(covers(planned, a) for a in areas)
            assert sum(area_cost(a, 1024 * 1024) for a in planned) < AREA_BUDGET
    assert plan_areas([(k, k + 8, 0, 8) for k in range(0, 8 * (MAX_AREAS + 1), 8)], 1024, 1024) is None
    assert plan_areas([(0, 1000, 0, 1000)], 1024, 1024) is None  # nearly the whole tile: decoded whole
