"""Cloud Storage as the production object store, behind the ``ObjectStore`` interface assets use.

Assets only ever see local paths (``store.path(key)``, ``store.folder(prefix)``):
GDAL, Parquet and numpy memory maps all want files. :class:`GcsObjectStore` is
therefore a local folder mirrored to ``gs://<bucket>/<prefix>/``:

- each execution (one step, one pod under the k8s executor) works in a fresh
  sub-folder of ``root``, so nothing stale from another run can be uploaded;
- ``path(key)`` / ``folder(prefix)`` download what the bucket has there, the
  first time they are asked for it;
- when the execution ends, every file created or changed since is uploaded
  (Dagster calls ``teardown_after_execution`` after the step, failed or not, so
  finished chip shards of a failed step are kept for resumption).

Imagery is not copied: tiles under ``gs://`` are read in place through GDAL's
``/vsigs/`` (see ``resources.imagery``).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import requests
from dagster import InitResourceContext, get_dagster_logger
from dagster_gcp import GCSResource
from google.api_core import exceptions as gexc
from google.api_core.retry import if_transient_error
from google.cloud import storage
from google.cloud.storage.retry import DEFAULT_RETRY
from pydantic import Field, PrivateAttr

from ops.imagery.convert import DIGEST_TAG, SOURCE_TAG, cog_name
from ops.imagery.remote import HTTP_TIMEOUT_S, FetchError, TransientFetchError
from resources.gcp import client_options, credentials_for
from resources.object_store import ObjectStore

TRANSIENT_SUFFIXES = (".tmp",)


def split_gs_uri(uri: str) -> tuple[str, str]:
    """``gs://bucket/a/b`` → ``("bucket", "a/b")``."""
    if not uri.startswith("gs://"):
        raise ValueError(f"{uri!r} is not a gs:// URI")
    bucket, _, key = uri[len("gs://") :].partition("/")
    if not bucket:
        raise ValueError(f"{uri!r}: no bucket")
    return bucket, key.strip("/")


def gcs_client(api_endpoint: str | None = None, project: str | None = None) -> storage.Client:
    """A Cloud Storage client: application default credentials, or anonymous for an http:// emulator."""
    return storage.Client(
        project=project,
        credentials=credentials_for(api_endpoint, ["https://www.googleapis.com/auth/devstorage.read_write"]),
        client_options=client_options(api_endpoint),
    )


