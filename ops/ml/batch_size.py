"""Which batch size a partition's inference runs at: configured, CUDA's default, or measured once per machine kind.

On CPU the best batch size is small and depends on the machine, so it is
measured on the partition's own chips (:func:`ops.ml.inference.tune_batch_size`)
and kept in a small JSON file keyed by machine kind and model versions: the
next partitions start straight away. A measurement that later proves far too
optimistic (the machine was busy then, or is now) is forgotten, so the next
partition measures again.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ops.cpus import available_cpus
from ops.ml.card import ModelCard
from ops.ml.inference import Forward, tune_batch_size
from ops.shards import open_chips

#: Below this many chips a partition runs at a fixed batch size: measuring would cost more than it saves.
TUNE_MIN_CHIPS = 2048
CPU_DEFAULT_BATCH = 32
CUDA_DEFAULT_BATCH = 512
SAMPLE_CHIPS = 512


def machine_key(device: torch.device) -> str:
    """What the best batch size depends on: the device model, or the CPU count and torch threads."""
    if device.type == "cuda":
        return "cuda-" + "".join(c if c.isalnum() else "_" for c in torch.cuda.get_device_name(device))
    return f"cpu{available_cpus()}-threads{torch.get_num_threads()}"


def models_key(cards: Sequence[ModelCard]) -> str:
    """The set of model versions a measurement is valid for."""
    return "+".join(f"{c.name}@{c.version}" for c in cards)


@dataclass
class BatchSize:
    """The batch size chosen, the chips/s measured per batch size (if measured), and where that is kept."""

    size: int
    rates: dict[int, float] = field(default_factory=dict)
    cache: Path | None = None

    def forget_if_slower(self, chips: int, seconds: float, log: Callable[[str], None]) -> None:
        """Forget the measurement when the partition ran at under half its rate: the next partition measures again."""
        measured = self.rates.get(self.size, 0.0)
        if self.cache is None or chips < TUNE_MIN_CHIPS or not seconds or chips / seconds >= 0.5 * measured:
            return
        self.cache.unlink(missing_ok=True)
        log(
            f"{chips / seconds:,.0f} chips/s against {measured:,.0f} measured for batch {self.size}: "
            "the batch size will be measured again on the next partition"
        )


def sample_chips(folder: Path, shards: Sequence[str], n: int = SAMPLE_CHIPS) -> np.ndarray:
    """The first ``n`` chips of a partition's shards, in memory."""
    sample, got = [], 0
    for shard in shards:
        sample.append(np.array(open_chips(folder, shard)[: n - got]))
        got += len(sample[-1])
        if got >= n:
            break
    return np.concatenate(sample)


def choose_batch_size(
    requested: int,
    device: torch.device,
    forwards: Sequence[Forward],
    folder: Path,
    shards: Sequence[str],
    total_chips: int,
    cache: Path | None,
    log: Callable[[str], None],
) -> BatchSize:
    """``requested`` if positive; else CUDA's default; else on CPU the size kept in ``cache``, or measured and kept there."""
    if requested > 0:
        return BatchSize(requested)
    if device.type == "cuda":
        return BatchSize(CUDA_DEFAULT_BATCH)
    if total_chips < TUNE_MIN_CHIPS or cache is None:
        return BatchSize(CPU_DEFAULT_BATCH)
    if cache.exists():
        known = json.loads(cache.read_text())
        log(f"batch size {known['best']} (measured before for {cache.stem} on {cache.parent.name})")
        return BatchSize(int(known["best"]), {int(k): v for k, v in known["rates"].items()}, cache)
    best, rates = tune_batch_size(forwards, sample_chips(folder, shards))
    log(
        "batch size measured on this partition's chips: "
        + ", ".join(f"{b}: {r:,.0f} chips/s" for b, r in rates.items())
        + f" → {best}"
    )
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"best": best, "rates": {str(b): round(r, 1) for b, r in rates.items()}}))
    return BatchSize(best, rates, cache)
