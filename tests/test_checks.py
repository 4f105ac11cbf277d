"""Canary checks: Prometheus canary-vs-stable metrics against a fake Prometheus, and combining checks."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest

from pipeline.checks import combined, load_check, metrics_check, metrics_rows
from pipeline.config import CanaryPolicy, load_config
from pipeline.errors import TerminalError
from pipeline.gates import GateResult, GateRow
from pipeline.rollout import ObservedRollout

ROOT = Path(__file__).resolve().parent.parent
STAGING = load_config(ROOT / "examples" / "cluster" / "promotion.yaml").environment("staging")  # SLO ttft_p95 300
SEEN = ObservedRollout(
    generation=2, observed_generation="2", phase="Paused", step_index=1, step_count=4,
    current_pod_hash="canary1", stable_rs="stable1", pause_reasons=("CanaryPauseStep",), controller_pause=True,
)  # fmt: skip


Series = dict[str, str]
SELECTOR = re.compile(r"^sum\(rate\(http_requests_total\{(?P<labels>[^}]*)\}\[\w+\]\)\)$")
TTFT = re.compile(
    r"^histogram_quantile\(0\.95, sum by \(le\) \(rate\(vllm:time_to_first_token_seconds_bucket"
    r'\{[^}]*rollouts_pod_template_hash="(?P<pod>\w+)"[^}]*\}\[\w+\]\)\)\)$'
)
MATCHER = re.compile(r'(\w+)(=~|=)"([^"]*)"')


def evaluate(query: str, ttft: dict[str, float], requests: list[tuple[Series, float]]) -> list[float]:
    """A tiny PromQL for the queries the checks send, with Prometheus' rules for absent series.

    A selector with no matching series gives an empty vector (vLLM creates a status series only after the first
    answer with that status); ``a or b`` gives ``b`` when ``a`` is empty; ``a / b`` is empty when either side is,
    and NaN for 0/0. Anything else is an error, so a query the fake does not understand cannot pass unnoticed.
    """
    query = query.strip()
    depth, cut = 0, None
    for i, ch in enumerate(query):  # the top-level binary operator: "/" binds tighter than "or"
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0 and query.startswith(" or ", i):
            cut = (i, 4, "or")
            break
        if depth == 0 and ch == "/" and cut is None:
            cut = (i, 1, "/")
    if cut is not None:
        i, width, op = cut
        left, right = evaluate(query[:i], ttft, requests), evaluate(query[i + width :], ttft, requests)
        if op == "or":
            return left or right
        if not left or not right:
            return []
        return [left[0] / right[0] if right[0] else math.nan]
    if query.startswith("(") and query.endswith(")"):
        return evaluate(query[1:-1], ttft, requests)
    if query == "vector(0)":
        return [0.0]
    if match := TTFT.match(query):
        return [ttft[match["pod"]]] if match["pod"] in ttft else []
    if match := SELECTOR.match(query):
        wanted = MATCHER.findall(match["labels"])
        values = [
            rate
            for labels, rate in requests
            if all(re.fullmatch(v, labels.get(k, "")) if op == "=~" else labels.get(k, "") == v for k, op, v in wanted)
        ]
        return [sum(values)] if values else []
    raise AssertionError(f"the fake Prometheus does not understand {query!r}")


@pytest.fixture
def prometheus() -> Iterator[dict[str, Any]]:
    """A fake Prometheus: instant queries evaluated by ``evaluate`` over the series the test puts in.

    ``ttft``: p95 seconds per pod hash (absent: no histogram samples); ``requests``: (labels, rate) per
    ``http_requests_total`` series that exists.
    """
    answers: dict[str, Any] = {"queries": [], "ttft": {}, "requests": []}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            return None

        def do_GET(self) -> None:
            query = parse_qs(urlparse(self.path).query)["query"][0]
            answers["queries"].append(query)
            values = evaluate(query, answers["ttft"], answers["requests"])
            result = [{"metric": {}, "value": [0, "NaN" if math.isnan(v) else str(v)]} for v in values]
            body = json.dumps({"status": "success", "data": {"resultType": "vector", "result": result}}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    answers["url"] = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield answers
    finally:
        server.shutdown()
        server.server_close()


def serve(prometheus: dict[str, Any], pod: str, ok: float, errors: float | None = None, ttft: float = 0.1) -> None:
    """``pod`` answered ``ok`` 2xx and ``errors`` 5xx requests per second on /v1 (None: never a 5xx, no series)."""
    prometheus["ttft"][pod] = ttft
    for status, rate in (("2xx", ok), ("5xx", errors)):
        if rate is not None:
            labels = {"namespace": "llm-staging", "rollouts_pod_template_hash": pod, "status": status}
            prometheus["requests"].append(({**labels, "handler": "/v1/chat/completions"}, rate))


def env_with(url: str) -> Any:
    return STAGING.model_copy(update={"canary": CanaryPolicy(prometheus_url=url, checks=["metrics"])})


def test_healthy_canary_passes(prometheus: dict[str, Any]) -> None:
    serve(prometheus, "canary1", ok=9.99, errors=0.01, ttft=0.210)
    serve(prometheus, "stable1", ok=10, ttft=0.200)
    result = metrics_check("staging", env_with(prometheus["url"]))(SEEN)
    assert result.passed, result.markdown()
    assert any('rollouts_pod_template_hash="stable1"' in q for q in prometheus["queries"])


def test_a_canary_with_zero_errors_passes_and_one_with_no_traffic_is_inconclusive(prometheus: dict[str, Any]) -> None:
    serve(prometheus, "canary1", ok=5, errors=None)  # never answered a 5xx: vLLM has no 5xx series at all
    serve(prometheus, "stable1", ok=5, errors=None)
    plain = evaluate(
        'sum(rate(http_requests_total{status="5xx",rollouts_pod_template_hash="canary1"}[2m])) '
        '/ sum(rate(http_requests_total{rollouts_pod_template_hash="canary1"}[2m]))',
        prometheus["ttft"],
        prometheus["requests"],
    )
    assert plain == []  # the plain ratio answers "no data" on this healthy canary
    healthy = metrics_check("staging", env_with(prometheus["url"]))(SEEN)
    assert healthy.passed, healthy.markdown()
    assert next(r for r in healthy.rows if r.name == "canary 5xx ratio").value == 0.0

    prometheus["ttft"].clear()
    canary = {"namespace": "llm-staging", "rollouts_pod_template_hash": "canary1", "status": "2xx"}
    prometheus["requests"][:] = [  # no /v1 requests: only the kubelet's probes, and an idle counter (0/0)
        ({**canary, "handler": "/health"}, 0.1),
        ({**canary, "handler": "/v1/completions"}, 0.0),
    ]
    idle = metrics_check("staging", env_with(prometheus["url"]))(SEEN)
    assert idle.verdict == "inconclusive", idle.markdown()
    assert {r.name for r in idle.rows} == {"canary ttft_p95", "canary ttft_p95 vs stable", "canary 5xx ratio"}
    assert {r.verdict for r in idle.rows} == {"inconclusive"}
    assert "no requests counted on the canary pods" in idle.summary()
    prometheus["requests"].clear()  # no series at all
    assert metrics_check("staging", env_with(prometheus["url"]))(SEEN).verdict == "inconclusive"


def test_stable_without_data_is_inconclusive_never_a_dropped_comparison(prometheus: dict[str, Any]) -> None:
    serve(prometheus, "canary1", ok=5, errors=None, ttft=0.2)  # fast, no errors, but stable has no samples
    result = metrics_check("staging", env_with(prometheus["url"]))(SEEN)
    assert result.verdict == "inconclusive"
    row = next(r for r in result.rows if r.name == "canary ttft_p95 vs stable")
    assert row.verdict == "inconclusive" and "no TTFT samples from the stable pods (hash stable1)" in row.why
    alone = metrics_check("staging", env_with(prometheus["url"]))(dataclasses.replace(SEEN, stable_rs="canary1"))
    assert alone.verdict == "inconclusive" and "no stable ReplicaSet besides the canary" in alone.summary()
    serve(prometheus, "stable1", ok=5, ttft=0.2)
    assert metrics_check("staging", env_with(prometheus["url"]))(SEEN).passed


def test_slow_canary_fails_against_stable_and_the_slo(prometheus: dict[str, Any]) -> None:
    serve(prometheus, "canary1", ok=10, errors=0.0, ttft=0.450)
    serve(prometheus, "stable1", ok=10, ttft=0.200)
    result = metrics_check("staging", env_with(prometheus["url"]))(SEEN)
    assert result.verdict == "fail"
    assert {r.name for r in result.failures} == {"canary ttft_p95 vs stable", "canary ttft_p95"}
    assert "450 ms vs stable 200 ms (x1.25 = 250)" in result.summary()


def test_erroring_canary_fails_and_an_unreachable_prometheus_is_inconclusive(prometheus: dict[str, Any]) -> None:
    serve(prometheus, "canary1", ok=8, errors=2)
    serve(prometheus, "stable1", ok=10)
    failing = metrics_check("staging", env_with(prometheus["url"]))(SEEN)
    assert [r.name for r in failing.failures] == ["canary 5xx ratio"] and "20.00% > 1.00%" in failing.summary()
    unreachable = metrics_check("staging", env_with("http://127.0.0.1:9"))(SEEN)  # nothing listens there
    assert unreachable.verdict == "inconclusive"


def test_metrics_rows_without_an_slo_compare_with_stable_only() -> None:
    env = STAGING.model_copy(update={"gates": STAGING.gates.model_copy(update={"load": None})})
    rows = metrics_rows(0.3, 0.2, 0.0, env)
    assert [(r.name, r.verdict) for r in rows] == [("canary ttft_p95 vs stable", "fail"), ("canary 5xx ratio", "pass")]


def test_metrics_check_needs_prometheus() -> None:
    with pytest.raises(TerminalError, match=r"no canary\.prometheus_url"):
        metrics_check("staging", STAGING.model_copy(update={"canary": CanaryPolicy()}))


def test_combined_check_fails_when_any_part_fails() -> None:
    good = GateResult(gate="a", rows=[GateRow(name="x", value=1, limit="-", verdict="pass", why="ok")])
    bad = GateResult(gate="b", rows=[GateRow(name="y", value=2, limit="-", verdict="fail", why="too slow")])
    both = combined([lambda _: good, lambda _: bad])(SEEN)
    assert both.gate == "a + b" and both.verdict == "fail" and [r.name for r in both.failures] == ["y"]


def test_load_check_runs_through_the_canary_endpoint() -> None:
    from pipeline.config import LoadGate, LoadProfile, Slo
    from tests.loadservers import MODEL, Behaviour, running

    profile = LoadProfile(concurrency=4, duration_s=1.5, warmup_s=0.2, prompt_tokens=8, max_tokens=8)
    gate = LoadGate(profile=profile, slo=Slo(latency_ms={"ttft_p95": 250}, min_requests=20))
    with running(Behaviour()) as fast, running(Behaviour(ttft_delay=0.4)) as slow:
        good_env = STAGING.model_copy(
            update={"endpoint": fast.url, "gates": STAGING.gates.model_copy(update={"load": gate})}
        )
        bad_env = good_env.model_copy(update={"endpoint": slow.url})
        assert load_check("staging", good_env, MODEL)(SEEN).passed
        failing = load_check("staging", bad_env, MODEL)(SEEN)
    assert failing.gate == "canary load" and "ttft_p95" in {r.name for r in failing.failures}
