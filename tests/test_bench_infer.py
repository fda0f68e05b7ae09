"""`make bench-infer` runs for every declared attribute: its per-chip baseline handles every task.

The benchmark's naive contender (what a user would write first: one chip at a
time, a row appended) was written when every model was a classifier, and a
regression crashed it (an index into classes it has none of). A benchmark is
not a test, but one that cannot run for a shipped model is a bug: this runs
the baseline on a few real chips for each shipped model and reads its rows.
"""

from __future__ import annotations

import duckdb
import pytest
import torch

from bench.infer import naive
from ops.ml.attributes import DEFAULT_PATH, load_attributes
from ops.ml.card import load_model
from tests.realchips import real_chips, shipped_model, write_partition


@pytest.fixture(scope="module")
def bank():
    return real_chips()[::97][:16]


@pytest.mark.parametrize("name", sorted(load_attributes(DEFAULT_PATH)))
def test_the_per_chip_baseline_writes_one_row_per_ok_chip_for_every_shipped_model(tmp_path, bank, name):
    folder, _, _ = write_partition(tmp_path, bank, 40)  # building 0 has no chip: 39 ok
    model, card = load_model(shipped_model(name))
    db = tmp_path / "naive.duckdb"
    assert naive(model.eval(), card, folder, db, 30, torch.device("cpu")) > 0
    rows = duckdb.connect(str(db), read_only=True).execute("select * from naive").df()
    assert len(rows) == 30 and rows["building_id"].is_unique
    if card.task == "regression":
        lo, hi = card.postprocess["range"]
        assert rows["value"].between(lo, hi).all()
    else:
        assert rows["label"].isin(card.classes).all() and rows["score"].between(0, 1).all()
