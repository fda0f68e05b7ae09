"""Partitions of the pipeline: one per French département (defined beside the assets)."""

from assets.partitions import departements_partitions
from ops.geo.departements import DEPARTEMENTS, check_departement

__all__ = ["DEPARTEMENTS", "check_departement", "departements_partitions"]
