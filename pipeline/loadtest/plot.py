"""Latency CDFs (TTFT and end-to-end) as a PNG, with the SLO marked."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Slo
from pipeline.errors import TerminalError
from pipeline.loadtest.report import QUANTILES, LoadReport


def plot_cdf(report: LoadReport, path: Path, slo: Slo | None = None) -> Path:
    """Write a PNG of the TTFT and end-to-end latency CDFs, with the SLO's limits marked as vertical lines.

    Raises:
        TerminalError: matplotlib is not installed, or the report has no per-request rows.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise TerminalError("the latency plot needs matplotlib", hint="pip install matplotlib") from None
    ok = [r for r in report.requests if r.error is None]
    if not ok:
        raise TerminalError("no successful request to plot", hint="plot a report that measured some requests")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, title in ((axes[0], "ttft", "time to first token"), (axes[1], "e2e", "end-to-end latency")):
        values = sorted(1000 * (getattr(r, f"{metric}_s") or 0.0) for r in ok)
        ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], drawstyle="steps-post")
        for key, limit in (slo.latency_ms if slo else {}).items():
            if key.startswith(metric + "_"):
                ax.axvline(limit, color="red", linestyle="--", label=f"SLO {key} <= {limit:g} ms")
                ax.axhline(QUANTILES[key.rsplit("_", 1)[1]], color="grey", linestyle=":", linewidth=0.8)
        ax.set(title=title, xlabel="ms", ylabel="fraction of requests", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right")
    fig.suptitle(f"{report.model} @ {report.endpoint}: {report.successes} requests", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
