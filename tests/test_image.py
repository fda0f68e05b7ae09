"""The production image, proven without Docker: it runs as a non-root user on a read-only root filesystem and
lacks nothing the code location needs.

There is no Docker daemon here, so the image is read from the ``Dockerfile`` (and ``.dockerignore``) and its
file tree is rebuilt in a temporary folder: what the ``COPY`` lines copy from the build context, then the build
step that parses the dbt manifest. That copy is made read-only and the code location is imported from it, then
a dbt partition is built, with the image's ``ENV`` (``/scratch`` and the working directory mapped to temporary
folders): nothing may be written outside ``/scratch``. When the tests run as root (which chmod does not stop),
that runs as the image's uid, or, where that uid cannot reach this interpreter, as root without the capabilities
that override file permissions (setpriv).
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from setuptools import find_packages

from tests.prodenv import prod_env

REPO = Path(__file__).resolve().parent.parent
SCRATCH = "/scratch"  # the pods mount an emptyDir there

pytestmark = pytest.mark.k8s


# --- the Dockerfile, read ---------------------------------------------------------------------------------------


def instructions(text: str | None = None) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction: continuation lines joined, comments dropped."""
    text = (REPO / "Dockerfile").read_text() if text is None else text
    out: list[tuple[str, str]] = []
    current = ""
    for line in text.splitlines():
        if line.strip().startswith("#") or (not line.strip() and not current):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        word, _, args = current.strip().partition(" ")
        out.append((word.upper(), args.strip()))
        current = ""
    return out


def final_user() -> str:
    users = [args for word, args in instructions() if word == "USER"]
    assert users, "the Dockerfile has no USER: the image runs as root"
    return users[-1].split(":")[0]


def workdir() -> str:
    return [args for word, args in instructions() if word == "WORKDIR"][-1]


def image_env() -> dict[str, str]:
    """The ENV of the final stage."""
    env: dict[str, str] = {}
    for word, args in instructions():
        if word == "FROM":
            env = {}
        elif word == "ENV":
            tokens = shlex.split(args)
            if "=" not in tokens[0]:  # legacy form: ENV KEY value
                env[tokens[0]] = args.split(None, 1)[1]
            else:
                env.update(t.split("=", 1) for t in tokens)
    return env


def copies() -> list[tuple[list[str], str]]:
    """(sources, destination) of each COPY from the build context (not those from another stage)."""
    out = []
    for word, args in instructions():
        if word not in {"COPY", "ADD"}:
            continue
        if args.startswith("["):
            tokens = json.loads(args)
        else:
            tokens = shlex.split(args)
        flags = [t for t in tokens if t.startswith("--")]
        if any(f.startswith("--from") for f in flags):
            continue
        paths = [t for t in tokens if not t.startswith("--")]
        out.append((paths[:-1], paths[-1]))
    return out


def _glob_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignored() -> Callable[[str], bool]:
    """Whether a context-relative path is left out of the build context (a folder's pattern covers its files)."""
    patterns = []
    ignore = REPO / ".dockerignore"
    for line in ignore.read_text().splitlines() if ignore.exists() else []:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        patterns.append((negated, _glob_regex(posixpath.normpath(line.lstrip("!").strip().lstrip("/")))))

    def ignored(rel: str) -> bool:
        parts = rel.split("/")
        prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
        result = False
        for negated, regex in patterns:
            if any(regex.fullmatch(p) for p in prefixes):
                result = not negated
        return result

    return ignored


