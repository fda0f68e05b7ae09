"""Where buildings are: départements and their CRS, the work grid, footprint reading and repair, reprojection.

Serves the ``buildings`` step (footprints → the ``buildings`` contract) and
anything that places a building on the map (cells, WGS84 for the warehouse).
"""
