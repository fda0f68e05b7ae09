"""Peak memory of the current process, as the benches report it."""

from __future__ import annotations

import resource
from pathlib import Path


def peak_rss_bytes() -> int:
    """VmHWM: this process image's peak RSS (``ru_maxrss`` would include the parent's memory at fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
