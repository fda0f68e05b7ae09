"""Versioned models by name: ``<root>/<name>/<version>/`` plus a ``CURRENT`` pointer.

The pointer is what inference uses by default; the version (a hash of the
weights) is written into every prediction row.

Locally the store is the folder ``root``. In production it lives in the object
store (``store``, e.g. a bucket) under ``models/``: versions and pointers are
fetched from it when asked for, and what ``save`` writes goes back to it when
the step ends.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from dagster import ConfigurableResource
from pydantic import Field
from torch import nn

from ops.ml.card import ModelCard, load_model, save_model
from resources import keys
from resources.object_store import ObjectStore


class ModelNotFoundError(FileNotFoundError):
    pass


class ModelStore(ConfigurableResource):
    root: str = Field(default="data/store/models", description="Folder of the model store")
    shipped: str = Field(default="models", description="Models shipped in the repository, used when the store has none")
    store: ObjectStore | None = Field(
        default=None, description="Object store holding the models under models/ (then `root` is not used)"
    )

    def _root(self) -> Path:
        if self.store is None:
            return Path(self.root)
        return self.store.local(keys.MODELS_ROOT)

    def _version_dir(self, name: str, version: str) -> Path:
        if self.store is not None:
            return self.store.folder(keys.model_version(name, version))
        return Path(self.root) / name / version

    def save(self, model: nn.Module, card: ModelCard, *, make_current: bool = True) -> str:
        version, _ = save_model(model, card, self._root())
        if make_current:
            self._pointer(card.name).write_text(version)
        return version

    def _pointer(self, name: str) -> Path:
        if self.store is not None:
            return self.store.path(keys.model_pointer(name))
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
            shutil.copytree(Path(self.shipped) / name / version, self._version_dir(name, version), dirs_exist_ok=True)
            p.write_text(version)
            return version
        raise ModelNotFoundError(
            f"no version of model {name!r} in {self.where()}: materialize its training asset (declared in models/attributes.yaml) first"
        )

    def load(
        self, name: str, version: str | None = None, device: str | torch.device = "cpu"
    ) -> tuple[nn.Module, ModelCard]:
        version = version or self.current_version(name)
        folder = self._version_dir(name, version)
        if not (folder / "weights.pt").exists():
            raise ModelNotFoundError(f"model {name}@{version} not found in {self.where()}")
        return load_model(folder, device)

    def card(self, name: str, version: str | None = None) -> ModelCard:
        version = version or self.current_version(name)
        return ModelCard(**json.loads((self._version_dir(name, version) / "model_card.json").read_text()))

    def where(self) -> str:
        return self.store.uri(keys.MODELS_ROOT) if self.store is not None else str(Path(self.root).resolve())
