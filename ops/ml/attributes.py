"""Attribute declarations: what the product learns and predicts, read from one YAML file.

An attribute (roof type, roof material, roof slope, solar panels...) is a
declaration plus labels, not code: its name, task, classes or unit, training
settings and where its labels come from. Everything downstream is generated
from it: the training asset, the models ``predictions`` runs, the columns of
dbt's ``building_attributes``. The file is validated as a whole when it is
read, before anything trains, and every error names the file, the attribute
and the field, because the person who wrote it is not the person who wrote
this module.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

TASKS = ("classification", "segmentation", "regression")
#: Where labels come from: a per-département CSV/Parquet file, a column of the footprints, polygons.
LABEL_KINDS = ("file", "footprint_column", "polygons")
#: Training settings a declaration may set, with their type and default (the defaults of the shipped classifier).
TRAINING_DEFAULTS: dict[str, int | float] = {
    "epochs": 24,
    "batch_size": 128,
    "learning_rate": 3e-3,
    "max_samples": 30_000,
    "max_train_seconds": 900.0,
    "seed": 0,
}
#: The declarations the product ships; ``BATIVISION_ATTRIBUTES`` points elsewhere (a deployment's own file, tests).
DEFAULT_PATH = Path(__file__).resolve().parents[2] / "models" / "attributes.yaml"
NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")  # it becomes dbt column prefixes and an asset key
#: The chip geometry of the `chips` asset's defaults (``ops.crop.spec.ChipSpec``): what a `chip` field overrides.
CHIP_DEFAULTS: dict[str, int | float] = {"size": 64, "margin_m": 2.0, "margin_ratio": 0.15}
#: Bounds of a declared chip: its side in pixels, its margins (metres, fraction of the building's extent).
CHIP_BOUNDS: dict[str, tuple[float, float]] = {"size": (16, 512), "margin_m": (0.0, 200.0), "margin_ratio": (0.0, 5.0)}


class DeclarationError(ValueError):
    """A declaration that cannot be used: names the file, the attribute and the field."""


@dataclass(frozen=True)
class LabelSource:
    """Where an attribute's labels come from, per département.

    ``file``: a CSV or Parquet file named ``file`` in the département's source folder (next to
    the footprints), an id column and ``column``. ``footprint_column``: ``column`` of the footprint
    file itself (BD TOPO carries open labels such as ``MAT_TOITS``). ``polygons``: a vector file
    of the département (segmentation ground truth). ``values`` maps raw values to classes (a
    raw value mapped to null means "unknown": counted and not used); a raw value neither mapped
    nor a class is an error unless ``unmapped`` is ``skip``.
    """

    kind: str
    file: str | None = None
    column: str | None = None
    values: Mapping[str, str | None] = field(default_factory=dict)
    unmapped: str = "error"

    def describe(self) -> str:
        if self.kind == "footprint_column":
            return f"footprint column {self.column}" + (f" ({len(self.values)} values mapped)" if self.values else "")
        if self.kind == "polygons":
            return f"{self.file} per département"
        return f"{self.file} (column {self.column}) per département"


@dataclass(frozen=True)
class ChipGeometry:
    """An attribute's own chips: a side and margins other than the default crop's.

    A swimming pool sits in the garden, not on the roof: its model needs a wider
    margin than a roof's. Attributes that declare the same geometry share one
    set of chips, cut by the `chips` asset beside the default ones and named
    after the geometry (:attr:`name`), so the set's name alone says how it was cut.
    """

    size: int
    margin_m: float
    margin_ratio: float

    @property
    def name(self) -> str:
        """The chip set's name, e.g. ``s96-m12-r0.5``: a folder name (``resources.keys.chips``)."""
        return f"s{self.size}-m{self.margin_m:g}-r{self.margin_ratio:g}"


