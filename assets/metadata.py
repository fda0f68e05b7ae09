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
