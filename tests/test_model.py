"""The roof model: it learns the synthetic roofs, versions are content hashes, mismatches are caught."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from ops.crop.partition import crop_partition
from ops.crop.spec import ChipSpec
from ops.geo.footprints import iter_building_batches, write_buildings_geoparquet
from ops.imagery.mosaic import build_mosaic, find_tiles
from ops.ml.card import ModelCard, ModelMismatchError, load_model, save_model
from ops.ml.inference import BatchRunner, forward_fn
from ops.ml.nets import RoofNet
from ops.ml.training import TrainConfig, train_classifier
from ops.shards import list_shards, open_chips, read_index

CLASSES = ["flat", "gable", "hip"]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """Chips and labels of a synthetic département of 1,500 buildings."""
    from synthetic import generate_departement

    root = tmp_path_factory.mktemp("model")
    dep = generate_departement(root / "src", "2A", 1500, seed=11, tile_px=1500)
    parquet = root / "b.parquet"
    write_buildings_geoparquet(iter_building_batches(dep.footprints, "2A", 2154), parquet, 2154)
    info = build_mosaic(find_tiles(dep.ortho_dir), root / "m.vrt", name="m")
    list(crop_partition(parquet, info, root / "chips", ChipSpec(), buildings_fingerprint="x"))
    labels = pd.read_csv(dep.labels, dtype=str).set_index("cleabs")["roof_type"]
    xs, ys, gs = [], [], []
    for cell in list_shards(root / "chips"):
        idx = read_index(root / "chips", cell).to_pandas()
        idx = idx[idx.status == "ok"]
        xs.append(np.asarray(open_chips(root / "chips", cell)[idx.row.to_numpy()]))
        ys.append(labels.loc[idx.building_id].map(CLASSES.index).to_numpy())
        gs.append(np.array([cell] * len(idx), dtype=object))
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(gs)


@pytest.mark.slow
def test_trained_model_clearly_beats_chance(labelled):
    x, y, g = labelled
    result = train_classifier(x, y, CLASSES, g, config=TrainConfig(epochs=8, seed=0), log=lambda _: None)
    m = result.card.metrics
    assert m["n_val"] >= 100
    assert m["accuracy"] > m["chance_accuracy"] + 0.1, m
    assert result.confusion.sum() == m["n_val"]


def _tiny_model() -> tuple[RoofNet, ModelCard]:
    torch.manual_seed(0)
    model = RoofNet(3, [0.5] * 3, [0.25] * 3, [8, 16])
    card = ModelCard("roof_type", "classification", CLASSES, 64, 3, [0.5] * 3, [0.25] * 3, "RoofNet", [8, 16])
    return model.eval(), card


def test_version_is_the_weights_hash_and_round_trips(tmp_path):
    model, card = _tiny_model()
    v1, folder = save_model(model, card, tmp_path)
    v2, _ = save_model(model, card, tmp_path)
    assert v1 == v2 and len(v1) == 12
    loaded, card2 = load_model(folder)
    x = torch.randint(0, 255, (4, 3, 64, 64), dtype=torch.uint8)
    torch.testing.assert_close(loaded(x), model(x))
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    v3, _ = save_model(model, card, tmp_path)
    assert v3 != v1
    (folder / "weights.pt").write_bytes((tmp_path / "roof_type" / v3 / "weights.pt").read_bytes())
    with pytest.raises(ModelMismatchError, match=v1):
        load_model(folder)


@pytest.mark.reliability
def test_chips_of_the_wrong_size_or_bands_are_refused():
    _, card = _tiny_model()
    card.version = "abc"
    card.check_chips((10, 3, 64, 64), what="shard x")
    with pytest.raises(ModelMismatchError, match=r"shard x: chips are 48×48 px, model roof_type@abc expects 64×64"):
        card.check_chips((10, 3, 48, 48), what="shard x")
    with pytest.raises(ModelMismatchError, match="1 bands"):
        card.check_chips((10, 1, 64, 64), what="shard x")


def test_batched_inference_is_ordered_and_batch_size_independent():
    model, _ = _tiny_model()
    x = np.random.default_rng(0).integers(0, 255, (37, 3, 64, 64), dtype=np.uint8)
    run = forward_fn(model, torch.device("cpu"))
    a = BatchRunner(run, 5)(torch.from_numpy(x))
    b = BatchRunner(run, 37)(torch.from_numpy(x))
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert a.shape == (37, 3) and np.allclose(a.sum(1), 1, atol=1e-5)


def test_shipped_model_loads_from_an_empty_store_and_reads_64px_chips(tmp_path):
    from pathlib import Path

    from resources.model_store import ModelStore

    shipped = Path(__file__).resolve().parent.parent / "models"
    store = ModelStore(root=str(tmp_path / "store"), shipped=str(shipped))
    version = (shipped / "roof_type" / "CURRENT").read_text().strip()
    model, card = store.load("roof_type")
    assert card.version == version and store.current_version("roof_type") == version
    assert card.metrics["accuracy"] > card.metrics["chance_accuracy"] + 0.2
    card.check_chips((1, 3, 64, 64), what="chips")
    x = np.random.default_rng(0).integers(0, 255, (2, 3, 64, 64), dtype=np.uint8)
    probs = forward_fn(model, torch.device("cpu"))(torch.from_numpy(x))
    assert probs.shape == (2, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)
