"""The crop's block decoder gives GDAL's pixels, block by block, on every layout it meets.

The direct path (DEFLATE or uncompressed, 8-bit, pixel-interleaved) must be
taken where it applies (it is where the crop's speed comes from) and must
agree with GDAL exactly, edge blocks and short last strips included; every
other layout goes through GDAL and must say why.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window

from ops.imagery.blocks import BlockReader
from tests.realdata import IGN_ORTHO, SPACENET_TIF


def _texture(bands: int, h: int, w: int, dtype: str = "uint8") -> np.ndarray:
    rng = np.random.default_rng(7)
    ramp = (np.arange(w)[None, :] * 3 + np.arange(h)[:, None] * 5) % 251
    return (ramp[None] + rng.integers(0, 5, (bands, h, w))).astype(dtype)


def _write(path: Path, bands: int = 3, h: int = 300, w: int = 410, dtype: str = "uint8", **profile) -> Path:
    with rasterio.open(
        path, "w", driver="GTiff", width=w, height=h, count=bands, dtype=dtype, crs="EPSG:2154",
        transform=from_origin(700_000, 6_600_000, 0.2, 0.2), **profile,
    ) as dst:  # fmt: skip
        dst.write(_texture(bands, h, w, dtype))
    return path


def _assert_same_as_gdal(path: Path) -> BlockReader:
    r = BlockReader(str(path))
    bh, bw = r.block
    with rasterio.open(path) as ds:
        for br in range(-(-ds.height // bh)):
            for bc in range(-(-ds.width // bw)):
                ref = ds.read(
                    window=Window(bc * bw, br * bh, min(bw, ds.width - bc * bw), min(bh, ds.height - br * bh))
                )
                np.testing.assert_array_equal(r.read(br, bc), ref.transpose(1, 2, 0), err_msg=f"{path.name} {br},{bc}")
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
        ("jpeg", dict(tiled=True, blockxsize=64, blockysize=64, compress="jpeg"), "compression JPEG"),
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
