"""Batched resampling of square chips to the model's input size.

Chips stay uint8 from the tile to the shard: torch's anti-aliased bilinear
``interpolate`` has a vectorised uint8 kernel that is several times faster
than any float path here (measured 15-29k chips/s on one thread for 70-150 px
windows, against 5-10k in float32), and chips of one window size are resized
as one batch rather than one call each. Chips arrive bands last (as decoded
blocks are kept) and leave planar, the shard layout.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def resample_batch(chips: np.ndarray, size: int) -> np.ndarray:
    """(B, n, n, C) uint8, bands last → (B, C, size, size) uint8, anti-aliased bilinear (align_corners=False).

    Bands last is torch's channels-last layout, for which its uint8 kernel is
    fastest (about 1.6x the planar layout, measured on 96 px windows).
    """
    x = torch.from_numpy(np.ascontiguousarray(chips, dtype=np.uint8)).permute(0, 3, 1, 2)  # a channels-last view
    if chips.shape[1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.contiguous().numpy()
