"""report.png: one bar per timed row with its 95% interval, headless (forward reports: the speedup
over eager fp32; generation reports: decode tokens/s). It draws numbers; the reports pick them."""

from __future__ import annotations

import io
from collections.abc import Sequence


def bars_png(labels: Sequence[str], values: Sequence[float], intervals: Sequence[Sequence[float]], passed: Sequence[bool],
             xlabel: str, title: str, ref: float | None = None) -> bytes | None:
    """Horizontal bars with their intervals as error bars, green where the row passed; None for no rows."""
    if not labels:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display: CI machines and servers have none
    import matplotlib.pyplot as plt

    low = [max(0.0, v - ci[0]) for v, ci in zip(values, intervals)]
    high = [max(0.0, ci[1] - v) for v, ci in zip(values, intervals)]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(labels) + 1.4))
    try:
        ax.barh(range(len(labels)), values, xerr=[low, high], color=["#2a7" if ok else "#c44" for ok in passed], capsize=3)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.invert_yaxis()
        if ref is not None:
            ax.axvline(ref, color="black", linewidth=0.8)
        ax.set_xlabel(xlabel)
        ax.set_title(title, fontsize=9)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        return buf.getvalue()
    finally:
        plt.close(fig)
