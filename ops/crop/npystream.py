"""Chip arrays streamed to ``.npy`` files with O_DIRECT, a few megabytes at a time, from a small ring of buffers.

Why: a partition's chips are ~12 KB each, written once by the crop and read
once, later, by inference.
- Written the ordinary way, every shard costs a fresh array (a page fault per
  4 KiB), a copy into the page cache and fresh page-cache pages. Measured on
  this project's 2-core VM for 30 shards of 4,096 chips, that was 3-5 s of CPU,
  about a quarter of the crop's work. Here chips are resampled straight into
  page-aligned memory laid out as the file will be, and the disk reads that
  memory (``O_DIRECT``): no copy, no cached pages.
- That memory is a ring of a few chunks of ~4 MiB, each written as soon as it
  is full while the next one is filled, whatever the size of the file. An
  earlier design held a whole unit of work (50 MB for 4,096 chips), twice per
  process so one could be written while the next was cut. On this VM memory a
  process touches for the first time costs about 0.7 ms/MB, and 1.5-3 ms/MB
  when two crop workers fault at once (measured: 0.07 s for those 100 MB in
  one process, 0.15-0.30 s each in two), so every worker paid that at start-up
  and the second worker bought less speed. A writer now touches its chunks
  (12 MiB by default) once and reuses them.
- The files are ordinary ``.npy`` files, byte for byte what ``np.save``
  writes. Rows are appended in order; the header, which holds the row count,
  goes in last, into the first block.

Where ``O_DIRECT`` is refused (tmpfs, macOS, some network file systems), the
same bytes are written the ordinary way; ``NpyWriter.direct_files`` and
``buffered_files`` count which way each file went.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import queue
import struct
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

ALIGN = max(4096, mmap.PAGESIZE)  # O_DIRECT wants address, offset and length aligned to the device's blocks
_MAGIC = b"\x93NUMPY\x01\x00"  # .npy format 1.0 (NEP 1): magic, version, then a uint16 header length
CHUNK_BYTES = 4 << 20


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def _header_dict(shape: tuple[int, ...], dtype: np.dtype) -> str:
    descr = np.lib.format.dtype_to_descr(dtype)
    return "{'descr': %r, 'fortran_order': False, 'shape': %r, }" % (descr, tuple(shape))  # noqa: UP031 (numpy's own layout)


def header_room(rows: int, row_shape: tuple[int, ...], dtype: np.dtype) -> int:
    """Bytes before row 0 in the .npy file np.save writes for ``rows`` rows (a multiple of 64)."""
    return _round_up(len(_header_dict((rows, *row_shape), dtype)) + len(_MAGIC) + 3, 64)


def npy_header(shape: tuple[int, ...], dtype: np.dtype, room: int) -> bytes:
    """The .npy header of a C-ordered array, space-padded to exactly ``room`` bytes (a multiple of 64)."""
    d = _header_dict(shape, dtype)
    n = room - len(_MAGIC) - 2
    if len(d) + 1 > n or room % 64:
        raise ValueError(f"a header for shape {shape} does not fit in {room} bytes")
    return _MAGIC + struct.pack("<H", n) + (d.ljust(n - 1) + "\n").encode("latin1")


class _Chunk:
    """Page-aligned memory holding the file's bytes ``[offset, offset + fill)``."""

    def __init__(self, size: int) -> None:
        self.mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", 0))
        self.bytes = np.frombuffer(self.mm, np.uint8)
        self.size = size
        self.offset = 0
        self.fill = 0

    def close(self) -> None:
        del self.bytes
        with contextlib.suppress(BufferError):  # an array over it is still alive: the mapping goes with it
            self.mm.close()


