"""Small helpers that turn results into Dagster UI metadata (tables, images)."""

import base64
import io

from dagster import MetadataValue


def counts_table(counts: dict[str, int], key: str = "status") -> MetadataValue:
    total = sum(counts.values()) or 1
    rows = "\n".join(f"| {k} | {v:,} | {100 * v / total:.1f} % |" for k, v in counts.items())
    return MetadataValue.md(f"| {key} | count | share |\n|---|---:|---:|\n{rows}")


def png_markdown(fig) -> MetadataValue:
    """A matplotlib figure inlined in Markdown, so the UI shows it without a file server."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return MetadataValue.md(f"![preview](data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()})")


def points_map(
    x,
    y,
    categories,
    title: str,
    max_points: int = 5_000,
    *,
    polygons=(),
    tiles=(),
) -> MetadataValue:
    """A map of buildings coloured by category (status, label), for the asset's metadata.

    Subsampled deterministically to ``max_points``. ``polygons`` (shapely, same
    CRS) are drawn filled on top, e.g. a segmenter's panels; ``tiles`` are
    (minx, miny, maxx, maxy) boxes drawn as outlines underneath: the imagery's extent.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Polygon as Patch
    from matplotlib.patches import Rectangle

    x, y, cat = np.asarray(x, float), np.asarray(y, float), np.asarray(categories, dtype=object)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y, cat = x[keep], y[keep], cat[keep]
    if len(x) > max_points:
        sel = np.random.default_rng(0).choice(len(x), max_points, replace=False)
        x, y, cat = x[sel], y[sel], cat[sel]
    fig, ax = plt.subplots(figsize=(5, 4))
    for minx, miny, maxx, maxy in tiles:
        ax.add_patch(Rectangle((minx, miny), maxx - minx, maxy - miny, fill=False, lw=0.4, ec="0.6"))
    for name in sorted(set(cat.tolist())):
        m = cat == name
        ax.scatter(x[m], y[m], s=2, label=f"{name} ({m.sum():,})")
    for g in polygons:
        ax.add_patch(Patch(np.asarray(g.exterior.coords), closed=True, fc="red", ec="darkred", lw=0.3))
    handles, _ = ax.get_legend_handles_labels()
    if len(polygons):
        handles.append(Patch([[0, 0]], fc="red", ec="darkred", label=f"polygons ({len(polygons):,} drawn)"))
    ax.autoscale_view()
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=6)
    ax.legend(handles=handles, fontsize=6, markerscale=4, loc="best")
    return png_markdown(fig)


def chip_grid(examples: dict[str, list[tuple]], title: str) -> MetadataValue:
    """Example chips per class: one row per label, each chip (3, S, S uint8) titled with its score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted(examples)
    cols = max((len(v) for v in examples.values()), default=1)
    fig, axes = plt.subplots(max(len(labels), 1), cols, figsize=(1.2 * cols, 1.35 * max(len(labels), 1)), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for r, label in enumerate(labels):
        for c, (chip, score) in enumerate(examples[label]):
            axes[r][c].imshow(chip.transpose(1, 2, 0))
            axes[r][c].set_title(f"{label} {score:.2f}", fontsize=6)
    fig.suptitle(title, fontsize=8)
    return png_markdown(fig)


def confusion_figure(cm, classes: list[str], title: str = "held-out confusion matrix"):
    """A confusion matrix as a matplotlib figure (rows: truth, columns: prediction)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(3.6, 3.2))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, f"{v:,}", ha="center", va="center", color="black", fontsize=8)
    ax.set_title(title, fontsize=9)
    return fig


def confusion_markdown(cm, classes: list[str]) -> MetadataValue:
    rows = "\n".join(f"| {c} | " + " | ".join(f"{v:,}" for v in row) + " |" for c, row in zip(classes, cm, strict=True))
    return MetadataValue.md(
        "| true \\ predicted | " + " | ".join(classes) + " |\n|---|" + "---:|" * len(classes) + "\n" + rows
    )


def _ece_of(table: dict) -> float:
    """The ECE a reliability table implies: Σ count × |accuracy − confidence| / Σ count (0.0 when empty)."""
    counts = table.get("count", [])
    total = sum(counts)
    gaps = (
        c * abs(a - f)
        for c, a, f in zip(counts, table.get("accuracy", []), table.get("confidence", []), strict=False)
        if c and a is not None and f is not None
    )
    return sum(gaps) / total if total else 0.0


