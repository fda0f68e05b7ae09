"""A new attribute is a declaration plus labels: trained, predicted and in dbt without a line of Python.

What a user checks, through Dagster's ``materialize`` on the small synthetic
département: an attribute declared from a column of the footprints (BD TOPO's
``mat_toits`` codes, mapped to classes) and a regression declared from a CSV
(roof slope in degrees) each get a training asset, a model that beats the
baseline on held-out cells, calibrated scores, one ``predictions`` row per
building and columns in ``building_attributes``; a filled labelling sheet
changes which labels the next model saw; and removing a declaration removes
nothing already written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from dagster import materialize

from ops.ml.attributes import load_attributes
from ops.shards import index_rows, list_shards, open_chips, read_index
from orchestration.definitions import assemble_assets
from tests.localenv import local_env, query_warehouse

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("attributes")]

DBT = ["stg_buildings", "stg_predictions", "building_attributes", "departement_summary"]
ROOF_TYPE = """
  roof_type:
    task: classification
    classes: [flat, gable, hip]
    asset: roof_model
    labels: {file: labels.csv, column: roof_type}
"""
ROOF_COVER = """
  roof_cover:
    description: roof material from BD TOPO codes
    task: classification
    classes: [tiles, slate, concrete, other]
    labels:
      footprint_column: mat_toits
      values: {"00": null, "10": tiles, "20": slate, "40": concrete, "90": other}
    chip: {size: 48, margin_m: 4}
    training: {epochs: 6, learning_rate: 0.004}
"""
PITCH = """
  pitch:
    task: regression
    unit: degrees
    range: [0, 90]
    labels: {file: roof_slope.csv, column: slope_deg}
    training: {epochs: 12, learning_rate: 0.004}
"""
DECLARATIONS = "attributes:" + ROOF_TYPE + ROOF_COVER + PITCH


def _declare(folder: Path, text: str) -> dict:
    path = folder / "attributes.yaml"
    path.write_text(text)
    return load_attributes(path)


@pytest.fixture(scope="module")
def env(small_dep, tmp_path_factory):
    data = tmp_path_factory.mktemp("attr-data")
    with local_env(small_dep.root.parent, data) as (resources, instance):
        yield resources, data, small_dep, instance, tmp_path_factory.mktemp("decl")


def _run(env, attributes, selection, partition=None, run_config=None, raise_on_error=True):
    resources, _, _, instance, _ = env
    return materialize(
        assemble_assets(attributes),
        selection=selection,
        partition_key=partition,
        resources=resources,
        instance=instance,
        run_config=run_config,
        raise_on_error=raise_on_error,
    )


_query = query_warehouse


@pytest.fixture(scope="module")
def trained(env):
    """The crop, then the two declared attributes trained briefly, predicted and built into dbt."""
    attrs = _declare(env[4], DECLARATIONS)
    assert _run(env, attrs, ["buildings", "ortho_mosaic", "chips"], "12").success
    result = _run(env, attrs, ["roof_cover_model", "pitch_model"])
    assert result.success
    meta = {
        name: result.asset_materializations_for_node(name)[0].metadata for name in ("roof_cover_model", "pitch_model")
    }
    assert _run(env, attrs, ["predictions", *DBT], "12").success
    return attrs, meta


def test_a_declared_attribute_gets_a_column_for_every_building(env, trained):
    _, data, dep, _, _ = env
    b = _query(data, "select building_id from buildings where departement = '12'")
    assert len(b) == dep.n_buildings
    for model in ("roof_type", "roof_cover", "pitch"):  # the accounting invariant, per model
        p = _query(data, f"select building_id from predictions where departement = '12' and model_name = '{model}'")
        assert len(p) == len(b) and p["building_id"].is_unique and set(p["building_id"]) == set(b["building_id"])
    ba = _query(data, "select * from building_attributes where departement = '12'")
    assert len(ba) == dep.n_buildings
    assert {"roof_cover_label", "roof_cover_score", "roof_cover_status", "pitch_value", "pitch_status"} <= set(
        ba.columns
    )
    assert "pitch_label" not in ba.columns  # a regression has a value, not a label
    ok = ba[ba["roof_cover_status"] == "ok"]
    assert len(ok) > 0.8 * dep.n_buildings
    assert ok["roof_cover_label"].isin(["tiles", "slate", "concrete", "other"]).all()
    assert ok["roof_cover_score"].between(0, 1).all()
    assert ba.loc[ba["pitch_status"] == "ok", "pitch_value"].between(0, 90).all()  # clipped to the declared range
    assert ba.loc[ba["pitch_status"] != "ok", "pitch_value"].isna().all()
    summary = _query(data, "select model_name, task, mean_value from departement_summary where departement = '12'")
    assert summary.set_index("model_name").loc["pitch", "task"] == "regression"


def test_the_marts_column_schema_in_the_ui_lists_every_column_of_the_table_from_the_declarations(env, trained):
    """What an analyst reads beside `building_attributes`: its yml describes the fixed columns only;
    each declared attribute's columns come from its declaration (classes, unit, range)."""
    attrs, _ = trained
    _, data, _, _, _ = env
    (spec,) = [
        s for a in assemble_assets(attrs) for s in getattr(a, "specs", []) if s.key.path[-1] == "building_attributes"
    ]
    schema = {c.name: c for c in spec.metadata["dagster/column_schema"].columns}
    table = _query(data, "select * from building_attributes where departement = '12' limit 1")
    assert list(schema) == list(table.columns)  # every column, in the table's order
    assert schema["roof_cover_label"].description.startswith("roof material from BD TOPO codes: one of tiles, slate")
    assert "in degrees, clipped to [0, 90]" in schema["pitch_value"].description
    assert "nodata" in schema["pitch_status"].description and schema["roof_cover_score"].type == "double"


