"""Decoding one raster block at a time, bands last: the crop's innermost step.

The crop decodes every block its chips touch exactly once, so the cost of a
block read *is* the cost of the step. For the three formats orthophotos come
in, the block is decoded here from its own bytes, with the fastest decoder we
have, rather than through a GDAL windowed read:

- **DEFLATE or uncompressed GeoTIFF** (8-bit, pixel-interleaved, predictor 1
  or 2): the block's byte range comes from GDAL's own block table, libdeflate
  inflates it, and the predictor is undone with one vectorised cumulative sum.
  That skips GDAL's block cache (a second copy of every block) and its
  pixel-to-band deinterleaving, and leaves the block pixel-interleaved, which
  is the layout torch's fastest uint8 resampling kernel wants (see
  ``ops.imagery.resample``): about 7 % less time per block than GDAL.
- **JPEG-compressed GeoTIFF** (a JPEG COG): the tile's JPEG stream, with the
  file's shared tables (TIFF tag JPEGTables), decoded by libjpeg-turbo
  (``imagecodecs``): about 4x a GDAL windowed read, because the GDAL of
  rasterio's wheels is built on IJG libjpeg 9, which has no SIMD. Same pixels
  as GDAL for RGB and grey JPEG. For YCbCr JPEG with subsampled chroma (what
  GDAL writes by default) the two libraries upsample the chroma differently:
  libjpeg 9 by scaled inverse DCT, libjpeg-turbo by a triangle filter; the
  JPEG standard leaves that step to the decoder, so "GDAL's pixels" depend on
  the libjpeg GDAL was built with. Measured on three synthetic 5,000 px JPEG
  COG tiles (q85): 87 % of samples identical, 99 % within 2 grey levels,
  99.96 % within 8, at most 43 (at sharp colour edges); mean |difference| 0.22;
  libjpeg-turbo's is the closer to the lossless source (mean |error| 1.51 vs
  1.56). tests/test_blocks.py holds it to those bounds.
- **JPEG 2000** (JP2 or raw codestream, as IGN's BD ORTHO): GDAL's block is
  one codestream tile; its tile-parts are copied behind the main header into a
  one-tile codestream (the SIZ marker narrowed to that tile, in the same
  coordinates, so every wavelet and code-block boundary is unchanged) and
  OpenJPEG (``imagecodecs``) decodes it with ``threads`` threads. Exactly
  GDAL's pixels; about 1.3x less CPU per block than GDAL's JP2OpenJPEG driver,
  plus OpenJPEG's threads (the crop gives each worker its share of the CPUs,
  and a worker with several decodes blocks ahead, several at once, through
  :meth:`BlockReader.decode_direct`, which touches no GDAL object).
  A block that few chip windows touch can instead be decoded by *areas*, each
  from its own code-blocks only (``ops.imagery.openjpeg``; same pixels): about
  a tenth of the tile's cost per small area instead of the whole.

Anything else (LZW, ZSTD, 16-bit, band-interleaved, sparse blocks, remote
paths, VRT, a JPEG 2000 whose blocks are not its tiles, a palette...) is read
through GDAL and transposed; :attr:`BlockReader.refusal` says why. A block
whose bytes the direct decoder rejects raises :class:`BlockReadError` naming
the file and the block: GDAL would return garbage for some of them (a JPEG
tile damaged mid-stream decodes with a warning only).
"""

from __future__ import annotations

import os
import struct
import warnings

import deflate
import imagecodecs
import numpy as np
import rasterio
import rasterio.errors
import torch
from rasterio.windows import Window

from ops.imagery import openjpeg

_FAST_COMPRESSIONS = {None, "NONE", "DEFLATE", "ZIP"}
_JPEG_COMPRESSIONS = {"JPEG", "YCbCr JPEG"}
#: (row0, row1, col0, col1) of a block, in its own pixels: an area of it to decode
Area = tuple[int, int, int, int]
# the inflated block is an immutable bytes object that torch only reads (cumsum writes a new tensor)
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


class BlockReadError(OSError):
    """A block that could not be read or decoded; the message names the file and the block."""


class _Refused(Exception):
    """What the file's own bytes say against the direct path (its message is the refusal)."""


