"""Batched resampling of square chips to the model's input size.

Chips stay uint8 from the tile to the shard: torch's anti-aliased bilinear
``interpolate`` has a vectorised uint8 kernel that is several times faster
than any float path here (measured 15-29k chips/s on one thread for 70-150 px
windows, against 5-10k in float32), and chips of one window size are resized
as one batch rather than one call each. Its fastest form takes pixels with
their bands last (torch's ``channels_last``: 17-29 µs a chip against 22-48 µs
for planar input, 80-160 px windows), which is how blocks are decoded
(``ops.imagery.blocks``); the output is made planar, the shard's layout, only at the
model's size.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def resample_batch(chips: np.ndarray, size: int, out: np.ndarray | None = None) -> np.ndarray:
    """(B, n, n, C) uint8, bands last → (B, C, size, size) uint8, anti-aliased bilinear (align_corners=False).

    ``out``, if given, receives the result (a slice of the shard's array: no intermediate copy).
    """
    x = torch.from_numpy(np.ascontiguousarray(chips, dtype=np.uint8)).permute(0, 3, 1, 2)  # a channels_last view
    if chips.shape[1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    if out is None:
        return x.contiguous().numpy()
    out[...] = x.numpy()  # bands-last strides to planar, in one pass
    return out
