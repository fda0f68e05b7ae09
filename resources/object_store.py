"""Where intermediate artefacts live: building GeoParquet, mosaics, chip shards, models.

Keys are relative paths (``chips/12/E0660000_N6360000.chips.npy``). The
embedded default is a local folder; assets only use keys and the methods
below, so a bucket-backed store can take its place without touching them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from dagster import ConfigurableResource
from pydantic import Field


class LocalObjectStore(ConfigurableResource):
    """A local folder as object store."""

    root: str = Field(default="data/store", description="Folder holding every artefact")

    def path(self, key: str) -> Path:
        """Local path of ``key`` (its parent folder is created)."""
        p = Path(self.root).resolve() / key
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def local(self, key: str) -> Path:
        """Local path of ``key`` to write new content to (nothing is fetched; the folder is created)."""
        p = Path(self.root).resolve() / key
        p.mkdir(parents=True, exist_ok=True)
        return p

    def folder(self, key: str) -> Path:
        """Local folder of the prefix ``key`` (created)."""
        p = Path(self.root).resolve() / key
        p.mkdir(parents=True, exist_ok=True)
        return p

    def uri(self, key: str) -> str:
        return self.path(key).as_uri()

    def exists(self, key: str) -> bool:
        return (Path(self.root) / key).exists()

    def delete(self, key: str) -> None:
        p = Path(self.root) / key
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
