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
