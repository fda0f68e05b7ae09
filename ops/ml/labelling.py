"""The labelling loop: which buildings to label next, the sheet a person fills, and the labels read back.

Attributes are learned from a few thousand buildings labelled in-house (issue 18). A label teaches
the model most where it is least certain, so the sheet leads with those; but a sheet of hard cases
alone says nothing about how the model does on ordinary buildings, and trains it on a skewed
sample, so a seeded random control sample of the other buildings comes with them. A model version's
staged predictions (``ops.ml.rows``) are read in record batches and only a bounded number of rows
is kept, whatever the partition's size.

The sheet is a plain CSV (one header line, nothing else, so any spreadsheet opens it) with the
chips as PNGs beside it; what the CSV cannot say (attribute, model version, allowed classes or unit)
is in a ``sheet.json`` sidecar. Files are written to ``<name>.tmp`` and moved into place, the CSV
last: a half-written sheet never looks complete. :func:`read_sheet` turns the filled sheet into
training labels, naming the file, line and building of any bad cell, and :func:`labels_digest`
is what a model card records so that a re-trained model's version shows which labels it saw.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from PIL import Image

from ops.ml.attributes import TASKS
from ops.shards import list_shards, open_chips, read_index

#: Why a building is on the sheet: the model is least sure of it, the random control sample, or a
#: random pick where the model gives no uncertainty (regression).
REASONS = ("least_certain", "control", "random")
SELECTION_COLUMNS = ("building_id", "reason", "predicted_label", "score", "value", "margin")
SHEET_COLUMNS = ("building_id", "reason", "predicted_label", "score", "value", "chip", "label", "comment")
#: Chips are small (a few dozen pixels): shown 4× larger, nearest neighbour, so a labeller sees the pixels.
PNG_SCALE = 4
#: Rows of the staged file read at a time: memory is this plus the rows kept, not the partition.
BATCH_ROWS = 65_536


def sheet_info_path(sheet: Path) -> Path:
    """The sidecar of ``sheet`` (``sheet.csv`` → ``sheet.json``): attribute, model version, classes or unit."""
    return sheet.with_suffix(".json")


def read_sheet_info(sheet: Path) -> dict:
    """The sheet's sidecar as a dict, empty when there is none (a sheet made by hand)."""
    path = sheet_info_path(sheet)
    return json.loads(path.read_text()) if path.exists() else {}


# -- which buildings ------------------------------------------------------------------------------


def _margins(probabilities: Sequence[str | None], ids: Sequence[str], staged: Path) -> np.ndarray:
    """Highest minus second-highest class probability per row (NaN where there are none)."""
    out = np.full(len(probabilities), np.nan)
    for i, text in enumerate(probabilities):
        if not text:
            continue
        try:
            p = sorted((float(v) for v in json.loads(text).values()), reverse=True)
        except (ValueError, TypeError, AttributeError) as exc:
            raise ValueError(f"{staged}: building {ids[i]}: probabilities {text!r} are not a JSON object") from exc
        out[i] = p[0] - p[1] if len(p) > 1 else 1.0
    return out


def _smallest(kept: pd.DataFrame, new: pd.DataFrame, by: list[str], k: int) -> pd.DataFrame:
    """The ``k`` first rows of ``kept`` and ``new`` together, ordered by ``by``: the bounded buffer."""
    both = new if kept.empty else kept if new.empty else pd.concat([kept, new], ignore_index=True)
    return both.sort_values(by, kind="stable").head(k)


def _take(table: dict[str, list], name: str, rows: list[int]) -> list:
    """Column ``name`` of a batch at ``rows``; all None when the file has no such column (``value`` before it existed)."""
    return [table[name][i] for i in rows] if name in table else [None] * len(rows)


