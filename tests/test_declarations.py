"""Bad attribute declarations fail before any training, naming the file, the attribute and the field.

A declaration is written by whoever wants a new attribute; what they get back
when it is wrong must say where. The parser checks the file as a whole when
the code location loads; what it cannot see (a label column that the
footprints do not have, label values outside the classes) fails the training
asset when the labels are read, before any epoch runs.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from dagster import DagsterInstance, materialize

from assets.attribute_models import model_asset
from assets.chips import ChipsConfig
from ops.crop.spec import ChipSpec
from ops.ml.attributes import (
    CHIP_DEFAULTS,
    DEFAULT_PATH,
    ChipGeometry,
    DeclarationError,
    chip_sets,
    load_attributes,
)

GOOD = """
attributes:
  roof_cover:
    task: classification
    classes: [tiles, slate, concrete, other]
    labels: {footprint_column: mat_toits, values: {"10": tiles, "20": slate, "40": concrete, "90": other}}
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "attributes.yaml"
    path.write_text(text)
    return path


def test_the_shipped_declarations_hold_the_two_historic_models_and_two_more():
    attrs = load_attributes(DEFAULT_PATH)
    assert {"roof_type", "solar_panels"} <= set(attrs) and len(attrs) >= 4
    assert attrs["roof_type"].asset == "roof_model" and attrs["solar_panels"].asset == "solar_model"
    assert {a.task for a in attrs.values()} == {"classification", "segmentation", "regression"}


@pytest.mark.parametrize(
    ("edit", "culprit"),
    [
        (("task: classification", "task: clasification"), "field 'task': 'clasification' is not a task"),
        (("    classes: [tiles, slate, concrete, other]\n", ""), "field 'classes'"),
        (("classes: [tiles, slate, concrete, other]", "classes: [tiles]"), "at least two classes"),
        (("classes: [tiles, slate, concrete, other]", "classes: [tiles, tiles]"), "listed twice"),
        (("    task: classification", "    task: classification\n    colour: red"), "field 'colour': unknown field"),
        (('"90": other', '"90": metal'), "field 'labels.values': maps to ['metal']"),
        (("footprint_column: mat_toits, ", "polygons: x.gpkg, "), "field 'labels.polygons'"),
        (("{footprint_column: mat_toits, values", "{values"), "field 'labels': name exactly one source"),
        (("  roof_cover:", "  Roof-Cover:"), "'Roof-Cover': its name must be a lowercase identifier"),
        (
            ("    task: classification", "    task: classification\n    training: {epochs: -3}"),
            "field 'training.epochs': expected a positive int",
        ),
        (
            ("    task: classification", "    task: classification\n    chip: {size: 8}"),
            "field 'chip.size': expected a whole number of pixels from 16 to 512, got 8",
        ),
        (
            ("    task: classification", "    task: classification\n    chip: {size: 64.5}"),
            "field 'chip.size': expected a whole number of pixels",
        ),
        (
            ("    task: classification", "    task: classification\n    chip: {margin_m: -1}"),
            "field 'chip.margin_m': expected a number from 0 to 200, got -1",
        ),
        (
            ("    task: classification", "    task: classification\n    chip: {zoom: 2}"),
            "field 'chip.zoom': unknown setting",
        ),
        (("    task: classification", "    task: classification\n    chip: 96"), "field 'chip': expected a mapping"),
    ],
)
def test_a_bad_declaration_names_the_file_the_attribute_and_the_field(tmp_path, edit, culprit):
    assert load_attributes(_write(tmp_path, GOOD))  # the unedited declaration is fine
    path = _write(tmp_path, GOOD.replace(*edit))
    with pytest.raises(DeclarationError) as err:
        load_attributes(path)
    assert str(path) in str(err.value) and culprit in str(err.value)
    if "Roof-Cover" not in edit[1]:
        assert "'roof_cover'" in str(err.value)


def test_a_chip_geometry_names_its_own_chip_set_and_defaults_to_the_crop_s(tmp_path):
    """Undeclared chip settings are those of the `chips` asset; equal geometries share one set of chips."""
    spec, config = ChipSpec(), ChipsConfig()
    assert {"size": spec.size, "margin_m": spec.margin_m, "margin_ratio": spec.margin_ratio} == CHIP_DEFAULTS
    assert {"size": config.size, "margin_m": config.margin_m, "margin_ratio": config.margin_ratio} == CHIP_DEFAULTS
    text = GOOD + GOOD.replace("attributes:\n", "").replace("roof_cover", "pool")
    text = text.replace("    task: classification", "    task: classification\n    chip: {margin_m: 12, size: 96}")
    attrs = load_attributes(_write(tmp_path, text))
    assert attrs["roof_cover"].chip_set == attrs["pool"].chip_set == "s96-m12-r0.15"
    assert attrs["pool"].chip == ChipGeometry(96, 12.0, 0.15)
    assert chip_sets(attrs) == {"s96-m12-r0.15": ChipGeometry(96, 12.0, 0.15)}
    plain = load_attributes(_write(tmp_path, GOOD))["roof_cover"]
    assert plain.chip is None and plain.chip_set == "" and chip_sets({"roof_cover": plain}) == {}
    # a chip geometry is part of the declaration: another one marks the model stale
    assert plain.digest != attrs["roof_cover"].digest


