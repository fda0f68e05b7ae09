"""An attribute's labels for one département, from the source its declaration names.

A CSV or Parquet file of building id → label, or a column of the footprint
file itself (BD TOPO's open ``MAT_TOITS`` roof-material codes), mapped through
the declaration's ``values``. Every label is checked against the attribute
(a class of a classification, a number for a regression) and what is not
used is counted — unknown codes, skipped mixed codes, empty cells — never
dropped silently. Errors name the file, the column, the line or building and
the value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyogrio

from ops.geo.footprints import ID_CANDIDATES
from ops.ml.attributes import Attribute

#: Columns a label file may name its building ids with (the project's own, BD TOPO's, OSM's).
LABEL_ID_COLUMNS = ("building_id", "cleabs", "id", "ID")


@dataclass
class Labels:
    """Building id → class (str) or value (float), and what the source held that is not a label."""

    values: pd.Series
    source: str
    empty: int = 0  # rows without a value
    unknown: int = 0  # values the declaration maps to null ("unknown")
    skipped: dict[str, int] = field(default_factory=dict)  # raw values neither mapped nor a class (unmapped: skip)

    def summary(self) -> str:
        parts = [f"{len(self.values):,} labels from {self.source}"]
        if self.empty:
            parts.append(f"{self.empty:,} without a value")
        if self.unknown:
            parts.append(f"{self.unknown:,} mapped to unknown")
        if self.skipped:
            top = sorted(self.skipped.items(), key=lambda kv: -kv[1])[:5]
            parts.append(
                f"{sum(self.skipped.values()):,} skipped as unmapped ({', '.join(f'{k}: {v}' for k, v in top)})"
            )
        return "; ".join(parts)


def read_label_file(path: Path, attr: Attribute) -> Labels:
    """Labels from a CSV or Parquet file with an id column and the declaration's ``column``."""
    column = attr.labels.column or attr.name
    try:
        df = pd.read_parquet(path) if path.suffix.lower() in (".parquet", ".pq") else pd.read_csv(path, dtype=str)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path}: empty label file (expected a header with an id column and `{column}`)") from None
    id_col = next((c for c in LABEL_ID_COLUMNS if c in df.columns), None)
    if id_col is None or column not in df.columns:
        raise ValueError(
            f"{path}: attribute {attr.name}: expected an id column ({'/'.join(LABEL_ID_COLUMNS)}) and `{column}`; "
            f"got {list(df.columns)}"
        )
    if df.empty:
        raise ValueError(f"{path}: no labels (a header and no rows)")
    ids = df[id_col].astype("string")
    missing = ids.isna()
    if missing.any():
        rows = (df.index[missing] + 2).tolist()  # file line numbers (header = line 1)
        raise ValueError(f"{path}: {len(rows)} label(s) without a building id, lines {rows[:5]}")
    return to_labels(ids, df[column], attr, f"{path} column {column}", line_offset=2)


def read_footprint_column(path: Path, attr: Attribute, id_column: str | None = None) -> Labels:
    """Labels from a column of the footprint file (any OGR format): its id column and the declared one."""
    column = attr.labels.column or ""
    info = pyogrio.read_info(path)
    fields = list(info["fields"])
    lower = {f.lower(): f for f in fields}
    if column.lower() not in lower:
        raise ValueError(
            f"{path}: attribute {attr.name}: label column {column!r} (labels.footprint_column) is not a column of "
            f"the footprints; columns are {fields}"
        )
    id_col = lower.get(id_column.lower()) if id_column else next((lower[c] for c in ID_CANDIDATES if c in lower), None)
    if id_col is None:
        raise ValueError(
            f"{path}: attribute {attr.name}: no building id column ({', '.join(ID_CANDIDATES)}) in {fields}"
        )
    df = pyogrio.read_dataframe(path, columns=[id_col, lower[column.lower()]], read_geometry=False)
    ids = df[id_col].astype("string")
    keep = ids.notna()  # a footprint without an id has no building to label (buildings says so itself)
    return to_labels(ids[keep], df[lower[column.lower()]][keep], attr, f"{path} column {lower[column.lower()]}")


def to_labels(ids: pd.Series, raw: pd.Series, attr: Attribute, where: str, line_offset: int | None = None) -> Labels:
    """Map and check raw values against the attribute; ``where`` names the source in errors.

    ``line_offset``: for a file, the line of its first row, so an error names the line.
    """
    ids = ids.reset_index(drop=True)
    raw = raw.reset_index(drop=True)
    dup = ids[ids.duplicated()]
    if len(dup):
        raise ValueError(
            f"{where}: {dup.nunique()} building id(s) labelled more than once, e.g. {sorted(set(dup))[:5]}"
        )
    text = raw.astype("string").str.strip()
    empty = text.isna() | (text == "")
    labels = Labels(values=pd.Series(dtype=object), source=where, empty=int(empty.sum()))
    ids, text = ids[~empty], text[~empty]

    def at(mask: pd.Series) -> str:
        first = mask.to_numpy().nonzero()[0][0]
        pos = text.index[first]
        line = f"line {pos + line_offset}, " if line_offset is not None else ""
        return f"{line}building {ids.loc[pos]}"

    if attr.task == "regression":
        num = pd.to_numeric(text, errors="coerce")
        bad = num.isna()
        if bad.any():
            raise ValueError(
                f"{where}: attribute {attr.name}: {int(bad.sum())} value(s) are not numbers ({attr.unit}), "
                f"e.g. {text[bad].iloc[0]!r} at {at(bad)}"
            )
        labels.values = pd.Series(num.astype("float64").to_numpy(), index=ids.to_numpy())
        return labels
    mapping = attr.labels.values
    known = set(attr.classes)
    unmapped = ~text.isin(list(mapping)) & ~text.isin(list(known))
    if unmapped.any():
        if attr.labels.unmapped != "skip":
            vals = sorted(set(text[unmapped]))
            raise ValueError(
                f"{where}: attribute {attr.name}: {int(unmapped.sum())} label(s) outside the classes "
                f"{list(attr.classes)}{' and the declared values' if mapping else ''}: {vals[:8]}, first at {at(unmapped)}"
            )
        labels.skipped = {str(k): int(v) for k, v in text[unmapped].value_counts().items()}
        ids, text = ids[~unmapped], text[~unmapped]
    mapped = text.map(lambda v: mapping.get(v, v))
    unknown = mapped.isna()
    labels.unknown = int(unknown.sum())
    labels.values = pd.Series(mapped[~unknown].astype(str).to_numpy(), index=ids[~unknown].to_numpy(), dtype=object)
    return labels
