"""The capacity plan's workload: buildings and km² of imagery per département, counted or estimated.

Why a module of its own: what is to be done (how many buildings, on how much imagery) is the plan's
other input beside its rates (``orchestration.capacity_rates``), and it is the part that reads files:
a département's buildings are counted from its footprint file when one can be read, else estimated
from France's stated total, and the plan says which.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from ops.geo.departements import DEPARTEMENTS, check_departement

# France ≈ 35 million buildings: the product's stated figure for IGN BD TOPO (not counted here).
# Without a better stated basis it is spread evenly over the 101 départements (Paris has far fewer,
# large rural départements more): per-département estimates are rough, their sum is the figure.
FRANCE_BUILDINGS = 35_000_000
# France's area, all of it under BD ORTHO: métropole 543,940 km² (INSEE) and the five overseas
# départements 89,176 (Guyane 83,534, Réunion 2,512, Guadeloupe 1,628, Martinique 1,128, Mayotte 374),
# spread evenly like the buildings (stated, not counted).
FRANCE_KM2 = 633_116.0

COUNTED = "counted"
ESTIMATE = "estimate"


def estimate_buildings(departements: Iterable[str], france: int = FRANCE_BUILDINGS) -> dict[str, int]:
    """``france`` spread evenly over the 101 départements, the remainder to the first: all 101 add up to it."""
    base, extra = divmod(france, len(DEPARTEMENTS))
    rank = {d: i for i, d in enumerate(DEPARTEMENTS)}
    return {d: base + (1 if rank[check_departement(d)] < extra else 0) for d in departements}


def estimate_km2(departements: Iterable[str], france: float = FRANCE_KM2) -> dict[str, float]:
    """France's km² of imagery spread evenly over the 101 départements (stated: Guyane is 84,000, Paris 105)."""
    return {check_departement(d): france / len(DEPARTEMENTS) for d in departements}


def buildings_by_departement(
    departements: Sequence[str],
    locate: Callable[[str], Path] | None,
    count: Callable[[Path], int] | None,
    france: int = FRANCE_BUILDINGS,
) -> tuple[dict[str, int], dict[str, str], dict[str, str]]:
    """(buildings, basis, why not counted) per département: counted from its footprint file where
    ``locate`` finds one and ``count`` can read it, else the even-spread estimate.

    ``locate=None`` estimates them all. A missing or unreadable file is not an error: the plan falls
    back to the estimate and says so (the third dict holds the reason).
    """
    estimates = estimate_buildings(departements, france)
    counts: dict[str, int] = {}
    basis: dict[str, str] = {}
    why: dict[str, str] = {}
    for dep in departements:
        if locate is not None and count is not None:
            try:
                counts[dep] = int(count(locate(dep)))
                basis[dep] = COUNTED
                continue
            except (OSError, ValueError) as exc:  # MissingInputError is an OSError, FootprintError a ValueError
                why[dep] = str(exc)
        counts[dep] = estimates[dep]
        basis[dep] = ESTIMATE
    return counts, basis, why


def footprint_counter(source_dir: str) -> tuple[Callable[[str], Path], Callable[[Path], int]]:
    """The real locate and count: ``FootprintSource.footprints`` and ``count_features``.

    Imported here, not at the top: ``resources.imagery`` brings Dagster (seconds to import), which the
    arithmetic does not need.
    """
    from ops.geo.footprints import count_features
    from resources.imagery import FootprintSource

    return FootprintSource(root=source_dir).footprints, lambda path: count_features(path, None)


def default_source_dir() -> str:
    """Where the pipeline reads its inputs (``BATIVISION_SOURCE_DIR``); imports Dagster, so only when counting."""
    from orchestration.environment import source_dir

    return str(source_dir())
