"""Capacity: the highest request rate one replica sustains within the SLO (goodput), and the gate on it.

A sweep drives one server open loop (constant rate) at a sequence of rates and judges each with the load gate's
SLO (:func:`pipeline.loadtest.report.gate`). Its stopping rules are deterministic:

1. Start at ``start_rps``. If the SLO fails there, the sweep is a **fail** (no tried rate is sustained).
2. Ramp geometrically: the next rate is ``rate * growth``, capped at ``max_rps``, until a rate fails. A pass at
   ``max_rps`` ends the sweep at the **ceiling**: the goodput is at least ``max_rps``.
3. Once a passing rate ``lo`` and a failing rate ``hi`` bracket the goodput, bisect (the midpoint, rounded to
   4 significant digits) until ``hi / lo - 1 <= resolution``. The goodput is ``lo``.
4. Time bound: before each rate the sweep asks its clock (replaceable, so tests never measure durations) how
   long it has run, and starts no rate that would end past ``budget_s`` (warm-up plus hold). Stopping before
   the goodput is bracketed is **inconclusive**; stopping after bracketing reports ``lo`` (the bracket it
   reached is kept). An SLO judgement that is itself inconclusive at some rate also makes the sweep inconclusive.

Each rate is held for ``duration_s``, or longer when the SLO's percentiles need more successful requests than
that gives (p99 needs 100). Every rate tried is kept in the result with its percentiles.

The capacity gate compares candidate and incumbent goodput measured in the same run on the same engine (at
least 3 repetitions each, interleaved): it refuses a drop of the median beyond ``max_regression`` of the
incumbent's, unless the drop is within ``stderr_k`` x the combined standard error of the repetitions (the way
the eval gate judges stderr). Failing the SLO at the lowest rate, or any inconclusive sweep, refuses too.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, Field

from pipeline.config import CapacityPolicy, CapacitySweep, LoadProfile, Slo
from pipeline.gates import GateResult, GateRow, Verdict
from pipeline.loadtest.generator import run_load
from pipeline.loadtest.prompts import PromptSet
from pipeline.loadtest.report import LoadReport, Stats, Target, gate, needed_samples

GATE_NAME = "capacity"
Clock = Callable[[], float]
Runner = Callable[[Target, LoadProfile, PromptSet], LoadReport]
Stop = Literal["bracketed", "ceiling", "fails_at_start", "budget", "inconclusive_rate"]


class Trial(BaseModel):
    """One rate tried: the SLO's verdict there and what was measured (latencies in ms)."""

    rate: float
    verdict: Verdict
    why: str
    achieved_rate: float | None
    error_rate: float
    successes: int
    output_tokens_per_s: float
    ttft_ms: Stats
    itl_ms: Stats
    e2e_ms: Stats


class Sweep(BaseModel):
    """One sweep of one server: its verdict, goodput (requests/s within the SLO), and every rate tried."""

    label: str
    verdict: Verdict
    goodput_rps: float | None = Field(description="the highest rate that passed; None unless the verdict is pass")
    output_tokens_per_s: float | None = Field(description="output tokens/s measured at the goodput rate")
    lo_rps: float | None = Field(description="the highest rate that passed")
    hi_rps: float | None = Field(description="the lowest rate that failed")
    at_ceiling: bool = False
    stopped: Stop
    why: str
    elapsed_s: float
    served_by: str | None = None
    trials: list[Trial]


class CapacityMeasurement(BaseModel):
    """The repeated sweeps of one server (candidate or incumbent)."""

    label: str
    sweeps: list[Sweep]

    def goodputs(self) -> list[float]:
        """Each conclusive sweep's goodput; a sweep that fails the SLO at its lowest rate counts as 0."""
        return [s.goodput_rps or 0.0 for s in self.sweeps if s.verdict != "inconclusive"]

    @property
    def median_goodput(self) -> float | None:
        values = self.goodputs()
        return statistics.median(values) if values else None

    @property
    def stderr(self) -> float | None:
        """Standard error of the repetitions' goodput (sample stdev / sqrt n); None under two repetitions."""
        values = self.goodputs()
        return statistics.stdev(values) / math.sqrt(len(values)) if len(values) >= 2 else None

    @property
    def median_tokens_per_s(self) -> float | None:
        values = [s.output_tokens_per_s for s in self.sweeps if s.output_tokens_per_s is not None]
        return statistics.median(values) if values else None

    @property
    def at_ceiling(self) -> bool:
        """True when most repetitions passed at ``max_rps``: the real goodput may be higher."""
        return sum(s.at_ceiling for s in self.sweeps) * 2 > len(self.sweeps)

    @property
    def engines(self) -> set[str]:
        return {s.served_by for s in self.sweeps if s.served_by}


