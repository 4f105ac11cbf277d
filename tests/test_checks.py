"""Canary checks: Prometheus canary-vs-stable metrics against a fake Prometheus, and combining checks."""

from __future__ import annotations

import json
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


@pytest.fixture
def prometheus() -> Iterator[dict[str, Any]]:
    """A fake Prometheus: answers instant queries from a table keyed by (metric, pod hash)."""
    answers: dict[str, Any] = {"queries": []}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            return None

        def do_GET(self) -> None:
            query = parse_qs(urlparse(self.path).query)["query"][0]
            answers["queries"].append(query)
            metric = "ttft" if "time_to_first_token" in query else "errors"
            pod = "canary1" if 'hash="canary1"' in query else "stable1"
            value = answers.get((metric, pod))
            result = [] if value is None else [{"metric": {}, "value": [0, str(value)]}]
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


def env_with(url: str) -> Any:
    return STAGING.model_copy(update={"canary": CanaryPolicy(prometheus_url=url, checks=["metrics"])})


def test_healthy_canary_passes(prometheus: dict[str, Any]) -> None:
    prometheus.update({("ttft", "canary1"): 0.210, ("ttft", "stable1"): 0.200, ("errors", "canary1"): 0.001})
    result = metrics_check("staging", env_with(prometheus["url"]))(SEEN)
    assert result.passed, result.markdown()
    assert any('rollouts_pod_template_hash="stable1"' in q for q in prometheus["queries"])


def test_slow_canary_fails_against_stable_and_the_slo(prometheus: dict[str, Any]) -> None:
    prometheus.update({("ttft", "canary1"): 0.450, ("ttft", "stable1"): 0.200, ("errors", "canary1"): 0.0})
    result = metrics_check("staging", env_with(prometheus["url"]))(SEEN)
    assert result.verdict == "fail"
    assert {r.name for r in result.failures} == {"canary ttft_p95 vs stable", "canary ttft_p95"}
    assert "450 ms vs stable 200 ms (x1.25 = 250)" in result.summary()


def test_erroring_canary_fails_and_no_data_is_inconclusive(prometheus: dict[str, Any]) -> None:
    prometheus.update({("ttft", "canary1"): 0.1, ("ttft", "stable1"): 0.1, ("errors", "canary1"): 0.2})
    failing = metrics_check("staging", env_with(prometheus["url"]))(SEEN)
    assert [r.name for r in failing.failures] == ["canary 5xx ratio"] and "20.00% > 1.00%" in failing.summary()
    for key in [("ttft", "canary1"), ("ttft", "stable1"), ("errors", "canary1")]:
        del prometheus[key]
    no_traffic = metrics_check("staging", env_with(prometheus["url"]))(SEEN)
    assert no_traffic.verdict == "inconclusive" and "no TTFT samples" in no_traffic.summary()
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
