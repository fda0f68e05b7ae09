"""Shards written from reused, page-aligned buffers are the .npy files np.save writes, whichever way they go to disk."""

from __future__ import annotations

import errno
import io
import os

import numpy as np
import pytest

from ops.npybuffer import NpyBuffer


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


def test_a_reused_buffer_writes_each_shard_as_np_save_would(tmp_path):
    """Units of different sizes cut one after the other into one buffer (it grows once): every file is exact."""
    rng = np.random.default_rng(0)
    buf = NpyBuffer((3, 8, 8))
    sizes = [40, 3, 0, 41, 100, 7]  # shrinking then growing: stale rows of a bigger unit must not leak
    for k, n in enumerate(sizes):
        want = rng.integers(0, 256, (n, 3, 8, 8), dtype=np.uint8)
        rows = buf.rows(n)
        rows[...] = want  # what the crop does: resample straight into the buffer
        buf.write(tmp_path / f"{k}.npy", rows)
        assert (tmp_path / f"{k}.npy").read_bytes() == _np_save_bytes(want), f"unit {k} ({n} rows)"
        assert np.array_equal(np.load(tmp_path / f"{k}.npy", mmap_mode="r"), want)
    assert buf.capacity >= 100
    assert buf.direct_writes + buf.buffered_writes == len(sizes)
    if _direct_io_works(tmp_path):
        assert buf.direct_writes == len(sizes), (
            "this file system takes O_DIRECT: no shard should have gone through the page cache"
        )


def test_rows_from_elsewhere_are_copied_in(tmp_path):
    """The baseline's stacked chips, or any array, go through the same writer."""
    arr = np.arange(5 * 3 * 4 * 4, dtype=np.uint8).reshape(5, 3, 4, 4)
    buf = NpyBuffer((3, 4, 4))
    buf.write(tmp_path / "a.npy", arr[::-1])  # not contiguous, not the buffer's memory
    assert (tmp_path / "a.npy").read_bytes() == _np_save_bytes(np.ascontiguousarray(arr[::-1]))
    with pytest.raises(ValueError, match="b.npy: rows of shape"):
        buf.write(tmp_path / "b.npy", np.zeros((2, 3, 5, 5), np.uint8))


def test_a_file_system_that_refuses_o_direct_gets_the_same_bytes(tmp_path, monkeypatch):
    """tmpfs and some network mounts answer EINVAL to O_DIRECT: the shard is written the ordinary way."""
    real_open = os.open

    def refusing_open(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing_open)
    want = np.random.default_rng(1).integers(0, 256, (9, 3, 8, 8), dtype=np.uint8)
    buf = NpyBuffer((3, 8, 8))
    buf.rows(9)[...] = want
    buf.write(tmp_path / "s.npy", buf.rows(9))
    assert (tmp_path / "s.npy").read_bytes() == _np_save_bytes(want)
    assert (buf.direct_writes, buf.buffered_writes) == (0, 1)


def test_a_failed_write_names_the_file(tmp_path):
    buf = NpyBuffer((3, 4, 4))
    with pytest.raises(OSError, match="missing"):
        buf.write(tmp_path / "missing" / "s.npy", np.zeros((2, 3, 4, 4), np.uint8))