class CapacityReport(BaseModel):
    """Candidate and incumbent measured in one run (the incumbent is None on a first promotion)."""

    measured_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    slo: Slo
    sweep: CapacitySweep
    candidate: CapacityMeasurement
    incumbent: CapacityMeasurement | None = None


def hold_seconds(rate: float, slo: Slo, settings: CapacitySweep) -> float:
    """How long a rate is held: ``duration_s``, or long enough for the SLO's percentiles to be estimable."""
    need = max([needed_samples(key, slo) for key in slo.latency_ms] + [slo.min_requests, 2])
    return max(settings.duration_s, math.ceil(need * 1.1) / rate)


def _midpoint(lo: float, hi: float) -> float:
    mid = (lo + hi) / 2
    return float(f"{mid:.4g}")


def _trial(rate: float, report: LoadReport, slo: Slo) -> Trial:
    result = gate(report, slo)
    why = "within the SLO" if result.passed else "; ".join(f"{r.name}: {r.why}" for r in result.failures)
    return Trial(
        rate=rate,
        verdict=result.verdict,
        why=why,
        achieved_rate=report.achieved_rate,
        error_rate=report.error_rate,
        successes=report.successes,
        output_tokens_per_s=report.output_tokens_per_s,
        ttft_ms=report.ttft_ms,
        itl_ms=report.itl_ms,
        e2e_ms=report.e2e_ms,
    )


def sweep(
    target: Target,
    profile: LoadProfile,
    slo: Slo,
    settings: CapacitySweep,
    prompts: PromptSet,
    *,
    label: str = "candidate",
    clock: Clock = time.monotonic,
    runner: Runner | None = None,
    timeout_s: float = 60.0,
) -> Sweep:
    """Find one server's goodput by the module's stopping rules (ramp, then bisection, within ``budget_s``).

    ``profile`` gives the request shape (api, max_tokens, prompt size); its rate and durations are the sweep's.
    ``runner`` replaces the load generator (default: :func:`run_load` with ``timeout_s``).

    Raises:
        TerminalError: the endpoint is not a usable URL (from the load generator).
    """

    def default_runner(t: Target, p: LoadProfile, ps: PromptSet) -> LoadReport:
        return run_load(t, p, ps, timeout_s=timeout_s)

    run = runner or default_runner
    shape = profile.model_dump(exclude={"rate", "concurrency", "duration_s", "warmup_s", "max_requests", "poisson"})
    began = clock()
    trials: list[Trial] = []
    lo: float | None = None
    hi: float | None = None
    lo_tokens: float | None = None
    served_by: str | None = None
    rate = settings.start_rps

    def done(verdict: Verdict, stopped: Stop, why: str, ceiling: bool = False) -> Sweep:
        goodput = lo if verdict == "pass" else None
        return Sweep(
            label=label, verdict=verdict, goodput_rps=goodput, output_tokens_per_s=lo_tokens if goodput else None,
            lo_rps=lo, hi_rps=hi, at_ceiling=ceiling, stopped=stopped, why=why,
            elapsed_s=round(clock() - began, 3), served_by=served_by, trials=trials,
        )  # fmt: skip

    while True:
        hold = hold_seconds(rate, slo, settings)
        elapsed = clock() - began
        if elapsed + settings.warmup_s + hold > settings.budget_s:
            left = f"{settings.budget_s - elapsed:.1f} s of its {settings.budget_s:g} s budget were left"
            if hi is None:
                seen = f"passed up to {lo:g} req/s" if lo is not None else "tried no rate"
                why = f"ran out of time before the goodput was bracketed: it {seen}, and {rate:g} req/s needs "
                why += f"{settings.warmup_s + hold:.1f} s but {left}; raise sweep.budget_s or sweep.start_rps"
                return done("inconclusive", "budget", why)
            assert lo is not None
            why = f"goodput {lo:g} req/s (bracket {lo:g}-{hi:g}, wider than the resolution: out of time, {left})"
            return done("pass", "budget", why)
        load_profile = LoadProfile(**shape, rate=rate, duration_s=hold, warmup_s=settings.warmup_s)
        report = run(target, load_profile, prompts)
        served_by = served_by or report.served_by
        trial = _trial(rate, report, slo)
        trials.append(trial)
        if trial.verdict == "inconclusive":
            why = f"the SLO could not be judged at {rate:g} req/s: {trial.why}"
            return done("inconclusive", "inconclusive_rate", why)
        if trial.verdict == "pass":
            lo, lo_tokens = rate, trial.output_tokens_per_s
        else:
            hi = rate
        if lo is None:
            why = f"fails the SLO even at the lowest rate tried, {rate:g} req/s: {trial.why}"
            return done("fail", "fails_at_start", why)
        if hi is None:
            if rate >= settings.max_rps:
                why = f"sustains the sweep's ceiling {lo:g} req/s (max_rps): the goodput is at least that"
                return done("pass", "ceiling", why, ceiling=True)
            rate = min(rate * settings.growth, settings.max_rps)
        else:
            rate = _midpoint(lo, hi)
            if hi / lo - 1 <= settings.resolution or not lo < rate < hi:  # (rounding leaves nothing between)
                return done("pass", "bracketed", f"goodput {lo:g} req/s: {hi:g} req/s fails the SLO")