def reliability_figure(
    before: dict,
    after: dict,
    title: str = "held-out reliability",
    *,
    ece_before: float | None = None,
    ece_after: float | None = None,
):
    """A reliability diagram: accuracy against mean confidence per bin, before and after temperature scaling.

    ``before`` and ``after`` are ``ops.ml.calibration.reliability`` tables
    (lists per bin: lower, upper, confidence, accuracy, count; empty bins null).
    Points on the diagonal are calibrated, below it over-confident. The ECEs in
    the legend are computed from the tables unless given. A strip underneath
    shows how many samples each bin holds, so a wild point of a near-empty bin
    reads as such.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, hist) = plt.subplots(
        2, 1, figsize=(3.8, 4.2), sharex=True, gridspec_kw={"height_ratios": [3, 1], "hspace": 0.08}
    )
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="0.5", label="calibrated")
    series = (
        ("before", before, ece_before, "tab:red", "o"),
        ("after (cross-fitted)", after, ece_after, "tab:blue", "s"),
    )
    for offset, (name, table, ece, color, marker) in zip((-0.5, 0.5), series, strict=True):
        table = table or {}
        ece = _ece_of(table) if ece is None else ece
        pts = [
            (f, a)
            for f, a in zip(table.get("confidence", []), table.get("accuracy", []), strict=False)
            if f is not None and a is not None
        ]
        ax.plot(
            [f for f, _ in pts],
            [a for _, a in pts],
            marker=marker,
            ms=3.5,
            lw=1,
            color=color,
            label=f"{name}: ECE {ece:.3f}",
        )
        lower, upper, counts = table.get("lower", []), table.get("upper", []), table.get("count", [])
        if counts:
            width = [(u - lo) / 2 for lo, u in zip(lower, upper, strict=False)]  # two bars side by side per bin
            centres = [lo + w * (1 + offset) for lo, w in zip(lower, width, strict=False)]
            hist.bar(centres, counts[: len(centres)], width=width, color=color, alpha=0.35, label=name)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy", fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, loc="upper left")
    ax.tick_params(labelsize=6)
    hist.set_xlabel("confidence (top score)", fontsize=7)
    hist.set_ylabel("samples", fontsize=7)
    hist.tick_params(labelsize=6)
    return fig


def predicted_vs_true_figure(y_true, y_pred, unit: str, title: str = "held-out predictions", max_points: int = 5_000):
    """A regression model's held-out predictions against the truth, with the y = x line and MAE, R² in the legend.

    The metrics are on every finite pair; the scatter is subsampled
    deterministically to ``max_points`` so the PNG stays small.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ops.ml.regression_metrics import regression_metrics

    t, p = np.asarray(y_true, float).ravel(), np.asarray(y_pred, float).ravel()
    keep = np.isfinite(t) & np.isfinite(p)
    t, p = t[keep], p[keep]
    m = regression_metrics(t, p, train_mean=float("nan"))
    shown = np.arange(len(t))
    if len(t) > max_points:
        shown = np.sort(np.random.default_rng(0).choice(len(t), max_points, replace=False))
    fig, ax = plt.subplots(figsize=(3.8, 3.6))
    if len(t):
        lo, hi = float(min(t.min(), p.min())), float(max(t.max(), p.max()))
    else:
        lo, hi = 0.0, 1.0
    pad = (hi - lo) * 0.05 or 1.0
    lo, hi = lo - pad, hi + pad
    ax.plot([lo, hi], [lo, hi], ls="--", lw=0.8, color="0.5", label="y = x")
    label = f"n = {len(t):,}" + (f" ({len(shown):,} shown)" if len(shown) < len(t) else "")
    ax.scatter(t[shown], p[shown], s=3, alpha=0.5, lw=0, label=f"{label}\nMAE {m['mae']:.3g} {unit}, R² {m['r2']:.3f}")
    if not len(t):
        ax.text(0.5, 0.5, "no held-out samples", ha="center", va="center", transform=ax.transAxes, fontsize=8)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal")
    ax.set_xlabel(f"true ({unit})", fontsize=7)
    ax.set_ylabel(f"predicted ({unit})", fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=6)
    ax.legend(fontsize=6, loc="upper left", markerscale=3)
    return fig
