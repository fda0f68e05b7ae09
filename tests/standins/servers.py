"""Start real servers standing in for production systems, on free 127.0.0.1 ports.

- PostgreSQL (Debian's server binaries, or any ``initdb``/``pg_ctl`` on PATH);
- the ``local-bigquery`` BigQuery emulator, from its own Python ≥ 3.13 virtualenv
  (``.venv-bq``, built by ``make install-emulators``);
- ``gcp-storage-emulator``, a Cloud Storage JSON + XML API server.

Each is a context manager that yields where to reach it and stops it on exit.
A missing server binary is an error, not a skip: CI must not go green without
having exercised the production code path.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BQ_PYTHON = REPO / ".venv-bq" / "bin" / "python"
PG_BIN_DIRS = [Path("/usr/local/bin"), *sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{url}: no answer after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def _process(cmd: list[str], log: Path, ready_url: str, env: dict | None = None) -> Iterator[subprocess.Popen]:
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_http(ready_url, proc, log)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def bigquery_emulator(workdir: Path) -> Iterator[str]:
    """The BigQuery REST API on ``http://127.0.0.1:<port>`` (local-bigquery on DuckDB)."""
    if not BQ_PYTHON.exists():
        raise RuntimeError(f"{BQ_PYTHON} missing: run `make install-emulators` (needs Python >= 3.13)")
    port, grpc_port = free_port(), free_port()
    data = workdir / "bigquery-data"
    data.mkdir(parents=True, exist_ok=True)
    cmd = [
        str(BQ_PYTHON),
        str(Path(__file__).parent / "bigquery_emulator.py"),
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--grpc-port",
        str(grpc_port),
        "--data-dir",
        str(data),
    ]
    url = f"http://127.0.0.1:{port}"
    with _process(cmd, workdir / "bigquery.log", f"{url}/bigquery/v2/projects/p/datasets"):
        yield url


@contextlib.contextmanager
def gcs_emulator(workdir: Path) -> Iterator[str]:
    """The Cloud Storage JSON and XML APIs on ``http://127.0.0.1:<port>`` (gcp-storage-emulator, in memory)."""
    exe = Path(sys.executable).parent / "gcp-storage-emulator"
    port = free_port()
    cmd = [str(exe), "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory"]
    url = f"http://127.0.0.1:{port}"
    with _process(cmd, workdir / "gcs.log", f"{url}/storage/v1/b"):
        yield url


@dataclass
class Postgres:
    host: str
    port: int
    user: str
    password: str
    db: str

    def env(self) -> dict[str, str]:
        """The variables ``orchestration/instance/prod.yaml`` reads."""
        return {
            "DAGSTER_PG_HOST": self.host,
            "DAGSTER_PG_PORT": str(self.port),
            "DAGSTER_PG_DB": self.db,
            "DAGSTER_PG_USERNAME": self.user,
            "DAGSTER_PG_PASSWORD": self.password,
        }

    def connect(self):
        import psycopg2

        return psycopg2.connect(host=self.host, port=self.port, user=self.user, password=self.password, dbname=self.db)


def _pg_tool(name: str) -> str:
    found = shutil.which(name) or next((str(d / name) for d in PG_BIN_DIRS if (d / name).exists()), None)
    if not found:
        raise RuntimeError(f"PostgreSQL's {name} not found (apt-get install postgresql)")
    return found


@contextlib.contextmanager
def postgres_server() -> Iterator[Postgres]:
    """A throw-away PostgreSQL cluster listening on 127.0.0.1 (password auth), removed on exit.

    PostgreSQL refuses to run as root: as root, the server runs as the ``postgres`` system user.
    """
    as_user: list[str] = []
    owner = None
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    base = Path(tempfile.mkdtemp(prefix="bativision-pg-"))
    pgdata, sock = base / "data", base / "sock"
    sock.mkdir()
    pwfile = base / "pw"
    password = "pg-" + secrets.token_urlsafe(18)  # a real-looking secret: tests grep the run records for it
    pwfile.write_text(password + "\n")
    if owner is not None:
        for p in (base, sock, pwfile):
            os.chown(p, owner.pw_uid, owner.pw_gid)
    port = free_port()
    log = base / "server.log"
    run = {"check": True, "capture_output": True, "text": True}
    subprocess.run(
        [*as_user, _pg_tool("initdb"), "-D", str(pgdata), "-U", "dagster", "--pwfile", str(pwfile),
         "--auth=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8"],
        **run,
    )  # fmt: skip
    pg_ctl = _pg_tool("pg_ctl")
    try:
        subprocess.run(
            [*as_user, pg_ctl, "-D", str(pgdata), "-l", str(log), "-w", "-t", "60", "start",
             "-o", f"-k {sock} -h 127.0.0.1 -p {port}"],
            **run,
        )  # fmt: skip
        server = Postgres("127.0.0.1", port, "dagster", password, "postgres")
        con = server.connect()
        con.autocommit = True
        con.cursor().execute("CREATE DATABASE dagster")
        con.close()
        server.db = "dagster"
        yield server
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(pgdata), "-m", "fast", "-w", "stop"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)
