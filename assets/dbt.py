"""The dbt project as Dagster assets, so lineage runs from footprints to `building_attributes`.

dbt's sources `warehouse.buildings` and `warehouse.predictions` map onto the
`buildings` and `predictions` assets. The models are partitioned like their
sources: a partition run rebuilds them and runs their tests (the accounting
invariant among them) after that département's predictions landed.
"""

import fcntl
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import uuid
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dagster import AssetExecutionContext, AssetKey, AssetsDefinition, AssetSpec, TableColumn, TableSchema
from dagster_dbt import DagsterDbtTranslator, DbtCliResource, DbtProject, dbt_assets

from assets.owners import ANALYTICS
from assets.partitions import departements_partitions
from ops.ml.attributes import Attribute
from resources.env import kinds, scratch_dir
from resources.warehouse import WAREHOUSE_POOL, DuckDBWarehouse, Warehouse

DBT_DIR = Path(__file__).resolve().parent.parent / "dbt"
dbt_project = DbtProject(project_dir=DBT_DIR, profiles_dir=DBT_DIR)


def ensure_manifest(project_dir: Path = DBT_DIR) -> Path:
    """Parse the dbt project if its manifest is missing or older than its sources.

    Dagster builds the dbt assets from the manifest at import time; a fresh
    clone has none, and a stale one would show models that no longer exist.
    A current manifest is only read: importing the code location writes
    nothing (the image parses at build time and runs on a read-only root
    filesystem). Several processes may import this module at once (test
    workers, the code server and its run workers), so a parse runs under a
    file lock, into a private target folder, and the manifest is swapped in
    whole: a reader never sees half a file. Where the project cannot be
    written, a stale manifest is parsed into the scratch folder instead.
    """
    manifest = project_dir / "target" / "manifest.json"
    if not _manifest_is_stale(project_dir, manifest):
        return manifest
    if not _writable(manifest.parent):
        key = hashlib.sha256(str(project_dir.resolve()).encode()).hexdigest()[:12]
        warnings.warn(
            f"{manifest} is missing or stale and {project_dir} is read-only: parsing into the scratch folder",
            stacklevel=2,
        )
        manifest = scratch_dir() / "dbt-manifest" / key / "manifest.json"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    with open(manifest.parent / ".parse.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _manifest_is_stale(project_dir, manifest):
            _parse_into(project_dir, manifest)
    return manifest


def run_target_dir(project_dir: Path = DBT_DIR) -> Path:
    """The folder under which each dbt invocation gets its own target folder, which also holds its logs.

    ``DBT_TARGET_PATH`` when set (dbt's own variable; relative to the project,
    as in dbt); else the scratch folder when ``BATIVISION_CACHE_DIR`` is set
    (a pod's scratch volume); else the project's ``target/`` where it can be
    written (a checkout: the demo and the tests); else the temp dir's scratch.
    """
    if os.environ.get("DBT_TARGET_PATH"):
        return project_dir / os.environ["DBT_TARGET_PATH"]
    if os.environ.get("BATIVISION_CACHE_DIR"):
        return scratch_dir() / "dbt-target"
    target = project_dir / "target"
    return target if _writable(target) else scratch_dir() / "dbt-target"


def _writable(folder: Path) -> bool:
    """Whether files can be created in `folder`, or in its nearest existing parent (it would be created)."""
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    return os.access(folder, os.W_OK)


def _manifest_is_stale(project_dir: Path, manifest: Path) -> bool:
    sources = [p for p in project_dir.rglob("*") if p.suffix in {".sql", ".yml", ".yaml"} and "target" not in p.parts]
    newest = max((p.stat().st_mtime for p in sources), default=0)
    return not manifest.exists() or manifest.stat().st_mtime < newest


def _parse_into(project_dir: Path, manifest: Path) -> None:
    env = {
        **os.environ,
        **DuckDBWarehouse(path=os.environ.get("BATIVISION_DUCKDB_PATH", "data/warehouse.duckdb")).dbt_env(),
    }
    dbt = Path(sys.executable).parent / "dbt"
    with tempfile.TemporaryDirectory(dir=manifest.parent, prefix=".parse-") as scratch:
        args = [
            "parse",
            "--project-dir",
            str(project_dir),
            "--profiles-dir",
            str(project_dir),
            "--target-path",
            scratch,
            "--log-path",
            scratch,
        ]
        subprocess.run([str(dbt), *args, "--quiet"], check=True, env=env, cwd=project_dir)
        os.replace(Path(scratch) / "manifest.json", manifest)


#: The mart with a set of columns per declared attribute (its yml can only describe the fixed ones).
ATTRIBUTES_MART = "building_attributes"


class BativisionDbtTranslator(DagsterDbtTranslator):
    """dbt sources are our own assets; models go in the `warehouse_models` group; the attributes' mart
    lists each declared attribute's columns in its column schema."""

    def __init__(self, attributes: Mapping[str, Attribute] | None = None) -> None:
        super().__init__()
        self.attributes = dict(attributes or {})

    def get_asset_key(self, dbt_resource_props: Mapping[str, Any]) -> AssetKey:
        if dbt_resource_props["resource_type"] == "source":
            return AssetKey(dbt_resource_props["name"])
        return super().get_asset_key(dbt_resource_props)

    def get_group_name(self, dbt_resource_props: Mapping[str, Any]) -> str | None:
        return "warehouse_models"

    def get_owners(self, dbt_resource_props: Mapping[str, Any]) -> Sequence[str] | None:
        return ANALYTICS

    def get_asset_spec(self, manifest: Mapping[str, Any], unique_id: str, project: DbtProject | None) -> AssetSpec:
        """The engine in the kinds is this environment's warehouse, not the adapter the manifest was parsed with."""
        spec = super().get_asset_spec(manifest, unique_id, project)
        adapter = manifest.get("metadata", {}).get("adapter_type")
        spec = spec.replace_attributes(kinds=(spec.kinds - {adapter}) | kinds(warehouse=True, store=False))
        if manifest["nodes"].get(unique_id, {}).get("name") != ATTRIBUTES_MART or not self.attributes:
            return spec
        fixed = spec.metadata.get("dagster/column_schema")
        columns = [
            *(fixed.columns if fixed else []),
            *(TableColumn(n, t, d) for a in self.attributes.values() for n, t, d in a.columns()),
        ]
        return spec.merge_attributes(metadata={"dagster/column_schema": TableSchema(columns=columns)})


def dbt_vars(departement: str, attributes: Mapping[str, Attribute]) -> dict[str, Any]:
    """What a partition's dbt run is told: its département and the declared attributes (their columns)."""
    return {"departement": departement, "attribute_models": [a.dbt() for a in attributes.values()]}


def dbt_models_asset(attributes: Mapping[str, Attribute]) -> AssetsDefinition:
    """The dbt models as assets; `building_attributes` gets a column set per declared attribute (a dbt var)."""

    @dbt_assets(
        manifest=ensure_manifest(),
        project=dbt_project,
        dagster_dbt_translator=BativisionDbtTranslator(attributes),
        partitions_def=departements_partitions,
        pool=WAREHOUSE_POOL,
    )
    def bativision_dbt_models(context: AssetExecutionContext, dbt: DbtCliResource, warehouse: Warehouse):
        os.environ.update(warehouse.dbt_env())
        args = ["build", "--vars", json.dumps(dbt_vars(context.partition_key, attributes))]
        # a folder of its own per invocation (dagster-dbt's naming), outside the project where it is read-only
        name = f"{context.op_execution_context.op.name}-{context.run.run_id[:7]}-{uuid.uuid4().hex[:7]}"
        yield from dbt.cli(args, context=context, target_path=run_target_dir() / name).stream()

    return bativision_dbt_models
