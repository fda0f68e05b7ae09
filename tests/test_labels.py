"""Label files: every way one can be wrong is an error naming the file and the culprit."""

from __future__ import annotations

import pytest

from ops.ml.catalog import ROOF_CLASSES, ROOF_TYPE
from ops.ml.datasets import read_labels

pytestmark = pytest.mark.reliability


def _labels(tmp_path, text: str):
    path = tmp_path / "labels.csv"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "culprit"),
    [
        ("", "empty label file"),
        ("cleabs,roof_type\n", "no labels"),
        ("nom,roof_type\nA,flat\n", "expected an id column"),
        ("cleabs,roof_type\nA,flat\nB,gable\nA,hip\n", r"labelled more than once, e.g. \['A'\]"),
        ("cleabs,roof_type\nA,flat\n,gable\n", r"without a building id, lines \[3\]"),
        ("cleabs,roof_type\nA,flat\nB,dome\n", r"unknown roof_type value\(s\) \['dome'\]"),
    ],
)
def test_a_bad_label_file_is_an_error_naming_it_and_the_culprit(tmp_path, text, culprit):
    path = _labels(tmp_path, text)
    with pytest.raises(ValueError, match=culprit) as exc:
        read_labels(path, ROOF_TYPE, ROOF_CLASSES)
    assert str(path) in str(exc.value)


def test_a_building_listed_without_a_class_is_not_labelled(tmp_path):
    labels = read_labels(_labels(tmp_path, "cleabs,roof_type\nA,flat\nB,\nC,hip\n"), ROOF_TYPE, ROOF_CLASSES)
    assert labels.to_dict() == {"A": "flat", "C": "hip"}
