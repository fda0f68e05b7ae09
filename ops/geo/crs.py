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

from pyproj import CRS

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