@dataclass(frozen=True)
class Attribute:
    """One declared attribute: the model that learns it and how it is trained."""

    name: str
    task: str
    labels: LabelSource
    classes: tuple[str, ...] = ()
    unit: str | None = None
    #: regression: the values the quantity can take (a slope is 0-90°); predictions are clipped to it
    value_range: tuple[float, float] | None = None
    asset: str = ""
    description: str = ""
    training: Mapping[str, int | float] = field(default_factory=dict)
    #: its own chip geometry; None: the partition's default chips
    chip: ChipGeometry | None = None

    @property
    def chip_set(self) -> str:
        """The chips it is trained on and predicted from: "" for the default ones, else its geometry's name."""
        return self.chip.name if self.chip else ""

    @property
    def digest(self) -> str:
        """12 hex digits over the declaration: the training asset's code version, so an edit marks the model stale."""
        doc = asdict(self)
        if doc["chip"] is None:  # declarations from before `chip` existed keep their version
            del doc["chip"]
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:12]

    def setting(self, key: str) -> int | float:
        return self.training.get(key, TRAINING_DEFAULTS[key])

    def columns(self) -> list[tuple[str, str, str]]:
        """Its columns in dbt's ``building_attributes``: (name, type, description), in the mart's order.

        What an analyst reads beside the table (the asset's column schema in the UI): the values a
        column can take come from this declaration, so they follow it.
        """
        from ops.shards import STATUSES  # here: declarations are read without pyarrow (the capacity plan)

        what = self.description.strip().rstrip(".") or self.name.replace("_", " ")
        if self.task == "regression":
            bounds = f", clipped to [{self.value_range[0]:g}, {self.value_range[1]:g}]" if self.value_range else ""
            cols = [(f"{self.name}_value", "double", f"{what}, in {self.unit}{bounds} (regression)")]
        else:
            cols = [
                (f"{self.name}_label", "string", f"{what}: one of {', '.join(self.classes)} ({self.task})"),
                (f"{self.name}_score", "double", f"calibrated probability of {self.name}_label, in [0, 1]"),
            ]
        return cols + [
            (f"{self.name}_status", "string", f"{self.name} prediction status: {', '.join(STATUSES)}"),
            (f"{self.name}_model_version", "string", f"the {self.name} model version of this prediction (latest)"),
            (f"{self.name}_predicted_at", "timestamp", f"when the {self.name} prediction was made"),
        ]

    def dbt(self) -> dict[str, Any]:
        """What dbt's ``building_attributes`` needs of it (``var('attribute_models')``)."""
        out: dict[str, Any] = {"name": self.name, "task": self.task}
        if self.classes:
            out["classes"] = list(self.classes)
        if self.unit:
            out["unit"] = self.unit
        if self.value_range:
            out["range"] = list(self.value_range)
        return out


def chip_sets(attributes: Mapping[str, Attribute]) -> dict[str, ChipGeometry]:
    """The chip sets the declarations ask for beyond the default chips: name → geometry (shared by equal ones)."""
    return {a.chip.name: a.chip for a in attributes.values() if a.chip}


def attributes_path() -> Path:
    return Path(os.environ.get("BATIVISION_ATTRIBUTES") or DEFAULT_PATH)


@functools.cache
def _declared(path: Path) -> dict[str, Attribute]:
    return load_attributes(path)


def declared_attributes() -> dict[str, Attribute]:
    """The code location's declarations (:func:`attributes_path`), read and checked once per process.

    The Definitions, `chips`, `predictions`, the asset checks and the pods' sizing all build
    themselves from them at import: one read, and all of them from the same file contents.
    Shared: don't modify the mapping.
    """
    return _declared(attributes_path().resolve())


def load_attributes(path: Path | None = None) -> dict[str, Attribute]:
    """Every declaration of ``path`` (default: :func:`attributes_path`), validated, by name in file order."""
    path = Path(path or attributes_path())
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise DeclarationError(f"{path}: attribute declarations not found") from None
    except yaml.YAMLError as exc:
        raise DeclarationError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("attributes"), dict) or not doc["attributes"]:
        raise DeclarationError(f"{path}: expected a mapping `attributes:` of name → declaration")
    extra = sorted(set(doc) - {"attributes"})
    if extra:
        raise DeclarationError(f"{path}: unknown top-level key(s) {extra}; expected only `attributes`")
    out: dict[str, Attribute] = {}
    assets: dict[str, str] = {}
    for name, decl in doc["attributes"].items():
        attr = parse_attribute(str(name), decl, path)
        if attr.asset in assets:
            raise DeclarationError(
                f"{path}: attribute {name!r}: field 'asset': {attr.asset!r} is already attribute {assets[attr.asset]!r}'s"
            )
        assets[attr.asset] = attr.name
        out[attr.name] = attr
    return out


