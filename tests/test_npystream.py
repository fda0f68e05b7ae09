"""Shards streamed through a few small reused chunks are the .npy files np.save writes, whichever way they go to disk."""

from __future__ import annotations

import errno
import io
import os

import numpy as np
import pytest

from ops.crop.npystream import ALIGN, NpyWriter


def _np_save_bytes(arr: np.ndarray) -> bytes:
    fh = io.BytesIO()
    np.save(fh, arr, allow_pickle=False)
    return fh.getvalue()


def _direct_io_works(folder) -> bool:
    try:
        fd = os.open(folder / "probe", os.O_WRONLY | os.O_CREAT | getattr(os, "O_DIRECT", 0))
    except OSError:
        return False
    os.close(fd)
    return hasattr(os, "O_DIRECT")


def _stream(writer: NpyWriter, path, want: np.ndarray, batch: int) -> None:
    """What the crop does: ask for room for a batch, resample into it, commit; then close."""
    stream = writer.open(path, len(want))
    for i in range(0, len(want), batch):
        part = want[i : i + batch]
        stream.rows(len(part))[...] = part
        stream.commit(len(part))
    stream.close().result()


def test_files_of_any_size_are_what_np_save_writes_and_memory_stays_a_few_chunks(tmp_path):
    """Rows of 192 bytes (not a divisor of a block) through chunks of ~8 KiB: files from 0 rows to many chunks."""
    rng = np.random.default_rng(0)
    writer = NpyWriter((3, 8, 8), chunk_rows=16, chunks=2, chunk_bytes=ALIGN)
    held = writer.mapped_bytes
    sizes = [40, 3, 0, 41, 1000, 7, 21]  # shrinking then growing: stale bytes of a bigger file must not leak
    for k, n in enumerate(sizes):
        want = rng.integers(0, 256, (n, 3, 8, 8), dtype=np.uint8)
        _stream(writer, tmp_path / f"{k}.npy", want, batch=int(rng.integers(1, 17)))
        assert (tmp_path / f"{k}.npy").read_bytes() == _np_save_bytes(want), f"file {k} ({n} rows)"
        assert np.array_equal(np.load(tmp_path / f"{k}.npy", mmap_mode="r"), want)
    assert writer.mapped_bytes == held < 1000 * 192, "the writer's memory does not grow with the files"
    assert writer.direct_files + writer.buffered_files == len(sizes)
    if _direct_io_works(tmp_path):
        assert writer.direct_files == len(sizes), (
            "this file system takes O_DIRECT: no shard should have gone through the page cache"
        )
    writer.close()


def test_rows_from_elsewhere_are_copied_in(tmp_path):
    """The baseline's stacked chips, or any array, go through the same writer."""
    arr = np.arange(50 * 3 * 4 * 4, dtype=np.uint8).reshape(50, 3, 4, 4)
    writer = NpyWriter((3, 4, 4), chunk_rows=8, chunk_bytes=ALIGN)
    writer.write(tmp_path / "a.npy", arr[::-1])  # not contiguous, bigger than a chunk
    assert (tmp_path / "a.npy").read_bytes() == _np_save_bytes(np.ascontiguousarray(arr[::-1]))
    with pytest.raises(ValueError, match="b.npy: rows of shape"):
        writer.write(tmp_path / "b.npy", np.zeros((2, 3, 5, 5), np.uint8))
    writer.close()


def test_a_file_system_that_refuses_o_direct_gets_the_same_bytes(tmp_path, monkeypatch):
    """tmpfs and some network mounts answer EINVAL to O_DIRECT: the shard is written the ordinary way."""
    real_open = os.open

    def refusing_open(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing_open)
    want = np.random.default_rng(1).integers(0, 256, (90, 3, 8, 8), dtype=np.uint8)
    writer = NpyWriter((3, 8, 8), chunk_rows=16, chunk_bytes=ALIGN)
    _stream(writer, tmp_path / "s.npy", want, batch=16)
    assert (tmp_path / "s.npy").read_bytes() == _np_save_bytes(want)
    assert (writer.direct_files, writer.buffered_files) == (0, 1)
    writer.close()


def test_a_failed_write_names_the_file_and_the_writer_goes_on(tmp_path):
    writer = NpyWriter((3, 4, 4), chunk_rows=8, chunk_bytes=ALIGN)
    with pytest.raises(OSError, match="missing"):
        writer.write(tmp_path / "missing" / "s.npy", np.zeros((200, 3, 4, 4), np.uint8))
    ok = np.ones((200, 3, 4, 4), np.uint8)
    writer.write(tmp_path / "t.npy", ok)  # its chunks came back to the ring
    assert (tmp_path / "t.npy").read_bytes() == _np_save_bytes(ok)
    writer.close()


def test_an_aborted_stream_leaves_no_file_and_gives_its_memory_back(tmp_path):
    """A unit of work that fails midway: its partial file is removed, the next file is written whole."""
    writer = NpyWriter((3, 4, 4), chunk_rows=8, chunks=2, chunk_bytes=ALIGN)
    stream = writer.open(tmp_path / "a.npy", 100)
    for _ in range(10):
        stream.rows(8)[...] = 7
        stream.commit(8)
    stream.abort().result()
    assert not (tmp_path / "a.npy").exists()
    again = np.full((100, 3, 4, 4), 3, np.uint8)
    writer.write(tmp_path / "b.npy", again)
    assert (tmp_path / "b.npy").read_bytes() == _np_save_bytes(again)
    writer.close()