def copied_files() -> dict[str, Path]:
    """Image path relative to the working directory → the context file it is copied from."""
    ignored = dockerignored()
    work = workdir()
    out: dict[str, Path] = {}
    for sources, dest in copies():
        target = posixpath.normpath(posixpath.join(work, dest))
        assert target == work or target.startswith(work + "/"), f"COPY to {dest}: outside WORKDIR {work}"
        target = posixpath.relpath(target, work)
        for pattern in sources:
            for src in sorted(REPO.glob(pattern)) if any(c in pattern for c in "*?[") else [REPO / pattern]:
                assert src.exists(), f"COPY {pattern}: not in the build context"
                if src.is_dir():
                    files = [p for p in src.rglob("*") if p.is_file()]
                    pairs = [(p, posixpath.join(target, p.relative_to(src).as_posix())) for p in files]
                elif dest.endswith("/") or len(sources) > 1:
                    pairs = [(src, posixpath.join(target, src.name))]
                else:
                    pairs = [(src, target)]
                for path, rel in pairs:
                    if not ignored(path.relative_to(REPO).as_posix()):
                        out[posixpath.normpath(rel)] = path
    return out


def build_step_snippet() -> str:
    """The Python the image runs at build time to parse the dbt manifest."""
    for word, args in instructions():
        found = re.search(r"python3? -c \"([^\"]*ensure_manifest[^\"]*)\"", args) if word == "RUN" else None
        if found:
            return found.group(1)
    raise AssertionError("the Dockerfile parses no dbt manifest at build time (assets.dbt.ensure_manifest)")


# --- the Dockerfile's text --------------------------------------------------------------------------------------


def test_the_image_runs_as_a_numeric_non_root_user():
    user = final_user()
    assert user.isdigit(), f"USER {user}: Kubernetes' runAsNonRoot can only check a numeric uid"
    assert int(user) != 0, "USER 0 is root"


def test_run_time_writes_go_to_scratch_owned_by_the_user():
    env = image_env()
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1"
    for var in ("HOME", "TMPDIR"):
        assert env.get(var, "").startswith(SCRATCH), f"{var} is not under {SCRATCH}"
    runs = " ".join(args for word, args in instructions() if word == "RUN")
    uid = final_user()
    assert re.search(rf"chown (-R )?{uid}(:\d+)? {SCRATCH}\b", runs), f"{SCRATCH} is not made the user's"


def test_torch_is_the_cpu_build_unless_a_cuda_index_is_given():
    args = dict(a.split("=", 1) for word, a in instructions() if word == "ARG" and "=" in a)
    assert args.get("TORCH_INDEX", "").rstrip("/").endswith("/whl/cpu")
    assert "--build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu" in (REPO / "Dockerfile").read_text()
    assert any("$TORCH_INDEX" in a and "torch==" in a for word, a in instructions() if word == "RUN")


def test_every_installed_package_is_copied():
    find = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = find_packages(where=str(REPO), include=find.get("include", ["*"]), exclude=find.get("exclude", ()))
    assert packages
    image = copied_files()
    for package in packages:
        folder = REPO / package.replace(".", "/")
        for source in folder.glob("*.py"):
            rel = source.relative_to(REPO).as_posix()
            assert rel in image, f"{rel} (package {package}) is not copied into the image"


# --- the image's file tree, rebuilt -----------------------------------------------------------------------------


def _as_image_user() -> tuple[list[str], dict]:
    """How to run a command so that a read-only tree is read-only to it (chmod a-w does not stop root).

    As the image's user (USER) when the tests run as root and that uid can run this interpreter; else root
    without the capabilities that override file permissions; else as is (not root: chmod suffices).
    """
    if os.geteuid() != 0:
        return [], {}
    uid = int(final_user())
    as_uid = {"user": uid, "group": uid, "extra_groups": []}
    try:
        if subprocess.run([sys.executable, "-c", "pass"], capture_output=True, **as_uid).returncode == 0:
            return [], as_uid
    except OSError:  # this interpreter lies where that uid cannot go
        pass
    setpriv = shutil.which("setpriv")
    assert setpriv, "running as root, without setpriv to drop root's permission overrides"
    return [setpriv, "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search,-fowner"], {}


