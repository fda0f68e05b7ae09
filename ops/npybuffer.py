"""Chip arrays cut into reused, page-aligned memory and written to disk from it with O_DIRECT.

Why: a partition's chips are ~12 KB each, written once by the crop and read
once, later, by inference. Written the ordinary way, every shard costs a fresh
array (a page fault per 4 KiB), a copy into the page cache and fresh
page-cache pages; measured on this project's 2-core VM for 30 shards of
4,096 chips, that was 3-5 s of CPU, about a quarter of the crop's work, and
work that does not shrink with more workers. Here a unit of work's chips are
cut straight into a buffer laid out as the ``.npy`` file will be (header
room, then rows), the buffer is reused from one unit to the next, and the
file is written from it with ``O_DIRECT``: the disk reads that memory, with
no copy and no cached pages (0.3-0.4 s of CPU for the same 30 shards). The
files are ordinary ``.npy`` files, byte for byte what ``np.save`` writes.

Where ``O_DIRECT`` is refused (tmpfs, macOS, some network file systems),
the same bytes are written the ordinary way; ``NpyBuffer.direct_writes``
counts which way each file went.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import struct
import threading
from pathlib import Path

import numpy as np

ALIGN = max(4096, mmap.PAGESIZE)  # O_DIRECT wants address, offset and length aligned to the device's blocks
_MAGIC = b"\x93NUMPY\x01\x00"  # .npy format 1.0 (NEP 1): magic, version, then a uint16 header length


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def _header_dict(shape: tuple[int, ...], dtype: np.dtype) -> str:
    descr = np.lib.format.dtype_to_descr(dtype)
    return "{'descr': %r, 'fortran_order': False, 'shape': %r, }" % (descr, tuple(shape))  # noqa: UP031 (numpy's own layout)


def npy_header(shape: tuple[int, ...], dtype: np.dtype, room: int) -> bytes:
    """The .npy header of a C-ordered array, space-padded to exactly ``room`` bytes (a multiple of 64)."""
    d = _header_dict(shape, dtype)
    n = room - len(_MAGIC) - 2
    if len(d) + 1 > n or room % 64:
        raise ValueError(f"a header for shape {shape} does not fit in {room} bytes")
    return _MAGIC + struct.pack("<H", n) + (d.ljust(n - 1) + "\n").encode("latin1")


class NpyBuffer:
    """Page-aligned memory holding one ``.npy`` file: header room, then up to ``capacity`` rows.

    Cut rows into :meth:`rows`, then :meth:`write` the first ``n`` of them to a
    file. The memory is kept for the next unit of work (growing if one needs
    more rows), so its pages are faulted in once, not once per shard.

    ``capacity``: rows to map now. Only the pages rows are cut into are
    faulted in, so this costs address space, not memory; mapping the most a
    unit of work can hold avoids growing, i.e. unmapping and faulting a whole
    buffer in again (measured: growing to each unit's exact size re-faulted
    50 MB every few shards).
    """

    def __init__(
        self, row_shape: tuple[int, ...] = (3, 64, 64), dtype: str | np.dtype = "uint8", capacity: int = 0
    ) -> None:
        self.row_shape = tuple(row_shape)
        self.dtype = np.dtype(dtype)
        self.row_items = int(np.prod(self.row_shape))
        self.row_bytes = self.row_items * self.dtype.itemsize
        self.capacity = 0
        self.room = 0
        self._mm: mmap.mmap | None = None
        self.direct_writes = 0
        self.buffered_writes = 0
        if capacity:
            self._map(capacity)

    def _ensure(self, n: int) -> None:
        if n <= self.capacity and self._mm is not None:
            return
        self._map(max(n, 2 * self.capacity))  # growing geometrically: a few maps, however the sizes come

    def _map(self, n: int) -> None:
        capacity = n
        room = _round_up(len(_header_dict((capacity, *self.row_shape), self.dtype)) + len(_MAGIC) + 3, 64)
        self.close()
        size = _round_up(room + capacity * self.row_bytes, ALIGN)
        self._mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", 0))  # page-aligned
        self.capacity, self.room = capacity, room
        self._data_address = np.frombuffer(self._mm, np.uint8, 1, room).ctypes.data  # where row 0 starts

    def rows(self, n: int) -> np.ndarray:
        """A writable (n, *row_shape) array over the buffer's first ``n`` rows."""
        self._ensure(max(n, 1))
        return np.frombuffer(self._mm, self.dtype, n * self.row_items, self.room).reshape(n, *self.row_shape)

    def _holds(self, arr: np.ndarray) -> bool:
        """Whether ``arr`` is this buffer's own first rows (no copy needed)."""
        return (
            self._mm is not None
            and arr.dtype == self.dtype
            and arr.shape[1:] == self.row_shape
            and arr.flags.c_contiguous
            and arr.__array_interface__["data"][0] == self._data_address
        )

    def write(self, path: Path, arr: np.ndarray) -> None:
        """Write ``arr`` (rows of this buffer, or any array of rows, then copied in) as the .npy file ``path``."""
        n = len(arr)
        if not self._holds(arr):
            if arr.shape[1:] != self.row_shape:
                raise ValueError(f"{path}: rows of shape {arr.shape[1:]}, this buffer holds {self.row_shape}")
            self.rows(n)[...] = arr
        assert self._mm is not None
        self._mm[: self.room] = npy_header((n, *self.row_shape), self.dtype, self.room)
        size = self.room + n * self.row_bytes
        view = memoryview(self._mm)
        try:
            if self._write_direct(path, view, size):
                self.direct_writes += 1
                return
            with open(path, "wb") as fh:
                fh.write(view[:size])
            self.buffered_writes += 1
        finally:
            view.release()

    @staticmethod
    def _write_direct(path: Path, view: memoryview, size: int) -> bool:
        """Write ``view[:size]`` with O_DIRECT (whole aligned blocks, then cut to ``size``); False if refused."""
        flag = getattr(os, "O_DIRECT", 0)
        if not flag:
            return False
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flag, 0o644)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                return False
            raise
        try:
            total, done = _round_up(size, ALIGN), 0
            while done < total:
                done += os.pwrite(fd, view[done:total], done)
            os.ftruncate(fd, size)
        except OSError as exc:
            os.close(fd)
            if exc.errno == errno.EINVAL and done == 0:  # accepted at open, refused at write
                return False
            raise OSError(exc.errno, f"{path}: {exc.strerror}") from exc
        os.close(fd)
        return True

    def close(self) -> None:
        """Let the memory go (unmapped now, or when the last array cut from it is gone)."""
        if self._mm is not None:
            with contextlib.suppress(BufferError):  # an array over it is still alive: the mapping goes with it
                self._mm.close()
        self._mm, self.capacity = None, 0


_SCRATCH = threading.local()


def scratch_buffer(row_shape: tuple[int, ...], dtype: np.dtype) -> NpyBuffer:
    """This thread's buffer for writing rows that were not cut into one (they are copied in first)."""
    buffer = getattr(_SCRATCH, "buffer", None)
    if buffer is None or buffer.row_shape != tuple(row_shape) or buffer.dtype != dtype:
        buffer = _SCRATCH.buffer = NpyBuffer(row_shape, dtype)
    return buffer