def block_range(ds: rasterio.io.DatasetReader, br: int, bc: int, band: int = 1) -> tuple[int, int]:
    """(offset, length) in the file of block (``br``, ``bc``) of ``band``, from GDAL's block table; (0, 0) if empty.

    The crop reads blocks here directly and the prefetch fetches them by these ranges.
    """
    offset = ds.get_tag_item(f"BLOCK_OFFSET_{bc}_{br}", "TIFF", bidx=band)
    size = ds.get_tag_item(f"BLOCK_SIZE_{bc}_{br}", "TIFF", bidx=band)
    return (int(offset), int(size)) if offset and size else (0, 0)


def fast_path_refusal(ds: rasterio.io.DatasetReader, tags: dict[str, str]) -> str | None:
    """Why this dataset's blocks can't be decoded directly (None when they may); ``tags``: its IMAGE_STRUCTURE.

    What only the file's bytes tell (a JPEG's TIFF tags, a JPEG 2000's tiling) is checked by
    :class:`BlockReader` when it opens the file, and may still refuse.
    """
    checks = [
        (ds.driver in ("GTiff", "JP2OpenJPEG"), f"driver {ds.driver}"),
        (os.path.isfile(ds.name), "not a local file"),
        (all(d == "uint8" for d in ds.dtypes), f"dtype {ds.dtypes[0]}"),
        (len(set(ds.block_shapes)) == 1, "bands with different block shapes"),
    ]
    if ds.driver == "GTiff":
        checks += [
            ("NBITS" not in tags, f"NBITS={tags.get('NBITS')}"),
            (
                tags.get("COMPRESSION") in _FAST_COMPRESSIONS | _JPEG_COMPRESSIONS,
                f"compression {tags.get('COMPRESSION')}",
            ),
            (tags.get("PREDICTOR", "1") in {"1", "2"}, f"predictor {tags.get('PREDICTOR')}"),
            (ds.count == 1 or tags.get("INTERLEAVE") == "PIXEL", f"interleave {tags.get('INTERLEAVE')}"),
        ]
    return next((why for ok, why in checks if not ok), None)


def _pread(fd: int, size: int, offset: int, where: str) -> bytes:
    """``size`` bytes at ``offset``; a short read (a file cut short) or an I/O error raises naming ``where``."""
    try:
        raw = os.pread(fd, size, offset)
    except OSError as exc:  # name the culprit: the bare errno says nothing of which tile or block
        raise BlockReadError(f"{where}, bytes {offset}+{size}: {exc}") from exc
    if len(raw) < size:
        raise BlockReadError(f"{where}, bytes {offset}+{size}: the file ends at {offset + len(raw)} (truncated?)")
    return raw


