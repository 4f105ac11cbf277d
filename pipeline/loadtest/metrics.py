"""The server's own view of a load test: vLLM's ``/metrics`` scraped before and after the load window.

The client measures what a user feels; vLLM's histograms say what the engine did. Histograms are cumulative
since the server started, so the window's distribution is the difference of two snapshots (after - before),
and its count equals the requests the server finished in the window (warm-up included). Percentiles are
estimated from the buckets as Prometheus' ``histogram_quantile`` does (linear within a bucket). Queue depth
(``vllm:num_requests_waiting``, a gauge) is sampled during the window.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx

from pipeline.loadtest.report import QUANTILES, ServerView, Stats

TTFT = "vllm:time_to_first_token_seconds"
ITL = "vllm:inter_token_latency_seconds"
WAITING = "vllm:num_requests_waiting"
RUNNING = "vllm:num_requests_running"

# {metric name: {"le" bound or "" for plain samples: value summed over every other label}}
Snapshot = dict[str, dict[str, float]]


def parse(text: str) -> Snapshot:
    """Histogram buckets, counts, sums and gauges from Prometheus text, summed over labels other than ``le``."""
    from prometheus_client.parser import text_string_to_metric_families

    out: Snapshot = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.labels.get("le", "") if sample.name.endswith("_bucket") else ""
            series = out.setdefault(sample.name, {})
            series[key] = series.get(key, 0.0) + float(sample.value)
    return out


def scrape(base_url: str, timeout_s: float = 5.0) -> Snapshot:
    """One snapshot of the server's ``/metrics``.

    Raises:
        httpx.HTTPError: the server cannot be reached or answers an error.
    """
    response = httpx.get(f"{base_url.rstrip('/').removesuffix('/v1')}/metrics", timeout=timeout_s)
    response.raise_for_status()
    return parse(response.text)


def _bound(le: str) -> float:
    return math.inf if le in ("+Inf", "inf", "Inf") else float(le)


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """The q-quantile of cumulative ``(upper bound, count)`` buckets, as Prometheus estimates it."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return prev_bound  # in the open top bucket: its lower bound, as Prometheus does
            if count == prev_count:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = bound, count
    return prev_bound


def window_stats(before: Snapshot, after: Snapshot, name: str, scale: float = 1000.0) -> Stats:
    """Percentiles and mean of histogram ``name`` over the window between two snapshots (seconds -> ms)."""
    b_buckets, a_buckets = before.get(f"{name}_bucket", {}), after.get(f"{name}_bucket", {})
    delta = [(_bound(le), a_buckets[le] - b_buckets.get(le, 0.0)) for le in a_buckets]
    count = after.get(f"{name}_count", {}).get("", 0.0) - before.get(f"{name}_count", {}).get("", 0.0)
    total = after.get(f"{name}_sum", {}).get("", 0.0) - before.get(f"{name}_sum", {}).get("", 0.0)
    if count <= 0:
        return Stats(count=0)
    quants = {}
    for key, q in QUANTILES.items():
        value = histogram_quantile(q, delta)
        quants[key] = None if value is None else round(value * scale, 3)
    return Stats(count=round(count), mean=round(total / count * scale, 3), **quants)


def server_view(before: Snapshot, after: Snapshot | None, source: str, gauges: list[Snapshot]) -> ServerView:
    """The window's server view from two snapshots and the gauge samples taken in between (pure)."""
    if after is None:
        return ServerView(
            source=source, requests=0, ttft_ms=Stats(count=0), itl_ms=Stats(count=0),
            note="the server's /metrics could not be read after the load window (did the server stop?)",
        )  # fmt: skip
    ttft = window_stats(before, after, TTFT)
    waiting = [g[WAITING][""] for g in gauges if "" in g.get(WAITING, {})]
    running = [g[RUNNING][""] for g in gauges if "" in g.get(RUNNING, {})]
    return ServerView(
        source=source,
        requests=ttft.count,
        ttft_ms=ttft,
        itl_ms=window_stats(before, after, ITL),
        queue_waiting_max=max(waiting) if waiting else None,
        queue_waiting_mean=round(sum(waiting) / len(waiting), 3) if waiting else None,
        running_max=max(running) if running else None,
    )


@dataclass
class Observation:
    """Filled in when the ``observe`` block ends: the server's view of the window."""

    view: ServerView | None = None
    gauges: list[Snapshot] = field(default_factory=list)


@contextmanager
def observe(base_url: str, interval_s: float = 0.5) -> Iterator[Observation]:
    """Snapshot ``/metrics`` before the block, sample the queue gauges during it, and snapshot it after.

    Raises:
        httpx.HTTPError: the server's metrics cannot be read before the window (nothing was measured yet).
    """
    url = base_url.rstrip("/").removesuffix("/v1")
    before = scrape(url)
    obs = Observation()
    stop = threading.Event()

    def sample() -> None:
        # The first sample is taken at once: on a busy machine a short window may otherwise end before the
        # first interval does, leaving no queue reading at all.
        while True:
            try:
                obs.gauges.append(scrape(url, timeout_s=2.0))
            except httpx.HTTPError:
                return  # the server is gone; the load's own errors say so
            if stop.wait(interval_s):
                return

    sampler = threading.Thread(target=sample, name="metrics-sampler", daemon=True)
    sampler.start()
    try:
        yield obs
    finally:
        stop.set()
        sampler.join(timeout=5.0)
        try:
            after: Snapshot | None = scrape(url)
        except httpx.HTTPError:
            after = None
        obs.view = server_view(before, after, f"{url}/metrics", obs.gauges)
