"""A crop process's shard writer: chips streamed to their shard file as they are cut, the index published last."""

from __future__ import annotations

import functools
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pyarrow as pa

from ops.crop.npystream import NpyStream, NpyWriter, scratch_writer
from ops.shards import partial_path, publish_shard, shard_paths


class ShardWriter:
    """Streams a crop process's shards to disk as their chips are cut, on one background thread.

    Each crop process, the step's own or a worker, has its own: chips go
    straight from the resampler into the chunk of the file being written
    (see ``ops.crop.npystream``), so a process holds a few megabytes of chips
    whatever a unit's size. :meth:`submit` queues a unit's header and index
    once its chips are cut, then waits for the unit before it to be complete
    (re-raising its error); :meth:`drain` waits for the last.
    """

    def __init__(self, row_shape: tuple[int, ...] = (3, 64, 64)) -> None:
        self._writer = NpyWriter(row_shape)
        self._pending: Future | None = None

    def open(self, folder: Path, shard_id: str, max_rows: int) -> NpyStream:
        """The stream to cut a unit of at most ``max_rows`` chips into (``folder`` exists: see crop_partition)."""
        return self._writer.open(partial_path(shard_paths(folder, shard_id)[0]), max_rows)

    def submit(self, stream: NpyStream, folder: Path, shard_id: str, index: pa.Table, meta: dict[str, str]) -> None:
        """Queue the end of ``stream`` (its last rows and header), then the shard's index; raise the unit before's error."""
        previous = self._pending
        self._pending = stream.close(then=functools.partial(publish_shard, folder, shard_id, index, meta))
        if previous is not None:
            previous.result()

    def drain(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        self._writer.close()


def write_shard(folder: Path, shard_id: str, chips: np.ndarray, index: pa.Table, meta: dict[str, str]) -> None:
    """Write a cell's chips (any array: copied through this thread's stream writer) then its index."""
    folder.mkdir(parents=True, exist_ok=True)
    scratch_writer(chips.shape[1:], chips.dtype).write(partial_path(shard_paths(folder, shard_id)[0]), chips)
    publish_shard(folder, shard_id, index, meta)