_FIELDS = {"task", "classes", "unit", "range", "asset", "description", "labels", "training", "chip"}
_LABEL_FIELDS = {"file", "column", "footprint_column", "polygons", "values", "unmapped"}


def parse_attribute(name: str, decl: Any, path: Path | str = "<declarations>") -> Attribute:
    """One declaration, checked field by field (the error names ``path``, ``name`` and the field)."""

    def bad(fld: str, msg: str) -> DeclarationError:
        return DeclarationError(f"{path}: attribute {name!r}: field {fld!r}: {msg}")

    if not NAME.match(name):
        raise DeclarationError(
            f"{path}: attribute {name!r}: its name must be a lowercase identifier [a-z][a-z0-9_]* of at most 40 "
            "characters (it names the model, an asset and dbt columns)"
        )
    if not isinstance(decl, dict):
        raise DeclarationError(f"{path}: attribute {name!r}: expected a mapping of fields, got {decl!r}")
    unknown = sorted(set(decl) - _FIELDS)
    if unknown:
        raise bad(unknown[0], f"unknown field; fields are {sorted(_FIELDS)}")
    task = decl.get("task")
    if task not in TASKS:
        raise bad("task", f"{task!r} is not a task; tasks are {list(TASKS)}")
    classes = decl.get("classes")
    unit = decl.get("unit")
    if task == "regression":
        if classes is not None:
            raise bad("classes", "a regression predicts a quantity: declare its `unit`, not classes")
        if not isinstance(unit, str) or not unit.strip():
            raise bad("unit", "a regression needs the unit of its value (e.g. degrees, m)")
        classes = ()
    else:
        if decl.get("range") is not None:
            raise bad("range", f"only a regression has a range of values; a {task} has classes")
        if unit is not None:
            raise bad("unit", f"only a regression has a unit; a {task} has classes")
        if not isinstance(classes, list) or len(classes) < 2:
            raise bad("classes", f"a {task} needs a list of at least two classes, got {classes!r}")
        if not all(isinstance(c, str) and c.strip() and c == c.strip() for c in classes):
            raise bad("classes", f"classes must be non-empty strings without surrounding spaces, got {classes!r}")
        dup = sorted({c for c in classes if classes.count(c) > 1})
        if dup:
            raise bad("classes", f"class(es) {dup} listed twice")
        classes = tuple(classes)
    value_range = decl.get("range")
    if value_range is not None:
        ok = (
            isinstance(value_range, list)
            and len(value_range) == 2
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value_range)
            and value_range[0] < value_range[1]
        )
        if not ok:
            raise bad("range", f"expected [lowest, highest] numbers, lowest first, got {value_range!r}")
        value_range = (float(value_range[0]), float(value_range[1]))
    asset = decl.get("asset", f"{name}_model")
    if not isinstance(asset, str) or not NAME.match(asset):
        raise bad("asset", f"{asset!r} is not a lowercase identifier")
    description = decl.get("description", "")
    if not isinstance(description, str):
        raise bad("description", "expected text")
    labels = _parse_labels(decl.get("labels"), task, classes, bad)
    training = decl.get("training") or {}
    if not isinstance(training, dict):
        raise bad("training", f"expected a mapping of settings, got {training!r}")
    for key, value in training.items():
        if key not in TRAINING_DEFAULTS:
            raise bad(f"training.{key}", f"unknown setting; settings are {sorted(TRAINING_DEFAULTS)}")
        want = type(TRAINING_DEFAULTS[key])
        ok = isinstance(value, int | float) and not isinstance(value, bool) and (want is float or value == int(value))
        if not ok or (key != "seed" and value <= 0) or value < 0:
            raise bad(f"training.{key}", f"expected a positive {want.__name__}, got {value!r}")
        training[key] = want(value)
    chip = _parse_chip(decl.get("chip"), bad)
    return Attribute(
        name=name,
        task=task,
        labels=labels,
        classes=classes,
        unit=unit.strip() if isinstance(unit, str) else None,
        value_range=value_range,
        asset=asset,
        description=description.strip(),
        training=dict(training),
        chip=chip,
    )


