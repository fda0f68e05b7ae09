"""Batched inference over stored chip shards.

Chips are memory-mapped and fed to the model in fixed-size batches in shard
order, so the output order is deterministic and memory is bounded by one
batch, whatever the size of the partition.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass
class BatchPrediction:
    labels: list[str]
    scores: np.ndarray  # probability of the label
    probabilities: np.ndarray  # (n, n_classes)


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


@torch.inference_mode()
def classify(
    model: nn.Module, chips: np.ndarray, classes: list[str], *, batch_size: int = 64, device: torch.device | None = None
) -> Iterator[BatchPrediction]:
    """Yield predictions for ``chips`` (uint8, N×3×S×S, may be a memory map), batch by batch."""
    device = device or torch.device("cpu")
    for i in range(0, len(chips), batch_size):
        # np.array copies the (read-only, memory-mapped) slice into a writable, contiguous batch
        xb = torch.from_numpy(np.array(chips[i : i + batch_size])).to(device, non_blocking=True)
        if device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.float16):
                logits = model(xb)
        else:
            logits = model(xb)
        probs = torch.softmax(logits.float(), dim=1).cpu().numpy()
        top = probs.argmax(1)
        yield BatchPrediction([classes[k] for k in top], probs[np.arange(len(top)), top], probs)
