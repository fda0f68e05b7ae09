"""Where intermediate artefacts live: building GeoParquet, mosaics, chip shards, staged rows, models.

Keys are relative paths laid out by ``resources.keys`` (``chips/12`` ...).
:class:`ObjectStore` is what assets depend on; the embedded default is
:class:`LocalObjectStore` (a folder), production's is
``resources.gcs.GcsObjectStore`` (a bucket behind a per-step local cache).
Every method hands back a *local* path, since GDAL, Parquet and numpy memory
maps all want files: a bucket-backed store fetches on demand and uploads what
a step wrote when the step ends.
"""

from __future__ import annotations

import shutil
from abc import abstractmethod
from pathlib import Path

from dagster import ConfigurableResource
from pydantic import Field

from ops.imagery.convert import CogDestination, LocalCogs


class ObjectStore(ConfigurableResource):
    """What assets need from an object store, whichever is behind it (assets annotate with this base)."""

    @abstractmethod
    def path(self, key: str) -> Path:
        """Local path of the file ``key``, holding the stored copy if there is one (its parent folder is created)."""

    @abstractmethod
    def local(self, key: str) -> Path:
        """Local folder ``key`` to write new content to: nothing is fetched (the folder is created)."""

    @abstractmethod
    def folder(self, key: str) -> Path:
        """Local folder of the prefix ``key``, holding every stored object under it (created)."""

    @abstractmethod
    def uri(self, key: str) -> str:
        """Where ``key`` lives, for people (``file://``, ``gs://``)."""

    @abstractmethod
    def cogs(self, key: str) -> CogDestination:
        """The prefix ``key`` as the home of converted COGs, which GDAL reads where they are stored."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether ``key`` is a stored object or a prefix holding some."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``, or everything under the prefix ``key``."""


class LocalObjectStore(ObjectStore):
    """A local folder as object store (the embedded default)."""

    root: str = Field(default="data/store", description="Folder holding every artefact")

    def _abs(self, key: str) -> Path:
        return Path(self.root).resolve() / key

    def path(self, key: str) -> Path:
        p = self._abs(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def local(self, key: str) -> Path:
        return self.folder(key)

    def folder(self, key: str) -> Path:
        p = self._abs(key)
        p.mkdir(parents=True, exist_ok=True)
        return p

    def uri(self, key: str) -> str:
        return self.path(key).as_uri()

    def cogs(self, key: str) -> LocalCogs:
        return LocalCogs(self.folder(key))

    def exists(self, key: str) -> bool:
        return self._abs(key).exists()

    def delete(self, key: str) -> None:
        p = self._abs(key)
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