class NpyStream:
    """One ``.npy`` file being written: :meth:`rows` gives room for the next rows, :meth:`commit` keeps them.

    Rows must be committed in the order they should appear in the file; a
    chunk goes to disk once the next rows do not fit in it. :meth:`close`
    queues the rest and the header, and returns a future for the whole file.
    """

    def __init__(self, writer: NpyWriter, path: Path, max_rows: int) -> None:
        self.writer, self.path = writer, Path(path)
        self.room = header_room(max(max_rows, 0), writer.row_shape, writer.dtype)
        if self.room > ALIGN:
            raise ValueError(f"{path}: a .npy header of {self.room} bytes does not fit in one block")
        self.n = 0  # rows committed
        self.error: OSError | None = None
        self._fd: int | None = None
        self._direct = False
        self._written = False
        self._head: bytes | None = None  # the first block, kept when its chunk is written before the header is known
        self._chunk: _Chunk | None = writer._take()
        self._chunk.offset, self._chunk.fill = 0, self.room

    def rows(self, n: int) -> np.ndarray:
        """Writable room for the next ``n`` rows (at most the writer's ``chunk_rows``), kept by :meth:`commit`."""
        if self._chunk is None:
            raise ValueError(f"{self.path}: the stream is closed")
        need = n * self.writer.row_bytes
        if self._chunk.fill + need > self._chunk.size:
            self._seal()
        c = self._chunk
        if c.fill + need > c.size:
            raise ValueError(f"{self.path}: {n} rows do not fit in a chunk of {self.writer.chunk_rows} rows")
        return c.bytes[c.fill : c.fill + need].view(self.writer.dtype).reshape(n, *self.writer.row_shape)

    def commit(self, n: int) -> None:
        assert self._chunk is not None
        self._chunk.fill += n * self.writer.row_bytes
        self.n += n

    def _seal(self) -> None:
        """Queue the current chunk's whole blocks for writing; its unaligned tail starts the next chunk."""
        c = self._chunk
        assert c is not None
        cut = c.fill // ALIGN * ALIGN
        if c.offset == 0:  # the header block: rewritten with the header once the row count is known
            self._head = bytes(c.bytes[:ALIGN])
        nxt = self.writer._take()
        nxt.offset, nxt.fill = c.offset + cut, c.fill - cut
        nxt.bytes[: nxt.fill] = c.bytes[cut : c.fill]
        self._chunk = nxt
        self.writer._submit(self._write, c, cut)

    def close(self, then: Callable[[], None] | None = None) -> Future:
        """Queue the last rows and the header; the future is done once the file is complete and ``then`` ran.

        The future raises the first error writing this file (naming it), and ``then`` is not run.
        """
        c, self._chunk = self._chunk, None
        if c is None:
            raise ValueError(f"{self.path}: the stream is already closed")
        return self.writer._submit(self._finish, c, then)

    def abort(self) -> Future:
        """Give up the file (the unit of work failed): its chunk goes back to the ring, the partial file is removed."""
        c, self._chunk = self._chunk, None
        return self.writer._submit(self._discard, c)

    # --- on the writer thread ----------------------------------------------

    def _discard(self, c: _Chunk | None) -> None:
        if c is not None:
            self.writer._give(c)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.path.unlink(missing_ok=True)

    def _open(self) -> None:
        flag = getattr(os, "O_DIRECT", 0)
        if flag:
            try:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flag, 0o644)
                self._direct = True
                return
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._direct = False

    def _pwrite(self, view: memoryview, offset: int) -> None:
        if self._fd is None:
            self._open()
        try:
            done = 0
            while done < len(view):
                done += os.pwrite(self._fd, view[done:], offset + done)
        except OSError as exc:
            if exc.errno == errno.EINVAL and self._direct and not self._written:  # accepted at open, refused at write
                os.close(self._fd)
                self._fd, self._direct = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), False
                return self._pwrite(view, offset)
            raise
        self._written = True

    def _write(self, c: _Chunk, nbytes: int) -> None:
        try:
            if self.error is None:
                with memoryview(c.mm) as view:
                    self._pwrite(view[:nbytes], c.offset)
        except OSError as exc:
            self.error = OSError(exc.errno, f"{self.path}: {exc.strerror}")
        finally:
            self.writer._give(c)

    def _finish(self, c: _Chunk, then: Callable[[], None] | None) -> None:
        size = c.offset + c.fill
        header = npy_header((self.n, *self.writer.row_shape), self.writer.dtype, self.room)
        try:
            if self.error is None:
                with memoryview(c.mm) as view:
                    if c.offset == 0:
                        view[: self.room] = header
                    self._pwrite(view[: _round_up(c.fill, ALIGN)], c.offset)
                if c.offset > 0:
                    head = self.writer._head_block
                    head[:ALIGN] = self._head
                    head[: self.room] = header
                    with memoryview(head) as view:
                        self._pwrite(view, 0)
                os.ftruncate(self._fd, size)
        except OSError as exc:
            self.error = OSError(exc.errno, f"{self.path}: {exc.strerror}")
        finally:
            self.writer._give(c)
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        if self.error is not None:
            raise self.error
        self.writer._count(self._direct)
        if then is not None:
            then()


