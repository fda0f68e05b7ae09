"""`labelling_sheet`: the buildings of a partition worth labelling next, as a sheet a person fills.

Issue 18, the labelling loop. From one model version's staged predictions of
the partition, ``ops.ml.labelling`` picks the buildings the model is least
certain of plus a random control sample, and writes a CSV with each
building's chip as a PNG beside it. The filled sheet is read back by
``ops.ml.labelling.read_sheet`` as labels for the next training, whose model
card records their digest. A sheet someone has started to fill is not
overwritten unless asked: their work would be lost.

In production the store is a per-step local copy of the bucket: what is
written here is uploaded when the step ends (``.tmp`` files are not), and the
previous sheet's PNGs are deleted from the bucket first so that no stale chip
lingers beside the new sheet.
"""

from dagster import AssetExecutionContext, Config, Failure, MaterializeResult, MetadataValue, asset
from pydantic import Field

from assets.errors import IO_RETRY, bad_input_fails_fast
from assets.metadata import chip_grid, counts_table
from assets.owners import ML
from assets.partitions import departements_partitions
from assets.predictions import predictions
from ops.geo.departements import check_departement
from ops.locks import partition_lock
from ops.ml.catalog import ROOF_TYPE
from ops.ml.labelling import REASONS, chips_by_building, filled_labels, select_for_labelling, write_sheet
from resources import keys
from resources.env import kinds
from resources.model_store import ModelNotFoundError, ModelStore
from resources.object_store import ObjectStore

#: Chips shown in the step's metadata: the first of the sheet (the least certain).
PREVIEW = 8


class LabellingSheetConfig(Config):
    attribute: str = Field(default=ROOF_TYPE, description="The model (attribute) whose labels the sheet collects")
    n: int = Field(default=200, ge=0, description="Buildings the model is least certain of (random for regression)")
    control: int = Field(default=50, ge=0, description="Other ok buildings drawn at random: the control sample")
    seed: int = Field(default=0, description="Seed of the control sample (same seed, same sheet)")
    model_version: str = Field(
        default="", description="Model version whose predictions are read (default: the model store's current one)"
    )
    replace_filled: bool = Field(
        default=False, description="Overwrite the partition's sheet even if labels have been filled in it"
    )


@asset(
    partitions_def=departements_partitions,
    deps=[predictions],
    group_name="labelling",
    kinds=kinds("csv"),
    owners=ML,
    code_version="1",
    retry_policy=IO_RETRY,
    description="Labelling sheet of a partition: the buildings the model is least certain of plus a random "
    "control sample, a CSV with their chips as PNGs, filled in by hand as labels for the next training.",
)
def labelling_sheet(
    context: AssetExecutionContext, config: LabellingSheetConfig, store: ObjectStore, models: ModelStore
) -> MaterializeResult:
    with bad_input_fails_fast(context.partition_key):
        dep = check_departement(context.partition_key)
        name = config.attribute
        version = config.model_version or models.current_version(name)
        try:
            card = models.card(name, version)
        except FileNotFoundError as exc:
            raise ModelNotFoundError(f"model {name}@{version} not found in {models.where()}") from exc
        if card.task == "segmentation":
            raise Failure(
                description=f"{name} is a segmentation model: its ground truth is polygons drawn on the imagery, "
                "which a sheet of one label per building cannot give; label its chips with a polygon tool instead",
                allow_retries=False,
            )
        staged_key = keys.staged_predictions(dep, name, version)
        staged = store.path(staged_key)
        if not staged.exists():
            raise Failure(
                description=f"partition {dep}: no staged predictions of {name}@{version} at {store.uri(staged_key)}: "
                f"materialize `predictions` for partition {dep} with that version first",
                allow_retries=False,
            )
        sheet_key, png_key = keys.labelling_sheet(dep, name), keys.labelling_chips(dep, name)
        sheet = store.path(sheet_key)
        with partition_lock(sheet.parent, f"partition {dep}: labelling sheet of {name}"):
            if sheet.exists() and not config.replace_filled:
                filled = filled_labels(sheet)
                if filled:
                    raise Failure(
                        description=f"partition {dep}: {store.uri(sheet_key)} already has {filled} label(s) filled in: "
                        "train on it, or move it away, or set replace_filled to overwrite it",
                        allow_retries=False,
                    )
            context.log.info(f"partition {dep}: reading the staged predictions of {name}@{version} ({card.task})")
            rows = select_for_labelling(staged, config.n, config.control, config.seed, card.task)
            counts = {r: int((rows["reason"] == r).sum()) for r in REASONS if (rows["reason"] == r).any()}
            context.log.info(
                f"partition {dep}: {counts} among {rows.attrs['ok_rows']:,} ok buildings; writing the sheet's PNGs"
            )
            store.delete(sheet_key)  # no sheet pointing at deleted chips if the step fails below
            store.delete(png_key)
            chips_folder = store.folder(keys.chips(dep, card.chip_set))  # the chips the model reads
            written = write_sheet(
                rows,
                chips_folder,
                store.path(sheet_key),
                store.local(png_key),
                attribute=name,
                model_version=version,
                classes_or_unit=(card.unit or "") if card.task == "regression" else list(card.classes),
            )
        context.log.info(f"partition {dep}: labelling sheet of {written} buildings at {store.uri(sheet_key)}")
        first = rows.head(PREVIEW)
        chips = chips_by_building(chips_folder, first["building_id"])
        examples: dict[str, list] = {}
        for r in first.itertuples():
            shown = r.predicted_label if isinstance(r.predicted_label, str) else r.reason
            examples.setdefault(shown, []).append(
                (chips[r.building_id], r.value if card.task == "regression" else r.score)
            )
        metadata = {
            "sheet": MetadataValue.path(store.uri(sheet_key)),
            "chips": MetadataValue.path(store.uri(png_key)),
            "model_version": f"{name}@{version}",
            "rows": written,
            "ok_buildings": rows.attrs["ok_rows"],
            "reasons": counts_table(counts, "reason"),
            "preview": chip_grid(examples, f"{name}@{version} in {dep}: the sheet's first {len(first)}, predicted"),
        }
        for reason in ("least_certain", "control"):
            margins = rows.loc[rows["reason"] == reason, "margin"].dropna()
            if len(margins):
                metadata[f"{reason}_mean_margin"] = round(float(margins.mean()), 4)
        return MaterializeResult(metadata=metadata)
