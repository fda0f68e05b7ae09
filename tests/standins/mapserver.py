"""MapServer (Debian's ``mapserv``, the OGC reference WMS) serving a folder of orthophoto tiles on 127.0.0.1.

Stands in for IGN's Géoplateforme WMS (and WMTS) in the tests and in ``make bench-prefetch``:
one layer (``ORTHO`` by default) in EPSG:2154 over a VRT of the tiles, PNG
(lossless) and JPEG output, GetMap up to ``max_size`` px a side. ``mapserv`` is
a CGI program: a small threaded HTTP front end runs it once per request, as
Apache would, after waiting ``latency_s`` (a far-away service) and, every
``fail_every``-th GetMap, answering 503 instead (a flaky one). A test steers
those through ``PUT /__behaviour`` and reads the GetMap log at ``/__log``.

It runs in its own process: GDAL keeps Python's GIL while it reads from the
WMS, so a server thread in the test's process would never answer.

``/wmts`` is MapCache (Debian's ``mapcache-cgi``) in front of that WMS: a
WMTS (KVP) with one tile matrix set, ``LA93`` (EPSG:2154, 0.2 m, 256 px tiles
from the map's top-left corner).

A missing ``mapserv`` is an error, not a skip: ``make install-mapserver``
installs Debian's ``cgi-mapserver`` and ``mapcache-cgi``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from tests.standins.servers import _process, free_port

LAYER = "ORTHO"


def mapfile(vrt: Path, bounds: tuple[float, float, float, float], url: str, layer: str, max_size: int) -> str:
    """The map: one raster layer, nearest-neighbour so that an aligned GetMap returns the source's pixels."""
    minx, miny, maxx, maxy = bounds
    return f"""MAP
  NAME "bativision"
  EXTENT {minx} {miny} {maxx} {maxy}
  SIZE 1024 1024
  MAXSIZE {max_size}
  UNITS METERS
  IMAGECOLOR 0 0 0
  PROJECTION "init=epsg:2154" END
  OUTPUTFORMAT NAME "png" DRIVER "AGG/PNG" MIMETYPE "image/png" IMAGEMODE RGB EXTENSION "png"
    FORMATOPTION "COMPRESSION=1" END
  OUTPUTFORMAT NAME "jpeg" DRIVER "AGG/JPEG" MIMETYPE "image/jpeg" IMAGEMODE RGB EXTENSION "jpg"
    FORMATOPTION "QUALITY=90" END
  WEB
    METADATA
      "wms_title" "bativision stand-in"
      "wms_onlineresource" "{url}?"
      "wms_srs" "EPSG:2154"
      "wms_enable_request" "*"
      "wms_getmap_formatlist" "image/png,image/jpeg"
    END
  END
  LAYER
    NAME "{layer}"
    TYPE RASTER
    STATUS ON
    DATA "{vrt}"
    PROJECTION "init=epsg:2154" END
    PROCESSING "RESAMPLE=NEAREST"
    METADATA "wms_title" "{layer}" "wms_srs" "EPSG:2154" "wms_extent" "{minx} {miny} {maxx} {maxy}" END
  END
END
"""


def mapcache_config(bounds: tuple[float, float, float, float], wms_url: str, layer: str, work: Path) -> str:
    """MapCache as a WMTS in front of the map: tile matrix set ``LA93`` (EPSG:2154, 0.2 m, 256 px tiles)."""
    minx, miny, maxx, maxy = bounds
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<mapcache>
  <grid name="LA93">
    <srs>EPSG:2154</srs>
    <units>m</units>
    <extent>{minx} {miny} {maxx} {maxy}</extent>
    <resolutions>0.2</resolutions>
    <size>256 256</size>
    <origin>top-left</origin>
  </grid>
  <source name="map" type="wms">
    <getmap><params><FORMAT>image/png</FORMAT><LAYERS>{layer}</LAYERS></params></getmap>
    <http><url>{wms_url}?</url></http>
  </source>
  <cache name="disk" type="disk"><base>{work / "mapcache"}</base></cache>
  <format name="PNGFAST" type="PNG"><compression>fast</compression></format>
  <tileset name="{layer}">
    <source>map</source><cache>disk</cache><grid>LA93</grid><format>PNGFAST</format>
    <metatile>1 1</metatile><metabuffer>0</metabuffer>
  </tileset>
  <service type="wmts" enabled="true"/>
  <service type="wms" enabled="false"/>
  <log_level>warn</log_level>
