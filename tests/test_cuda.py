"""The CUDA paths, on a GPU: what runs in production's GPU pods and nowhere else.

On a machine without CUDA (CI, a laptop) every test here is skipped; on a GPU
machine they need torch, numpy, pyarrow, shapely, pyproj and rasterio, not
Dagster (``tests/realchips.py``). Chips are real: windows of the IGN 20 cm
orthophoto in ``tests/data/real``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from ops.ml.card import load_model
from ops.ml.inference import BatchRunner, forward_fn
from ops.ml.predict import ModelRun
from ops.ml.training import TrainConfig, predict_logits, train_classifier
from tests.realchips import real_chips, shipped_model, stage_predictions, write_partition

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def shipped(name: str, device: torch.device):
    return load_model(shipped_model(name), device)


@pytest.fixture(scope="module")
def bank() -> np.ndarray:
    return real_chips()


@pytest.mark.parametrize("name", ["roof_type", "solar_panels"])
def test_half_precision_on_cuda_gives_the_cpu_answers(bank, name):
    """The GPU step runs under fp16 autocast; its answers must be the fp32 CPU ones."""
    x = torch.from_numpy(bank[:1024])
    cpu = forward_fn(shipped(name, CPU)[0], CPU)(x)
    model, card = shipped(name, CUDA)
    gpu = forward_fn(model, CUDA)(x)
    assert gpu.shape == cpu.shape and gpu.dtype == np.float32
    assert np.abs(gpu - cpu).max() < 0.02
    if card.task == "classification":
        assert (gpu.argmax(1) == cpu.argmax(1)).mean() >= 0.99
    else:
        t = card.postprocess.get("threshold", 0.5)
        assert ((gpu[:, 1] > t) == (cpu[:, 1] > t)).mean() >= 0.999


def test_a_real_cuda_out_of_memory_halves_the_batch_and_loses_nothing(bank):
    """Memory capped at 1.5 GiB: batch 16,384 cannot fit; the runner halves until it does and the answers are unchanged."""
    model, _ = shipped("solar_panels", CUDA)
    fwd = forward_fn(model, CUDA)
    x = torch.from_numpy(np.concatenate([bank] * 4)[:16384])
    reference = np.concatenate([fwd(x[i : i + 256]) for i in range(0, len(x), 256)])
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(1.5 * 2**30 / total)
    try:
        logs: list[str] = []
        runner = BatchRunner(fwd, 16384, logs.append)
        got = runner(x)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert runner.halvings >= 1 and runner.max_batch < 16384
    assert logs[0].startswith("out of memory at batch 16384")
    assert got.shape == reference.shape
    assert np.abs(got - reference).max() < 1e-2


def _staged_rows(out: Path, folder: Path, buildings: Path, shards: list[str], device: torch.device) -> dict:
    runs = []
    for name in ("roof_type", "solar_panels"):
        model, card = shipped(name, device)
        runs.append(ModelRun(card, BatchRunner(forward_fn(model, device, card.task), 512)))
    tally, staged = stage_predictions(folder, buildings, shards, runs, 512, out, device.type == "cuda")
    return {"tally": tally, **{n: pq.read_table(p).to_pandas().set_index("building_id") for n, p in staged.items()}}


def test_predict_partition_on_cuda_stages_the_rows_the_cpu_stages(bank, tmp_path):
    """The GPU path (pinned-memory reads, fp16 forward) gives every building one row, with the CPU's labels."""
    folder, buildings, shards = write_partition(tmp_path / "part", bank, 3000, per_shard=1000)
    cpu = _staged_rows(tmp_path / "cpu", folder, buildings, shards, CPU)
    gpu = _staged_rows(tmp_path / "cuda", folder, buildings, shards, CUDA)
    for name in ("roof_type", "solar_panels"):
        a, b = cpu[name], gpu[name].loc[cpu[name].index]
        assert len(b) == len(gpu[name]) == 3000 and gpu[name].index.is_unique
        assert (a["status"] == b["status"]).all()
        assert (b["status"] == "no_imagery").sum() == 60  # every 50th building has no chip
        ok = a["status"] == "ok"
        assert (a.loc[ok, "label"] == b.loc[ok, "label"]).mean() >= 0.99
    assert gpu["tally"].chips == cpu["tally"].chips == 2940


def test_training_on_cuda_learns_and_the_model_runs_on_cpu(bank):
    """A classifier trained on the GPU (labels: the shipped model's answers) beats chance and loads back on CPU."""
    teacher, card = shipped("roof_type", CPU)
    labels = forward_fn(teacher, CPU)(torch.from_numpy(bank)).argmax(1)
    groups = np.arange(len(bank)) % (len(bank) // 8)  # a window's 8 rotations and flips stay on one side
    res = train_classifier(
        bank, labels, card.classes, groups, config=TrainConfig(epochs=6, max_train_seconds=120), log=lambda _m: None
    )
    assert next(res.model.parameters()).device.type == "cuda"
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    assert res.card.metrics["accuracy"] > res.card.metrics["chance_accuracy"] + 0.1
    on_gpu = predict_logits(res.model, bank[:512]).argmax(1)
    on_cpu = predict_logits(res.model.to(CPU), bank[:512]).argmax(1)
    assert (on_gpu == on_cpu).mean() >= 0.99