class _TiffBlocks:
    """Uncompressed or DEFLATE blocks of a GeoTIFF (see module doc)."""

    name = "libdeflate"

    def __init__(self, ds: rasterio.io.DatasetReader, tags: dict[str, str], fd: int) -> None:
        self.ds, self.fd = ds, fd
        self.block = ds.block_shapes[0]
        self.deflate = tags.get("COMPRESSION") in {"DEFLATE", "ZIP"}
        self.predictor = tags.get("PREDICTOR", "1") == "2"
        self.name = "libdeflate" if self.deflate else "raw"

    def decode(self, br: int, bc: int, h: int, w: int, where: str) -> np.ndarray | None:
        offset, size = block_range(self.ds, br, bc)
        if not size:  # a sparse block: GDAL knows what to fill it with
            return None
        raw = _pread(self.fd, size, offset, where)
        bands = self.ds.count
        # a tile is stored whole (padding included), a strip has the raster's width and may be cut short
        row_bytes = self.block[1] * bands
        if self.deflate:
            try:
                raw = deflate.zlib_decompress(raw, self.block[0] * row_bytes)
            except deflate.DeflateError:
                return None
        if len(raw) < h * row_bytes or len(raw) % row_bytes:
            return None
        stored = np.frombuffer(raw, dtype=np.uint8).reshape(-1, row_bytes // bands, bands)
        if self.predictor:  # horizontal differencing: each sample is stored minus its left neighbour's
            stored = torch.cumsum(torch.from_numpy(stored[:h]), dim=1, dtype=torch.uint8).numpy()
        return stored[:h, :w]


def _first_ifd(fd: int, wanted: set[int]) -> dict[int, int | bytes]:
    """The ``wanted`` tags of a TIFF's first IFD (the full-resolution image): one value as int, else the raw bytes.

    GDAL does not expose JPEGTables, hence this reader of the few tags the JPEG path needs.
    """
    head = os.pread(fd, 16, 0)
    bo = {b"II": "<", b"MM": ">"}.get(head[:2])
    version = struct.unpack(bo + "H", head[2:4])[0] if bo and len(head) == 16 else None
    if version == 42:
        ifd, n_fmt, entry_fmt, inline, off_fmt = struct.unpack(bo + "I", head[4:8])[0], "H", "HHI4s", 4, "I"
    elif version == 43:  # BigTIFF
        ifd, n_fmt, entry_fmt, inline, off_fmt = struct.unpack(bo + "Q", head[8:16])[0], "Q", "HHQ8s", 8, "Q"
    else:
        raise _Refused("not a TIFF header")
    n_size, e_size = struct.calcsize(bo + n_fmt), struct.calcsize(bo + entry_fmt)
    (n,) = struct.unpack(bo + n_fmt, os.pread(fd, n_size, ifd))
    table = os.pread(fd, n * e_size, ifd + n_size)
    scalar = {3: "H", 4: "I", 16: "Q"}  # SHORT, LONG, LONG8
    width = {1: 1, 2: 1, 7: 1, 3: 2, 4: 4, 16: 8}  # bytes per value: BYTE, ASCII, UNDEFINED, SHORT, LONG, LONG8
    out: dict[int, int | bytes] = {}
    for k in range(len(table) // e_size):
        tag, typ, count, val = struct.unpack_from(bo + entry_fmt, table, k * e_size)
        if tag not in wanted or typ not in width:
            continue
        nbytes = count * width[typ]
        val = os.pread(fd, nbytes, struct.unpack(bo + off_fmt, val)[0]) if nbytes > inline else val[:nbytes]
        out[tag] = struct.unpack(bo + scalar[typ], val)[0] if count == 1 and typ in scalar else val
    return out


class _JpegBlocks:
    """JPEG-compressed blocks of a GeoTIFF, decoded by libjpeg-turbo with the file's shared tables (see module doc)."""

    name = "libjpeg-turbo"

    def __init__(self, ds: rasterio.io.DatasetReader, tags: dict[str, str], fd: int) -> None:
        self.ds, self.fd = ds, fd
        ifd = _first_ifd(fd, {256, 257, 259, 262, 347})  # width, length, compression, photometric, JPEGTables
        if (ifd.get(256), ifd.get(257)) != (ds.width, ds.height) or ifd.get(259) != 7:
            raise _Refused("the first IFD is not the image's JPEG")
        photometric, cs = ifd.get(262), imagecodecs.JPEG8.CS
        # GDAL converts YCbCr to RGB (and says "YCbCr JPEG") unless told not to: then it hands out YCbCr
        ycbcr = tags.get("COMPRESSION") == "YCbCr JPEG"
        if photometric == 6 and ycbcr and ds.count == 3:
            self.colorspace, self.out = cs.YCbCr, cs.RGB
        elif photometric == 2 and not ycbcr and ds.count == 3:
            self.colorspace, self.out = cs.RGB, cs.RGB
        elif photometric in (0, 1) and ds.count == 1:
            self.colorspace, self.out = cs.GRAYSCALE, cs.GRAYSCALE
        else:
            raise _Refused(f"JPEG with photometric {photometric} and {ds.count} bands")
        tables = ifd.get(347)
        self.tables = tables if isinstance(tables, bytes) and len(tables) > 4 else None

    def decode(self, br: int, bc: int, h: int, w: int, where: str) -> np.ndarray | None:
        offset, size = block_range(self.ds, br, bc)
        if not size:  # a sparse block: GDAL knows what to fill it with
            return None
        raw = _pread(self.fd, size, offset, where)
        try:
            arr = imagecodecs.jpeg8_decode(raw, tables=self.tables, colorspace=self.colorspace, outcolorspace=self.out)
        except imagecodecs.Jpeg8Error as exc:
            raise BlockReadError(f"{where}: corrupt JPEG data ({size} bytes at {offset}): {exc}") from exc
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if arr.shape[0] < h or arr.shape[1] < w or arr.shape[2] != self.ds.count:
            return None  # not stored as expected: GDAL reads it
        return arr[:h, :w]  # a tile is coded whole, padding included


def _boxes(fd: int, start: int, end: int) -> dict[bytes, tuple[int, int]]:
    """{box type: (content start, content end)} of the JPEG 2000 boxes between ``start`` and ``end`` (first of each)."""
    out: dict[bytes, tuple[int, int]] = {}
    pos = start
    while pos + 8 <= end:
        head = os.pread(fd, 16, pos)
        length, kind = struct.unpack(">I4s", head[:8])
        body = pos + 8
        if length == 1:
            length, body = struct.unpack(">Q", head[8:16])[0], pos + 16
        elif length == 0:  # to the end of the file
            length = end - pos
        if length < body - pos:
            raise _Refused("JPEG 2000 box of impossible length")
        out.setdefault(kind, (body, pos + length))
        pos += length
    return out


class _Jp2Blocks:
    """JPEG 2000 codestream tiles (GDAL's blocks), each decoded alone by OpenJPEG (see module doc)."""

    name = "openjpeg"

    def __init__(self, ds: rasterio.io.DatasetReader, fd: int, threads: int) -> None:
        self.ds, self.fd, self.threads = ds, fd, max(1, threads)
        self.count = ds.count  # read once here: decodes may run on other threads, which must not call GDAL
        size = os.fstat(fd).st_size
        if os.pread(fd, 4, 0) == b"\xff\x4f\xff\x51":  # a bare codestream
            start, end = 0, size
        else:
            top = _boxes(fd, 0, size)
            if b"jp2c" not in top:
                raise _Refused("no JPEG 2000 codestream box")
            start, end = top[b"jp2c"]
            header = _boxes(fd, *top[b"jp2h"]) if b"jp2h" in top else {}
            if b"pclr" in header or b"cdef" in header:  # a palette, or channels GDAL reorders or makes alpha
                raise _Refused("JPEG 2000 palette or channel definitions")
            colr = os.pread(fd, 7, header[b"colr"][0]) if b"colr" in header else b""
            if len(colr) < 7 or colr[0] != 1 or struct.unpack(">I", colr[3:7])[0] not in (16, 17):
                raise _Refused("JPEG 2000 colour space other than sRGB or grey")
        self._parse_main_header(start, end)
        self._index_tile_parts(end)

    def _parse_main_header(self, start: int, end: int) -> None:
        ds = self.ds
        buf = os.pread(self.fd, min(end - start, 1 << 16), start)
        if buf[:4] != b"\xff\x4f\xff\x51":
            raise _Refused("JPEG 2000 codestream without SOC and SIZ")
        pos, kept = 2, [b"\xff\x4f"]
        while True:
            if pos + 4 > len(buf):
                raise _Refused("JPEG 2000 main header longer than 64 KiB")
            marker, length = struct.unpack_from(">HH", buf, pos)
            if marker == 0xFF90:  # the first tile-part: the main header ends
                break
            if marker == 0xFF60:  # PPM: every tile's packet headers live in the main header
                raise _Refused("JPEG 2000 packed packet headers (PPM)")
            if marker == 0xFF51:
                self.siz = pos
            if marker not in (0xFF55, 0xFF57):  # TLM, PLM index tiles of the whole image: dropped (optional)
                kept.append(buf[pos : pos + 2 + length])
            pos += 2 + length
        self.first_part = start + pos
        siz = buf[self.siz : self.siz + 40]
        self.rsiz, x1, y1, x0, y0, self.tw, self.th, tx0, ty0, comps = struct.unpack(">HIIIIIIIIH", siz[4:40])
        depth = buf[self.siz + 40 : self.siz + 40 + 3 * comps]
        if comps != ds.count or any(depth[3 * c : 3 * c + 3] != b"\x07\x01\x01" for c in range(comps)):
            raise _Refused("JPEG 2000 components not 8-bit unsigned, full resolution, one per band")
        if (x0, y0) != (tx0, ty0) or (self.th, self.tw) != ds.block_shapes[0] or (x1 - x0, y1 - y0) != ds.shape[::-1]:
            raise _Refused(f"JPEG 2000 tiles of {self.tw}x{self.th} px are not GDAL's {ds.block_shapes[0]} blocks")
        self.x0, self.y0, self.x1, self.y1 = x0, y0, x1, y1
        self.ntx = -(-(x1 - x0) // self.tw)
        self.head = kept  # SOC, SIZ (rewritten per tile), then the other main-header markers
        self.siz_index = next(i for i, seg in enumerate(kept) if seg[:2] == b"\xff\x51")

    def _index_tile_parts(self, end: int) -> None:
        """Where each tile's tile-parts are: one SOT marker segment read per tile-part, in codestream order."""
        self.parts: dict[int, list[tuple[int, int]]] = {}
        pos = self.first_part
        while pos + 12 <= end:
            sot = os.pread(self.fd, 10, pos)
            if len(sot) < 10:  # the file is cut short: the tiles indexed so far can still be read
                break
            marker, _, tile, length = struct.unpack(">HHHI", sot)
            if marker != 0xFF90:  # EOC, or a damaged tile-part header: the tiles after it are not found
                break
            if length < 12:  # 0: "to the end of the codestream", which only the last tile-part may say
                raise _Refused("JPEG 2000 tile-part of unspecified length")
            self.parts.setdefault(tile, []).append((pos, length))
            pos += length
        self.indexed_end = pos

    def codestream(self, br: int, bc: int, h: int, w: int, where: str) -> tuple[bytes, int, int]:
        """Tile (``br``, ``bc``) as a codestream of its own, and its origin on the reference grid."""
        parts = self.parts.get(br * self.ntx + bc)
        if not parts:
            raise BlockReadError(
                f"{where}: not in the JPEG 2000 codestream, whose tile-parts end at byte {self.indexed_end} "
                "(a truncated or damaged file?)"
            )
        x0, y0 = self.x0 + bc * self.tw, self.y0 + br * self.th
        siz = self.head[self.siz_index]
        # the same tile, alone: image area = tile area, tile grid anchored on it, coordinates unchanged
        one = struct.pack(">HIIIIIIII", self.rsiz, x0 + w, y0 + h, x0, y0, self.tw, self.th, x0, y0)
        head = list(self.head)
        head[self.siz_index] = siz[:4] + one + siz[38:]
        body = []
        for pos, length in parts:
            raw = _pread(self.fd, length, pos, where)
            body.append(raw[:4] + b"\x00\x00" + raw[6:])  # Isot: tile 0 of the one-tile codestream
        return b"".join(head + body + [b"\xff\xd9"]), x0, y0

    def decode(self, br: int, bc: int, h: int, w: int, where: str, threads: int | None = None) -> np.ndarray | None:
        data, _, _ = self.codestream(br, bc, h, w, where)
        try:
            arr = imagecodecs.jpeg2k_decode(data, numthreads=threads or self.threads)
        except imagecodecs.Jpeg2kError as exc:
            raise BlockReadError(f"{where}: corrupt JPEG 2000 tile: {exc}") from exc
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if arr.shape != (h, w, self.count) or arr.dtype != np.uint8:
            return None
        return arr

    def decode_areas(
        self, br: int, bc: int, h: int, w: int, areas: list[Area], where: str, threads: int | None = None
    ) -> np.ndarray | None:
        """The block with only ``areas`` decoded (see :meth:`BlockReader.read`); None if OpenJPEG can't."""
        data, x0, y0 = self.codestream(br, bc, h, w, where)
        out = np.empty((h, w, self.count), dtype=np.uint8)
        try:
            with openjpeg.Codestream(data, threads or self.threads) as cs:
                for r0, r1, c0, c1 in areas:
                    out[r0:r1, c0:c1] = cs.area(x0 + c0, y0 + r0, x0 + c1, y0 + r1)
        except openjpeg.OpenJpegError as exc:
            if "corrupt" in str(exc):
                raise BlockReadError(f"{where}: {exc}") from exc
            return None
        return out


class BlockReader:
    """One tile's blocks as (h, w, bands) arrays, decoded directly when the file allows it (see module doc).

    ``threads``: how many threads one JPEG 2000 block may be decoded with (the other formats' blocks
    are too small to split); the crop gives each worker process its share of the CPUs.
    """

    def __init__(self, path: str, threads: int = 1) -> None:
        self.path = path
        self.ds = rasterio.open(path)
        self.block = self.ds.block_shapes[0]  # (rows, cols)
        self.height, self.width = self.ds.height, self.ds.width
        tags = self.ds.tags(ns="IMAGE_STRUCTURE")
        self.refusal = fast_path_refusal(self.ds, tags)
        self._fd: int | None = None
        self._codec: _TiffBlocks | _JpegBlocks | _Jp2Blocks | None = None
        if self.refusal is None:
            self._fd = os.open(path, os.O_RDONLY)
            try:
                if self.ds.driver == "JP2OpenJPEG":
                    self._codec = _Jp2Blocks(self.ds, self._fd, threads)
                elif tags.get("COMPRESSION") in _JPEG_COMPRESSIONS:
                    self._codec = _JpegBlocks(self.ds, tags, self._fd)
                else:
                    self._codec = _TiffBlocks(self.ds, tags, self._fd)
            except (_Refused, struct.error, OSError) as exc:  # OSError: a header cut short; GDAL reads what it can
                self.refusal = str(exc) or type(exc).__name__
                os.close(self._fd)
                self._fd = None
        #: who decodes the blocks: "raw", "libdeflate", "libjpeg-turbo", "openjpeg", or "gdal"
        self.decoder = self._codec.name if self._codec is not None else "gdal"
        self.fallbacks = 0  # blocks that had to go through GDAL on a fast-path file (sparse or odd blocks)

    @property
    def decodes_areas(self) -> bool:
        """Whether :meth:`read` can decode parts of a block alone (JPEG 2000, through ``ops.imagery.openjpeg``)."""
        return isinstance(self._codec, _Jp2Blocks) and openjpeg.available()

    def read(self, br: int, bc: int, areas: list[Area] | None = None) -> np.ndarray:
        """Block (``br``, ``bc``), clipped to the raster: (h, w, bands).

        ``areas`` (where :attr:`decodes_areas`): only these parts of the block are decoded, the rest of
        the array is left unset. For a block of which a few chip windows need a few per cent: each
        area costs its own code-blocks instead of the whole tile (``ops.crop.tiles`` decides).
        """
        blk = self.decode_direct(br, bc, areas)
        return blk if blk is not None else self.read_gdal(br, bc)

    def decode_direct(
        self, br: int, bc: int, areas: list[Area] | None = None, threads: int | None = None
    ) -> np.ndarray | None:
        """:meth:`read` by the file's own decoder only, or None where it can't (then :meth:`read_gdal`).

        Touches no GDAL object, so it may run on another thread than the reader's (JPEG 2000 blocks
        decoded ahead, see ``ops.crop.tiles``), several blocks at once; ``threads``: OpenJPEG's threads
        for this block instead of the reader's.
        """
        bh, bw = self.block
        h = min(bh, self.height - br * bh)
        w = min(bw, self.width - bc * bw)
        where = f"{self.path}: block ({br}, {bc})"
        if areas and self.decodes_areas:
            assert isinstance(self._codec, _Jp2Blocks)
            blk = self._codec.decode_areas(br, bc, h, w, areas, where, threads)
            if blk is not None:
                return blk
        if isinstance(self._codec, _Jp2Blocks):
            return self._codec.decode(br, bc, h, w, where, threads)
        if self._codec is not None:
            return self._codec.decode(br, bc, h, w, where)
        return None

    def read_gdal(self, br: int, bc: int) -> np.ndarray:
        """Block (``br``, ``bc``) read through GDAL (on the reader's own thread), bands last."""
        bh, bw = self.block
        h = min(bh, self.height - br * bh)
        w = min(bw, self.width - bc * bw)
        if self._codec is not None:
            self.fallbacks += 1
        try:
            planar = self.ds.read(window=Window(bc * bw, br * bh, w, h))
        except rasterio.errors.RasterioError as exc:  # rasterio's own message is "Read failed. See previous..."
            why = exc.__cause__ or exc
            raise BlockReadError(f"{self.path}: block ({br}, {bc}) could not be decoded: {why}") from exc
        return np.ascontiguousarray(planar.transpose(1, 2, 0))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.ds.close()