def _chmod_tree(root: Path, writable: bool) -> None:
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode
        path.chmod(mode | stat.S_IWUSR if writable else mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def _env(work: Path, scratch: Path) -> dict[str, str]:
    """This environment without the project's own settings, plus the image's ENV, its folders mapped here."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("BATIVISION_", "DBT_", "DAGSTER_HOME", "PYTHONPATH", "VIRTUAL_ENV"))
    }
    for key, value in image_env().items():
        value = value.replace(SCRATCH, str(scratch)) if value.startswith(SCRATCH) else value
        env[key] = value.replace(workdir(), str(work)) if value.startswith(workdir()) else value
    env["DAGSTER_DISABLE_TELEMETRY"] = "1"
    return env


@pytest.fixture(scope="module")
def image() -> Iterator[Path]:
    """The image's working directory, rebuilt: COPY'd files, then the build-time manifest parse.

    Under a folder of its own (pytest's tmp_path is root's only; the image's user must read this one).
    """
    base = Path(tempfile.mkdtemp(prefix="bativision-image-"))
    base.chmod(0o755)
    work = base / "opt"
    (base / "build-scratch").mkdir()
    try:
        for rel, source in copied_files().items():
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, work / rel)
        build = subprocess.run(
            [sys.executable, "-c", build_step_snippet()],
            cwd=work,
            env=_env(work, base / "build-scratch") | {"PYTHONDONTWRITEBYTECODE": "0"},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert build.returncode == 0, build.stderr[-3000:]
        yield work
    finally:
        _chmod_tree(base, writable=True)
        shutil.rmtree(base, ignore_errors=True)


AUDIT = r"""
import json, os, sys
root, prefix, out = sys.argv[1], sys.prefix, sys.argv[2]
opened = set()

def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.path.abspath(os.fsdecode(args[0]))
        if path.startswith(root + os.sep) and not path.startswith(prefix + os.sep):
            opened.add(path)

sys.addaudithook(hook)
import orchestration.definitions as definitions
from dagster import ConfigurableResource

paths = set()
def walk(value):
    if isinstance(value, ConfigurableResource):
        for name in type(value).model_fields:
            walk(getattr(value, name))
    elif isinstance(value, (list, tuple)):
        for v in value:
            walk(v)
    elif isinstance(value, (str, os.PathLike)) and os.path.isabs(os.fspath(value)):
        paths.add(os.path.abspath(os.fspath(value)))
for resource in definitions.defs.resources.values():
    walk(resource)
json.dump({"opened": sorted(opened), "resource_paths": sorted(paths)}, open(out, "w"))
"""


def _source_of(path: Path) -> Path:
    """`pkg/__pycache__/mod.cpython-311.pyc` → `pkg/mod.py`; any other path as is."""
    if path.parent.name == "__pycache__":
        return path.parent.parent / (path.name.split(".")[0] + ".py")
    return path


@pytest.mark.slow
def test_what_the_code_location_reads_at_import_is_in_the_image(image, tmp_path):
    """Every file under the repository that importing the code location opens (BATIVISION_ENV=prod, as in the
    image), and every repository path its resources are configured with, is in the image."""
    out = tmp_path / "audit.json"
    env = prod_env(DAGSTER_DISABLE_TELEMETRY="1")
    proc = subprocess.run(
        [sys.executable, "-c", AUDIT, str(REPO), str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    audit = json.loads(out.read_text())
    # a module read from its bytecode cache stands for its source; installed distributions' metadata (scanned for
    # entry points; `pip install .` makes the image's) is no file of the code location
    opened = {_source_of(Path(p)) for p in audit["opened"] if os.path.isfile(p)}
    opened = [p for p in opened if not p.relative_to(REPO).parts[0].endswith((".egg-info", ".dist-info"))]
    assert any(p.suffix == ".yml" for p in opened) and any(p.name == "manifest.json" for p in opened)
    missing = sorted(p.relative_to(REPO).as_posix() for p in opened if not (image / p.relative_to(REPO)).is_file())
    assert not missing, f"read at import but not in the image: {missing}"
    configured = [Path(p) for p in audit["resource_paths"] if Path(p).is_relative_to(REPO)]
    configured = [p for p in configured if not p.is_relative_to(Path(sys.prefix).resolve())]
    assert configured, "no resource points into the repository (the dbt project, the shipped models)"
    missing = [p.relative_to(REPO).as_posix() for p in configured if not (image / p.relative_to(REPO)).exists()]
    assert not missing, f"resources configured with paths the image lacks: {missing}"


READ_ONLY_RUN = r"""
import json, os, sys
from pathlib import Path
root, scratch = Path(sys.argv[1]), Path(sys.argv[2])

def listing():
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            st = os.lstat(os.path.join(folder, name))
            out[os.path.relpath(os.path.join(folder, name), root)] = [st.st_mode, st.st_size, st.st_mtime_ns]
    return out

report = {"before": listing()}
import orchestration.definitions
report["modules"] = sorted(
    m.__file__ for n, m in list(sys.modules.items())
    if n.split(".")[0] in {"orchestration", "assets", "ops", "resources", "synthetic"} and getattr(m, "__file__", None)
)
report["after_import"] = listing()

# run time: one département's dbt build (models and tests) on an empty warehouse in the scratch folder
from dagster import DagsterInstance, materialize
from assets.dbt import dbt_models_asset
from ops.ml.attributes import load_attributes
from orchestration.environment import resources_for
from resources.warehouse import DuckDBWarehouse

warehouse = DuckDBWarehouse(path=str(scratch / "warehouse.duckdb"))
with warehouse.connect() as con:
    warehouse.ensure_tables(con)
result = materialize(
    [dbt_models_asset(load_attributes())], partition_key="12", resources={"dbt": resources_for()["dbt"], "warehouse": warehouse},
    instance=DagsterInstance.ephemeral(), raise_on_error=False,
)
report["dbt_success"] = result.success
report["dbt_failures"] = [str(e.event_specific_data)[:2000] for e in result.all_events if e.is_failure]
report["after_dbt"] = listing()
(scratch / "report.json").write_text(json.dumps(report))
"""


@pytest.fixture(scope="module")
def read_only_run(image) -> dict:
    """The image's tree made read-only, then imported and a dbt partition built, as the image's user (or so)."""
    scratch = image.parent / "scratch"
    scratch.mkdir()
    prefix, as_user = _as_image_user()
    if "user" in as_user:
        os.chown(scratch, as_user["user"], as_user["group"])
    _chmod_tree(image, writable=False)
    proc = subprocess.run(
        [*prefix, sys.executable, "-c", READ_ONLY_RUN, str(image), str(scratch)],
        cwd=image,
        env=_env(image, scratch),
        capture_output=True,
        text=True,
        timeout=900,
        **as_user,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads((scratch / "report.json").read_text()) | {"scratch": scratch}


def _changes(before: dict, after: dict) -> list[str]:
    return sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))


@pytest.mark.slow
def test_importing_the_code_location_from_a_read_only_image_writes_nothing(image, read_only_run):
    modules = [Path(m) for m in read_only_run["modules"]]
    assert modules and all(m.is_relative_to(image) for m in modules), "modules imported from outside the image"
    assert (image / "dbt" / "target" / "manifest.json").is_file()
    written = _changes(read_only_run["before"], read_only_run["after_import"])
    assert not written, f"importing wrote under the image: {written[:20]}"
    assert not (read_only_run["scratch"] / "bativision" / "dbt-manifest").exists(), "the manifest was parsed again"


@pytest.mark.slow
def test_dbt_runs_on_a_read_only_image_and_writes_under_scratch_only(read_only_run):
    assert read_only_run["dbt_success"], read_only_run["dbt_failures"]
    written = _changes(read_only_run["after_import"], read_only_run["after_dbt"])
    assert not written, f"dbt wrote under the image: {written[:20]}"
    scratch = read_only_run["scratch"]
    assert list(scratch.rglob("run_results.json")) and list(scratch.rglob("dbt.log")), "no dbt target under scratch"
