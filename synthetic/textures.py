"""Per-pixel surface codes and the grain each one gets when a tile is finished.

While a tile is drawn, a second image records what every pixel is (ground,
roof tiles, gravel, smooth slate, foliage, road); the renderer then adds
blotches and white grain whose strength depends on that code, and darkens the
shadow mask. The codes are chosen by the roof shading, the ground and the
renderer, so they live apart from all three.
"""

from __future__ import annotations

import numpy as np

# texture codes (per pixel), each with its own noise amplitude
TEX_GROUND, TEX_TILES, TEX_GRAVEL, TEX_SMOOTH, TEX_FOLIAGE, TEX_ROAD = range(6)
TEX_SIGMA = np.zeros(256, dtype=np.float32)
TEX_SIGMA[:6] = (3.5, 3.5, 7.0, 2.5, 7.0, 3.0)  # white grain, grey levels
TEX_BLOTCH = np.zeros(256, dtype=np.float32)
TEX_BLOTCH[:6] = (0.08, 0.05, 0.06, 0.03, 0.18, 0.04)  # 3 px blotches, relative

BLOT_LUT = ((np.arange(256, dtype=np.float32) - 128.0) / 32.0).astype(np.float32)  # uint8 blotch -> N(0, 1)
SHADE_LUT = (1.0 - 0.5 * np.arange(256, dtype=np.float32) / 255.0).astype(np.float32)  # shadow mask -> factor
SHADE_BLUE = (10.0 * np.arange(256, dtype=np.float32) / 255.0).astype(np.float32)  # skylight in shadows
