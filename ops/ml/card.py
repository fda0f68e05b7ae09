"""A model's card and its on-disk form: what it is, what it expects, how good it is, and its version.

A saved model is a folder with ``weights.pt`` (a state dict) and
``model_card.json``; its version is the first 12 hex digits of the SHA-256 of
the weights file, so the same weights always get the same version and any
change of weights gets a new one. Loading checks that hash, and that the
card's architecture, task and classes fit the weights, before any chip is read.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ops.ml.nets import ARCHITECTURES, LATER_BUFFERS, TASK_OF_ARCHITECTURE


class ModelMismatchError(ValueError):
    """A model that cannot read the chips it is given (input size, bands, classes)."""


@dataclass
class ModelCard:
    """What a model is, what it expects and how good it is."""

    name: str
    task: str  # "classification" | "segmentation" | "regression"
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
    #: segmentation: probability above which a pixel belongs to a class, smallest polygon kept (in chip pixels)
    postprocess: dict = field(default_factory=dict)
    #: regression: the unit of the value (from the attribute's declaration)
    unit: str | None = None
    #: classification: the temperature and the expected calibration error before and after (ops.ml.calibration)
    calibration: dict = field(default_factory=dict)
    #: the chips it reads: "" the partition's default chips, else its attribute's own chip set (``resources.keys.chips``)
    chip_set: str = ""

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


def build_model(card: ModelCard) -> nn.Module:
    cls = ARCHITECTURES.get(card.architecture)
    if cls is None:
        raise ModelMismatchError(f"model {card.name}: unknown architecture {card.architecture!r}")
    if TASK_OF_ARCHITECTURE[card.architecture] != card.task:
        raise ModelMismatchError(
            f"model {card.name}: architecture {card.architecture} does {TASK_OF_ARCHITECTURE[card.architecture]}, "
            f"the card says {card.task!r}"
        )
    return cls(len(card.classes), card.mean, card.std, card.widths)


@torch.inference_mode()
def check_outputs(model: nn.Module, card: ModelCard, device: str | torch.device = "cpu") -> None:
    """Run one blank chip through ``model``: its outputs must match the card's task and classes.

    Catches a card whose class list was edited, or weights of another model,
    before any prediction row is written.
    """
    x = torch.zeros((1, card.bands, card.input_size, card.input_size), dtype=torch.uint8, device=device)
    out = model(x)
    want = {
        "classification": (1, len(card.classes)),
        "regression": (1, 1),
    }.get(card.task, (1, len(card.classes), card.input_size, card.input_size))
    if tuple(out.shape) != want:
        raise ModelMismatchError(
            f"model {card.name}@{card.version}: outputs {tuple(out.shape)} for one chip, but its card "
            f"({card.task}, classes {card.classes}) means {want}"
        )


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
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    for key, value in model.state_dict().items():
        if key in LATER_BUFFERS and key not in state:  # saved before the buffer existed: "as before"
            state[key] = torch.full_like(value, LATER_BUFFERS[key])
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # shapes differ: the card's classes or widths are not the weights'
        raise ModelMismatchError(
            f"{folder}: weights do not fit the card ({card.architecture}, {len(card.classes)} classes "
            f"{card.classes}, widths {card.widths}): {str(exc).splitlines()[0]}"
        ) from exc
    model.eval().to(device)
    return model, card
