"""A static HTTP file server with Range requests: the protocol of COG hosting (and of GDAL's ``/vsicurl/``).

Stands in for remote imagery in the prefetch's tests and benchmark. Beside
serving files it can misbehave the way object stores do, for the fetch's
clients only (requests from GDAL itself, which opens the headers, pass):

- ``fail_first=k``: each distinct range answers 503 its first k times (throttling);
- ``fail_every=k``: every k-th range request answers 503 (k=1: an outage);
- ``deny``: file names answered 403 (a permission problem: no retry helps);
- ``latency_s``: every request waits this long first (a far-away bucket).

Every request is logged as (client, method, path, range).

It runs in its own process: GDAL holds Python's GIL while it opens a
``/vsicurl/`` file, so a server thread in the test's process would never
answer. The test steers it through ``/__behaviour`` and reads ``/__log``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.standins.servers import _process, free_port


@dataclass
class Behaviour:
    fail_every: int = 0
    fail_first: int = 0
    deny: set[str] = field(default_factory=set)
    latency_s: float = 0.0
    log: list[tuple[str, str, str, str]] = field(default_factory=list)
    _count: int = 0
    _seen: dict[tuple[str, str], int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def next_fails(self, path: str, rng: str) -> bool:
        with self._lock:
            self._count += 1
            seen = self._seen[(path, rng)] = self._seen.get((path, rng), 0) + 1
            return seen <= self.fail_first or (bool(self.fail_every) and self._count % self.fail_every == 0)


def _handler(root: Path, how: Behaviour):
    class Handler(SimpleHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args) -> None:  # quiet
            pass

        def _client(self) -> str:
            return "gdal" if "GDAL" in self.headers.get("User-Agent", "") else "fetch"

        def do_HEAD(self) -> None:
            how.log.append((self._client(), "HEAD", self.path, ""))
            if how.latency_s:
                time.sleep(how.latency_s)
            super().do_HEAD()

        def do_PUT(self) -> None:  # the test steers the server
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            how.fail_every = int(body.get("fail_every", how.fail_every))
            how.fail_first = int(body.get("fail_first", how.fail_first))
            how._seen.clear()  # fail_first counts from now
            how.deny = set(body.get("deny", how.deny))
            how.latency_s = float(body.get("latency_s", how.latency_s))
            self._status(204)

        def do_GET(self) -> None:
            if self.path == "/__log":
                data = json.dumps(how.log).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            rng = self.headers.get("Range", "")
            client = self._client()
            how.log.append((client, "GET", self.path, rng))
            if how.latency_s:
                time.sleep(how.latency_s)
            path = Path(self.translate_path(self.path))
            if client == "fetch" and path.name in how.deny:
                return self._status(403)
            if client == "fetch" and rng and how.next_fails(self.path, rng):
                return self._status(503)
            if not path.is_file():
                return self._status(404)
            size = path.stat().st_size
            if not rng:
                start, stop, code = 0, size, 200
            else:
                a, _, b = rng.removeprefix("bytes=").partition("-")
                start, stop, code = int(a), min(int(b) + 1 if b else size, size), 206
                if start >= size:
                    return self._status(416)
            self.send_response(code)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(stop - start))
            if code == 206:
                self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{size}")
            self.end_headers()
            with open(path, "rb") as fh:
                self.wfile.write(os.pread(fh.fileno(), stop - start, start))

        def _status(self, code: int) -> None:
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.end_headers()

    return Handler


class Control:
    """The test's handle on a running server."""

    def __init__(self, url: str) -> None:
        self.url = url

    def set(self, **behaviour) -> None:
        """fail_first=k, fail_every=k, deny=[file names], latency_s=seconds."""
        body = json.dumps({k: sorted(v) if isinstance(v, set) else v for k, v in behaviour.items()}).encode()
        req = urllib.request.Request(self.url + "/__behaviour", data=body, method="PUT")
        urllib.request.urlopen(req, timeout=10).close()

    def log(self) -> list[tuple[str, str, str, str]]:
        with urllib.request.urlopen(self.url + "/__log", timeout=10) as r:
            return [tuple(x) for x in json.loads(r.read())]


@contextlib.contextmanager
def range_server(root: Path, **behaviour) -> Iterator[tuple[str, Control]]:
    """Serve ``root`` on ``http://127.0.0.1:<port>`` from a child process; yields (base URL, control)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(tempfile.mkdtemp(prefix="range-server-")) / "server.log"
    cmd = [sys.executable, "-m", "tests.standins.range_server", str(root), str(port)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    with _process(cmd, log, url + "/__log", env=env):
        control = Control(url)
        if behaviour:
            control.set(**behaviour)
        yield url, control


def serve(root: Path, port: int) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", port), _handler(root, Behaviour()))
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    serve(Path(sys.argv[1]), int(sys.argv[2]))