def test_a_regression_needs_a_unit_and_no_classes(tmp_path):
    text = "attributes:\n  pitch:\n    task: regression\n    labels: {file: s.csv, column: deg}\n"
    with pytest.raises(DeclarationError, match="field 'unit'"):
        load_attributes(_write(tmp_path, text))
    with pytest.raises(DeclarationError, match="field 'classes'"):
        load_attributes(
            _write(tmp_path, text.replace("task: regression", "task: regression\n    unit: deg\n    classes: [a, b]"))
        )
    ok = load_attributes(_write(tmp_path, text.replace("task: regression", "task: regression\n    unit: degrees")))
    assert ok["pitch"].unit == "degrees" and ok["pitch"].classes == () and ok["pitch"].value_range is None
    ranged = text.replace("task: regression", "task: regression\n    unit: degrees\n    range: [0, 90]")
    assert load_attributes(_write(tmp_path, ranged))["pitch"].value_range == (0.0, 90.0)
    with pytest.raises(DeclarationError, match=r"field 'range': expected \[lowest, highest\]"):
        load_attributes(_write(tmp_path, ranged.replace("[0, 90]", "[90, 0]")))


def test_not_yaml_or_no_attributes_is_named(tmp_path):
    with pytest.raises(DeclarationError, match="not valid YAML"):
        load_attributes(_write(tmp_path, "attributes: [unclosed"))
    with pytest.raises(DeclarationError, match="expected a mapping `attributes:`"):
        load_attributes(_write(tmp_path, "models: {}"))
    with pytest.raises(DeclarationError, match="not found"):
        load_attributes(tmp_path / "missing.yaml")


def _train(small_dep, tmp_path, monkeypatch, text: str):
    """Materialize the declared attribute's training asset on the sample's département 12 (no chips needed)."""
    monkeypatch.setenv("BATIVISION_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("BATIVISION_SOURCE_DIR", str(small_dep.root.parent))
    from orchestration.environment import local_resources

    attr = next(iter(load_attributes(_write(tmp_path, text)).values()))
    result = materialize(
        [model_asset(attr)],
        resources=local_resources(),
        instance=DagsterInstance.ephemeral(),
        run_config={"ops": {attr.asset: {"config": {"departements": ["12"]}}}},
        raise_on_error=False,
    )
    assert not result.success
    failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert len(failures) == 1  # bad input fails once: not retried
    error = failures[0].step_failure_data.error
    messages = error.message + (error.cause.message if error.cause else "")
    assert not any("epoch" in str(e.message or "") for e in result.all_events), "training started"
    return messages


def test_a_label_column_the_footprints_do_not_have_fails_before_training(small_dep, tmp_path, monkeypatch):
    msg = _train(small_dep, tmp_path, monkeypatch, GOOD.replace("mat_toits", "mat_toit"))
    assert "'mat_toit'" in msg and "batiment.gpkg" in msg and "roof_cover" in msg


def test_labels_outside_the_classes_fail_before_training_naming_the_values(small_dep, tmp_path, monkeypatch):
    msg = _train(
        small_dep, tmp_path, monkeypatch, GOOD.replace(', "90": other', "")
    )  # "90" now neither mapped nor a class
    assert "outside the classes" in msg and "'90'" in msg and "mat_toits" in msg and "building" in msg


def test_a_warehouse_of_an_earlier_release_gains_the_value_column_and_keeps_its_rows(tmp_path):
    """A DuckDB file whose predictions table predates `value` is brought up to the contract on the next publish."""
    import pyarrow as pa

    from ops.ml.rows import PREDICTIONS_SCHEMA
    from resources.warehouse import DuckDBWarehouse, PartitionRows, duckdb_ddl

    wh = DuckDBWarehouse(path=str(tmp_path / "old.duckdb"))
    with wh.connect() as con:  # the table as the previous release created it: no `value`
        con.execute(duckdb_ddl("predictions").replace(", value DOUBLE", ""))
        con.execute(
            "INSERT INTO predictions (building_id, departement, model_name, model_version, task, status) "
            "VALUES ('A', '2A', 'roof_type', 'v0', 'classification', 'ok')"
        )
        assert "value" not in [r[0] for r in con.execute("DESCRIBE predictions").fetchall()]
    row = {f.name: [None] for f in PREDICTIONS_SCHEMA}
    row.update(
        building_id=["B"], departement=["12"], model_name=["roof_slope"], model_version=["v1"],
        task=["regression"], status=["ok"], value=[31.5],
    )  # fmt: skip
    batch = pa.RecordBatch.from_pydict(row, schema=PREDICTIONS_SCHEMA)
    assert wh.publish("12", [PartitionRows("predictions", [batch], where={"model_name": "roof_slope"})]) == [1]
    got = wh.query("select building_id, departement, value from predictions order by building_id")
    assert got["building_id"].tolist() == ["A", "B"] and got["departement"].tolist() == ["2A", "12"]
    assert pd.isna(got["value"].iloc[0]) and got["value"].iloc[1] == 31.5
