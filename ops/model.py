"""The roof classifier: a small CNN in plain torch, and its on-disk form.

Plain torch (no torchvision) so it runs wherever torch does. The model takes
the chips exactly as stored (uint8, N×3×S×S) and normalises inside
``forward``: the normalisation travels with the weights and cannot drift from
what training used.

A saved model is a folder with ``weights.pt`` (a state dict) and
``model_card.json``; its version is the first 12 hex digits of the SHA-256 of
the weights file, so the same weights always get the same version and any
change of weights gets a new one.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn


class ModelMismatchError(ValueError):
    """A model that cannot read the chips it is given (input size, bands, classes)."""


@dataclass
class ModelCard:
    """What a model is, what it expects and how good it is."""

    name: str
    task: str  # "classification" | "segmentation"
    classes: list[str]
    input_size: int
    bands: int
    mean: list[float]
    std: list[float]
    architecture: str
    widths: list[int]
    version: str = ""
    metrics: dict = field(default_factory=dict)
    training_data: dict = field(default_factory=dict)
    created_at: str = ""

    def check_chips(self, chip_shape: tuple[int, ...], *, what: str) -> None:
        """Raise :class:`ModelMismatchError` if chips of ``chip_shape`` (…, C, H, W) don't fit."""
        c, h, w = chip_shape[-3:]
        if c != self.bands:
            raise ModelMismatchError(
                f"{what}: chips have {c} bands, model {self.name}@{self.version} expects {self.bands}"
            )
        if (h, w) != (self.input_size, self.input_size):
            raise ModelMismatchError(
                f"{what}: chips are {h}×{w} px, model {self.name}@{self.version} expects {self.input_size}×{self.input_size}"
            )


class RoofNet(nn.Module):
    """Four conv blocks (conv-BN-ReLU, pooled), global average pooling, a linear head."""

    def __init__(self, n_classes: int, mean: list[float], std: list[float], widths: list[int] | None = None) -> None:
        super().__init__()
        widths = widths or [24, 48, 96, 128]
        layers: list[nn.Module] = []
        c_in = 3
        for w in widths:
            layers += [
                nn.Conv2d(c_in, w, 3, padding=1, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            c_in = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(c_in, n_classes))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: uint8 or float chips in 0..255, N×3×S×S → class logits."""
        x = (x.float() / 255.0 - self.mean) / self.std
        x = self.features(x)
        return self.head(x.mean(dim=(2, 3)))


def build_model(card: ModelCard) -> nn.Module:
    if card.architecture != "RoofNet":
        raise ModelMismatchError(f"model {card.name}: unknown architecture {card.architecture!r}")
    return RoofNet(len(card.classes), card.mean, card.std, card.widths)


def save_model(model: nn.Module, card: ModelCard, root: Path) -> tuple[str, Path]:
    """Save under ``root/<name>/<version>/``; returns (version, folder). Idempotent."""
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    data = buf.getvalue()
    version = hashlib.sha256(data).hexdigest()[:12]
    card.version = version
    folder = root / card.name / version
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "weights.pt").write_bytes(data)
    (folder / "model_card.json").write_text(json.dumps(asdict(card), indent=1))
    return version, folder


def load_model(folder: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelCard]:
    """Load a saved model, checking that its weights still hash to its version."""
    card = ModelCard(**json.loads((folder / "model_card.json").read_text()))
    data = (folder / "weights.pt").read_bytes()
    digest = hashlib.sha256(data).hexdigest()[:12]
    if card.version and digest != card.version:
        raise ModelMismatchError(f"{folder}: weights hash {digest} does not match the card's version {card.version}")
    model = build_model(card)
    model.load_state_dict(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
    model.eval().to(device)
    return model, card
