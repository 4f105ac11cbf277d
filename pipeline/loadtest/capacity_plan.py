"""The capacity plan: what a goodput means for the environment (replicas at peak, GPUs, cost), its tables, its
plot, and the values change that sizes the environment in the promotion commit.

Arithmetic (all from one replica's median goodput and output tokens/s at that rate):

- replicas at peak = ceil(peak_rps / goodput_rps)
- GPUs = replicas x gpu_pool.gpus_per_replica
- cost per month = GPUs x gpu_hour_cost x 730 (hours in an average month: 8760 / 12)
- cost per million output tokens = gpus_per_replica x gpu_hour_cost / (output tokens/s x 3600) x 1e6, i.e. one
  replica kept busy at its goodput
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from rich.table import Table

from pipeline.config import CapacityPolicy, Slo
from pipeline.errors import TerminalError
from pipeline.loadtest.capacity import CapacityMeasurement, CapacityReport

HOURS_PER_MONTH = 730.0


class SidePlan(BaseModel):
    """What serving the peak with one model costs."""

    label: str
    goodput_rps: float | None
    output_tokens_per_s: float | None
    at_ceiling: bool = False
    replicas: int | None = None
    gpus: int | None = None
    cost_per_month: float | None = None
    cost_per_million_tokens: float | None = None
    fits: bool | None = None  # replicas <= max_replicas; None when either is unknown


class CapacityPlan(BaseModel):
    """Candidate vs incumbent at the environment's peak rate and GPU price."""

    peak_rps: float | None
    gpu_hour_cost: float | None
    gpus_per_replica: int
    max_replicas: int | None
    candidate: SidePlan
    incumbent: SidePlan | None = None

    @property
    def saving_per_month(self) -> float | None:
        """Incumbent's monthly cost minus the candidate's (positive: the candidate is cheaper)."""
        if self.incumbent is None or self.incumbent.cost_per_month is None or self.candidate.cost_per_month is None:
            return None
        return round(self.incumbent.cost_per_month - self.candidate.cost_per_month, 2)

    def rows(self) -> list[tuple[str, str, str]]:
        """(quantity, candidate, incumbent) as display text: what both renderers show."""
        sides = [self.candidate, self.incumbent]

        def cells(fmt: Any) -> tuple[str, str]:
            c, i = (fmt(s) if s is not None else "-" for s in sides)
            return c, i

        def num(value: float | None, pattern: str) -> str:
            return "-" if value is None else pattern.format(value)

        def goodput(s: SidePlan) -> str:
            return ("≥ " if s.at_ceiling else "") + num(s.goodput_rps, "{:.4g} req/s")

        peak = "" if self.peak_rps is None else f" at {self.peak_rps:g} req/s"
        cap = "" if self.max_replicas is None else f" (max {self.max_replicas})"
        return [
            ("goodput per replica", *cells(goodput)),
            ("output tokens/s per replica", *cells(lambda s: num(s.output_tokens_per_s, "{:.1f}"))),
            (f"replicas{peak}{cap}", *cells(lambda s: _replicas_text(s))),
            (f"GPUs ({self.gpus_per_replica} per replica)", *cells(lambda s: num(s.gpus, "{:d}"))),
            ("cost per month", *cells(lambda s: num(s.cost_per_month, "{:,.2f}"))),
            ("cost per million output tokens", *cells(lambda s: num(s.cost_per_million_tokens, "{:,.4f}"))),
        ]

    def notes(self) -> list[str]:
        """What qualifies the figures: missing inputs, ceilings, the saving."""
        notes = []
        if self.peak_rps is None:
            notes.append("no capacity.peak_rps: replicas, GPUs and monthly cost need the peak rate")
        if self.gpu_hour_cost is None:
            notes.append("no capacity.gpu_hour_cost: costs need the GPU price")
        if any(s is not None and s.at_ceiling for s in (self.candidate, self.incumbent)):
            notes.append("≥: the sweep's ceiling (sweep.max_rps) was sustained; replicas and costs are upper bounds")
        saving = self.saving_per_month
        if saving is not None:
            notes.append(f"the candidate {'saves' if saving >= 0 else 'costs'} {abs(saving):,.2f} per month")
        return notes

    def markdown(self) -> str:
        """A markdown table, candidate vs incumbent (for records and Prefect artifacts)."""
        lines = ["**capacity plan**", "", "| | candidate | incumbent |", "| --- | --- | --- |"]
        lines += [f"| {q} | {c} | {i} |" for q, c, i in self.rows()]
        notes = self.notes()
        if notes:
            lines += ["", *(f"- {n}" for n in notes)]
        return "\n".join(lines) + "\n"

    def table(self) -> Table:
        """The same table for the terminal (rich)."""
        table = Table("", "candidate", "incumbent", title="capacity plan", caption="\n".join(self.notes()) or None)
        for quantity, c, i in self.rows():
            table.add_row(quantity, c, i)
        return table


def _replicas_text(side: SidePlan) -> str:
    if side.replicas is None:
        return "-"
    return f"{side.replicas}" + ("" if side.fits is not False else " (over max)")