def select_for_labelling(staged: Path, n: int, control: int, seed: int, task: str) -> pd.DataFrame:
    """The ``n`` ok buildings of ``staged`` the model is least certain of, plus ``control`` random others.

    Uncertainty: classification, the margin between the two highest class
    probabilities; segmentation, how close the score is to 0.5 (margin
    ``|2·score − 1|``, the same measure for a two-class model); ties by
    building id. Regression has none: the ``n`` picks are random too
    (reason ``random``). The control sample is uniform among the ok buildings
    not picked, and the same for the same file and ``seed``: each ok row gets a
    seeded random priority in file order and the lowest win (a reservoir of
    ``n + control`` rows holds every candidate). Columns
    :data:`SELECTION_COLUMNS`; ``attrs["ok_rows"]``: the ok buildings seen.
    """
    if task not in TASKS:
        raise ValueError(f"task {task!r}: expected one of {TASKS}")
    if n < 0 or control < 0:
        raise ValueError(f"n={n}, control={control}: expected counts ≥ 0")
    pf = pq.ParquetFile(staged)
    names = set(pf.schema_arrow.names)
    needed = {"building_id", "status"} | {"classification": {"probabilities"}, "segmentation": {"score"}}.get(
        task, set()
    )
    if needed - names:
        raise ValueError(f"{staged}: no column(s) {sorted(needed - names)} ({task}); columns: {sorted(names)}")
    columns = [c for c in ("building_id", "status", "label", "score", "probabilities", "value") if c in names]
    rng = np.random.default_rng(seed)
    ranked = task != "regression"
    least = pool = pd.DataFrame()
    ok_rows = 0
    for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=columns):
        table = batch.to_pydict()
        ok = [i for i, s in enumerate(table["status"]) if s == "ok"]
        if not ok:
            continue
        ok_rows += len(ok)
        ids = [str(b) for b in _take(table, "building_id", ok)]
        score = np.array(_take(table, "score", ok), dtype=float)  # None → NaN
        if task == "classification":
            margin = _margins(_take(table, "probabilities", ok), ids, staged)
        elif task == "segmentation":
            margin = np.abs(2 * score - 1)
        else:
            margin = np.full(len(ok), np.nan)
        rows = pd.DataFrame(
            {
                "building_id": pd.Series(ids, dtype=object),
                "predicted_label": pd.Series(_take(table, "label", ok), dtype=object),
                "score": score,
                "value": np.array(_take(table, "value", ok), dtype=float),
                "margin": margin,
                "key": np.where(np.isnan(margin), np.inf, margin),  # no measure: least certain last
                "priority": rng.random(len(ok)),
            }
        )
        if ranked and n:
            least = _smallest(least, rows, ["key", "building_id"], n)
        pool = _smallest(pool, rows, ["priority"], n + control)
    if pool.empty:
        text = ("building_id", "reason", "predicted_label")
        out = pd.DataFrame({c: pd.Series(dtype=object if c in text else float) for c in SELECTION_COLUMNS})
        out.attrs["ok_rows"] = ok_rows
        return out
    first = least if ranked else pool.head(n)
    rest = pool[~pool["building_id"].isin(set(first["building_id"]))].head(control)
    first = first.assign(reason="least_certain" if ranked else "random")
    rest = rest.sort_values("building_id", kind="stable").assign(reason="control")
    out = pd.concat([f for f in (first, rest) if not f.empty], ignore_index=True)[list(SELECTION_COLUMNS)]
    out.attrs["ok_rows"] = ok_rows
    return out


# -- the sheet ------------------------------------------------------------------------------------


def chips_by_building(chips_folder: Path, building_ids: Iterable[str]) -> dict[str, np.ndarray]:
    """The chip (uint8, bands first) of each building, found through the chips index of ``chips_folder``.

    Raises naming the buildings without one: the chips were cut again (or
    lost) since the predictions the sheet comes from.
    """
    wanted = set(building_ids)
    out: dict[str, np.ndarray] = {}
    for shard in list_shards(chips_folder):
        if len(out) == len(wanted):
            break
        index = read_index(chips_folder, shard)
        hits = [
            (b, r)
            for b, r in zip(index.column("building_id").to_pylist(), index.column("row").to_pylist(), strict=True)
            if b in wanted and r >= 0
        ]
        if hits:
            chips = open_chips(chips_folder, shard)
            out.update((b, np.array(chips[r])) for b, r in hits)
    missing = sorted(wanted - out.keys())
    if missing:
        raise ValueError(
            f"{chips_folder}: no chip for {len(missing)} building(s) of the sheet, e.g. {missing[:5]}: "
            "the chips changed since these predictions; re-run predictions for the partition"
        )
    return out


