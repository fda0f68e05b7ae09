"""The 101 French départements: partition keys and their native CRS.

Partition keys are INSEE codes as strings. Anything else is rejected with an
error that names the key, because a typo in a backfill would otherwise create
an empty partition that looks like a success.
"""

from __future__ import annotations

METRO_CODES: tuple[str, ...] = (
    *(f"{i:02d}" for i in range(1, 20)),
    "2A",
    "2B",
    *(f"{i:02d}" for i in range(21, 96)),
)
OVERSEAS_CRS: dict[str, int] = {
    "971": 5490,  # Guadeloupe, RGAF09 / UTM 20N
    "972": 5490,  # Martinique, RGAF09 / UTM 20N
    "973": 2972,  # Guyane, RGFG95 / UTM 22N
    "974": 2975,  # La Réunion, RGR92 / UTM 40S
    "976": 4471,  # Mayotte, RGM04 / UTM 38S
}
DEPARTEMENTS: tuple[str, ...] = (*METRO_CODES, *OVERSEAS_CRS)
LAMBERT_93 = 2154
NATIVE_CRS_EPSG: frozenset[int] = frozenset({LAMBERT_93, *OVERSEAS_CRS.values()})


class UnknownDepartementError(ValueError):
    """A partition key that is not one of the 101 INSEE département codes."""


def check_departement(key: str) -> str:
    """Return ``key`` if it is a département code, else raise naming it."""
    if key not in DEPARTEMENTS:
        raise UnknownDepartementError(
            f"unknown département partition key {key!r}: expected one of the 101 INSEE codes "
            "01-19, 2A, 2B, 21-95, 971, 972, 973, 974, 976"
        )
    return key


def native_epsg(departement: str) -> int:
    """EPSG code of the département's native CRS (Lambert-93 in metropolitan France)."""
    check_departement(departement)
    return OVERSEAS_CRS.get(departement, LAMBERT_93)