def _parse_chip(decl: Any, bad) -> ChipGeometry | None:
    """The `chip` field: any of size, margin_m, margin_ratio; the others keep their default."""
    if decl is None:
        return None
    if not isinstance(decl, dict) or not decl:
        raise bad("chip", f"expected a mapping of some of {sorted(CHIP_DEFAULTS)}, got {decl!r}")
    got = dict(CHIP_DEFAULTS)
    for key, value in decl.items():
        if key not in CHIP_DEFAULTS:
            raise bad(f"chip.{key}", f"unknown setting; settings are {sorted(CHIP_DEFAULTS)}")
        lo, hi = CHIP_BOUNDS[key]
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not lo <= value <= hi or (key == "size" and value != int(value)):
            what = "a whole number of pixels" if key == "size" else "a number"
            raise bad(f"chip.{key}", f"expected {what} from {lo:g} to {hi:g}, got {value!r}")
        got[key] = int(value) if key == "size" else float(value)
    return ChipGeometry(**got)


def _parse_labels(decl: Any, task: str, classes: tuple[str, ...], bad) -> LabelSource:
    if not isinstance(decl, dict):
        raise bad("labels", "expected a mapping naming one of " + ", ".join(LABEL_KINDS))
    unknown = sorted(set(decl) - _LABEL_FIELDS)
    if unknown:
        raise bad(f"labels.{unknown[0]}", f"unknown field; fields are {sorted(_LABEL_FIELDS)}")
    kinds = [k for k in LABEL_KINDS if k in decl]
    if len(kinds) != 1:
        raise bad("labels", f"name exactly one source of {list(LABEL_KINDS)}, got {kinds or 'none'}")
    kind = kinds[0]
    value = decl[kind]
    if not isinstance(value, str) or not value.strip():
        raise bad(f"labels.{kind}", f"expected a file or column name, got {value!r}")
    if (kind == "polygons") != (task == "segmentation"):
        raise bad(
            f"labels.{kind}",
            "a segmentation learns from polygons"
            if task == "segmentation"
            else f"polygons train a segmentation, not a {task}",
        )
    column = decl.get("column")
    if kind == "file":
        if not isinstance(column, str) or not column.strip():
            raise bad(
                "labels.column",
                f"a label file needs the column holding the {'value' if task == 'regression' else 'class'}",
            )
    elif column is not None:
        raise bad("labels.column", f"only a label `file` has a column; {kind} names its own")
    values = decl.get("values") or {}
    if not isinstance(values, dict):
        raise bad("labels.values", "expected a mapping raw value → class (or null: unknown)")
    if values and task != "classification":
        raise bad("labels.values", f"a value mapping maps raw values to classes; a {task} has none")
    values = {str(k): (None if v is None else str(v)) for k, v in values.items()}
    outside = sorted({v for v in values.values() if v is not None} - set(classes))
    if outside:
        raise bad("labels.values", f"maps to {outside}, which are not classes {list(classes)}")
    unmapped = decl.get("unmapped", "error")
    if unmapped not in ("error", "skip"):
        raise bad("labels.unmapped", f"{unmapped!r}: expected error (the default) or skip")
    if kind == "footprint_column":
        return LabelSource(kind, column=value.strip(), values=values, unmapped=unmapped)
    return LabelSource(
        kind, file=value.strip(), column=column.strip() if column else None, values=values, unmapped=unmapped
    )
