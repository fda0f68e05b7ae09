"""An HTTP proxy in front of a stand-in that answers 503 to every Nth request (a flaky Google API).

Requests are forwarded as they are (method, path, headers, body) to the
upstream server; every ``every``-th one gets a Google-style 503
``backendError`` instead, or half its body before the connection drops, or
an answer after 5 s of silence, and is
counted, so a test can check that the faults happened and were retried.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

STALL_S = 5.0
_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


class Faults:
    """Every ``every``-th request fails: a 503 (``how="503"``), a body cut short (``"cut"``) or 5 s of silence (``"stall"``)."""

    def __init__(self, every: int, how: str = "503") -> None:
        self.every, self.how, self.requests, self.injected = every, how, 0, 0
        self._lock = threading.Lock()

    def next_fails(self) -> bool:
        with self._lock:
            self.requests += 1
            fail = self.every > 0 and self.requests % self.every == 0
            self.injected += fail
            return fail


def _handler(upstream: str, faults: Faults) -> type[BaseHTTPRequestHandler]:
    target = urlsplit(upstream)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def _forward(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            failing = faults.next_fails()
            if failing and faults.how == "stall":
                time.sleep(STALL_S)
            if failing and faults.how == "503":
                payload = json.dumps(
                    {"error": {"code": 503, "message": "injected", "errors": [{"reason": "backendError"}]}}
                ).encode()
                self.send_response(503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                return
            con = http.client.HTTPConnection(target.hostname, target.port, timeout=120)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
            con.request(self.command, self.path, body=body, headers=headers)
            resp = con.getresponse()
            data = resp.read()
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in _HOP:
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if failing and faults.how == "cut":  # half the body, then the connection drops
                self.wfile.write(data[: len(data) // 2])
                self.close_connection = True
            else:
                self.wfile.write(data)
            con.close()

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

    return Handler


@contextlib.contextmanager
def faulty_proxy(upstream: str, every: int, how: str = "503") -> Iterator[tuple[str, Faults]]:
    """``(url, faults)`` of a proxy to ``upstream`` failing every ``every``-th request (a 503, or a cut body)."""
    faults = Faults(every, how)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(upstream, faults))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", faults
    finally:
        server.shutdown()
        server.server_close()
