"""The inputs as assets: each département's footprint files and orthophoto tiles, observed.

Declaring them puts the start of lineage at the files themselves: in the UI,
`buildings` hangs off `footprint_files` and `ortho_mosaic` off
`orthophoto_tiles`. Observing them (the UI's "Observe sources", or the
`observe` API) records a data version per département — a fingerprint of the
files' names, sizes and modification times (generations in Cloud Storage) —
so a new imagery vintage or a new BD TOPO delivery shows as a new data
version, and what was built from the old one as stale.
"""

from dagster import DataVersion, DataVersionsByPartition, observable_source_asset

from assets.partitions import departements_partitions
from ops.geo.departements import DEPARTEMENTS
from resources.imagery import FootprintSource, OrthoImagery


@observable_source_asset(
    partitions_def=departements_partitions,
    group_name="inputs",
    description="A département's building footprints (BD TOPO BATIMENT, any OGR format): <source>/<dep>/footprints/.",
    tags={"dagster/kind/gdal": ""},
)
def footprint_files(footprints: FootprintSource) -> DataVersionsByPartition:
    found = {dep: footprints.fingerprint(dep) for dep in DEPARTEMENTS}
    return DataVersionsByPartition({dep: DataVersion(fp) for dep, fp in found.items() if fp is not None})


@observable_source_asset(
    partitions_def=departements_partitions,
    group_name="inputs",
    description="A département's orthophoto tiles (BD ORTHO GeoTIFF / JPEG 2000): <source>/<dep>/ortho/.",
    tags={"dagster/kind/gdal": ""},
)
def orthophoto_tiles(imagery: OrthoImagery) -> DataVersionsByPartition:
    found = {dep: imagery.fingerprint(dep) for dep in DEPARTEMENTS}
    return DataVersionsByPartition({dep: DataVersion(fp) for dep, fp in found.items() if fp is not None})
