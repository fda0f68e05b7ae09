"""Recognise a raster's or a vector file's CRS as an EPSG code.

Real IGN files are not always tagged with an authority: the BD ORTHO sample in
``tests/data/real`` writes Lambert-93 as a WKT with no EPSG code and an unnamed
datum, so ``to_epsg()`` returns None. Treating that as "unknown CRS" would
reject perfectly good imagery, while guessing from the name alone would accept
anything. We first trust an authority, and otherwise compare the projection
parameters with the native CRS of the départements, which is the set of CRS a
French orthophoto can legitimately be in.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from pyproj import CRS, Transformer

from ops.geo.departements import NATIVE_CRS_EPSG


class UnrecognisedCRSError(ValueError):
    """A file whose CRS is missing or matches none of the known projections."""


# Parameter names whose values must match; ellipsoid and datum names are
# deliberately ignored (the IGN sample writes "unnamed" / a WGS84 spheroid).
_PARAMS_TOLERANCE = 1e-6


def _projection_signature(crs: CRS) -> tuple[str, dict[str, float]] | None:
    """The projection method and its numeric parameters, or None if not projected."""
    if not crs.is_projected or crs.coordinate_operation is None:
        return None
    op = crs.coordinate_operation
    params = {p.name.lower(): float(p.value) for p in op.params}
    method = op.method_name.lower().replace("(", "").replace(")", "")
    return method, params


def _same_projection(a: CRS, b: CRS) -> bool:
    sa, sb = _projection_signature(a), _projection_signature(b)
    if sa is None or sb is None or sa[0] != sb[0] or set(sa[1]) != set(sb[1]):
        return False
    if any(not math.isclose(sa[1][k], sb[1][k], rel_tol=0, abs_tol=_PARAMS_TOLERANCE) for k in sa[1]):
        return False
    unit_a = a.axis_info[0].unit_name if a.axis_info else None
    unit_b = b.axis_info[0].unit_name if b.axis_info else None
    return unit_a == unit_b


def recognise_epsg(crs: object, *, what: str = "input") -> int:
    """Return the EPSG code of ``crs`` (anything pyproj accepts, or a rasterio CRS).

    Raises :class:`UnrecognisedCRSError` naming ``what`` (usually a file path)
    when the CRS is missing or matches nothing we know.
    """
    if crs is None or (hasattr(crs, "to_wkt") and not crs.to_wkt()):
        raise UnrecognisedCRSError(f"{what}: no CRS is defined")
    try:
        pcrs = CRS.from_user_input(crs.to_wkt() if hasattr(crs, "to_wkt") else crs)
    except Exception as exc:  # pyproj raises CRSError, rasterio its own
        raise UnrecognisedCRSError(f"{what}: CRS cannot be parsed ({exc})") from exc
    epsg = pcrs.to_epsg(min_confidence=70)
    if epsg is not None:
        return epsg
    for candidate in sorted(NATIVE_CRS_EPSG):
        if _same_projection(pcrs, CRS.from_epsg(candidate)):
            return candidate
    raise UnrecognisedCRSError(
        f"{what}: CRS {pcrs.name!r} has no EPSG authority and matches none of the "
        f"départements' projections (EPSG:{', '.join(map(str, sorted(NATIVE_CRS_EPSG)))})"
    )


@lru_cache(maxsize=16)
def valid_area(epsg: int) -> tuple[float, float, float, float] | None:
    """Bounds (xmin, ymin, xmax, ymax) of the area where ``epsg`` is meant to be used, in its own x/y order.

    A footprint whose coordinates fall outside is not "nonsense but well defined": it is a file
    whose coordinates are not in the CRS it declares (lon/lat degrees under a Lambert-93 tag,
    lat,lon swapped), and reading on would put every building in no cell of any image.
    Projected CRS: EPSG's area of use, reprojected with densified edges. None when EPSG gives none.
    """
    crs = CRS.from_epsg(epsg)
    aou = crs.area_of_use
    if aou is None:
        return None
    if crs.is_geographic:
        return aou.bounds  # lon/lat: our transformers are always_xy
    return Transformer.from_crs(4326, epsg, always_xy=True).transform_bounds(*aou.bounds, densify_pts=21)


def outside_area(names: list[str], src_bounds: np.ndarray, bounds: np.ndarray, src_epsg: int, epsg: int) -> str | None:
    """Why the shapes whose bounds (n × 4, in ``epsg``) leave ``epsg``'s valid area are misplaced, or None.

    ``src_bounds`` are the same shapes' bounds in the file's own ``src_epsg``: the message gives
    their extent as the user's file has it, and guesses the usual cause (degrees under a projected
    tag; lat,lon order in a geographic file). Shapes without coordinates (NaN source bounds) are
    skipped; a failed reprojection (inf, NaN) counts as outside.
    """
    area = valid_area(epsg)
    if area is None:
        return None
    x0, y0, x1, y1 = area
    with np.errstate(invalid="ignore"):
        inside = (bounds[:, 0] >= x0) & (bounds[:, 2] <= x1) & (bounds[:, 1] >= y0) & (bounds[:, 3] <= y1)
    rows = np.flatnonzero(~np.isnan(src_bounds[:, 0]) & ~inside)
    if not len(rows):
        return None
    sb = [*np.min(src_bounds[rows, :2], axis=0).tolist(), *np.max(src_bounds[rows, 2:], axis=0).tolist()]
    guess = ""
    if not CRS.from_epsg(src_epsg).is_geographic:
        if max(abs(sb[0]), abs(sb[2])) <= 180 and max(abs(sb[1]), abs(sb[3])) <= 90:
            guess = " They look like degrees: lon/lat written under a projected CRS's tag?"
    else:
        swapped = Transformer.from_crs(src_epsg, epsg, always_xy=True).transform([sb[1], sb[3]], [sb[0], sb[2]])
        if all(x0 <= v <= x1 for v in swapped[0]) and all(y0 <= v <= y1 for v in swapped[1]):
            guess = " Swapping x and y would put them inside: the file is in lat,lon order (GeoJSON is lon,lat)."
    return (
        f"{len(rows)} shape(s) lie outside the area where EPSG:{epsg} is valid (x {x0:.0f}..{x1:.0f}, "
        f"y {y0:.0f}..{y1:.0f}), e.g. {[names[i] for i in rows[:5]]}; their extent is x {sb[0]:.6g}..{sb[2]:.6g}, "
        f"y {sb[1]:.6g}..{sb[3]:.6g} in the file's EPSG:{src_epsg}. Is it the right file, with coordinates in the CRS it declares?"
        f"{guess}"
    )
