"""The load test's data (Target, RequestRecord, Stats, LoadReport), its aggregation, and the SLO gate (pure)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from pipeline.config import LoadProfile, Slo
from pipeline.errors import ConfigError
from pipeline.gates import GateResult, GateRow
from pipeline.secrets import redact

QUANTILES = {"p50": 0.50, "p90": 0.90, "p95": 0.95, "p99": 0.99}


@dataclass(frozen=True)
class Target:
    """Where to send load: the server's base URL (with or without ``/v1``), and the model name it answers for."""

    endpoint: str
    model: str
    api_key_env: str | None = None  # the variable holding a bearer token, if the endpoint needs one
    extra_body: tuple[tuple[str, Any], ...] = ()  # engine-specific request fields, e.g. vLLM's ignore_eos

    def url(self, api: str) -> str:
        base = self.endpoint.rstrip("/").removesuffix("/v1")
        return f"{base}/v1/{'chat/completions' if api == 'chat' else 'completions'}"


class RequestRecord(BaseModel):
    """One request: when it started (s after the measurement began) and what the user would have felt."""

    start_s: float
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = Field(default_factory=list)
    output_tokens: int = 0
    error: str | None = None


class Stats(BaseModel):
    """Percentiles and mean of one latency, in milliseconds; None when nothing was measured."""

    count: int
    mean: float | None = None
    p50: float | None = None
    p90: float | None = None
    p95: float | None = None
    p99: float | None = None


class ServerView(BaseModel):
    """What vLLM itself measured over the load window (milliseconds), next to the client's figures."""

    source: str
    requests: int  # TTFT histogram count delta: requests the server answered in the window
    ttft_ms: Stats
    itl_ms: Stats
    queue_waiting_max: float | None = None
    queue_waiting_mean: float | None = None
    running_max: float | None = None
    note: str | None = None


class LoadReport(BaseModel):
    """The aggregate of a load test; ``requests`` keeps every measured request (for plots, not for the gate)."""

    engine: str = "modelctl"
    endpoint: str
    model: str
    api: str
    mode: Literal["rate", "concurrency"]
    target_rate: float | None = None
    concurrency: int | None = None
    duration_s: float
    prompt_source: str
    requests_total: int
    successes: int
    errors: dict[str, int]
    error_rate: float
    sent_rate: float
    achieved_rate: float | None = Field(description="successful completions per second (middle 90 %)")
    rate_ratio: float | None = Field(description="achieved_rate / target_rate (open loop only)")
    output_tokens_per_s: float
    ttft_ms: Stats
    itl_ms: Stats
    e2e_ms: Stats
    output_tokens: Stats
    server: ServerView | None = Field(None, description="the server's own view (vLLM /metrics), when scraped")
    served_by: str | None = Field(None, description="engine and release that served the load, e.g. vllm 0.32.0")
    requests: list[RequestRecord] = Field(default_factory=list, repr=False)

    def summary_json(self) -> dict[str, Any]:
        """The report without per-request rows (what a record or ``--json`` wants)."""
        return self.model_dump(mode="json", exclude={"requests"})


@dataclass(frozen=True)
class Progress:
    """A live snapshot for progress lines: seconds elapsed, requests sent, finished, failed, warm-up or not."""

    elapsed_s: float
    sent: int
    done: int
    failed: int
    warming_up: bool


# --- aggregation -----------------------------------------------------------------------------------------


