"""What `predictions` keeps for its pictures stays bounded whatever the partition's size, and is the same run to run."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import shapely

from ops.ml.card import ModelCard
from ops.ml.postprocess import Columns
from ops.ml.predict import EXAMPLES_PER_CLASS, MAP_POINTS, MAP_POLYGONS, PartitionPredictions, ShardPredictions


def card(name: str, task: str, classes: list[str]) -> ModelCard:
    return ModelCard(name, task, classes, 64, 3, [0.5] * 3, [0.2] * 3, "RoofNet", [8], version="v1")


def shard(k: int, n: int) -> ShardPredictions:
    rng = np.random.default_rng(k)
    index = pa.table(
        {
            "building_id": [f"b{k}-{i}" for i in range(n)],
            "status": ["ok"] * n,
            "row": np.arange(n, dtype=np.int32),
            "minx": rng.random(n),
            "miny": rng.random(n),
            "maxx": rng.random(n) + 1,
            "maxy": rng.random(n) + 1,
        }
    )
    labels = [["flat", "gable", "hip"][i % 3] for i in range(n)]
    roof = Columns(labels, rng.random(n), [None] * n)
    panels = [shapely.box(i, 0, i + 1, 1) for i in range(n)]
    solar = Columns(["solar_panel"] * n, rng.random(n), [None] * n, panels)
    return ShardPredictions(f"s{k}", index, {}, {"roof_type": roof, "solar_panels": solar}, n)


def tally(n_shards: int, per_shard: int = 4096) -> PartitionPredictions:
    cards = [
        card("roof_type", "classification", ["flat", "gable", "hip"]),
        card("solar_panels", "segmentation", ["none", "solar_panel"]),
    ]
    total = n_shards * per_shard
    t = PartitionPredictions(stride=max(1, -(-total // MAP_POINTS)))
    for k in range(n_shards):
        t.add(shard(k, per_shard), cards)
    return t


def test_pictures_keep_a_bounded_sample_whatever_the_partition_size():
    small, big = tally(2), tally(12)
    for t, n in ((small, 2 * 4096), (big, 12 * 4096)):
        assert sum(t.statuses.values()) == n and sum(t.labels["roof_type"].values()) == n  # counts cover everything
        x, _ = t.centres()
        assert min(n, MAP_POINTS) / 2 <= len(x) <= MAP_POINTS  # one building in ceil(n / MAP_POINTS)
        assert len(t.map_categories["roof_type"]) == len(x)
        assert len(t.polygons["solar_panels"]) == MAP_POLYGONS
        assert all(len(v) == EXAMPLES_PER_CLASS for v in t.examples["roof_type"].values())


def test_the_sampled_polygons_are_the_same_run_to_run():
    a, b = tally(3), tally(3)
    assert [g.wkt for g in a.polygons["solar_panels"]] == [g.wkt for g in b.polygons["solar_panels"]]