def test_an_attribute_with_its_own_chip_geometry_is_cut_trained_and_predicted_on_its_own_chips(env, trained):
    """roof_cover declares 48 px chips with a 4 m margin: a set of chips beside the default ones, for it alone."""
    _, data, dep, _, _ = env
    store = data / "store"
    own, default = store / "chip_sets" / "s48-m4-r0.15" / "12", store / "chips" / "12"
    widths = {}
    for folder, size in ((own, 48), (default, 64)):
        shards = list_shards(folder)
        assert sum(index_rows(folder, s) for s in shards) == dep.n_buildings
        assert {open_chips(folder, s).shape[-2:] for s in shards} == {(size, size)}
        index = pd.concat([read_index(folder, s).to_pandas() for s in shards]).set_index("building_id")
        widths[size] = (index["maxx"] - index["minx"]).dropna()
    # the same buildings, 2 m more margin on each side where the metres set the margin
    assert widths[48].median() >= widths[64].median() + 3
    cards = [json.loads(p.read_text()) for p in (store / "models").rglob("model_card.json")]
    assert {
        (c["name"], c["input_size"], c.get("chip_set", "")) for c in cards if c["name"] in ("roof_cover", "pitch")
    } == {
        ("roof_cover", 48, "s48-m4-r0.15"),
        ("pitch", 64, ""),
    }


def test_a_model_whose_chip_set_is_not_cut_fails_before_any_row_naming_the_set(env, trained):
    """A partition cropped before the declaration gained its `chip`: predictions says to re-run chips."""
    attrs, _ = trained
    _, data, _, _, _ = env
    own = data / "store" / "chip_sets" / "s48-m4-r0.15" / "12"
    hidden = own.with_name("hidden")
    published = "select count(*) n, max(predicted_at) t from predictions where departement = '12'"
    before = _query(data, published).iloc[0].tolist()
    own.rename(hidden)
    try:
        failed = _run(env, attrs, ["predictions"], "12", raise_on_error=False)
    finally:
        shutil.rmtree(own, ignore_errors=True)
        hidden.rename(own)
    assert not failed.success
    (failure,) = [e for e in failed.all_events if e.event_type_value == "STEP_FAILURE"]
    message = failure.step_failure_data.error.message
    assert "partition 12, chip set s48-m4-r0.15 of roof_cover" in message and "re-run chips" in message
    assert _query(data, published).iloc[0].tolist() == before  # nothing published: the last run's rows stand


def test_the_regression_beats_predicting_the_mean_on_held_out_cells(env, trained):
    _, meta = trained
    m = meta["pitch_model"]
    assert m["mae"].value < m["baseline_mae"].value
    assert m["r2"].value > 0
    assert m["unit"].value == "degrees" and "predicted_vs_true" in m
    # and its predictions: flat roofs (0°) predicted lower than pitched ones
    _, data, dep, _, _ = env
    truth = pd.read_csv(dep.root / "labels.csv", dtype=str).set_index("cleabs")["roof_type"]
    p = _query(data, "select building_id, value from predictions where model_name = 'pitch' and status = 'ok'")
    p["flat"] = p["building_id"].map(truth).eq("flat")
    assert p.loc[p["flat"], "value"].mean() + 5 < p.loc[~p["flat"], "value"].mean()


