"""The dbt manifest survives processes that need it at the same moment (CI's clean clone broke on this).

Dagster reads the manifest when `assets.dbt` is imported; on a clean clone
there is none yet, and pytest's workers, a code server and its run workers all
import at once. Each must end up reading a whole, current manifest.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from assets.dbt import DBT_DIR

pytestmark = pytest.mark.slow  # several dbt parses at once

READ_AFTER_ENSURE = """
import json, sys
from pathlib import Path
from assets.dbt import ensure_manifest
manifest = ensure_manifest(Path(sys.argv[1]))
nodes = json.loads(manifest.read_bytes())["nodes"]
print(sum(1 for n in nodes.values() if n["resource_type"] == "model"))
"""


def test_concurrent_first_parses_leave_every_reader_a_whole_manifest(tmp_path):
    project = tmp_path / "dbt"
    shutil.copytree(DBT_DIR, project, ignore=shutil.ignore_patterns("target", "logs", ".user.yml"))
    procs = [
        subprocess.Popen([sys.executable, "-c", READ_AFTER_ENSURE, str(project)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
        for _ in range(6)
    ]  # fmt: skip
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
    models = {int(out.strip().splitlines()[-1]) for out, _ in outs}
    expected = len(list((DBT_DIR / "models").rglob("*.sql")))
    assert models == {expected}  # every reader saw the whole project
    assert not list((project / "target").glob(".parse-*"))  # no scratch left behind
    manifest = project / "target" / "manifest.json"
    json.loads(manifest.read_bytes())
    before = manifest.stat().st_mtime_ns
    next((project / "models").rglob("*.sql")).touch()  # a model changes
    subprocess.run([sys.executable, "-c", READ_AFTER_ENSURE, str(project)], check=True, capture_output=True,
                   cwd=Path(__file__).parent.parent)  # fmt: skip
    assert manifest.stat().st_mtime_ns > before  # a stale manifest is parsed again
