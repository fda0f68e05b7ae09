"""The rules of docs/ARCHITECTURE.md, checked on the source: who may import whom, no private names across packages.

Read from the files (``ast``), not by importing them, so a rule broken in a
module no test imports is still caught.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOP = ("orchestration", "assets", "ops", "resources", "synthetic", "bench", "tests")
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"
MAX_LINES = 500

# package → the project packages it may import (besides itself). Layers point one way:
# orchestration → assets → ops/resources; inside ops, domains point one way too.
MAY_IMPORT: dict[str, set[str]] = {
    "ops": set(),  # the package itself: its docstring only
    "ops.geo": set(),
    "ops.imagery": {"ops.geo"},
    "ops.shards": set(),
    "ops.cpus": set(),
    "ops.locks": set(),
    "ops.crop": {"ops.geo", "ops.imagery", "ops.shards", "ops.cpus"},
    "ops.ml": {"ops.geo", "ops.shards", "ops.cpus"},
    "resources": {"ops.geo", "ops.imagery", "ops.crop", "ops.ml", "ops.shards"},
    "synthetic": {"ops.geo", "ops.ml"},
    "assets": {"ops.geo", "ops.imagery", "ops.crop", "ops.ml", "ops.shards", "ops.cpus", "ops.locks", "resources"},
    "orchestration": {
        "assets",
        *("ops.geo", "ops.imagery", "ops.crop", "ops.ml", "ops.shards", "ops.cpus"),
        "resources",
        "synthetic",
    },
}
FRAMEWORK_FREE = ("ops", "synthetic")  # no Dagster: importable, testable and benchmarkable on their own


def sources() -> list[Path]:
    return sorted(p for top in TOP for p in (ROOT / top).rglob("*.py") if "__pycache__" not in p.parts)


def module_of(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_of(module: str) -> str:
    """The unit the rules speak of: ``ops.<domain>`` (or ``ops.shards``), a test sub-package, else the top folder."""
    parts = module.split(".")
    if parts[0] in ("ops", "tests") and len(parts) > 1 and (ROOT / parts[0] / parts[1]).is_dir():
        return ".".join(parts[:2])
    if parts[0] == "ops" and len(parts) > 1:
        return f"ops.{parts[1]}"
    return parts[0]


def is_project(module: str) -> bool:
    return module.split(".")[0] in TOP


def is_module(dotted: str) -> bool:
    base = ROOT.joinpath(*dotted.split("."))
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def imports(path: Path) -> list[tuple[int, str, str | None]]:
    """(line, module, name imported from it or None) of every import in the file, nested ones included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out += [(node.lineno, node.module, a.name) for a in node.names]
    return out


def test_the_rules_see_every_package():
    packages = {package_of(module_of(p)) for p in sources()}
    assert set(MAY_IMPORT) <= packages, "a package of the rules no longer exists"
    assert {p for p in packages if p.startswith("ops")} <= set(MAY_IMPORT), "an ops package the rules don't name"
    assert len(sources()) > 50


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_follow_the_layers(path):
    me = module_of(path)
    mine = package_of(me)
    bad = []
    for line, module, name in imports(path):
        target = f"{module}.{name}" if name and is_module(f"{module}.{name}") else module
        if mine.split(".")[0] in FRAMEWORK_FREE and target.split(".")[0].startswith("dagster"):
            bad.append(f"line {line}: {mine} must not import Dagster ({target})")
        if not is_project(target):
            continue
        theirs = package_of(target)
        if mine in MAY_IMPORT and theirs != mine and theirs not in MAY_IMPORT[mine]:
            bad.append(f"line {line}: {mine} may not import {theirs} ({target})")
    assert not bad, f"{path.relative_to(ROOT)}:\n" + "\n".join(bad)


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_names_across_packages(path):
    """``from x import _y`` or ``x._y`` on a project module of another package (bench and tests included)."""
    mine = package_of(module_of(path))
    tree = ast.parse(path.read_text())
    bad = []
    aliases: dict[str, str] = {}  # local name → project module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and is_project(node.module):
            for a in node.names:
                if is_module(f"{node.module}.{a.name}"):
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
                elif a.name.startswith("_") and package_of(node.module) != mine:
                    bad.append(f"line {node.lineno}: {a.name} from {node.module}")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if is_project(a.name) and a.asname:
                    aliases[a.asname] = a.name
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and re.fullmatch(r"_[^_].*", node.attr)
            and package_of(aliases[node.value.id]) != mine
        ):
            bad.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
    assert not bad, f"{path.relative_to(ROOT)} uses private names of other packages:\n" + "\n".join(bad)


def test_long_modules_say_why_in_the_architecture_doc():
    text = ARCHITECTURE.read_text()
    long = [p for p in sources() if len(p.read_text().splitlines()) > MAX_LINES]
    unexplained = [str(p.relative_to(ROOT)) for p in long if str(p.relative_to(ROOT)) not in text]
    assert not unexplained, f"over {MAX_LINES} lines with no word in docs/ARCHITECTURE.md: {unexplained}"


def test_the_architecture_doc_names_every_package():
    text = ARCHITECTURE.read_text()
    folders = {p.parent.relative_to(ROOT).as_posix() for p in sources() if p.name == "__init__.py"}
    missing = sorted(f for f in folders if f"{f}/" not in text and not f.startswith(("tests", "bench")))
    assert not missing, f"docs/ARCHITECTURE.md does not say what these hold: {missing}"