def png_name(building_id: str) -> str:
    """A file name for a building's PNG: the id itself when it is safe, else a safe form plus a short hash."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", building_id)
    if safe != building_id or safe.startswith("."):
        safe = f"{safe.lstrip('.')}-{hashlib.sha1(building_id.encode()).hexdigest()[:8]}"
    return f"{safe}.png"


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` to ``<path>.tmp``, then move it into place (never uploaded half-done: ``.tmp`` is transient)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def chip_image(chip: np.ndarray, scale: int = PNG_SCALE) -> Image.Image:
    """A chip (bands, S, S uint8) as an RGB (or grey) picture ``scale`` times larger, nearest neighbour."""
    pixels = np.ascontiguousarray(np.moveaxis(np.asarray(chip, dtype=np.uint8), 0, -1))
    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] < 3 else pixels[..., :3])
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)


def write_sheet(
    rows: pd.DataFrame,
    chips_folder: Path,
    sheet: Path,
    png_folder: Path,
    *,
    attribute: str,
    model_version: str,
    classes_or_unit: str | Sequence[str],
) -> int:
    """Write the labelling sheet of ``rows`` (from :func:`select_for_labelling`); returns its row count.

    Each building's chip becomes ``png_folder/<building_id>.png`` (the
    ``chip`` column: its path relative to the sheet); ``label`` and
    ``comment`` are left for the labeller. ``classes_or_unit``: the allowed
    classes (a sequence: classification) or the value's unit (a string:
    regression), kept in the sidecar for the labeller and :func:`read_sheet`.
    PNGs, sidecar, then the CSV, each moved into place once written; PNGs of
    an earlier sheet in ``png_folder`` are removed last.
    """
    ids = [str(b) for b in rows["building_id"]]
    dups = sorted({b for b in ids if ids.count(b) > 1}) if len(set(ids)) != len(ids) else []
    if dups:
        raise ValueError(f"sheet {sheet}: building id(s) listed more than once: {dups[:10]}")
    chips = chips_by_building(chips_folder, ids)
    png_folder.mkdir(parents=True, exist_ok=True)
    sheet.parent.mkdir(parents=True, exist_ok=True)
    names = {b: png_name(b) for b in ids}
    for b in ids:
        image = chip_image(chips[b])
        _atomic(png_folder / names[b], lambda tmp, image=image: image.save(tmp, format="PNG"))
    relative = Path(os.path.relpath(png_folder, sheet.parent))
    table = pd.DataFrame(
        {
            "building_id": ids,
            "reason": rows["reason"].to_numpy(),
            "predicted_label": rows["predicted_label"].to_numpy(),
            "score": rows["score"].astype(float).round(4).to_numpy(),
            "value": rows["value"].astype(float).to_numpy(),
            "chip": [(relative / names[b]).as_posix() for b in ids],
            "label": "",
            "comment": "",
        },
        columns=list(SHEET_COLUMNS),
    )
    regression = isinstance(classes_or_unit, str)
    info = {
        "attribute": attribute,
        "model_version": model_version,
        "task": "regression" if regression else "classification",
        "classes": None if regression else list(classes_or_unit),
        "unit": classes_or_unit if regression else None,
        "rows": len(table),
        "reasons": {r: int((table["reason"] == r).sum()) for r in REASONS if (table["reason"] == r).any()},
        "chips": relative.as_posix(),
        "columns": list(SHEET_COLUMNS),
    }
    _atomic(sheet_info_path(sheet), lambda tmp: tmp.write_text(json.dumps(info, indent=1, ensure_ascii=False)))
    _atomic(sheet, lambda tmp: table.to_csv(tmp, index=False, lineterminator="\n"))
    keep = set(names.values())
    for old in png_folder.glob("*.png"):
        if old.name not in keep:
            old.unlink(missing_ok=True)
    return len(table)


# -- reading it back ------------------------------------------------------------------------------


def _records(sheet: Path) -> Iterator[tuple[int, str, str]]:
    """(line number, building id, label) of each non-blank row, both cells stripped.

    Reads a comma-, semicolon- or tab-separated file (a French spreadsheet
    saves with ``;``), with or without a byte-order mark; the line is where
    the record starts (a comment may span lines).
    """
    with sheet.open(newline="", encoding="utf-8-sig") as f:
        first = f.readline()
        delimiter = max(",;\t", key=first.count)
        f.seek(0)
        reader = csv.reader(f, delimiter=delimiter)
        header = [h.strip() for h in next(reader, [])]
        missing = [c for c in ("building_id", "label") if c not in header]
        if missing:
            raise ValueError(f"{sheet}: no column(s) {missing}; columns found: {header}")
        at_id, at_label = header.index("building_id"), header.index("label")
        end = reader.line_num
        for record in reader:
            start, end = end + 1, reader.line_num
            if not any(cell.strip() for cell in record):
                continue
            bid = record[at_id].strip() if at_id < len(record) else ""
            label = record[at_label].strip() if at_label < len(record) else ""
            yield start, bid, label


def filled_labels(sheet: Path) -> int:
    """How many rows of ``sheet`` have a label: a sheet someone has started to fill is not to be overwritten."""
    return sum(1 for _, _, label in _records(sheet) if label)


def _number(text: str) -> float | None:
    """``text`` as a finite float (a decimal comma accepted: ``12,5``), None if it is not one."""
    for candidate in (text, text.replace(",", ".") if re.fullmatch(r"[+-]?\d+,\d+", text) else None):
        if candidate is None:
            continue
        try:
            x = float(candidate)
        except ValueError:
            continue
        return x if math.isfinite(x) else None
    return None


def _listing(items: list[str], limit: int = 20) -> str:
    more = f"; and {len(items) - limit} more" if len(items) > limit else ""
    return "; ".join(items[:limit]) + more


def read_sheet(sheet: Path, classes: Sequence[str] | None) -> pd.Series:
    """The filled sheet's labels: building id → label, for the rows whose ``label`` cell is filled.

    ``classes`` given: a classification sheet, every label one of them;
    ``None``: a regression sheet, every label a number (a float Series). An
    empty label is a building not labelled: skipped, counted in
    ``attrs["unlabelled"]``. A bad label, a label without a building id or a
    building listed twice raises ``ValueError`` naming the file, the lines,
    the ids and values, so the labeller can fix the sheet. The sidecar, when
    there is one, must agree on the kind of sheet (classes or a unit); its
    attribute and model version are in ``attrs`` and the Series' name.
    """
    info = read_sheet_info(sheet)
    if info.get("task") == "regression" and classes is not None:
        raise ValueError(
            f"{sheet}: a sheet of values (unit {info.get('unit')!r}, {sheet_info_path(sheet).name}), "
            f"read as classes {list(classes)}"
        )
    if info.get("task") == "classification" and classes is None:
        raise ValueError(
            f"{sheet}: a sheet of classes {info.get('classes')} ({sheet_info_path(sheet).name}), read as values: "
            "pass its classes"
        )
    allowed = set(classes) if classes is not None else set()
    seen: dict[str, list[int]] = {}
    ids: list[str] = []
    labels: list[str | float] = []
    bad: list[str] = []
    unlabelled = 0
    for line, bid, label in _records(sheet):
        if not bid:
            if label:
                bad.append(f"line {line}: label {label!r} without a building id")
            continue
        seen.setdefault(bid, []).append(line)
        if len(seen[bid]) > 1:
            continue
        if not label:
            unlabelled += 1
            continue
        if classes is not None:
            if label not in allowed:
                bad.append(f"line {line}: building {bid}: {label!r}")
                continue
            ids.append(bid)
            labels.append(label)
        else:
            x = _number(label)
            if x is None:
                bad.append(f"line {line}: building {bid}: {label!r}")
                continue
            ids.append(bid)
            labels.append(x)
    dups = [f"{b} (lines {', '.join(map(str, lines))})" for b, lines in seen.items() if len(lines) > 1]
    if dups:
        raise ValueError(f"{sheet}: {len(dups)} building id(s) listed more than once: {_listing(dups)}")
    if bad:
        expected = f"one of the classes {list(classes)}" if classes is not None else "a number"
        raise ValueError(f"{sheet}: {len(bad)} label(s) that are not {expected}: {_listing(bad)}")
    out = pd.Series(
        labels,
        index=pd.Index(ids, name="building_id", dtype=object),
        dtype=object if classes is not None else float,
        name=info.get("attribute", "label"),
    )
    out.attrs.update(
        sheet=str(sheet),
        attribute=info.get("attribute"),
        model_version=info.get("model_version"),
        unlabelled=unlabelled,
    )
    return out


def labels_digest(labels: pd.Series) -> str:
    """12 hex digits of SHA-256 over the sorted (building id, label) pairs: which labels a model saw.

    The training asset records it in the model card: the same labels, in any
    order or file, give the same digest, and one changed label another.
    """

    def canonical(v: object) -> object:
        return float(v) if isinstance(v, float | np.floating | int | np.integer) else str(v)

    pairs = sorted((str(b), canonical(v)) for b, v in labels.items())
    payload = json.dumps(pairs, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:12]
