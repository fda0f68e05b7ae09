"""Orthophoto tiles: the mosaic over a département's tiles, decoding one raster block, resampling, remote byte ranges.

Serves ``ortho_mosaic`` and, underneath the crop, everything that turns tile
bytes into pixels. Knows nothing of buildings or chips.
"""