def _quantile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default) of sorted ``values``."""
    pos = (len(values) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def stats(values: list[float], scale: float = 1000.0) -> Stats:
    """Percentiles and mean of ``values`` times ``scale`` (seconds -> milliseconds by default)."""
    if not values:
        return Stats(count=0)
    data = sorted(v * scale for v in values)
    quants = {name: round(_quantile(data, q), 3) for name, q in QUANTILES.items()}
    return Stats(count=len(data), mean=round(sum(data) / len(data), 3), **quants)


def summarize(
    target: Target, profile: LoadProfile, source: str, records: list[RequestRecord], elapsed_s: float
) -> LoadReport:
    """Aggregate measured requests into a LoadReport (pure: also used for reports read from other engines)."""
    ok = [r for r in records if r.error is None]
    errors: dict[str, int] = {}
    for r in records:
        if r.error is not None:
            errors[r.error] = errors.get(r.error, 0) + 1
    # Completion rate over the middle 90 % of completions: one stalled first or last request must not decide it.
    ends = sorted(r.start_s + (r.e2e_s or 0.0) for r in ok)
    lo, hi = math.floor(0.05 * (len(ends) - 1)), math.ceil(0.95 * (len(ends) - 1))
    achieved = (hi - lo) / (ends[hi] - ends[lo]) if len(ends) >= 2 and ends[hi] > ends[lo] else None
    starts = sorted(r.start_s for r in records)
    sent_rate = (len(starts) - 1) / (starts[-1] - starts[0]) if len(starts) >= 2 and starts[-1] > starts[0] else 0.0
    return LoadReport(
        endpoint=redact(target.endpoint),
        model=target.model,
        api=profile.api,
        mode="rate" if profile.rate is not None else "concurrency",
        target_rate=profile.rate,
        concurrency=profile.concurrency,
        duration_s=round(elapsed_s, 3),
        prompt_source=source,
        requests_total=len(records),
        successes=len(ok),
        errors=errors,
        error_rate=len(records) and (len(records) - len(ok)) / len(records),
        sent_rate=round(sent_rate, 3),
        achieved_rate=None if achieved is None else round(achieved, 3),
        rate_ratio=None if achieved is None or not profile.rate else round(achieved / profile.rate, 4),
        output_tokens_per_s=round(sum(r.output_tokens for r in ok) / max(elapsed_s, 1e-9), 3),
        ttft_ms=stats([r.ttft_s for r in ok if r.ttft_s is not None]),
        itl_ms=stats([gap for r in ok for gap in r.itl_s]),
        e2e_ms=stats([r.e2e_s for r in ok if r.e2e_s is not None]),
        output_tokens=stats([float(r.output_tokens) for r in ok], scale=1.0),
        requests=records,
    )


def load_slo(path: Path) -> Slo:
    """Read an SLO from a YAML file of Slo keys (``latency_ms``, ``max_error_rate``, ``min_rate_ratio``, ...).

    Raises:
        ConfigError: the file is unreadable, not YAML, or not a valid SLO (every problem is listed).
    """
    from pydantic import ValidationError
    from ruamel.yaml import YAML, YAMLError

    try:
        doc = YAML(typ="safe").load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, YAMLError) as exc:
        raise ConfigError(str(path), [f"{path}: cannot read an SLO from it: {type(exc).__name__}"]) from None
    try:
        return Slo.model_validate(doc or {})
    except ValidationError as exc:
        problems = [f"{path}: {'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg']}" for e in exc.errors()]
        raise ConfigError(str(path), problems, hint="keys: latency_ms (e.g. ttft_p95: 300), max_error_rate, "
                          "min_rate_ratio, min_requests") from None  # fmt: skip


# --- the gate --------------------------------------------------------------------------------------------


def needed_samples(key: str, slo: Slo) -> int:
    """Successful requests needed to estimate ``key``'s percentile: at least one sample beyond it, and the SLO's
    ``min_requests`` (p99 needs 100, p95 20, p50 2)."""
    q = QUANTILES[key.rsplit("_", 1)[1]]
    return max(slo.min_requests, math.ceil(1 / (1 - q) - 1e-9))


def gate(report: LoadReport, slo: Slo) -> GateResult:
    """Judge a LoadReport against an SLO: every latency limit, the error rate, and the achieved rate.

    A latency whose percentile cannot be estimated from the successful requests is inconclusive (never a pass).
    """
    rows: list[GateRow] = []
    n = report.successes
    for key, limit in slo.latency_ms.items():
        metric, pct = key.rsplit("_", 1)
        label = f"{pct} {metric.upper()}"
        value = getattr(getattr(report, f"{metric}_ms"), pct)
        need = needed_samples(key, slo)
        limit_text = f"<= {limit:g} ms"
        if n < need or value is None:
            why = f"only {n} successful requests; estimating {pct} needs at least {need}: run longer or faster"
            rows.append(GateRow(name=key, value=value, limit=limit_text, verdict="inconclusive", why=why))
        elif value <= limit:
            why = f"{label} {value:.1f} ms is within {limit:g} ms ({value / limit:.0%} of the limit)"
            rows.append(GateRow(name=key, value=value, limit=limit_text, verdict="pass", why=why))
        else:
            why = f"{label} {value:.1f} ms exceeds {limit:g} ms by {value - limit:.1f} ms"
            rows.append(GateRow(name=key, value=value, limit=limit_text, verdict="fail", why=why))

    failed = report.requests_total - report.successes
    kinds = ", ".join(f"{kind}: {count}" for kind, count in sorted(report.errors.items())) or "none"
    limit_text = f"<= {slo.max_error_rate:.1%}"
    if report.requests_total == 0:
        rows.append(GateRow(name="error_rate", value=None, limit=limit_text, verdict="inconclusive",
                            why="no request was measured: check the duration, warm-up and request count"))  # fmt: skip
    else:
        verdict = "pass" if report.error_rate <= slo.max_error_rate else "fail"
        why = f"{failed} of {report.requests_total} requests failed ({kinds})"
        rows.append(GateRow(name="error_rate", value=report.error_rate, limit=limit_text, verdict=verdict, why=why))

    limit_text = f">= {slo.min_rate_ratio:.0%} of target"
    if report.mode == "concurrency":
        why = f"closed loop ({report.concurrency} streams) has no target rate; achieved {report.achieved_rate} req/s"
        rows.append(GateRow(name="rate_ratio", value=None, limit=limit_text, verdict="pass", why=why))
    elif report.rate_ratio is None:
        why = "fewer than two successful requests: the achieved rate cannot be measured"
        rows.append(GateRow(name="rate_ratio", value=None, limit=limit_text, verdict="inconclusive", why=why))
    else:
        ratio = report.rate_ratio
        verdict = "pass" if ratio >= slo.min_rate_ratio else "fail"
        why = f"completed {report.achieved_rate:.1f} req/s of the {report.target_rate:g} req/s target ({ratio:.0%})"
        if verdict == "fail":
            why += ": the server (or the generator) cannot keep up with this rate"
        rows.append(GateRow(name="rate_ratio", value=ratio, limit=limit_text, verdict=verdict, why=why))
    return GateResult(gate="load", rows=rows)