def plan_side(m: CapacityMeasurement, policy: CapacityPolicy, gpus_per_replica: int) -> SidePlan:
    """One side's figures from its median goodput and output tokens/s (see the module's arithmetic)."""
    goodput, tokens = m.median_goodput, m.median_tokens_per_s
    side = SidePlan(label=m.label, goodput_rps=goodput, output_tokens_per_s=tokens, at_ceiling=m.at_ceiling)
    price = policy.gpu_hour_cost
    if tokens and price is not None:
        side.cost_per_million_tokens = round(gpus_per_replica * price / (tokens * 3600) * 1e6, 4)
    if not goodput or policy.peak_rps is None:
        return side
    side.replicas = math.ceil(policy.peak_rps / goodput - 1e-9)
    side.gpus = side.replicas * gpus_per_replica
    if policy.max_replicas is not None:
        side.fits = side.replicas <= policy.max_replicas
    if price is not None:
        side.cost_per_month = round(side.gpus * price * HOURS_PER_MONTH, 2)
    return side


def capacity_plan(report: CapacityReport, policy: CapacityPolicy, gpus_per_replica: int) -> CapacityPlan:
    """The plan for both sides of ``report`` (``gpus_per_replica``: the environment's gpu_pool.gpus_per_replica)."""
    incumbent = plan_side(report.incumbent, policy, gpus_per_replica) if report.incumbent is not None else None
    return CapacityPlan(
        peak_rps=policy.peak_rps,
        gpu_hour_cost=policy.gpu_hour_cost,
        gpus_per_replica=gpus_per_replica,
        max_replicas=policy.max_replicas,
        candidate=plan_side(report.candidate, policy, gpus_per_replica),
        incumbent=incumbent,
    )


def replica_changes(plan: CapacityPlan, policy: CapacityPolicy, values_text: str) -> dict[str, Any]:
    """The values keys to add to the promotion commit: the candidate's replicas at peak (or KEDA's bounds where
    the values file turns autoscaling on); empty unless ``capacity.write_replicas``.

    Raises:
        TerminalError: write_replicas is on but the plan has no replica count for the candidate, or it exceeds
            max_replicas (the capacity gate refuses such a candidate first).
    """
    from pipeline.gitops.values import scale_changes  # here: pipeline.gitops imports the record, which holds a plan

    if not policy.write_replicas:
        return {}
    replicas = plan.candidate.replicas
    if replicas is None:
        raise TerminalError(
            "capacity.write_replicas is on but the candidate has no replica count at peak",
            hint="the candidate sustained no rate within the SLO, or capacity.peak_rps is unset; nothing is written",
        )
    if plan.candidate.fits is False:
        raise TerminalError(
            f"the candidate needs {replicas} replicas at peak, more than capacity.max_replicas {plan.max_replicas}",
            hint="raise capacity.max_replicas or lower capacity.peak_rps; nothing is written",
        )
    return scale_changes(values_text, replicas)


# --- the plot --------------------------------------------------------------------------------------------


def plot_capacity(report: CapacityReport, path: Path, slo: Slo | None = None) -> Path:
    """Write a PNG of latency against offered rate, candidate and incumbent, every sweep, with the SLO's limits.

    One panel per latency limit of the SLO (default: the report's SLO; end-to-end p95 when it sets none).
    Failing rates are drawn as crosses; the dotted verticals are each side's median goodput.

    Raises:
        TerminalError: matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise TerminalError("the capacity plot needs matplotlib", hint="pip install matplotlib") from None
    slo = slo or report.slo
    keys: list[tuple[str, float | None]] = list(slo.latency_ms.items()) or [("e2e_p95", None)]
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4), squeeze=False)
    sides = [(report.candidate, "tab:blue"), (report.incumbent, "tab:orange")]
    for ax, (key, limit) in zip(axes[0], keys, strict=True):
        metric, pct = key.rsplit("_", 1)
        for side, color in sides:
            if side is None:
                continue
            for n, s in enumerate(side.sweeps):
                points = sorted(
                    (t.rate, getattr(getattr(t, f"{metric}_ms"), pct), t.verdict == "pass") for t in s.trials
                )
                points = [p for p in points if p[1] is not None]
                label = side.label if n == 0 else None
                ax.plot([p[0] for p in points], [p[1] for p in points], color=color, alpha=0.5, label=label)
                for passed in (True, False):
                    xs = [p[0] for p in points if p[2] == passed]
                    ys = [p[1] for p in points if p[2] == passed]
                    ax.scatter(xs, ys, color=color, marker="o" if passed else "x", s=18, zorder=3)
            if side.median_goodput:
                ax.axvline(side.median_goodput, color=color, linestyle=":", linewidth=1)
        if limit is not None:
            ax.axhline(limit, color="red", linestyle="--", label=f"SLO {key} <= {limit:g} ms")
        ax.set_xscale("log")
        ax.set(title=f"{pct} {metric.upper()} against offered rate", xlabel="offered rate (req/s)", ylabel="ms")
        ax.grid(alpha=0.3, which="both")
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle("capacity sweep: o the SLO held, x it failed (any check); dotted: median goodput", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
