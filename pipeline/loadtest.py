"""Streaming load test against an OpenAI-compatible endpoint -> LoadReport; its SLO gate -> GateResult.

Users feel a model through time to first token (TTFT) and the pace of tokens after it (inter-token latency,
ITL). The generator streams ``/v1/chat/completions`` or ``/v1/completions`` over one reused aiohttp connection
pool (aiohttp, not httpx: in the same run it sustains several times httpx's request rate on 2 cores, see
benchmarks/loadgen.py), either at a constant or Poisson request rate (open loop) or with a fixed number of
concurrent streams (closed loop), after a warm-up, bounded by duration and by request count. A process
starts it in about half a second (guidellm: about 20 s), so a gate can run at every canary step.

Example:
    >>> report = run_load(Target("http://127.0.0.1:8000", "m"), LoadProfile(rate=5), synthetic_prompts(64))
    ...  # doctest: +SKIP
    >>> gate(report, Slo(latency_ms={"ttft_p95": 300})).passed  # doctest: +SKIP
    True
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aiohttp
from pydantic import BaseModel, Field

from pipeline.config import LoadProfile, Slo
from pipeline.errors import ConfigError, TerminalError
from pipeline.gates import GateResult, GateRow
from pipeline.secrets import has_credentials, redact

QUANTILES = {"p50": 0.50, "p90": 0.90, "p95": 0.95, "p99": 0.99}
_WORDS = ("the", "river", "stone", "carries", "light", "over", "quiet", "fields", "where", "old", "maps")


@dataclass(frozen=True)
class Target:
    """Where to send load: the server's base URL (with or without ``/v1``), and the model name it answers for."""

    endpoint: str
    model: str
    api_key_env: str | None = None  # the variable holding a bearer token, if the endpoint needs one

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


# --- prompts ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptSet:
    """Prompt texts to cycle through, and how they were made (for the report)."""

    texts: tuple[str, ...]
    source: str


def synthetic_prompts(tokens: int, tokenizer_dir: Path | None = None, count: int = 64) -> PromptSet:
    """``count`` distinct prompts of exactly ``tokens`` tokens under the model's tokenizer.

    Without a tokenizer, prompts of ``tokens`` words (roughly as many tokens) are made instead, and the report
    says so. Only ``tokenizer.json`` is read (through ``tokenizers``: fast, no model load).

    Raises:
        TerminalError: the tokenizer directory has no readable tokenizer.json.
    """
    rng = random.Random(tokens)
    if tokenizer_dir is None:
        words = [" ".join([f"r{i}", *rng.choices(_WORDS, k=tokens - 1)]) for i in range(count)]
        return PromptSet(tuple(words), f"synthetic, {tokens} words (approximate tokens: no tokenizer given)")
    from tokenizers import Tokenizer

    file = Path(tokenizer_dir) / "tokenizer.json"
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as exc:
        raise TerminalError(
            f"cannot read the tokenizer at {file}: {redact(str(exc))[:200]}",
            hint="pass the model directory (the one holding tokenizer.json) as the tokenizer",
        ) from None
    texts = []
    for i in range(count):
        text = " ".join([f"r{i}", *rng.choices(_WORDS, k=tokens * 2)])
        ids = tok.encode(text, add_special_tokens=False).ids[:tokens]
        texts.append(tok.decode(ids))
    return PromptSet(tuple(texts), f"synthetic, {tokens} tokens ({file.parent.name} tokenizer)")


