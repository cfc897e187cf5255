"""report.png: each timed row's speedup over eager fp32 with its 95% interval, headless."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .report import Report


def speedup_png(report: Report) -> bytes | None:
    """The picture as PNG bytes; None when no row was timed against the reference."""
    rows = [r for r in report.results if r.speedup is not None and not (r.backend == "eager" and r.precision.value == "fp32")]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display: CI machines and servers have none
    import matplotlib.pyplot as plt

    labels = [f"{r.backend} {r.precision.value} {r.shape}" for r in rows]
    values = [r.speedup.value for r in rows if r.speedup]
    low = [r.speedup.value - r.speedup.ci_low for r in rows if r.speedup]
    high = [r.speedup.ci_high - r.speedup.value for r in rows if r.speedup]
    colors = ["#2a7" if r.status == "ok" else "#c44" for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.4))
    try:
        ax.barh(range(len(rows)), values, xerr=[low, high], color=colors, capsize=3)
        ax.set_yticks(range(len(rows)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xlabel("speedup over eager fp32, same run (bars: 95% interval; red: not a pass)")
        ax.set_title(f"{report.model.get('name')} on {report.environment.get('gpu') or report.environment.get('cpu')}", fontsize=9)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        return buf.getvalue()
    finally:
        plt.close(fig)