def test_calibration_lowers_the_held_out_ece(env, trained):
    _, meta = trained
    m = meta["roof_cover_model"]
    assert m["ece_after"].value < m["ece_before"].value
    assert m["temperature"].value > 0 and "reliability_diagram" in m
    card = json.loads(next((env[1] / "store" / "models" / "roof_cover").rglob("model_card.json")).read_text())
    assert card["calibration"]["ece_after"] == pytest.approx(m["ece_after"].value, abs=1e-4)


def test_a_filled_labelling_sheet_is_what_the_next_model_saw(env, trained):
    attrs, meta = trained
    _, data, dep, _, _ = env
    cfg = {"ops": {"labelling_sheet": {"config": {"attribute": "roof_cover", "n": 30, "control": 10}}}}
    assert _run(env, attrs, ["labelling_sheet"], "12", cfg).success
    sheet = next(data.rglob("labelling/12/roof_cover/sheet.csv"))
    rows = pd.read_csv(sheet, dtype=str, keep_default_na=False)
    assert len(rows) == 40
    # the labeller: the drawn material of each building (from the generator's own truth)
    truth = pd.read_csv(dep.root / "labels.csv", dtype=str).set_index("cleabs")
    drawn = truth.loc[rows["building_id"]]
    rows["label"] = [
        "tiles"
        if t != "flat" and c not in ("slate_grey", "dark_grey")
        else "slate"
        if t != "flat"
        else "other"
        if c in ("slate_grey", "dark_grey")
        else "concrete"
        for t, c in zip(drawn["roof_type"], drawn["roof_colour"], strict=True)
    ]
    rows.to_csv(sheet, index=False)
    result = _run(env, attrs, ["roof_cover_model"])
    after = result.asset_materializations_for_node("roof_cover_model")[0].metadata
    assert after["labels_digest"].value != meta["roof_cover_model"]["labels_digest"].value
    card = json.loads(
        (data / "store" / "models" / "roof_cover" / after["model_version"].value / "model_card.json").read_text()
    )
    assert str(sheet) in card["training_data"]["labels_per_departement"]["12"]["source"]


def test_removing_a_declaration_removes_nothing_already_written(env, trained):
    _, data, dep, _, decl = env
    before = _query(data, "select count(*) n from predictions where model_name = 'roof_cover'")["n"].iloc[0]
    fewer = _declare(decl, "attributes:" + ROOF_TYPE + PITCH)
    assert set(fewer) == {"roof_type", "pitch"}
    assert _run(env, fewer, ["predictions", *DBT], "12").success
    assert _query(data, "select count(*) n from predictions where model_name = 'roof_cover'")["n"].iloc[0] == before
    ba = _query(data, "select * from building_attributes where departement = '12'")
    assert "roof_cover_label" in ba.columns and ba["roof_cover_label"].notna().sum() > 0.8 * dep.n_buildings
    assert (data / "store" / "models" / "roof_cover" / "CURRENT").exists()


def test_a_declared_attribute_not_trained_yet_is_skipped_with_a_warning_unless_named(env, trained):
    _, data, dep, _, decl = env
    ghost = "\n  ghost:\n    task: classification\n    classes: [flat, gable, hip]\n    labels: {file: labels.csv, column: roof_type}\n"
    attrs = _declare(decl, DECLARATIONS + ghost)
    result = _run(env, attrs, ["predictions"], "12")
    assert result.success
    meta = result.asset_materializations_for_node("predictions")[0].metadata
    assert meta["untrained_attributes"].value == "ghost"
    assert _query(data, "select count(*) n from predictions where model_name = 'ghost'")["n"].iloc[0] == 0
    named = {"ops": {"predictions": {"config": {"models": ["roof_type", "ghost"]}}}}
    failed = _run(env, attrs, ["predictions"], "12", named, raise_on_error=False)
    assert not failed.success
    (failure,) = [e for e in failed.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "ghost" in failure.step_failure_data.error.message


def test_training_uses_only_the_cpus_the_step_may_use(env, trained, monkeypatch):
    """torch starts a thread per core of the node; a training pod may use its CPU limit only (read
    from the cgroup quota, as `predictions` does). Under a 1-CPU CFS quota on the 2-core VM, two
    threads trained in 9.2 s against 8.3 s for one."""
    import torch

    import assets.attribute_models as attribute_models

    attrs, _ = trained
    monkeypatch.setattr(attribute_models, "available_cpus", lambda: 1)  # a one-CPU pod
    saved = torch.get_num_threads()
    try:
        one_epoch = {"ops": {"pitch_model": {"config": {"epochs": 1}}}}
        result = _run(env, attrs, ["pitch_model"], run_config=one_epoch)
        assert result.asset_materializations_for_node("pitch_model")[0].metadata["threads"].value == 1
    finally:
        torch.set_num_threads(saved)
