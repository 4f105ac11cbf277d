"""What a promotion shows in the Prefect UI: the markdown report, a table per gate, the latency plot, and the
capacity plan (candidate vs incumbent) with its plot of latency against offered rate."""

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
    for name, gate in (("eval", record.eval_gate), ("load", record.load_gate), ("capacity", record.capacity_gate)):
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
    if record.capacity_report is not None:
        publish_capacity(record, env, key)


def publish_capacity(record: PromotionRecord, env: Environment, key: str) -> None:
    """The capacity plan as a table and the sweep's plot (latency against offered rate, with the SLO line)."""
    from pipeline.loadtest.capacity_plan import plot_capacity

    assert record.capacity_report is not None
    if record.capacity_plan is not None:
        rows = [{"quantity": q, "candidate": c, "incumbent": i} for q, c, i in record.capacity_plan.rows()]
        create_table_artifact(rows, key=f"{key}-capacity-plan", description="capacity plan: candidate vs incumbent")
    where = Path(env.cache.root) / "reports" / f"{record.id}-capacity.png"
    png = plot_capacity(record.capacity_report, where)
    data = base64.b64encode(png.read_bytes()).decode()
    plan = record.capacity_plan.markdown() if record.capacity_plan is not None else ""
    create_markdown_artifact(
        f"{plan}\n![capacity](data:image/png;base64,{data})\n\nSaved at `{png}`.",
        key=f"{key}-capacity",
        description="latency against offered rate, candidate and incumbent, with the SLO; the capacity plan",
    )
