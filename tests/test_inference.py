"""The inference engine: prefetching keeps order, out-of-memory halves the batch, models are checked."""

from __future__ import annotations

import threading
import time
import types

import numpy as np
import pytest
import torch

from ops.ml.card import ModelCard, ModelMismatchError, check_outputs, load_model, save_model
from ops.ml.inference import BatchRunner, forward_fn, prefetch, tune_batch_size
from ops.ml.nets import PanelNet, RoofNet


def test_prefetch_yields_in_order_while_loading_ahead():
    loaded_on = []

    def load(i: int) -> int:
        loaded_on.append(threading.current_thread().name)
        time.sleep(0.001 * (i % 3))  # uneven load times must not reorder
        return i * i

    assert list(prefetch(range(50), load, depth=2)) == [i * i for i in range(50)]
    assert set(loaded_on) == {"chip-prefetch"}  # loading happened off the consumer's thread


def test_prefetch_reraises_a_load_error_and_stops_when_abandoned():
    def load(i: int) -> int:
        if i == 3:
            raise OSError("shard 3 unreadable")
        return i

    got = []
    with pytest.raises(OSError, match="shard 3 unreadable"):
        for v in prefetch(range(10), load):
            got.append(v)
    assert got == [0, 1, 2]
    gen = prefetch(iter(range(10**9)), lambda i: i, depth=2)
    assert next(gen) == 0
    gen.close()  # the loader thread must not keep running (or block) after the consumer stops
    time.sleep(0.3)
    assert not [t for t in threading.enumerate() if t.name == "chip-prefetch" and t.is_alive()]


class _OOMAbove:
    """A forward that runs out of (pretend) device memory above ``limit`` chips, as CUDA would."""

    def __init__(self, forward, limit: int) -> None:
        self.forward, self.limit, self.calls = forward, limit, []

    def __call__(self, xb: torch.Tensor) -> np.ndarray:
        self.calls.append(len(xb))
        if len(xb) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.forward(xb)


def test_out_of_memory_halves_the_batch_and_gives_the_same_output():
    torch.manual_seed(0)
    model = RoofNet(3, [0.5] * 3, [0.25] * 3, [8, 16]).eval()
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (100, 3, 64, 64), dtype=np.uint8))
    plain = forward_fn(model, torch.device("cpu"))
    oom = _OOMAbove(plain, limit=20)
    messages: list[str] = []
    runner = BatchRunner(oom, 64, messages.append)
    out = np.concatenate([runner(x[i : i + 64]) for i in range(0, 100, 64)])
    np.testing.assert_allclose(out, plain(x), atol=1e-5)
    assert runner.max_batch == 16 and runner.halvings == 2  # 64 → 32 → 16, then it sticks
    assert max(oom.calls[3:]) <= 16 and "carrying on at batch 16" in messages[-1]
    # a chip that doesn't fit alone is a real error, not an endless loop
    with pytest.raises(torch.cuda.OutOfMemoryError):
        BatchRunner(_OOMAbove(plain, limit=0), 4)(x[:4])
    # other errors are not swallowed
    with pytest.raises(ValueError):
        BatchRunner(lambda xb: (_ for _ in ()).throw(ValueError("bad")), 4)(x[:4])


def test_batch_size_is_measured_not_assumed(monkeypatch):
    """A forward whose per-chip cost is lowest at 16 (a fixed cost per call, a cost growing with the batch).

    The cost is charged to a clock the measurement reads instead of the wall clock: the test checks the
    choice, not the machine (a loaded CI worker stretched real sleeps past the differences).
    """
    import ops.ml.inference as inference

    clock = [0.0]
    monkeypatch.setattr(inference, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    def forward(xb: torch.Tensor) -> np.ndarray:
        clock[0] += 0.004 + 0.00002 * len(xb) ** 2  # per chip: 1.08 ms at 4, 0.57 ms at 16, 1.34 ms at 64
        return np.zeros((len(xb), 3), np.float32)

    sample = np.zeros((128, 3, 64, 64), dtype=np.uint8)
    best, rates = tune_batch_size([forward], sample, candidates=(4, 16, 64, 256), min_images=128)
    assert set(rates) == {4, 16, 64}  # 256 > sample: not tried
    assert best == 16 and rates[16] > 1.3 * max(rates[4], rates[64]), rates


def _card(task: str, arch: str, classes: list[str], widths: list[int]) -> ModelCard:
    return ModelCard("m", task, classes, 64, 3, [0.5] * 3, [0.25] * 3, arch, widths, version="v")


def test_segmenter_outputs_per_pixel_probabilities():
    torch.manual_seed(0)
    card = _card("segmentation", "PanelNet", ["none", "solar_panel"], [8, 16, 32])
    model = PanelNet(2, card.mean, card.std, card.widths).eval()
    check_outputs(model, card)
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (3, 3, 64, 64), dtype=np.uint8))
    p = forward_fn(model, torch.device("cpu"))(x)
    assert p.shape == (3, 2, 64, 64) and np.allclose(p.sum(1), 1, atol=1e-5)


@pytest.mark.reliability
def test_a_card_that_does_not_match_its_weights_is_refused(tmp_path):
    torch.manual_seed(0)
    card = _card("classification", "RoofNet", ["flat", "gable", "hip"], [8, 16])
    model = RoofNet(3, card.mean, card.std, card.widths).eval()
    # a segmentation card on a classifier's outputs
    with pytest.raises(ModelMismatchError, match=r"outputs \(1, 3\)"):
        check_outputs(model, _card("segmentation", "RoofNet", ["flat", "gable", "hip"], [8, 16]))
    # classes edited in the card after training: the saved weights no longer fit
    _, folder = save_model(model, card, tmp_path)
    import json

    meta = json.loads((folder / "model_card.json").read_text())
    meta["classes"] = ["flat", "gable", "hip", "dome"]
    (folder / "model_card.json").write_text(json.dumps(meta))
    with pytest.raises(ModelMismatchError, match="4 classes"):
        load_model(folder)