def measure(
    candidate: Target,
    incumbent: Target | None,
    profile: LoadProfile,
    slo: Slo,
    settings: CapacitySweep,
    prompts: PromptSet,
    *,
    clock: Clock = time.monotonic,
    runner: Runner | None = None,
    timeout_s: float = 60.0,
    on_sweep: Callable[[Sweep], None] | None = None,
) -> CapacityReport:
    """Sweep candidate and incumbent ``settings.repetitions`` times each, interleaved (the order alternating per
    repetition, so drift on the shared engine falls on both alike): one run, one engine, one report."""
    sides = [("candidate", candidate)] + ([("incumbent", incumbent)] if incumbent is not None else [])
    found: dict[str, list[Sweep]] = {name: [] for name, _ in sides}
    for rep in range(settings.repetitions):
        for name, target in sides if rep % 2 == 0 else sides[::-1]:
            result = sweep(target, profile, slo, settings, prompts, label=name, clock=clock, runner=runner,
                           timeout_s=timeout_s)  # fmt: skip
            found[name].append(result)
            if on_sweep is not None:
                on_sweep(result)
    return CapacityReport(
        slo=slo,
        sweep=settings,
        candidate=CapacityMeasurement(label="candidate", sweeps=found["candidate"]),
        incumbent=CapacityMeasurement(label="incumbent", sweeps=found["incumbent"]) if incumbent else None,
    )


# --- the gate (pure) -------------------------------------------------------------------------------------


def _fmt(rps: float | None) -> str:
    return "-" if rps is None else f"{rps:.4g} req/s"


def _conclusive(side: CapacityMeasurement, need: int) -> str | None:
    """Why ``side``'s repetitions cannot be judged, or None."""
    if len(side.sweeps) < need:
        return f"the {side.label} was swept {len(side.sweeps)} time(s); the gate needs at least {need} repetitions"
    for i, s in enumerate(side.sweeps, 1):
        if s.verdict == "inconclusive":
            return f"the {side.label}'s sweep {i} is inconclusive: {s.why}"
    return None


def _candidate_row(side: CapacityMeasurement, need: int) -> GateRow:
    limit = f"SLO holds at the lowest rate; >= {need} conclusive sweeps"
    problem = _conclusive(side, need)
    if problem is not None:
        return GateRow(name="candidate goodput", value=None, limit=limit, verdict="inconclusive", why=problem)
    failing = [s for s in side.sweeps if s.verdict == "fail"]
    value = side.median_goodput
    if failing:
        why = f"the candidate {failing[0].why} ({len(failing)} of {len(side.sweeps)} sweeps)"
        return GateRow(name="candidate goodput", value=value, limit=limit, verdict="fail", why=why)
    each = ", ".join(f"{g:g}" for g in side.goodputs())
    tokens = side.median_tokens_per_s
    why = f"median goodput {_fmt(value)} (sweeps: {each})"
    why += f", {tokens:.1f} output tokens/s there" if tokens is not None else ""
    return GateRow(name="candidate goodput", value=value, limit=limit, verdict="pass", why=why, stderr=side.stderr)


