"""Label files: every way one can be wrong is an error naming the file and the culprit."""

from __future__ import annotations

import pytest

from ops.ml.catalog import ROOF_CLASSES, SHIPPED
from ops.ml.label_sources import read_label_file

ROOF = SHIPPED["roof_type"]  # the declaration: labels.csv, column roof_type


def read_labels(path):
    return read_label_file(path, ROOF).values


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
        (
            "cleabs,roof_type\nA,flat\nB,dome\n",
            r"outside the classes \['flat', 'gable', 'hip'\]: \['dome'\], first at line 3, building B",
        ),
        ("cleabs,slope\nA,flat\n", "expected an id column .* and `roof_type`"),
    ],
)
def test_a_bad_label_file_is_an_error_naming_it_and_the_culprit(tmp_path, text, culprit):
    path = _labels(tmp_path, text)
    with pytest.raises(ValueError, match=culprit) as exc:
        read_labels(path)
    assert str(path) in str(exc.value)


def test_a_building_listed_without_a_class_is_not_labelled(tmp_path):
    labels = read_labels(_labels(tmp_path, "cleabs,roof_type\nA,flat\nB,\nC,hip\n"))
    assert labels.to_dict() == {"A": "flat", "C": "hip"}


def test_labels_that_train_nothing_are_counted_with_examples(tmp_path):
    """A label on a building without a chip, or on an id the partition doesn't have, is counted, not lost silently."""
    import numpy as np
    import pyarrow as pa

    from ops.ml.datasets import labelled_chips
    from ops.shards import partial_path, publish_shard, shard_paths

    folder = tmp_path / "chips"
    folder.mkdir()
    with partial_path(shard_paths(folder, "c1")[0]).open("wb") as fh:
        np.save(fh, np.zeros((2, 3, 8, 8), "uint8"))
    index = pa.table({"building_id": ["A", "B", "C"], "status": ["ok", "ok", "nodata"], "row": [0, 1, -1]})
    publish_shard(folder, "c1", index, {})
    labels = read_labels(_labels(tmp_path, "cleabs,roof_type\nA,flat\nC,hip\nZ9,gable\nZ8,flat\n"))
    said: list[str] = []
    x, y, _ = labelled_chips(folder, "12", labels, ROOF_CLASSES, log=said.append)
    assert len(x) == 1 and list(y) == [ROOF_CLASSES.index("flat")]
    (line,) = said
    assert "4 labels: 1 on ok chips, 1 on buildings without a chip, 2 naming no building" in line
    assert "['Z8', 'Z9']" in line
