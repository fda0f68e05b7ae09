"""The object store's key layout: where each artefact of a partition lives, in one place.

It mirrors the artefact table of ``docs/DESIGN.md`` ("Artefacts in the object
store"); change both together. Keys are relative and ``/``-separated: the
local store puts them under its folder, the Cloud Storage store under its
bucket prefix, so every environment has the same layout. Assets ask here for
a key and hand it to the store (``store.path(key)``, ``store.folder(key)``);
no asset spells a key itself or imports another asset for one.
"""

from __future__ import annotations

BUILDINGS_ROOT = "buildings"
MOSAIC_ROOT = "mosaic"
CHIPS_ROOT = "chips"
CHIP_SETS_ROOT = "chip_sets"
PREDICTIONS_ROOT = "predictions"
BATCH_SIZE_ROOT = "inference/batch_size"
SCRATCH_ROOT = "tmp"
MODELS_ROOT = "models"
LABELLING_ROOT = "labelling"


def buildings(dep: str) -> str:
    """The partition's validated footprints: GeoParquet 1.1, native CRS (the ``buildings`` contract)."""
    return f"{BUILDINGS_ROOT}/{dep}/buildings.parquet"


def mosaic_vrt(dep: str) -> str:
    """The VRT over the partition's orthophoto tiles (EPSG-tagged)."""
    return f"{MOSAIC_ROOT}/{dep}/mosaic.vrt"


def mosaic_service(dep: str) -> str:
    """The GDAL WMS description of the partition's imagery when it is a WMS layer (the mosaic's one tile)."""
    return f"{MOSAIC_ROOT}/{dep}/service.xml"


def converted_tiles(dep: str) -> str:
    """The partition's JPEG 2000 tiles converted to COGs (``ortho_mosaic``'s ``convert``), one per tile."""
    return f"{MOSAIC_ROOT}/{dep}/cog"


def mosaic_info(dep: str) -> str:
    """What the crop needs of the mosaic and the VRT does not say (``ops.imagery.mosaic.MosaicInfo`` as JSON)."""
    return f"{MOSAIC_ROOT}/{dep}/mosaic.json"


def chips_root(chip_set: str = "") -> str:
    """The folder holding one folder of chip shards per partition, for ``chip_set`` ("": the default chips).

    Sets live under their own root, not under ``chips/``: a training of a default-chips model takes the
    whole ``chips/`` prefix (a bucket store downloads it), which must not hold every set's shards too.
    """
    return f"{CHIP_SETS_ROOT}/{chip_set}" if chip_set else CHIPS_ROOT


def chips(dep: str, chip_set: str = "") -> str:
    """The folder of the partition's chip shards (the format is ``ops.shards``).

    ``chip_set``: an attribute's own chip geometry (``ops.ml.attributes.ChipGeometry.name``);
    "" for the default chips.
    """
    return f"{chips_root(chip_set)}/{dep}"


def staged_predictions(dep: str, model: str, version: str) -> str:
    """One model version's rows of the partition, staged before the warehouse transaction."""
    return f"{PREDICTIONS_ROOT}/{dep}/{model}-{version}.parquet"


def batch_size_cache(machine: str, models: str) -> str:
    """The CPU batch size measured for a set of model versions on a kind of machine (reused by later partitions)."""
    return f"{BATCH_SIZE_ROOT}/{machine}/{models}.json"


def scratch() -> str:
    """Per-step scratch (footprints split by cell during ``predictions``); deleted by the step that made it."""
    return SCRATCH_ROOT


def model_version(name: str, version: str) -> str:
    """A saved model: ``weights.pt`` and ``model_card.json``."""
    return f"{MODELS_ROOT}/{name}/{version}"


def model_pointer(name: str) -> str:
    """The file holding the current version of model ``name``."""
    return f"{MODELS_ROOT}/{name}/CURRENT"


def labelling_sheet(dep: str, attribute: str) -> str:
    """The partition's labelling sheet for ``attribute`` (CSV, ``sheet.json`` beside it): labels for the next training."""
    return f"{LABELLING_ROOT}/{dep}/{attribute}/sheet.csv"


def labelling_chips(dep: str, attribute: str) -> str:
    """The chips of the labelling sheet's buildings as PNGs (``<building_id>.png``), what the labeller looks at."""
    return f"{LABELLING_ROOT}/{dep}/{attribute}/chips"
