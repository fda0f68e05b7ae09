"""What a chips folder holds, by building: the tests that compare two crops of the same buildings read it here."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ops.shards import list_shards, open_chips, read_index


def read_chips(folder: Path) -> tuple[dict[str, np.ndarray], dict[str, tuple[str, float]]]:
    """Chips (as int16, so that differences don't wrap) and (status, valid fraction) of every building of ``folder``."""
    chips, status = {}, {}
    for shard in list_shards(folder):
        arr = open_chips(folder, shard)
        for r in read_index(folder, shard).to_pandas().itertuples():
            status[r.building_id] = (r.status, r.valid_fraction)
            if r.row >= 0:
                chips[r.building_id] = np.asarray(arr[r.row], dtype=np.int16)
    return chips, status
