"""The async streaming generator: open loop (constant or Poisson rate) or closed loop, over one pool."""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from pipeline.config import LoadProfile
from pipeline.errors import TerminalError
from pipeline.loadtest.prompts import PromptSet
from pipeline.loadtest.report import LoadReport, Progress, RequestRecord, Target, summarize
from pipeline.secrets import has_credentials, redact

Clock = Callable[[], float]


def _body(target: Target, api: str, prompt: str, max_tokens: int) -> bytes:
    """The request body. Only standard fields (`transformers serve` rejects unknown ones) plus the target's extras."""
    body: dict[str, Any] = {"model": target.model, "max_tokens": max_tokens, "stream": True, **dict(target.extra_body)}
    if api == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return json.dumps(body).encode()


async def _one(
    session: aiohttp.ClientSession, url: str, body: bytes, t0: float, clock: Clock = time.perf_counter
) -> RequestRecord:
    """Send one streaming request and time it. Failures become an error kind, never an exception."""
    start = clock()
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
                now = clock()
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
        rec.e2e_s = clock() - start
        rec.output_tokens = usage if usage is not None else tokens
    return rec


async def load(
    target: Target,
    profile: LoadProfile,
    prompts: PromptSet,
    *,
    timeout_s: float = 60.0,
    on_progress: Callable[[Progress], None] | None = None,
    clock: Clock = time.perf_counter,
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
    t_begin = clock()
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
                now = clock()
                on_progress(Progress(now - t0, measured_sent, len(records), failed, now < t0))
                await asyncio.sleep(0.25)

        report_task = asyncio.create_task(reporter())
        if profile.concurrency is not None:

            async def worker() -> None:
                nonlocal sent, measured_sent
                while more(now := clock()):
                    measured_sent += now >= t0
                    sent += 1
                    measured(await _one(session, url, bodies[sent % len(bodies)], t0, clock), now >= t0)

            await asyncio.gather(*(worker() for _ in range(profile.concurrency)))
        else:
            rate = float(profile.rate or 1.0)
            tasks: set[asyncio.Task[None]] = set()

            async def fire(body: bytes, counted: bool) -> None:
                measured(await _one(session, url, body, t0, clock), counted)

            due = t_begin
            index = 0
            while True:
                now = clock()
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
            on_progress(Progress(clock() - t0, measured_sent, len(records), failed, False))
    return summarize(target, profile, prompts.source, records, clock() - t0)


def run_load(
    target: Target,
    profile: LoadProfile,
    prompts: PromptSet,
    *,
    timeout_s: float = 60.0,
    on_progress: Callable[[Progress], None] | None = None,
    clock: Clock | None = None,
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
    chosen = clock or time.perf_counter  # tests replace the clock; no test asserts a rate measured here
    return asyncio.run(load(target, profile, prompts, timeout_s=timeout_s, on_progress=on_progress, clock=chosen))
