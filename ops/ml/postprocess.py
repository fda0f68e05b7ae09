"""Model outputs → the columns of a `predictions` row (label, score, probabilities, geometry).

Classification: the argmax class, its probability, every class's probability.
Regression: the value, in the unit of the attribute's declaration; no label or score.
Segmentation: the pixels of each non-background class are vectorised into
polygons clipped to the building (:mod:`ops.ml.vectorize`); the label is the class
of the largest polygon (the first class, "none", when there is none), the
score the mean probability of that class over the largest polygon, and the
probabilities per class the highest pixel probability over the building
(the first class: one minus the highest of the others).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import shapely

from ops.ml.card import ModelCard
from ops.ml.vectorize import polygons_from_probability


@dataclass
class Columns:
    labels: list[str | None]
    scores: np.ndarray
    probabilities: list[str | None]
    geometries: list[shapely.Geometry | None] | None = None  # native CRS; segmentation only
    values: np.ndarray | None = None  # regression only: the value in the declared unit (NaN without a chip)


def _json_template(classes: list[str]) -> str:
    return "{" + ", ".join(f"{json.dumps(c)}: %.5f" for c in classes) + "}"


def classification_columns(probs: np.ndarray, card: ModelCard) -> Columns:
    """``probs``: (N, C) softmax outputs."""
    top = probs.argmax(1)
    classes = np.array(card.classes, dtype=object)
    tpl = _json_template(card.classes)
    return Columns(
        labels=classes[top].tolist(),
        scores=probs[np.arange(len(top)), top].astype("float64"),
        probabilities=[tpl % tuple(row) for row in probs.tolist()],
    )


def regression_columns(out: np.ndarray, card: ModelCard) -> Columns:
    """``out``: (N, 1) values in the card's unit, clipped to its declared range if any (a slope is never -3°).

    No label, score or probabilities: a quantity has none.
    """
    n = len(out)
    values = out.reshape(n, -1)[:, 0].astype("float64")
    lo_hi = (card.postprocess or {}).get("range")
    if lo_hi:
        values = np.clip(values, lo_hi[0], lo_hi[1])
    return Columns(labels=[None] * n, scores=np.full(n, np.nan), probabilities=[None] * n, values=values)


def segmentation_columns(
    probs: np.ndarray, windows: np.ndarray, footprints: list[bytes | shapely.Geometry | None], card: ModelCard
) -> Columns:
    """``probs``: (N, C, S, S) softmax outputs; ``windows``: (N, 4) chip windows; ``footprints``: native CRS.

    Footprints may be WKB: only those of chips where something was found get parsed.
    """
    pp = card.postprocess or {}
    threshold = float(pp.get("threshold", 0.5))
    min_area = int(pp.get("min_area_px", 4))
    buffer_m = float(pp.get("clip_buffer_m", 0.5))
    n, c = probs.shape[:2]
    tpl = _json_template(card.classes)
    labels: list[str | None] = [card.classes[0]] * n
    scores = np.empty(n)
    out_probs: list[str | None] = [None] * n
    geoms: list[shapely.Geometry | None] = [None] * n
    peak = probs[:, 1:].reshape(n, c - 1, -1).max(axis=2)  # (N, C-1), over the whole chip
    hit = peak.max(axis=1) > threshold
    for i in range(n):
        if not hit[i]:  # nothing anywhere in the chip: no polygon, no tracing
            p = peak[i]
        else:
            fp = footprints[i]
            fp = shapely.from_wkb(fp) if isinstance(fp, bytes) else fp
            best = None
            p = np.zeros(c - 1)
            for k in range(1, c):
                found = polygons_from_probability(
                    probs[i, k], windows[i], threshold=threshold, min_area_px=min_area, clip=fp, clip_buffer_m=buffer_m
                )
                if found.geometry is not None:
                    p[k - 1] = max(found.score, threshold)
                    if best is None or found.largest_area_m2 > best[1].largest_area_m2:
                        best = (k, found)
            if best is not None:
                labels[i] = card.classes[best[0]]
                geoms[i] = best[1].geometry
                scores[i] = best[1].score
                out_probs[i] = tpl % (1.0 - float(p.max()), *p.tolist())
                continue
            p = np.minimum(peak[i], threshold)  # seen outside the building only
        scores[i] = 1.0 - float(p.max())
        out_probs[i] = tpl % (scores[i], *p.tolist())
    return Columns(labels, scores, out_probs, geoms)