def download_prefix(client: storage.Client, bucket: str, prefix: str, dest: Path) -> list[Path]:
    """Copy every object under ``gs://bucket/prefix/`` into ``dest`` (keys relative to the prefix)."""
    prefix = prefix.strip("/")
    out = []
    for blob in client.list_blobs(bucket, prefix=f"{prefix}/" if prefix else None):
        if blob.name.endswith("/"):
            continue
        local = dest / blob.name[len(prefix) :].lstrip("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        blob.download_to_filename(str(local))
        out.append(local)
    return out


class GcsObjectStore(ObjectStore):
    """``gs://<bucket>/<prefix>/`` as object store, through a per-execution local cache under ``root``.

    The project is dagster-gcp's ``GCSResource``, nested here so the UI shows it; the
    client is built by :func:`gcs_client` rather than by that resource, which cannot
    point at another endpoint (the tests' emulator): one construction for both.
    """

    gcs: GCSResource = Field(description="dagster-gcp's Cloud Storage resource: the project of the client")
    root: str = Field(
        default=str(Path(tempfile.gettempdir()) / "bativision-store"),
        description="Local cache folder; each execution works in a fresh sub-folder of it",
    )
    bucket: str = Field(description="Bucket holding the artefacts")
    prefix: str = Field(default="", description="Key prefix inside the bucket (no leading or trailing slash)")
    api_endpoint: str | None = Field(
        default=None, description="Cloud Storage JSON API endpoint; None = Google's. http:// = an emulator (tests)"
    )

    _client: Any = PrivateAttr(default=None)
    _cache: Path | None = PrivateAttr(default=None)
    _synced: dict[str, tuple[int, int]] = PrivateAttr(default_factory=dict)
    _fetched_prefixes: set[str] = PrivateAttr(default_factory=set)

    # -- lifecycle -------------------------------------------------------------------------

    def setup_for_execution(self, context: InitResourceContext) -> None:
        self._local()

    def teardown_after_execution(self, context: InitResourceContext) -> None:
        if self._cache is None:
            return
        try:
            self.sync()
        finally:
            shutil.rmtree(self._cache, ignore_errors=True)
            self._cache = None
            self._synced.clear()
            self._fetched_prefixes.clear()

    # -- helpers ---------------------------------------------------------------------------

    def client(self) -> storage.Client:
        if self._client is None:
            self._client = gcs_client(self.api_endpoint, self.gcs.project)
        return self._client

    def _local(self) -> Path:
        if self._cache is None:
            Path(self.root).mkdir(parents=True, exist_ok=True)
            self._cache = Path(tempfile.mkdtemp(prefix="exec-", dir=self.root)).resolve()
        return self._cache

    def blob_name(self, key: str) -> str:
        key = key.strip("/")
        return f"{self.prefix.strip('/')}/{key}" if self.prefix.strip("/") else key

    def _signature(self, p: Path) -> tuple[int, int]:
        st = p.stat()
        return st.st_size, st.st_mtime_ns

    def _fetched(self, key: str) -> bool:
        key = key.strip("/")
        return key in self._synced or any(key == p or key.startswith(p + "/") for p in self._fetched_prefixes)

    def _download(self, blob: storage.Blob, key: str) -> None:
        local = self._local() / key
        local.parent.mkdir(parents=True, exist_ok=True)
        blob.download_to_filename(str(local))
        self._synced[key] = self._signature(local)

    # -- the ObjectStore interface ----------------------------------------------------

    def path(self, key: str) -> Path:
        """Local path of ``key``, holding the bucket's copy if there is one (its parent folder is created)."""
        key = key.strip("/")
        p = self._local() / key
        p.parent.mkdir(parents=True, exist_ok=True)
        if not self._fetched(key):
            blob = self.client().bucket(self.bucket).blob(self.blob_name(key))
            if blob.exists():
                self._download(blob, key)
            else:
                self._synced.setdefault(key, (-1, -1))  # absent remotely: upload whatever appears
        return p

    def local(self, key: str) -> Path:
        """This execution's local folder for ``key``, fetching nothing (new content is uploaded at the end)."""
        p = self._local() / key.strip("/")
        p.mkdir(parents=True, exist_ok=True)
        return p

    def folder(self, key: str) -> Path:
        """Local folder of the prefix ``key``, holding every object the bucket has under it (created)."""
        key = key.strip("/")
        p = self._local() / key
        p.mkdir(parents=True, exist_ok=True)
        if not self._fetched(key):
            for blob in self.client().list_blobs(self.bucket, prefix=self.blob_name(key) + "/"):
                rel = blob.name[len(self.blob_name("")) :].lstrip("/") if self.prefix.strip("/") else blob.name
                if not rel.endswith("/") and rel not in self._synced:
                    self._download(blob, rel)
            self._fetched_prefixes.add(key)
        return p

    def uri(self, key: str) -> str:
        return f"gs://{self.bucket}/{self.blob_name(key)}"

    def cogs(self, key: str) -> GcsCogs:
        """The prefix ``key`` of the bucket as the home of converted COGs (uploaded one by one, read in place)."""
        return GcsCogs(self.client(), self.bucket, self.blob_name(key), Path(self.root) / "convert")

    def exists(self, key: str) -> bool:
        key = key.strip("/")
        if (self._local() / key).exists():
            return True
        bucket = self.client().bucket(self.bucket)
        if bucket.blob(self.blob_name(key)).exists():
            return True
        return any(True for _ in self.client().list_blobs(self.bucket, prefix=self.blob_name(key) + "/", max_results=1))

    def delete(self, key: str) -> None:
        key = key.strip("/")
        local = self._local() / key
        if local.is_dir():
            shutil.rmtree(local)
        else:
            local.unlink(missing_ok=True)
        bucket = self.client().bucket(self.bucket)
        blobs = list(self.client().list_blobs(self.bucket, prefix=self.blob_name(key) + "/"))
        single = bucket.blob(self.blob_name(key))
        if single.exists():
            blobs.append(single)
        for blob in blobs:
            blob.delete()
        for k in [k for k in self._synced if k == key or k.startswith(key + "/")]:
            del self._synced[k]

    def sync(self) -> int:
        """Upload every file of this execution's cache created or changed since it was downloaded."""
        if self._cache is None:
            return 0
        bucket = self.client().bucket(self.bucket)
        n = 0
        for p in sorted(self._cache.rglob("*")):
            if not p.is_file() or p.name.endswith(TRANSIENT_SUFFIXES):
                continue
            key = p.relative_to(self._cache).as_posix()
            sig = self._signature(p)
            if self._synced.get(key) == sig:
                continue
            bucket.blob(self.blob_name(key)).upload_from_filename(str(p))
            self._synced[key] = sig
            n += 1
        if n:
            get_dagster_logger().info(f"uploaded {n} file(s) to gs://{self.bucket}/{self.blob_name('')}")
        return n


class GcsCogs:
    """Converted COGs under a prefix of the store's bucket, read in place by the chips pods (``/vsigs/``).

    Why not the store's local mirror: a département's COGs are tens of gigabytes, and every chips
    pod would download them all; here each COG is uploaded once, as it is finished, with the
    digest of its source in the object's metadata, so that deciding what to reuse lists the prefix
    and downloads nothing (``ops.imagery.convert.CogDestination``).

    Why the digest is in the object's name too (``<stem>.<digest>.tif``): a COG made from a new
    vintage of a tile is a new object, never an old path with new bytes. GDAL caches what it has
    read of a ``/vsigs/`` path for the life of the process (the old header with the new blocks gave
    "Premature end of JPEG file"), and a mosaic written before the new vintage keeps reading the
    COG it names until it is rebuilt.
    """

    def __init__(self, client: storage.Client, bucket: str, prefix: str, scratch: Path) -> None:
        self.client, self.bucket, self.prefix = client, bucket, prefix.strip("/")
        self._scratch = scratch
        self._objects: dict[str, list[storage.Blob]] = {}  # COG name → its objects (one, unless a put was cut)

    def recorded(self) -> dict[str, str]:
        self._objects.clear()
        found: dict[str, str] = {}
        blobs = self.client.list_blobs(self.bucket, prefix=self.prefix + "/", retry=DEFAULT_RETRY)
        for b in sorted(blobs, key=lambda b: b.updated or 0):  # the newest last: it is the one kept
            meta = b.metadata or {}
            if DIGEST_TAG in meta and SOURCE_TAG in meta and "/" not in b.name[len(self.prefix) + 1 :]:
                name = cog_name(meta[SOURCE_TAG])  # ours (foreign objects carry no digest): left alone otherwise
                self._objects.setdefault(name, []).append(b)
                found[name] = meta[DIGEST_TAG]
        for blobs in self._objects.values():  # an older vintage left by a put cut short: the newest is kept
            while len(blobs) > 1:
                with contextlib.suppress(gexc.NotFound):
                    blobs.pop(0).delete(retry=DEFAULT_RETRY)
        return found

    def scratch(self) -> Path:
        self._scratch.mkdir(parents=True, exist_ok=True)
        return self._scratch

    def put(self, name: str, cog: Path, digest: str, source: str) -> str:
        blob = self.client.bucket(self.bucket).blob(f"{self.prefix}/{Path(name).stem}.{digest}.tif")
        blob.metadata = {DIGEST_TAG: digest, SOURCE_TAG: source}
        # one request per COG (a few MB) to an object name of its own: retrying it is safe
        blob.upload_from_filename(str(cog), retry=DEFAULT_RETRY, timeout=HTTP_TIMEOUT_S)
        self.remove(name)  # the older vintages, once the new one is there
        self._objects[name] = [blob]
        return self.location(name)

    def location(self, name: str) -> str:
        return f"/vsigs/{self.bucket}/{self._objects[name][-1].name}"

    def size(self, name: str) -> int:
        return int(self._objects[name][-1].size or 0)

    def remove(self, name: str) -> None:
        for blob in self._objects.pop(name, []):
            with contextlib.suppress(gexc.NotFound):
                blob.delete(retry=DEFAULT_RETRY)


_TRANSIENT = (
    ConnectionError,
    TimeoutError,
    requests.exceptions.Timeout,
    requests.exceptions.ConnectionError,
    requests.exceptions.ChunkedEncodingError,
)


class GcsRangeReader:
    """Byte ranges of ``/vsigs/<bucket>/<key>`` objects through the Cloud Storage API (the prefetch's source).

    Errors the API client marks retryable (429, 5xx, connection resets) are
    reported as transient for the prefetch's backoff; a missing object or a
    refused permission fails at once, naming the object.
    """

    def __init__(self, api_endpoint: str | None = None, timeout_s: float = HTTP_TIMEOUT_S) -> None:
        if not timeout_s or timeout_s <= 0:
            raise ValueError(f"GcsRangeReader: timeout_s must be a positive number of seconds, got {timeout_s}")
        self.api_endpoint = api_endpoint
        self.timeout_s = timeout_s  # a stalled read is dropped after this long, and retried by the prefetch
        self._local = threading.local()  # one client (one HTTP session) per fetching thread

    def _blob(self, path: str) -> storage.Blob:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = gcs_client(self.api_endpoint)
        bucket, key = split_gs_uri("gs://" + path.removeprefix("/vsigs/").removeprefix("gs://"))
        return client.bucket(bucket).blob(key)

    def _call(self, path: str, fn):
        try:
            return fn()
        except gexc.NotFound as exc:
            raise FetchError(f"{path}: no such object") from exc
        except Exception as exc:
            # requests' timeouts and broken bodies are not builtin TimeoutError/ConnectionError subclasses all
            # the way (ReadTimeout is, ChunkedEncodingError is not): a stalled object read is retried too
            if if_transient_error(exc) or isinstance(exc, _TRANSIENT):
                raise TransientFetchError(f"{path}: {exc}") from exc
            raise FetchError(f"{path}: {type(exc).__name__}: {exc}") from exc

    def size(self, path: str) -> int:
        blob = self._blob(path)
        self._call(path, lambda: blob.reload(retry=None, timeout=self.timeout_s))
        return int(blob.size or 0)

    def read(self, path: str, start: int, stop: int) -> bytes:
        blob = self._blob(path)
        # no client-side retry: the prefetch's own backoff counts and bounds the attempts
        data = self._call(
            path,
            lambda: blob.download_as_bytes(
                start=start, end=stop - 1, checksum=None, retry=None, timeout=self.timeout_s
            ),
        )
        if len(data) != stop - start:
            raise TransientFetchError(f"{path}: short read, {len(data)} of {stop - start} bytes")
        return data
