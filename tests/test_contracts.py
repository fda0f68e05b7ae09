"""The lists the dbt project spells out are the Python ones: statuses, geometry statuses, tasks, model names, classes.

SQL and YAML cannot import Python, so the dbt project writes these lists
again; this test keeps each copy equal to its one definition (``ops.shards``,
``ops.geo.footprints``, ``ops.ml.attributes``), so a new status or task cannot
reach the pipeline without its dbt tests. The attributes themselves (names,
classes) are not written in the dbt project: the pipeline passes them from
the declarations (``assets.dbt.dbt_vars``).
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from ops.geo.footprints import GEOMETRY_STATUSES
from ops.ml.attributes import TASKS
from ops.shards import STATUSES

DBT = Path(__file__).resolve().parent.parent / "dbt"

# a list in the dbt project is recognised by a value only one definition has
DEFINITIONS = {
    "no_imagery": ("chip statuses (ops.shards.STATUSES)", list(STATUSES)),
    "repaired": ("geometry statuses (ops.geo.footprints.GEOMETRY_STATUSES)", list(GEOMETRY_STATUSES)),
    "segmentation": ("tasks (ops.ml.attributes.TASKS)", sorted(TASKS)),
}


def accepted_values() -> list[tuple[str, list[str]]]:
    """(file: column, values) of every accepted_values test of the dbt project's YAML."""
    found = []

    def walk(node, where: str) -> None:
        if isinstance(node, dict):
            if "accepted_values" in node:
                spec = node["accepted_values"] or {}
                values = spec.get("values") or (spec.get("arguments") or {}).get("values")
                found.append((where, list(values)))
            for k, v in node.items():
                walk(v, f"{where}/{node['name']}" if k == "data_tests" and "name" in node else where)
        elif isinstance(node, list):
            for item in node:
                walk(item, where)

    for path in sorted((DBT / "models").rglob("*.yml")):
        walk(yaml.safe_load(path.read_text()), path.name)
    return found


def test_every_accepted_values_list_is_a_python_definition():
    lists = accepted_values()
    assert len(lists) >= 4, "the dbt project's accepted_values tests were not found"
    for where, values in lists:
        key = next((k for k in DEFINITIONS if k in values), None)
        assert key is not None, f"{where}: accepted values {values} match no Python definition; add one here"
        what, expected = DEFINITIONS[key]
        got = sorted(values) if key == "segmentation" else values
        assert got == expected, f"{where}: {values} are not the {what}: {expected}"


def test_the_dbt_project_declares_no_attribute_of_its_own():
    """Columns come from models/attributes.yaml through the var the pipeline passes; a default would drift."""
    from assets.dbt import dbt_vars
    from ops.ml.attributes import load_attributes

    project = yaml.safe_load((DBT / "dbt_project.yml").read_text())
    assert project["vars"]["attribute_models"] == []
    attrs = load_attributes()
    passed = dbt_vars("12", attrs)["attribute_models"]
    assert [a["name"] for a in passed] == list(attrs)
    assert all(a["task"] in TASKS and ("unit" in a) == (a["task"] == "regression") for a in passed)


def test_the_summary_counts_every_chip_status():
    sql = (DBT / "models" / "marts" / "departement_summary.sql").read_text()
    statuses = re.search(r"set statuses = (\[[^\]]*\])", sql)
    assert statuses is not None
    assert yaml.safe_load(statuses.group(1)) == list(STATUSES)