def file_prompts(path: Path) -> PromptSet:
    """Prompts from a JSONL file: one object per line with a ``prompt`` string (blank lines are skipped).

    Raises:
        TerminalError: the file is unreadable, empty, or a line is not such an object (the line is named).
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise TerminalError(f"cannot read the prompt file {path}: {exc}", hint="pass a readable JSONL file") from None
    texts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TerminalError(f"{path}:{number}: not JSON ({exc.msg})", hint='write {"prompt": "..."}') from None
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not item["prompt"]:
            raise TerminalError(f"{path}:{number}: expected an object with a non-empty 'prompt' string")
        texts.append(item["prompt"])
    if not texts:
        raise TerminalError(f"{path}: no prompts in the file", hint='write one {"prompt": "..."} per line')
    return PromptSet(tuple(texts), f"file {Path(path).name} ({len(texts)} prompts)")


# --- the generator ---------------------------------------------------------------------------------------


def _body(target: Target, api: str, prompt: str, max_tokens: int) -> bytes:
    """The request body. Only standard fields: `transformers serve` rejects unknown ones."""
    body: dict[str, Any] = {"model": target.model, "max_tokens": max_tokens, "stream": True}
    if api == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return json.dumps(body).encode()


async def _one(session: aiohttp.ClientSession, url: str, body: bytes, t0: float) -> RequestRecord:
    """Send one streaming request and time it. Failures become an error kind, never an exception."""
    start = time.perf_counter()
    rec = RequestRecord(start_s=start - t0)
    last: float | None = None
    tokens = 0
    usage: int | None = None
    finished = False
    try:
        async with session.post(url, data=body) as resp:
            if resp.status != 200:
                await resp.read()
                rec.error = f"http_{resp.status}"
                return rec
            pending = b""
            async for piece in resp.content.iter_any():  # whole reads, timed on arrival: fewer wake-ups
                now = time.perf_counter()
                *lines, pending = (pending + piece).split(b"\n")
                for raw in lines:
                    if not raw.startswith(b"data:"):
                        continue
                    data = raw[5:].strip()
                    if data == b"[DONE]":
                        finished = True  # keep reading to the end: a fully read response keeps its connection
                        continue
                    chunk = json.loads(data)
                    for choice in chunk.get("choices") or ():
                        delta = choice.get("delta")
                        text = choice.get("text") if delta is None else delta.get("content")
                        if text:
                            tokens += 1
                            if last is None:
                                rec.ttft_s = now - start
                            else:
                                rec.itl_s.append(now - last)
                            last = now
                        if choice.get("finish_reason"):
                            finished = True
                    if chunk.get("usage"):
                        usage = chunk["usage"].get("completion_tokens")
    except TimeoutError:
        rec.error = "timeout"
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError):
        rec.error = "stream_cut"
    except aiohttp.ClientError:
        rec.error = "connection"
    except (json.JSONDecodeError, AttributeError):
        rec.error = "bad_response"
    if rec.error is None and not finished:
        rec.error = "stream_cut"
    if rec.error is None:
        rec.e2e_s = time.perf_counter() - start
        rec.output_tokens = usage if usage is not None else tokens
    return rec


async def load(
    target: Target,
    profile: LoadProfile,
    prompts: PromptSet,
    *,
    timeout_s: float = 60.0,
    on_progress: Callable[[Progress], None] | None = None,
) -> LoadReport:
    """Apply ``profile``'s load to ``target`` and measure every request (see :func:`run_load`)."""
    url = target.url(profile.api)
    bodies = [_body(target, profile.api, p, profile.max_tokens) for p in prompts.texts]
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if target.api_key_env and os.environ.get(target.api_key_env):
        headers["Authorization"] = f"Bearer {os.environ[target.api_key_env]}"
    connector = aiohttp.TCPConnector(limit=profile.concurrency or 0, force_close=False, ttl_dns_cache=300)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    records: list[RequestRecord] = []
    failed = 0
    sent = 0
    measured_sent = 0
    t_begin = time.perf_counter()
    t0 = t_begin + profile.warmup_s  # the measurement starts after the warm-up
    t_end = t_begin + (profile.warmup_s + profile.duration_s)
    cap = profile.max_requests
    rng = random.Random(0)

    def measured(rec: RequestRecord, counted: bool) -> None:
        nonlocal failed
        if counted:
            records.append(rec)
            failed += rec.error is not None

    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, headers=headers, auto_decompress=False, skip_auto_headers=["User-Agent"]
    ) as session:

        def more(when: float) -> bool:
            """Whether a request may start at ``when``: inside the window and under the request count."""
            return when < t_end and (cap is None or measured_sent < cap)

        async def reporter() -> None:
            while on_progress is not None:
                now = time.perf_counter()
                on_progress(Progress(now - t0, measured_sent, len(records), failed, now < t0))
                await asyncio.sleep(0.25)

        report_task = asyncio.create_task(reporter())
        if profile.concurrency is not None:

            async def worker() -> None:
                nonlocal sent, measured_sent
                while more(now := time.perf_counter()):
                    measured_sent += now >= t0
                    sent += 1
                    measured(await _one(session, url, bodies[sent % len(bodies)], t0), now >= t0)

            await asyncio.gather(*(worker() for _ in range(profile.concurrency)))
        else:
            rate = float(profile.rate or 1.0)
            tasks: set[asyncio.Task[None]] = set()

            async def fire(body: bytes, counted: bool) -> None:
                measured(await _one(session, url, body, t0), counted)

            due = t_begin
            index = 0
            while True:
                now = time.perf_counter()
                if due > now:
                    await asyncio.sleep(due - now)
                if not more(due):
                    break
                measured_sent += due >= t0
                sent += 1
                task = asyncio.create_task(fire(bodies[sent % len(bodies)], due >= t0))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                index += 1  # constant rate: computed from the index, so no rounding error accumulates
                due = due + rng.expovariate(rate) if profile.poisson else t_begin + index / rate
            if tasks:
                await asyncio.gather(*tasks)
        report_task.cancel()
        if on_progress is not None:
            on_progress(Progress(time.perf_counter() - t0, measured_sent, len(records), failed, False))
    return summarize(target, profile, prompts.source, records, time.perf_counter() - t0)


