"""Deterministic randomness: stable hashes, keyed generators and seamless value noise.

Every random draw of the generator comes from here, so the same parameters give
the same bytes in any process: :func:`keyed_rng` gives each stage (layout,
panels, each tile) its own stream, and :func:`hash2` / :func:`value_noise` derive
background patterns from global coordinates so they match across tile edges.
"""

from __future__ import annotations

import zlib

import numpy as np


def crc(text: str) -> int:
    """A stable 32-bit hash (Python's hash() is salted per process)."""
    return zlib.crc32(text.encode("utf-8"))


def keyed_rng(seed: int, *keys: int | str) -> np.random.Generator:
    """A generator keyed by (seed, ...) so each stage and tile draws independently of the others."""
    ints = [int(seed) & 0xFFFFFFFF] + [(crc(k) if isinstance(k, str) else int(k) & 0xFFFFFFFF) for k in keys]
    return np.random.default_rng(np.random.SeedSequence(ints))


_H1 = np.uint64(0x9E3779B97F4A7C15)
_H2 = np.uint64(0xC2B2AE3D27D4EB4F)
_H3 = np.uint64(0xFF51AFD7ED558CCD)
_H4 = np.uint64(0xC4CEB9FE1A85EC53)


def hash2(i: np.ndarray, j: np.ndarray, salt: int) -> np.ndarray:
    """Integer hash of global lattice indices, so background patterns match across tile edges."""
    with np.errstate(over="ignore"):
        a = np.asarray(i, dtype=np.int64).view(np.uint64)
        b = np.asarray(j, dtype=np.int64).view(np.uint64)
        h = a * _H1 ^ b * _H2 ^ np.uint64(salt & 0xFFFFFFFFFFFF)
        h ^= h >> np.uint64(33)
        h *= _H3
        h ^= h >> np.uint64(33)
        h *= _H4
        h ^= h >> np.uint64(33)
    return h


def hash_unit(h: np.ndarray) -> np.ndarray:
    """Map hashes to floats in [0, 1)."""
    return ((h >> np.uint64(40)).astype(np.float64) / float(1 << 24)).astype(np.float32)


def value_noise(xs: np.ndarray, ys: np.ndarray, spacing: float, salt: int) -> np.ndarray:
    """Smooth noise in [-1, 1] on the grid xs (columns) x ys (rows), defined by global coordinates.

    Bilinear value noise is separable, so it is evaluated as ``Wy @ lattice @ Wx.T``:
    cheap even for a 2,000 x 2,000 coarse grid, and seamless across tiles.
    """

    def weights(c: np.ndarray) -> tuple[np.ndarray, int, int]:
        g = c / spacing
        g0 = np.floor(g)
        i0, i1 = int(g0.min()), int(g0.max()) + 1
        f = g - g0
        s = f * f * (3.0 - 2.0 * f)
        w = np.zeros((c.size, i1 - i0 + 1), dtype=np.float32)
        k = (g0 - i0).astype(np.int64)
        rows = np.arange(c.size)
        w[rows, k] = 1.0 - s
        w[rows, k + 1] = s
        return w, i0, i1

    wx, x0, x1 = weights(xs)
    wy, y0, y1 = weights(ys)
    iy, ix = np.meshgrid(np.arange(y0, y1 + 1), np.arange(x0, x1 + 1), indexing="ij")
    lattice = hash_unit(hash2(ix, iy, salt)) * 2.0 - 1.0
    return (wy @ lattice) @ wx.T