def _regression_row(report: CapacityReport, policy: CapacityPolicy, need: int) -> GateRow:
    cand, inc = report.candidate, report.incumbent
    limit = f"<= {policy.max_regression:.0%} below the incumbent; drops within {policy.stderr_k:g}×σ ignored"
    name = "goodput vs incumbent"
    c = cand.median_goodput
    if inc is None:
        why = "no incumbent measured (a first promotion): nothing to compare the candidate's goodput with"
        return GateRow(name=name, value=c, limit=limit, verdict="pass", why=why)
    problem = _conclusive(cand, need) or _conclusive(inc, need)
    if problem is not None:
        return GateRow(name=name, value=c, limit=limit, verdict="inconclusive", why=problem)
    engines = cand.engines | inc.engines
    if len(engines) > 1:
        why = f"measured on different engines ({', '.join(sorted(engines))}): compare both on the same engine"
        return GateRow(name=name, value=c, limit=limit, verdict="inconclusive", why=why)
    b = inc.median_goodput
    assert c is not None and b is not None
    spread = math.hypot(cand.stderr or 0.0, inc.stderr or 0.0)
    row = {"name": name, "value": c, "limit": limit, "baseline": b, "stderr": spread}
    both = f"candidate {_fmt(c)} vs incumbent {_fmt(b)}"
    if b == 0:
        why = f"{both}: the incumbent fails the SLO even at the lowest rate, so any sustained rate is no regression"
        return GateRow(**row, verdict="pass", why=why)
    drop = b - c
    allowed = policy.max_regression * b
    ceiling = f"the incumbent reached the sweep's ceiling {_fmt(b)}, so its true goodput may be higher"
    if drop <= 0:
        if cand.at_ceiling and inc.at_ceiling:
            return GateRow(**row, verdict="pass", why=f"{both}: both reach the sweep's ceiling, no regression")
        return GateRow(**row, verdict="pass", why=f"{both}: {-drop / b:.0%} above the incumbent, no regression")
    if drop <= allowed or drop <= policy.stderr_k * spread:
        if inc.at_ceiling:
            why = f"{both}: {ceiling} and the drop beyond it unknown; raise sweep.max_rps to tell"
            return GateRow(**row, verdict="inconclusive", why=why)
        if drop <= allowed:
            why = f"{both}: {drop / b:.0%} below the incumbent, within the allowed {policy.max_regression:.0%}"
        else:
            why = f"{both}: {drop / b:.0%} below the incumbent, more than the allowed {policy.max_regression:.0%} "
            why += f"but within {policy.stderr_k:g}×σ = {policy.stderr_k * spread:.3g} req/s (combined stderr "
            why += f"{spread:.3g}): not a measurable regression; sweep more repetitions to tell"
        return GateRow(**row, verdict="pass", why=why)
    why = f"{both}: {drop / b:.0%} below the incumbent, more than the allowed {policy.max_regression:.0%} and beyond "
    why += f"{policy.stderr_k:g}×σ = {policy.stderr_k * spread:.3g} req/s: the candidate serves measurably less "
    why += "traffic per replica; do not promote it (or raise capacity.max_regression if the loss is acceptable)"
    return GateRow(**row, verdict="fail", why=why)


def _replicas_row(report: CapacityReport, policy: CapacityPolicy) -> GateRow | None:
    if policy.peak_rps is None or policy.max_replicas is None:
        return None
    limit = f"<= {policy.max_replicas} replicas at {policy.peak_rps:g} req/s"
    c = report.candidate.median_goodput
    if c is None:
        why = "the candidate's goodput is unknown (no conclusive sweep): no replica count can be planned"
        return GateRow(name="replicas at peak", value=None, limit=limit, verdict="inconclusive", why=why)
    if c == 0:
        why = "the candidate sustains no tried rate within the SLO: no replica count serves the peak"
        return GateRow(name="replicas at peak", value=None, limit=limit, verdict="fail", why=why)
    need = math.ceil(policy.peak_rps / c - 1e-9)
    verdict: Verdict = "pass" if need <= policy.max_replicas else "fail"
    why = f"{need} replicas of {_fmt(c)} serve the peak {policy.peak_rps:g} req/s"
    if verdict == "fail":
        why += f", more than the environment's max_replicas {policy.max_replicas}: raise it or lower capacity.peak_rps"
    return GateRow(name="replicas at peak", value=float(need), limit=limit, verdict=verdict, why=why)


def capacity_gate(report: CapacityReport, policy: CapacityPolicy) -> GateResult:
    """Judge a CapacityReport: the candidate holds the SLO, does not lose goodput against the incumbent beyond
    the policy, and (with ``peak_rps`` and ``max_replicas``) fits the environment at peak. Pure."""
    need = max(3, policy.sweep.repetitions)  # never fewer than 3, whatever measured the report
    rows = [_candidate_row(report.candidate, need), _regression_row(report, policy, need)]
    replicas = _replicas_row(report, policy)
    if replicas is not None:
        rows.append(replicas)
    return GateResult(gate=GATE_NAME, rows=rows)
