"""One writer per partition folder: a second run of the same partition fails at once, naming it.

Two runs of one département at the same time (a backfill launched twice, the
monthly run over a manual one) would write the same shard and staging files
(`<shard>.chips.npy.tmp`, `<model>-<version>.parquet.tmp`) and interleave them.
The run queue allows one run per partition at a time
(``orchestration/instance/*.yaml``); runs executed outside the queue
(``make demo``, ``dagster job execute``, a script) meet this lock, an advisory
``flock`` on a file named after the folder, in the machine's temporary folder
(not in the object store, which would upload it): released by the kernel when
the holder exits, however it exits, so a killed run never leaves it behind.
It guards one machine (the embedded default); in production each step pod has
its own store cache, and the run queue is what keeps one run per partition.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_DIR = Path(tempfile.gettempdir()) / "bativision-locks"


class PartitionBusyError(RuntimeError):
    """Another process is writing the same partition's files."""


@contextmanager
def partition_lock(folder: Path, what: str) -> Iterator[None]:
    """Hold ``folder``'s writer lock for the block; raise :class:`PartitionBusyError` naming ``what`` if taken."""
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    path = LOCK_DIR / (hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:20] + ".lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise PartitionBusyError(
                f"{what}: another run is writing {folder} (process {holder} holds the lock {path}); "
                "wait for it to finish, or stop it, then run again"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
