"""Versioned models by name: ``<root>/<name>/<version>/`` plus a ``CURRENT`` pointer.

The pointer is what inference uses by default; the version (a hash of the
weights) is written into every prediction row.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from dagster import ConfigurableResource
from pydantic import Field
from torch import nn

from ops.model import ModelCard, load_model, save_model


class ModelNotFoundError(FileNotFoundError):
    pass


class ModelStore(ConfigurableResource):
    root: str = Field(default="data/store/models", description="Folder of the model store")
    shipped: str = Field(default="models", description="Models shipped in the repository, used when the store has none")

    def save(self, model: nn.Module, card: ModelCard, *, make_current: bool = True) -> str:
        version, _ = save_model(model, card, Path(self.root))
        if make_current:
            self._pointer(card.name).write_text(version)
        return version

    def _pointer(self, name: str) -> Path:
        p = Path(self.root) / name / "CURRENT"
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def current_version(self, name: str) -> str:
        p = self._pointer(name)
        if p.exists():
            return p.read_text().strip()
        shipped = Path(self.shipped) / name / "CURRENT"
        if shipped.exists():
            version = shipped.read_text().strip()
            shutil.copytree(Path(self.shipped) / name / version, Path(self.root) / name / version, dirs_exist_ok=True)
            p.write_text(version)
            return version
        raise ModelNotFoundError(
            f"no version of model {name!r} in {Path(self.root).resolve()}: materialize roof_model first"
        )

    def load(
        self, name: str, version: str | None = None, device: str | torch.device = "cpu"
    ) -> tuple[nn.Module, ModelCard]:
        version = version or self.current_version(name)
        folder = Path(self.root) / name / version
        if not folder.exists():
            raise ModelNotFoundError(f"model {name}@{version} not found in {Path(self.root).resolve()}")
        return load_model(folder, device)

    def card(self, name: str, version: str | None = None) -> ModelCard:
        version = version or self.current_version(name)
        return ModelCard(**json.loads((Path(self.root) / name / version / "model_card.json").read_text()))