def run_load(
    target: Target,
    profile: LoadProfile,
    prompts: PromptSet,
    *,
    timeout_s: float = 60.0,
    on_progress: Callable[[Progress], None] | None = None,
) -> LoadReport:
    """Run a load test to its end (duration or request count, then in-flight requests finish or time out).

    Requests started during the warm-up are sent but not measured. Failures of single requests are counted by
    kind in the report (HTTP status, timeout, connection error, stream cut short), never raised.

    Raises:
        TerminalError: the endpoint is not an http(s) URL.
    """
    if not target.endpoint.startswith(("http://", "https://")):
        raise TerminalError(
            f"load-test endpoint {redact(target.endpoint)!r} is not an http:// or https:// URL",
            hint="pass the server's base URL, for example http://127.0.0.1:8000",
        )
    if has_credentials(target.endpoint):
        raise TerminalError(
            f"load-test endpoint {redact(target.endpoint)!r} carries credentials",
            hint="put the token in an environment variable and name it as the API key variable",
        )
    return asyncio.run(load(target, profile, prompts, timeout_s=timeout_s, on_progress=on_progress))


# --- engine: guidellm ------------------------------------------------------------------------------------


def from_guidellm(data: dict[str, Any], target: Target, profile: LoadProfile) -> LoadReport:
    """Read a guidellm JSON report (its first benchmark's per-request stats) into the same LoadReport.

    Raises:
        TerminalError: the data is not a guidellm report with per-request stats.
    """
    try:
        groups = data["benchmarks"][0]["requests"]
        rows: list[tuple[dict[str, Any], str | None]] = [(r, None) for r in groups.get("successful") or []]
        rows += [(r, "guidellm_error") for r in groups.get("errored") or []]  # "incomplete": cut off by the clock
        first = min(float(r["request_start_time"]) for r, _ in rows) if rows else 0.0
        records = []
        for r, error in rows:
            tokens = int(r.get("output_tokens") or 0)
            itl = (r.get("inter_token_latency_ms") or 0.0) / 1000
            ttft = r.get("time_to_first_token_ms")
            records.append(RequestRecord(
                start_s=float(r["request_start_time"]) - first, error=error, output_tokens=tokens if not error else 0,
                ttft_s=None if error or ttft is None else ttft / 1000, e2e_s=None if error else r["request_latency"],
                itl_s=[] if error else [itl] * max(tokens - 1, 0),
            ))  # fmt: skip
        duration = float(data["benchmarks"][0].get("duration") or profile.duration_s)
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise TerminalError(f"not a guidellm report with per-request stats ({type(exc).__name__}: {exc})") from None
    report = summarize(target, profile, "guidellm synthetic_text", records, duration)
    return report.model_copy(update={"engine": "guidellm"})


def run_guidellm(target: Target, profile: LoadProfile, tokenizer_dir: Path, executable: str = "guidellm") -> LoadReport:
    """The same load test through guidellm (when installed; it starts in ~20 s), read into a LoadReport.

    Raises:
        TerminalError: guidellm is not installed, or it failed (its output tail is in the message).
    """
    import shutil
    import subprocess
    import tempfile

    binary = shutil.which(executable)
    if binary is None:
        raise TerminalError(f"engine 'guidellm' needs {executable!r} on PATH", hint="pip install guidellm, or use "
                            "the built-in engine")  # fmt: skip
    mode = f"kind=constant,rate={profile.rate}" if profile.rate else f"kind=concurrent,streams={profile.concurrency}"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        cmd = [binary, "run", "--backend", f"kind=openai_http,target={target.endpoint},model={target.model}",
               "--profile", mode, "--constraint", f"kind=max_duration,seconds={profile.duration_s}",
               "--tokenizer", f"kind=huggingface_auto,model={tokenizer_dir}", "--disable-console-interactive",
               "--data", f"kind=synthetic_text,prompt_tokens={profile.prompt_tokens},"
               f"output_tokens={profile.max_tokens}",
               "--output", f"kind=json,path={out}"]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not out.exists():
            tail = redact((done.stderr or done.stdout)[-800:])
            raise TerminalError(
                f"guidellm exited with code {done.returncode}: {tail}", hint="run it by hand to see why"
            )
        return from_guidellm(json.loads(out.read_text()), target, profile)


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


# --- the plot --------------------------------------------------------------------------------------------


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
