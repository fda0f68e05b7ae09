"""The labelling loop: which buildings go on the sheet, the sheet itself, and the filled sheet read back.

The ops tests run on a hand-made partition (a staged predictions file whose
margins are known, a chips folder of two shards written with ``ops.shards``);
the last test runs the pipeline on the synthetic département and exports a
sheet through Dagster.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ops.ml import labelling
from ops.ml.labelling import (
    PNG_SCALE,
    SHEET_COLUMNS,
    labels_digest,
    read_sheet,
    read_sheet_info,
    select_for_labelling,
    write_sheet,
)
from ops.shards import INDEX_SCHEMA, partial_path, publish_shard, shard_paths

CLASSES = ["flat", "gable", "hip"]
N_BUILDINGS = 60
NO_CHIP = {"b005", "b041"}  # status nodata: no chip, never on a sheet
CHIP_PX = 12


def _margins() -> dict[str, float]:
    """A known margin per building, in an order unrelated to the ids; b010 and b011 tie."""
    order = np.random.default_rng(7).permutation(N_BUILDINGS)
    margins = {f"b{i:03d}": float(order[i]) / N_BUILDINGS for i in range(N_BUILDINGS)}
    margins["b011"] = margins["b010"]
    return margins


@pytest.fixture
def partition(tmp_path):
    """A chips folder (2 shards of 30 buildings) and staged predictions of each task for it."""
    rng = np.random.default_rng(0)
    ids = [f"b{i:03d}" for i in range(N_BUILDINGS)]
    status = ["nodata" if b in NO_CHIP else "ok" for b in ids]
    folder = tmp_path / "chips"
    folder.mkdir()
    chips = {}
    for k, shard in enumerate(("c0", "c1")):
        mine = ids[30 * k : 30 * (k + 1)]
        rows, arr = [], []
        for b in mine:
            if b in NO_CHIP:
                rows.append(-1)
                continue
            rows.append(len(arr))
            chips[b] = rng.integers(0, 256, (3, CHIP_PX, CHIP_PX), dtype=np.uint8)
            arr.append(chips[b])
        with partial_path(shard_paths(folder, shard)[0]).open("wb") as f:  # np.save would add .npy
            np.save(f, np.stack(arr))
        n = len(mine)
        index = pa.table(
            {
                "building_id": mine,
                "cell_id": [shard] * n,
                "status": [status[ids.index(b)] for b in mine],
                "row": pa.array(rows, pa.int32()),
                "minx": [0.0] * n,
                "miny": [0.0] * n,
                "maxx": [1.0] * n,
                "maxy": [1.0] * n,
                "valid_fraction": pa.array([1.0] * n, pa.float32()),
                "message": pa.nulls(n, pa.string()),
            },
            schema=INDEX_SCHEMA,
        )
        publish_shard(folder, shard, index, {"chip_size": str(CHIP_PX)})

    margins = _margins()
    probs = [
        json.dumps({"flat": 0.5 + margins[b] / 2, "gable": 0.5 - margins[b] / 2, "hip": 0.0}) if s == "ok" else None
        for b, s in zip(ids, status, strict=True)
    ]
    labels = [("flat" if i % 2 else "gable") if s == "ok" else None for i, s in enumerate(status)]
    scores = [0.5 + margins[b] / 2 if s == "ok" else None for b, s in zip(ids, status, strict=True)]
    classification = tmp_path / "roof_type-v1.parquet"
    common = {"building_id": ids, "status": status}
    pq.write_table(
        pa.table({**common, "label": labels, "score": scores, "probabilities": probs}), classification, row_group_size=8
    )
    segmentation = tmp_path / "panels-v1.parquet"
    seg_scores = [abs(m - 0.5) if s == "ok" else None for m, s in zip(margins.values(), status, strict=True)]
    pq.write_table(
        pa.table(
            {**common, "label": ["none"] * N_BUILDINGS, "score": seg_scores, "probabilities": [None] * N_BUILDINGS}
        ),
        segmentation,
    )
    regression = tmp_path / "height-v1.parquet"
    values = [3.0 + i / 10 if s == "ok" else None for i, s in enumerate(status)]
    pq.write_table(
        pa.table(
            {
                **common,
                "label": pa.nulls(N_BUILDINGS, pa.string()),
                "score": pa.nulls(N_BUILDINGS, pa.float64()),
                "value": values,
            }
        ),
        regression,
    )
    return {
        "chips": folder,
        "chip": chips,
        "classification": classification,
        "segmentation": segmentation,
        "regression": regression,
        "margins": margins,
        "ok": [b for b in ids if b not in NO_CHIP],
        "root": tmp_path,
    }


# -- selection ------------------------------------------------------------------------------------


def test_least_certain_come_first_in_margin_order_ties_by_id(partition):
    sel = select_for_labelling(partition["classification"], 10, 5, 1, "classification")
    least = sel[sel["reason"] == "least_certain"]
    margins = partition["margins"]
    expected = sorted(partition["ok"], key=lambda b: (margins[b], b))[:10]
    assert least["building_id"].tolist() == expected
    assert np.allclose(least["margin"], [margins[b] for b in expected])
    assert least["margin"].is_monotonic_increasing
    assert list(sel.columns) == ["building_id", "reason", "predicted_label", "score", "value", "margin"]
    assert sel.attrs["ok_rows"] == len(partition["ok"])
    assert sel["value"].isna().all()  # no value column in a classifier's file: NaN


def test_control_is_random_among_the_others_and_seeded(partition, monkeypatch):
    staged = partition["classification"]
    sel = select_for_labelling(staged, 10, 8, 1, "classification")
    control = sel[sel["reason"] == "control"]
    least = set(sel.loc[sel["reason"] == "least_certain", "building_id"])
    assert len(control) == 8 and not least & set(control["building_id"])
    assert set(control["building_id"]) <= set(partition["ok"])
    pd.testing.assert_frame_equal(sel, select_for_labelling(staged, 10, 8, 1, "classification"))
    other = select_for_labelling(staged, 10, 8, 2, "classification")
    assert set(other.loc[other["reason"] == "control", "building_id"]) != set(control["building_id"])
    # the same sheet whatever the batch size: memory is bounded, the result is not batch-dependent
    monkeypatch.setattr(labelling, "BATCH_ROWS", 7)
    pd.testing.assert_frame_equal(sel, select_for_labelling(staged, 10, 8, 1, "classification"))


def test_control_is_uniform_over_the_remaining_rows(partition):
    """Over many seeds every remaining ok building is drawn about equally often (none never, none always)."""
    counts: dict[str, int] = {}
    seeds = 400
    for seed in range(seeds):
        sel = select_for_labelling(partition["classification"], 10, 5, seed, "classification")
        for b in sel.loc[sel["reason"] == "control", "building_id"]:
            counts[b] = counts.get(b, 0) + 1
    remaining = len(partition["ok"]) - 10
    assert len(counts) == remaining
    expected = seeds * 5 / remaining
    assert min(counts.values()) > expected / 2 and max(counts.values()) < expected * 2


def test_more_asked_than_there_are(partition):
    sel = select_for_labelling(partition["classification"], 50, 50, 0, "classification")
    assert len(sel) == len(partition["ok"]) and sel["building_id"].is_unique
    assert (sel["reason"] == "least_certain").sum() == 50


def test_segmentation_is_least_certain_near_half(partition):
    sel = select_for_labelling(partition["segmentation"], 6, 3, 0, "segmentation")
    least = sel[sel["reason"] == "least_certain"]
    scores = pq.read_table(partition["segmentation"]).to_pandas().set_index("building_id")["score"]
    distance = (scores.loc[partition["ok"]] - 0.5).abs()
    assert least["building_id"].tolist() == sorted(distance.index, key=lambda b: (distance[b], b))[:6]
    assert np.allclose(least["margin"], 2 * distance.loc[least["building_id"]].to_numpy())


def test_regression_picks_are_random_and_say_so(partition):
    sel = select_for_labelling(partition["regression"], 6, 3, 4, "regression")
    assert sel["reason"].tolist() == ["random"] * 6 + ["control"] * 3
    assert sel["building_id"].is_unique and set(sel["building_id"]) <= set(partition["ok"])
    assert sel["margin"].isna().all() and sel["score"].isna().all() and sel["value"].notna().all()
    pd.testing.assert_frame_equal(sel, select_for_labelling(partition["regression"], 6, 3, 4, "regression"))
    assert sel["building_id"].tolist() != sorted(partition["ok"])[:6]


# -- the sheet ------------------------------------------------------------------------------------


def _sheet(partition, n=6, control=3, task="classification", classes_or_unit=CLASSES):
    rows = select_for_labelling(partition[task], n, control, 0, task)
    sheet = partition["root"] / "labelling" / "sheet.csv"
    written = write_sheet(
        rows,
        partition["chips"],
        sheet,
        partition["root"] / "labelling" / "chips",
        attribute="roof_type",
        model_version="v1",
        classes_or_unit=classes_or_unit,
    )
    assert written == n + control
    return rows, sheet


def test_sheet_has_its_columns_and_pngs_that_decode_to_the_chips(partition):
    rows, sheet = _sheet(partition)
    lines = sheet.read_text().splitlines()
    assert lines[0] == ",".join(SHEET_COLUMNS) and not any(line.startswith("#") for line in lines)
    table = pd.read_csv(sheet, dtype=str, keep_default_na=False)
    assert table["building_id"].tolist() == rows["building_id"].tolist()
    assert (table["label"] == "").all() and (table["comment"] == "").all()
    for b, chip in zip(table["building_id"], table["chip"], strict=True):
        png = sheet.parent / chip
        image = np.asarray(Image.open(png))
        assert image.shape == (CHIP_PX * PNG_SCALE, CHIP_PX * PNG_SCALE, 3)
        np.testing.assert_array_equal(image[::PNG_SCALE, ::PNG_SCALE].transpose(2, 0, 1), partition["chip"][b])
    assert read_sheet_info(sheet) | {"reasons": None} == {
        "attribute": "roof_type",
        "model_version": "v1",
        "task": "classification",
        "classes": CLASSES,
        "unit": None,
        "rows": 9,
        "reasons": None,
        "chips": "chips",
        "columns": list(SHEET_COLUMNS),
    }
    assert not list(sheet.parent.rglob("*.tmp"))


def test_a_new_sheet_drops_the_old_sheets_pngs(partition):
    _sheet(partition, n=10, control=0)
    _, sheet = _sheet(partition, n=2, control=0)
    assert len(list((sheet.parent / "chips").glob("*.png"))) == 2


def test_a_building_without_a_chip_is_named(partition):
    rows = pd.DataFrame({"building_id": ["b001", "b005"], "reason": "control", "predicted_label": "flat"})
    rows = rows.assign(score=0.5, value=np.nan, margin=np.nan)
    with pytest.raises(ValueError, match=r"no chip for 1 building.*b005.*re-run predictions"):
        write_sheet(
            rows,
            partition["chips"],
            partition["root"] / "s.csv",
            partition["root"] / "p",
            attribute="roof_type",
            model_version="v1",
            classes_or_unit=CLASSES,
        )
    assert not (partition["root"] / "s.csv").exists()


# -- reading it back ------------------------------------------------------------------------------


def _fill(sheet: Path, labels: dict[int, str], comments: dict[int, str] | None = None) -> pd.DataFrame:
    """Fill the ``label`` cell of rows (by position) as a labeller would, and save the CSV."""
    table = pd.read_csv(sheet, dtype=str, keep_default_na=False)
    for i, label in labels.items():
        table.loc[i, "label"] = label
    for i, comment in (comments or {}).items():
        table.loc[i, "comment"] = comment
    table.to_csv(sheet, index=False)
    return table


def test_round_trip_returns_exactly_the_filled_labels(partition):
    _, sheet = _sheet(partition)
    table = _fill(sheet, {0: "flat", 2: " hip ", 5: "gable"}, {1: "two\nlines, and a comma"})
    got = read_sheet(sheet, CLASSES)
    want = {
        table.loc[0, "building_id"]: "flat",
        table.loc[2, "building_id"]: "hip",
        table.loc[5, "building_id"]: "gable",
    }
    assert got.to_dict() == want
    assert got.index.name == "building_id" and got.name == "roof_type"
    assert got.attrs["unlabelled"] == 6 and got.attrs["model_version"] == "v1"


def test_a_bad_class_names_file_line_building_value_and_classes(partition):
    _, sheet = _sheet(partition)
    # row 1's comment spans two lines: row 3 starts on line 6 of the file (header = line 1)
    table = _fill(sheet, {0: "flat", 3: "flot"}, {1: "two\nlines"})
    with pytest.raises(ValueError) as err:
        read_sheet(sheet, CLASSES)
    message = str(err.value)
    assert str(sheet) in message and f"line 6: building {table.loc[3, 'building_id']}: 'flot'" in message
    assert "['flat', 'gable', 'hip']" in message


def test_duplicate_ids_are_named_with_their_lines(partition):
    _, sheet = _sheet(partition)
    table = pd.read_csv(sheet, dtype=str, keep_default_na=False)
    table.loc[4, "building_id"] = table.loc[1, "building_id"]
    table.to_csv(sheet, index=False)
    with pytest.raises(ValueError, match=rf"more than once: {table.loc[1, 'building_id']} \(lines 3, 6\)"):
        read_sheet(sheet, CLASSES)


def test_missing_columns_are_named(tmp_path):
    sheet = tmp_path / "sheet.csv"
    sheet.write_text("cleabs,roof\nb1,flat\n")
    with pytest.raises(
        ValueError, match=r"sheet.csv: no column\(s\) \['building_id', 'label'\]; columns found: \['cleabs', 'roof'\]"
    ):
        read_sheet(sheet, CLASSES)


def test_regression_labels_are_numbers(partition):
    _, sheet = _sheet(partition, task="regression", classes_or_unit="m")
    table = _fill(sheet, {0: "4.5", 1: "12,5", 7: "7"})
    got = read_sheet(sheet, None)
    assert got.dtype == float
    assert got.to_dict() == {
        table.loc[0, "building_id"]: 4.5,
        table.loc[1, "building_id"]: 12.5,
        table.loc[7, "building_id"]: 7.0,
    }
    assert read_sheet_info(sheet)["unit"] == "m"
    _fill(sheet, {2: "tall"})
    with pytest.raises(ValueError, match=rf"not a number: line 4: building {table.loc[2, 'building_id']}: 'tall'"):
        read_sheet(sheet, None)
    with pytest.raises(ValueError, match="a sheet of values"):
        read_sheet(sheet, CLASSES)


def test_a_semicolon_sheet_from_a_french_spreadsheet_reads(tmp_path):
    sheet = tmp_path / "sheet.csv"
    sheet.write_bytes("\ufeffbuilding_id;label;comment\nb1;flat;toit plat\nb2;;\n".encode())
    got = read_sheet(sheet, CLASSES)
    assert got.to_dict() == {"b1": "flat"} and got.attrs["unlabelled"] == 1


def test_labels_digest_is_about_the_pairs_not_their_order():
    a = pd.Series({"b1": "flat", "b2": "hip"})
    assert re.fullmatch(r"[0-9a-f]{12}", labels_digest(a))
    assert labels_digest(a) == labels_digest(a.iloc[::-1])
    assert labels_digest(a) != labels_digest(pd.Series({"b1": "flat", "b2": "gable"}))
    assert labels_digest(pd.Series({"b1": 2.5})) != labels_digest(pd.Series({"b1": 2.25}))


# -- through Dagster --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(small_dep, tmp_path_factory):
    """Local resources pointed at a temporary data folder and the synthetic sources."""
    from tests.localenv import local_env

    data = tmp_path_factory.mktemp("data")
    with local_env(small_dep.root.parent, data) as (resources, instance):
        yield resources, data, small_dep, instance


@pytest.mark.slow
def test_labelling_sheet_of_a_predicted_partition(env):
    from dagster import load_assets_from_modules, materialize

    from assets import buildings, chips, inputs, mosaic
    from assets.labelling import labelling_sheet
    from assets.predictions import predictions
    from resources import keys

    resources, data, _, instance = env
    assets = [*load_assets_from_modules([inputs, buildings, mosaic, chips]), predictions, labelling_sheet]

    def run(selection, run_config=None, raise_on_error=True):
        return materialize(
            assets,
            selection=selection,
            partition_key="12",
            resources=resources,
            instance=instance,
            run_config=run_config,
            raise_on_error=raise_on_error,
        )

    run(["buildings", "ortho_mosaic", "chips", "predictions"])
    config = {"ops": {"labelling_sheet": {"config": {"n": 20, "control": 5}}}}
    result = run(["labelling_sheet"], config)
    store = resources["store"]
    sheet = store.path(keys.labelling_sheet("12", "roof_type"))
    table = pd.read_csv(sheet, dtype=str, keep_default_na=False)
    version = resources["models"].current_version("roof_type")
    staged = pq.read_table(store.path(keys.staged_predictions("12", "roof_type", version))).to_pandas()
    ok = staged[staged["status"] == "ok"].set_index("building_id")
    assert len(table) == 25 and table["building_id"].is_unique and set(table["building_id"]) <= set(ok.index)
    assert table["reason"].value_counts().to_dict() == {"least_certain": 20, "control": 5}
    assert all((sheet.parent / c).is_file() for c in table["chip"])
    top2 = ok["probabilities"].map(lambda t: sorted(json.loads(t).values())[-2:])
    margin = top2.map(lambda p: p[1] - p[0])
    by_reason = table.set_index("building_id")["reason"]
    least, control = (
        margin[by_reason[by_reason == "least_certain"].index],
        margin[by_reason[by_reason == "control"].index],
    )
    assert least.mean() < control.mean() and least.max() <= margin.sort_values().iloc[19] + 1e-9
    (mat,) = result.asset_materializations_for_node("labelling_sheet")
    assert mat.metadata["rows"].value == 25 and mat.metadata["model_version"].value == f"roof_type@{version}"
    assert read_sheet_info(sheet)["model_version"] == version

    # someone starts labelling: a new export must not throw their work away
    table.loc[0, "label"] = "flat"
    table.to_csv(sheet, index=False)
    again = run(["labelling_sheet"], config, raise_on_error=False)
    assert not again.success
    (failure,) = [e for e in again.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "already has 1 label(s) filled in" in failure.step_failure_data.error.message
    assert read_sheet(sheet, ["flat", "gable", "hip"]).to_dict() == {table.loc[0, "building_id"]: "flat"}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("attribute", "message"),
    [
        ("solar_panels", "is a segmentation model: its ground truth is polygons"),
        ("roof_type", "no staged predictions of roof_type@"),
    ],
)
def test_labelling_sheet_refuses_what_it_cannot_do(tmp_path, attribute, message):
    """A segmenter gets no sheet; a model version never predicted on the partition is named, with what to run."""
    from dagster import materialize

    from assets.labelling import labelling_sheet
    from resources.model_store import ModelStore
    from resources.object_store import LocalObjectStore

    repo = Path(__file__).resolve().parent.parent
    resources = {
        "store": LocalObjectStore(root=str(tmp_path / "store")),
        "models": ModelStore(root=str(tmp_path / "models"), shipped=str(repo / "models")),
    }
    result = materialize(
        [labelling_sheet],
        partition_key="12",
        resources=resources,
        run_config={"ops": {"labelling_sheet": {"config": {"attribute": attribute}}}},
        raise_on_error=False,
    )
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    error = failure.step_failure_data.error.message
    assert message in error
    if attribute == "roof_type":
        assert "predictions/12/roof_type-" in error and "materialize `predictions` for partition 12" in error
    assert not [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
