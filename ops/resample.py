"""Batched, separable resampling of square chips to the model's input size.

Resizing an n×n chip to s×s with an anti-aliased bilinear (triangle) filter
is two matrix products, ``R @ X @ R.T``, where ``R`` (s×n) depends only on n.
We derive ``R`` by running torch's own ``interpolate(antialias=True)`` on an
identity matrix, so the result equals ``interpolate`` on each chip, and cache
it per n. Chips of the same n are then resized as one batched matmul instead
of one interpolate call each, which is where per-building cropping spends
most of its time.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F


@lru_cache(maxsize=512)
def resample_matrix(n: int, size: int) -> torch.Tensor:
    """(size, n) float32 weights: row i mixes the source pixels of output pixel i."""
    eye = torch.eye(n, dtype=torch.float32)[None, None]  # (1, 1, n, n)
    out = F.interpolate(eye, size=(n, size), mode="bilinear", antialias=True, align_corners=False)
    return out[0, 0].T.contiguous()  # (size, n)


def resample_batch(chips: np.ndarray, size: int) -> np.ndarray:
    """(B, C, n, n) float32 in 0..255 → (B, C, size, size) uint8."""
    n = chips.shape[-1]
    if n == size:
        out = torch.from_numpy(np.ascontiguousarray(chips))
    else:
        r = resample_matrix(n, size)
        x = torch.from_numpy(np.ascontiguousarray(chips, dtype=np.float32))
        out = r @ x @ r.T
    return out.round_().clamp_(0, 255).to(torch.uint8).numpy()