</mapcache>
"""


class Behaviour:
    """What the front end does besides running mapserv; shared by its threads."""

    def __init__(self) -> None:
        self.latency_s = 0.0
        self.fail_every = 0
        self.getmaps = 0
        self.failed = 0
        self.log: list[tuple[float, str]] = []  # (arrival time, query) of every GetMap
        self.lock = threading.Lock()

    def next_fails(self, query: str) -> bool:
        with self.lock:
            if "getmap" not in query.lower() and "gettile" not in query.lower():
                return False
            self.getmaps += 1
            self.log.append((time.time(), query))
            fail = self.fail_every > 0 and self.getmaps % self.fail_every == 0
            self.failed += fail
            return fail


def _handler(env: dict[str, str], how: Behaviour) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_PUT(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
            with how.lock:
                how.latency_s = float(body.get("latency_s", how.latency_s))
                how.fail_every = int(body.get("fail_every", how.fail_every))
            self._send(204, b"", "text/plain")

        def do_GET(self) -> None:  # noqa: N802
            parts = urlsplit(self.path)
            if parts.path == "/__log":
                with how.lock:
                    payload = {"getmaps": how.getmaps, "failed": how.failed, "log": how.log}
                return self._send(200, json.dumps(payload).encode(), "application/json")
            if how.latency_s:
                time.sleep(how.latency_s)
            if how.next_fails(parts.query):
                return self._send(503, b"injected failure", "text/plain")
            cgi = ["mapserv"] if parts.path != "/wmts" else ["/usr/lib/cgi-bin/mapcache"]
            run = subprocess.run(
                cgi, env={**env, "QUERY_STRING": parts.query, "REQUEST_METHOD": "GET", "PATH_INFO": parts.path,
                          "SCRIPT_NAME": "", "HTTP_HOST": self.headers.get("Host", "127.0.0.1")},
                capture_output=True, check=False,
            )  # fmt: skip
            head, _, body = run.stdout.partition(b"\r\n\r\n")
            headers = dict(line.split(": ", 1) for line in head.decode("latin-1").split("\r\n") if ": " in line)
            if run.returncode != 0 or not headers:
                return self._send(500, run.stdout + run.stderr, "text/plain")
            status = int(headers.get("Status", "200").split()[0])
            self._send(status, body, headers.get("Content-Type", "application/octet-stream"))

    return Handler


class Control:
    """The test's handle on a running server."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.wmts_url = f"{url}/wmts"  # MapCache's WMTS (KVP) over the same map, tile matrix set LA93

    def set(self, **behaviour: float) -> None:
        """latency_s=seconds, fail_every=k (every k-th GetMap answers 503; 0: none)."""
        req = urllib.request.Request(self.url + "/__behaviour", data=json.dumps(behaviour).encode(), method="PUT")
        urllib.request.urlopen(req, timeout=10).close()

    def log(self) -> dict:
        """{"getmaps": n, "failed": n, "log": [[arrival time, query string], ...]}."""
        with urllib.request.urlopen(self.url + "/__log", timeout=10) as r:
            return json.loads(r.read())


@contextlib.contextmanager
def wms_server(
    vrt: Path, bounds: tuple[float, float, float, float], *, layer: str = LAYER, max_size: int = 4096, **behaviour
) -> Iterator[tuple[str, Control]]:
    """Serve the mosaic ``vrt`` (EPSG:2154) as a WMS at ``http://127.0.0.1:<port>/wms``; yields (URL, control)."""
    if shutil.which("mapserv") is None:
        raise RuntimeError("mapserv not found: run `make install-mapserver` (Debian's cgi-mapserver, mapcache-cgi)")
    port = free_port()
    url = f"http://127.0.0.1:{port}/wms"
    work = Path(tempfile.mkdtemp(prefix="mapserver-"))
    (work / "ortho.map").write_text(mapfile(vrt, bounds, url, layer, max_size))
    # MapServer 8 reads its settings from a config file; the map to serve is fixed there, not taken from the URL
    (work / "mapserver.conf").write_text(f'CONFIG\n  ENV\n    MS_MAPFILE "{work / "ortho.map"}"\n  END\nEND\n')
    (work / "mapcache.xml").write_text(mapcache_config(bounds, url, layer, work))
    cmd = [sys.executable, "-m", "tests.standins.mapserver", str(work / "mapserver.conf"), str(port)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    with _process(cmd, work / "server.log", f"http://127.0.0.1:{port}/__log", env=env):
        control = Control(f"http://127.0.0.1:{port}")
        if behaviour:
            control.set(**behaviour)
        yield url, control
    shutil.rmtree(work, ignore_errors=True)


def serve(conf: Path, port: int) -> None:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "MAPSERVER_CONFIG_FILE": str(conf),
        "MAPCACHE_CONFIG_FILE": str(conf.with_name("mapcache.xml")),
    }
    server = ThreadingHTTPServer(("127.0.0.1", port), _handler(env, Behaviour()))
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    serve(Path(sys.argv[1]), int(sys.argv[2]))
