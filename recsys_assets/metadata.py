"""Helpers that turn polars frames into Dagster metadata the UI shows well."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

import dagster as dg
import polars as pl

from recsys_assets.data.rules import REASON_NUMBER_PATTERN, REASON_VALUE_PATTERN


def markdown_table(df: pl.DataFrame, limit: int = 10, float_digits: int = 4) -> dg.MarkdownMetadataValue:
    """The first ``limit`` rows of ``df`` as a Markdown table."""
    head = df.head(limit)
    if head.width == 0:
        return dg.MetadataValue.md("(no columns)")
    cells = [[_cell(v, float_digits) for v in row] for row in head.iter_rows()]
    lines = ["| " + " | ".join(head.columns) + " |", "|" + "---|" * head.width]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    if df.height > limit:
        lines.append(f"\n… {df.height - limit:,} more rows")
    if df.height == 0:
        lines.append("\n(no rows)")
    return dg.MetadataValue.md("\n".join(lines))


def _cell(value: Any, float_digits: int) -> str:
    if value is None:
        return "∅"
    if isinstance(value, float):
        return f"{value:.{float_digits}g}"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return str(value).replace("|", "\\|").replace("\n", " ")[:80]


def counts_table(counts: Mapping[str, int], key: str = "reason", value: str = "rows") -> dg.MarkdownMetadataValue:
    df = pl.DataFrame({key: list(counts), value: list(counts.values())}, schema={key: pl.String, value: pl.Int64})
    return markdown_table(df.sort(value, descending=True), limit=50)


def time_range(df: pl.DataFrame | pl.LazyFrame, column: str = "played_at") -> dict[str, dg.MetadataValue]:
    bounds = df.lazy().select(pl.col(column).min().alias("first"), pl.col(column).max().alias("last")).collect()
    first, last = bounds.row(0)
    return {
        "first_played_at": dg.MetadataValue.text(str(first) if first else "∅"),
        "last_played_at": dg.MetadataValue.text(str(last) if last else "∅"),
    }


def reason_category() -> pl.Expr:
    """A quarantine reason without its values: ``ms_played=-5: negative`` → ``ms_played: negative``."""
    return pl.col("reason").str.replace(REASON_VALUE_PATTERN, "${1}: ").str.replace_all(REASON_NUMBER_PATTERN, "N")


def plot_markdown(fig, alt: str = "plot") -> dg.MarkdownMetadataValue:
    """A matplotlib figure embedded in Markdown metadata (the UI renders it inline)."""
    import base64
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    encoded = base64.b64encode(buffer.getvalue()).decode()
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{encoded})")


def figure(width: float = 6.0, height: float = 3.2):
    """A new matplotlib figure and axes on the non-interactive backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))