class NpyWriter:
    """Streams ``.npy`` files of rows ``row_shape`` through ``chunks`` reused chunks, on one writer thread.

    ``chunk_rows``: the most rows asked of :meth:`NpyStream.rows` at once; a
    chunk holds at least that many (and at least ``CHUNK_BYTES``). Memory is
    ``chunks`` chunks whatever the files' sizes; when all of them are queued
    for writing, asking for rows waits for one to be written.
    """

    def __init__(
        self,
        row_shape: tuple[int, ...] = (3, 64, 64),
        dtype: str | np.dtype = "uint8",
        *,
        chunk_rows: int = 256,
        chunks: int = 3,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> None:
        self.row_shape = tuple(row_shape)
        self.dtype = np.dtype(dtype)
        self.row_bytes = int(np.prod(self.row_shape)) * self.dtype.itemsize
        size = _round_up(max(chunk_bytes, chunk_rows * self.row_bytes) + 2 * ALIGN, ALIGN)
        self.chunk_rows = (size - 2 * ALIGN) // self.row_bytes  # what fits after a carried partial block
        self._chunks = [_Chunk(size) for _ in range(max(chunks, 2))]
        self._free: queue.SimpleQueue[_Chunk] = queue.SimpleQueue()
        for c in self._chunks:
            self._free.put(c)
        self._head_block = mmap.mmap(-1, ALIGN, flags=mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", 0))
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="npy-writer")
        self._lock = threading.Lock()
        self.direct_files = 0
        self.buffered_files = 0

    @property
    def mapped_bytes(self) -> int:
        """Memory held for staging, whatever the size of the files written."""
        return sum(c.size for c in self._chunks) + ALIGN

    def open(self, path: Path, max_rows: int) -> NpyStream:
        """Start the file ``path`` of at most ``max_rows`` rows (the header's room depends on it)."""
        return NpyStream(self, path, max_rows)

    def write(self, path: Path, arr: np.ndarray) -> None:
        """Write any array of rows as the .npy file ``path`` (copied through the chunks), and wait for it."""
        arr = np.asarray(arr)
        if arr.shape[1:] != self.row_shape:
            raise ValueError(f"{path}: rows of shape {arr.shape[1:]}, this writer holds {self.row_shape}")
        stream = self.open(path, len(arr))
        for i in range(0, len(arr), self.chunk_rows):
            part = arr[i : i + self.chunk_rows]
            stream.rows(len(part))[...] = part
            stream.commit(len(part))
        stream.close().result()

    def _take(self) -> _Chunk:
        return self._free.get()

    def _give(self, c: _Chunk) -> None:
        self._free.put(c)

    def _submit(self, fn: Callable, *args) -> Future:
        return self._pool.submit(fn, *args)

    def _count(self, direct: bool) -> None:
        with self._lock:
            if direct:
                self.direct_files += 1
            else:
                self.buffered_files += 1

    def close(self) -> None:
        """Wait for queued writes, then let the memory go."""
        self._pool.shutdown(wait=True)
        for c in self._chunks:
            c.close()
        self._chunks.clear()
        self._head_block.close()


_SCRATCH = threading.local()


def scratch_writer(row_shape: tuple[int, ...], dtype: np.dtype) -> NpyWriter:
    """This thread's writer for arrays that were not cut into a stream (they are copied through its chunks)."""
    writer = getattr(_SCRATCH, "writer", None)
    if writer is None or writer.row_shape != tuple(row_shape) or writer.dtype != dtype:
        if writer is not None:
            writer.close()
        writer = _SCRATCH.writer = NpyWriter(row_shape, dtype)
    return writer
