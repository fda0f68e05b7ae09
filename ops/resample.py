"""Batched resampling of square chips to the model's input size.

Chips stay uint8 from the tile to the shard: torch's anti-aliased bilinear
``interpolate`` has a vectorised uint8 kernel that is several times faster
than any float path here (measured 15-29k chips/s on one thread for 70-150 px
windows, against 5-10k in float32), and chips of one window size are resized
as one batch rather than one call each.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def resample_batch(chips: np.ndarray, size: int) -> np.ndarray:
    """(B, C, n, n) uint8 → (B, C, size, size) uint8, anti-aliased bilinear (align_corners=False)."""
    if chips.shape[-1] == size:
        return np.ascontiguousarray(chips, dtype=np.uint8)
    x = torch.from_numpy(np.ascontiguousarray(chips, dtype=np.uint8))
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False).numpy()
