"""Areas of a JPEG 2000 codestream decoded by OpenJPEG, through its C API (ctypes): only the code-blocks they need.

Why: a BD ORTHO tile is cut in 1,024 px codestream tiles, and decoding one whole costs about
0.37 s of a core whichever decoder reads it (GDAL and imagecodecs both call OpenJPEG's
``opj_decode`` on the whole tile). A chip window needs a hundredth of that tile. OpenJPEG (2.3
and later) decodes a *decode area* from only the code-blocks and precincts that intersect it,
and for a codestream of one tile it keeps the tile's compressed data between calls, so that
several areas of one tile are decoded one after another without parsing it again. Neither
rasterio nor imagecodecs exposes ``opj_set_decode_area``: this module calls the library that
rasterio's own GDAL is linked with (``rasterio.libs``), or the system's ``libopenjp2``.

Pixels are those of a whole-tile decode, bit for bit (tested): the inverse wavelet transform is
computed over the area plus the filter's support.

:func:`available` says whether the library was found (a crop without it decodes whole tiles).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import threading
from functools import lru_cache

import numpy as np


class OpenJpegError(ValueError):
    """A codestream OpenJPEG refused; the message holds what OpenJPEG said."""


class _Comp(ctypes.Structure):  # opj_image_comp_t (OpenJPEG 2.3 - 2.5)
    _fields_ = [
        *((n, ctypes.c_uint32) for n in ("dx", "dy", "w", "h", "x0", "y0", "prec", "bpp", "sgnd", "resno", "factor")),
        ("data", ctypes.POINTER(ctypes.c_int32)),
        ("alpha", ctypes.c_uint16),
    ]


class _Image(ctypes.Structure):  # opj_image_t
    _fields_ = [
        *((n, ctypes.c_uint32) for n in ("x0", "y0", "x1", "y1", "numcomps")),
        ("color_space", ctypes.c_int),
        ("comps", ctypes.POINTER(_Comp)),
        ("icc_profile_buf", ctypes.c_void_p),
        ("icc_profile_len", ctypes.c_uint32),
    ]


_READ = ctypes.CFUNCTYPE(ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
_SKIP = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p)
_SEEK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int64, ctypes.c_void_p)
_MESSAGE = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_void_p)
_CODEC_J2K = 0  # OPJ_CODEC_J2K: a bare codestream
_PARAMETERS_BYTES = 1 << 14  # opj_dparameters_t is about 8.2 KB: the library fills it, we never read it
_END = ctypes.c_size_t(-1).value  # what a read callback returns at the end of the stream


def _library_paths() -> list[str]:
    """rasterio's own libopenjp2 first (the one GDAL decodes with), then the system's."""
    paths: list[str] = []
    try:
        import rasterio

        here = os.path.dirname(rasterio.__file__)
        paths += sorted(glob.glob(os.path.join(here, os.pardir, "rasterio.libs", "libopenjp2*")))
    except ImportError:  # pragma: no cover - rasterio is a dependency
        pass
    found = ctypes.util.find_library("openjp2")
    if found:
        paths.append(found)
    return paths


@lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL | None:
    for path in _library_paths():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        lib.opj_version.restype = ctypes.c_char_p
        major, minor = (int(x) for x in lib.opj_version().decode().split(".")[:2])
        if (major, minor) < (2, 3):  # sub-tile decoding and repeated decode areas came with 2.3
            continue
        _declare(lib)
        return lib
    return None


def _declare(lib: ctypes.CDLL) -> None:
    p, i32 = ctypes.c_void_p, ctypes.c_int32
    signatures = {
        "opj_create_decompress": (p, [ctypes.c_int]),
        "opj_set_default_decoder_parameters": (None, [p]),
        "opj_setup_decoder": (ctypes.c_int, [p, p]),
        "opj_codec_set_threads": (ctypes.c_int, [p, ctypes.c_int]),
        "opj_set_error_handler": (ctypes.c_int, [p, _MESSAGE, p]),
        "opj_stream_create": (p, [ctypes.c_size_t, ctypes.c_int]),
        "opj_stream_set_read_function": (None, [p, _READ]),
        "opj_stream_set_skip_function": (None, [p, _SKIP]),
        "opj_stream_set_seek_function": (None, [p, _SEEK]),
        "opj_stream_set_user_data_length": (None, [p, ctypes.c_uint64]),
        "opj_read_header": (ctypes.c_int, [p, p, ctypes.POINTER(ctypes.POINTER(_Image))]),
        "opj_set_decode_area": (ctypes.c_int, [p, ctypes.POINTER(_Image), i32, i32, i32, i32]),
        "opj_decode": (ctypes.c_int, [p, p, ctypes.POINTER(_Image)]),
        "opj_image_destroy": (None, [ctypes.POINTER(_Image)]),
        "opj_stream_destroy": (None, [p]),
        "opj_destroy_codec": (None, [p]),
    }
    for name, (restype, argtypes) in signatures.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes


def available() -> bool:
    """Whether an OpenJPEG of version 2.3 or later could be loaded."""
    return _lib() is not None


def version() -> str | None:
    lib = _lib()
    return lib.opj_version().decode() if lib is not None else None


class Codestream:
    """One in-memory JPEG 2000 codestream of **one tile**, whose areas are decoded one call at a time.

    ``threads``: OpenJPEG's own threads for one area's code-blocks. Not thread-safe: one
    instance per thread. Closed with :meth:`close` (or as a context manager).
    """

    def __init__(self, data: bytes, threads: int = 1) -> None:
        lib = _lib()
        if lib is None:
            raise OpenJpegError("no OpenJPEG 2.3 or later could be loaded")
        self._lib, self._data, self._pos = lib, data, 0
        self._messages: list[str] = []
        # the callbacks must outlive the codec and the stream: kept on the instance
        self._cb_read, self._cb_skip, self._cb_seek = _READ(self._read), _SKIP(self._skip), _SEEK(self._seek)
        self._cb_message = _MESSAGE(self._message)
        self._codec = lib.opj_create_decompress(_CODEC_J2K)
        self._stream = lib.opj_stream_create(1 << 20, 1)
        self._image = ctypes.POINTER(_Image)()
        self._lock = threading.Lock()
        params = ctypes.create_string_buffer(_PARAMETERS_BYTES)
        lib.opj_set_default_decoder_parameters(params)
        lib.opj_set_error_handler(self._codec, self._cb_message, None)
        if not lib.opj_setup_decoder(self._codec, params):
            self.close()
            raise OpenJpegError("OpenJPEG refused the decoder's set-up")
        lib.opj_codec_set_threads(self._codec, max(1, int(threads)))
        lib.opj_stream_set_read_function(self._stream, self._cb_read)
        lib.opj_stream_set_skip_function(self._stream, self._cb_skip)
        lib.opj_stream_set_seek_function(self._stream, self._cb_seek)
        lib.opj_stream_set_user_data_length(self._stream, len(data))
        if not lib.opj_read_header(self._stream, self._codec, ctypes.byref(self._image)):
            self.close()
            raise OpenJpegError(f"unreadable codestream header: {self._said()}")

    # -- the memory stream OpenJPEG reads through ---------------------------------------

    def _read(self, buf: int, n: int, _user: int) -> int:
        left = len(self._data) - self._pos
        if left <= 0:
            return _END
        n = min(n, left)
        ctypes.memmove(buf, ctypes.c_char_p(self._data[self._pos : self._pos + n]), n)
        self._pos += n
        return n

    def _skip(self, n: int, _user: int) -> int:
        n = max(-self._pos, min(n, len(self._data) - self._pos))
        self._pos += n
        return n

    def _seek(self, pos: int, _user: int) -> int:
        if not 0 <= pos <= len(self._data):
            return 0
        self._pos = pos
        return 1

    def _message(self, text: bytes, _user: int) -> None:
        self._messages.append(text.decode(errors="replace").strip())

    def _said(self) -> str:
        return "; ".join(self._messages[-3:]) or "no message"

    # -- decoding ----------------------------------------------------------------------

    @property
    def bounds(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the image on the codestream's reference grid."""
        im = self._image.contents
        return im.x0, im.y0, im.x1, im.y1

    def area(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """Pixels of the area [x0, x1) × [y0, y1) (reference grid coordinates): (h, w, components) uint8."""
        lib = self._lib
        with self._lock:
            if not lib.opj_set_decode_area(self._codec, self._image, x0, y0, x1, y1):
                raise OpenJpegError(f"decode area ({x0}, {y0}, {x1}, {y1}) refused: {self._said()}")
            if not lib.opj_decode(self._codec, self._stream, self._image):
                raise OpenJpegError(f"corrupt JPEG 2000 tile: {self._said()}")
            im = self._image.contents
            h, w = y1 - y0, x1 - x0
            out = np.empty((h, w, im.numcomps), dtype=np.uint8)
            for c in range(im.numcomps):
                comp = im.comps[c]
                if (comp.h, comp.w) != (h, w) or comp.prec != 8 or comp.sgnd or comp.dx != 1 or comp.dy != 1:
                    raise OpenJpegError(f"component {c} is not 8-bit unsigned at full resolution over the area")
                plane = np.ctypeslib.as_array(comp.data, shape=(h, w))
                np.clip(plane, 0, 255, out=plane)
                out[:, :, c] = plane
            return out

    def close(self) -> None:
        lib = self._lib
        if self._image:
            lib.opj_image_destroy(self._image)
            self._image = ctypes.POINTER(_Image)()
        if self._stream:
            lib.opj_stream_destroy(self._stream)
            self._stream = None
        if self._codec:
            lib.opj_destroy_codec(self._codec)
            self._codec = None

    def __enter__(self) -> Codestream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- when decoding areas pays -------------------------------------------------------------
#
# Measured on BD ORTHO-like tiles (1,024 px codestream tiles, 64 px code-blocks, 9-7 wavelet, one
# core, areas decoded one after another on one Codestream), as fractions of a whole-tile decode:
# the first call 0.05 (the tile's packet headers), then about 0.075 per area plus 1.2 times the
# area's share of the tile (64 px: 0.08, 128 px: 0.09, 256 px: 0.15; a code-block of the coarser
# levels covers 256-512 px of the image, so a small area still pays for those).
AREA_BASE_COST = 0.05
AREA_COST = 0.075
AREA_PIXEL_COST = 1.2
#: decode areas only below this fraction of a whole decode (the model's error, and the risk of a tile
#: with other coding parameters)
AREA_BUDGET = 0.8
#: more areas than this in one block: decode it whole without weighing (dense towns)
MAX_AREAS = 16


def area_cost(area: tuple[int, int, int, int], tile_pixels: int) -> float:
    """Modelled cost of decoding ``area`` (row0, row1, col0, col1), as a fraction of the whole tile's decode."""
    r0, r1, c0, c1 = area
    return AREA_COST + AREA_PIXEL_COST * (r1 - r0) * (c1 - c0) / tile_pixels


def plan_areas(areas: list[tuple[int, int, int, int]], h: int, w: int) -> list[tuple[int, int, int, int]] | None:
    """The areas to decode from an ``h`` × ``w`` tile so that ``areas`` are covered, or None: decode it whole.

    Areas are merged into their bounding box where that is modelled cheaper (neighbouring windows
    share the coarse levels' code-blocks); None when the whole decode is modelled no dearer than
    :data:`AREA_BUDGET` of it.
    """
    todo = sorted(set(areas))
    if not todo or len(todo) > MAX_AREAS:
        return None
    pixels = h * w
    merged = True
    while merged and len(todo) > 1:
        merged = False
        best: tuple[float, int, int] | None = None
        for i in range(len(todo)):
            for j in range(i + 1, len(todo)):
                a, b = todo[i], todo[j]
                box = (min(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), max(a[3], b[3]))
                gain = area_cost(a, pixels) + area_cost(b, pixels) - area_cost(box, pixels)
                if gain > 0 and (best is None or gain > best[0]):
                    best = (gain, i, j)
        if best is not None:
            _, i, j = best
            a, b = todo[i], todo[j]
            box = (min(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), max(a[3], b[3]))
            todo = [t for k, t in enumerate(todo) if k not in (i, j)] + [box]
            merged = True
    cost = AREA_BASE_COST + sum(area_cost(a, pixels) for a in todo)
    return todo if cost < AREA_BUDGET else None


def covers(decoded: list[tuple[int, int, int, int]], area: tuple[int, int, int, int]) -> bool:
    """Whether ``area`` lies inside one of the ``decoded`` areas."""
    r0, r1, c0, c1 = area
    return any(a[0] <= r0 and r1 <= a[1] and a[2] <= c0 and c1 <= a[3] for a in decoded)
