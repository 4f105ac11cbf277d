"""What a promotion shows in the Prefect UI: the markdown report, a table per gate, and the latency plot."""

from __future__ import annotations

import base64
from pathlib import Path

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from pipeline.config import Environment
from pipeline.record import PromotionRecord


def publish(record: PromotionRecord, env: Environment) -> None:
    """Create the promotion's artifacts: the report (markdown), each gate's rows (tables), the latency CDF (PNG)."""
    key = f"promotion-{record.id}"
    create_markdown_artifact(record.markdown(), key=key, description=f"{record.decision}: {record.env}")
    for name, gate in (("eval", record.eval_gate), ("load", record.load_gate)):
        if gate is not None:
            rows = [row.model_dump(mode="json") for row in gate.rows]
            create_table_artifact(rows, key=f"{key}-{name}-gate", description=f"{name} gate: {gate.verdict}")
    if record.load_report is not None and env.gates.load is not None:
        from pipeline.loadtest import plot_cdf

        where = Path(env.cache.root) / "reports" / f"{record.id}-latency.png"
        png = plot_cdf(record.load_report, where, env.gates.load.slo)
        data = base64.b64encode(png.read_bytes()).decode()
        create_markdown_artifact(
            f"![latency CDF](data:image/png;base64,{data})\n\nSaved at `{png}`.",
            key=f"{key}-latency",
            description="TTFT and end-to-end latency CDFs, with the SLO marked",
        )
