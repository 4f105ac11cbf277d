"""The sandbox's real Prometheus scrapes the pods a PodMonitor (rendered from the chart) selects, with its labels.

Pods are tiny stdlib HTTP servers exposing vLLM-named metrics; every scrape counts as one more request so that
rates are not zero. The pipeline's own canary queries (pipeline/checks.py) run against it unchanged.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from pipeline import processes
from pipeline.checks import error_ratio_query, ttft_p95_query
from pipeline.errors import TerminalError
from sandbox.pods import HASH_LABEL, HOST_PORTS
from sandbox.prometheus import POD, POD_MONITOR, Prometheus, find_binary, label_name, seconds
from sandbox.store import Store

ROOT = Path(__file__).resolve().parent.parent
NS = "llm-demo"
APP = {"app.kubernetes.io/name": "llm-inference", "app.kubernetes.io/instance": "llm-inference"}
BUCKETS = ("0.01", "0.05", "0.1", "0.25", "0.5", "1.0", "+Inf")
T = TypeVar("T")

try:
    find_binary()
    HAVE_PROMETHEUS = True
except TerminalError:
    HAVE_PROMETHEUS = False
needs_prometheus = pytest.mark.skipif(not HAVE_PROMETHEUS, reason="needs the prometheus binary (make prometheus)")


class _Metrics(BaseHTTPRequestHandler):
    """vLLM's metric names; each scrape adds one request whose time to first token is the server's ``ttft``."""

    def do_GET(self) -> None:
        server: Any = self.server
        if self.path != "/metrics":
            self.send_error(404)
            return
        with server.lock:
            server.requests += 1
            n, ttft = server.requests, server.ttft
        lines = ["# TYPE vllm:time_to_first_token_seconds histogram"]
        for le in BUCKETS:
            count = n if le == "+Inf" or ttft <= float(le) else 0
            lines.append(f'vllm:time_to_first_token_seconds_bucket{{le="{le}",model_name="llm"}} {count}')
        lines += [
            f'vllm:time_to_first_token_seconds_count{{model_name="llm"}} {n}',
            f'vllm:time_to_first_token_seconds_sum{{model_name="llm"}} {n * ttft}',
            "# TYPE http_requests_total counter",
            f'http_requests_total{{handler="/v1/completions",method="POST",status="2xx"}} {n}',
        ]
        body = ("\n".join(lines) + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def metric_servers() -> Iterator[dict[str, int]]:
    """A fast (stable) and a slow (canary) pod's metrics servers: name -> host port."""
    servers = {}
    for name, ttft in (("stable", 0.03), ("canary", 0.3)):
        server: Any = ThreadingHTTPServer(("127.0.0.1", 0), _Metrics)
        server.daemon_threads, server.lock, server.requests, server.ttft = True, threading.Lock(), 0, ttft
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers[name] = server
    yield {name: server.server_address[1] for name, server in servers.items()}
    for server in servers.values():
        server.shutdown()
        server.server_close()


def pod(name: str, namespace: str, pod_hash: str, host_port: int, ready: bool = True) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {**APP, HASH_LABEL: pod_hash},
            "annotations": {HOST_PORTS: json.dumps({"8000": host_port})},
        },
        "spec": {"containers": [{"name": "vllm", "ports": [{"name": "http", "containerPort": 8000}]}]},
        "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


def chart_pod_monitor() -> dict[str, Any]:
    """The PodMonitor as the chart renders it, scraping every second."""
    helm = pytest.importorskip("helm_python", reason="needs helm-python-sdk (Helm's renderer, offline)")
    with helm.Chart.load(str(ROOT / "gitops" / "charts" / "llm-inference")) as chart:
        rendered = chart.render(
            values={"metrics": {"podMonitor": {"interval": "1s"}}}, name="llm-inference", namespace=NS
        )
    docs = [doc for text in rendered.values() for doc in yaml.safe_load_all(text) if doc]
    monitor: dict[str, Any] = next(doc for doc in docs if doc["kind"] == "PodMonitor")
    return monitor


def eventually(probe: Callable[[], T | None], what: str, timeout_s: float = 40.0) -> T:
    """Poll until ``probe`` returns a value (Prometheus applies target changes every ~5 s on its own)."""
    deadline = time.monotonic() + timeout_s
    while (value := probe()) is None:
        assert time.monotonic() < deadline, f"gave up waiting: {what}"
        time.sleep(0.25)
    return value


@needs_prometheus
def test_pod_monitor_scrapes_ready_pods_with_their_labels(metric_servers: dict[str, int], tmp_path: Path) -> None:
    store = Store()
    store.create(POD_MONITOR, NS, chart_pod_monitor())
    store.create(POD, NS, pod("llm-inference-s1-aaaaa", NS, "s1", metric_servers["stable"]))
    store.create(POD, NS, pod("llm-inference-c2-bbbbb", NS, "c2", metric_servers["canary"]))
    store.create(POD, NS, pod("llm-inference-c2-ccccc", NS, "c2", 1, ready=False))  # not Ready: not a target
    store.create(POD, "elsewhere", pod("llm-inference-s1-ddddd", "elsewhere", "s1", 1))  # other namespace
    prometheus = Prometheus(tmp_path / "prom").start()
    pid = prometheus.proc.pid if prometheus.proc else 0
    try:
        prometheus.sync(store)
        config = yaml.safe_load(prometheus.config_file.read_text())
        (job,) = config["scrape_configs"]
        assert job["job_name"] == "podMonitor/llm-demo/llm-inference/0"
        assert (job["scrape_interval"], job["metrics_path"]) == ("1s", "/metrics")

        canary = eventually(lambda: prometheus.value(ttft_p95_query(NS, "c2", "30s")), "a canary TTFT p95")
        stable = eventually(lambda: prometheus.value(ttft_p95_query(NS, "s1", "30s")), "a stable TTFT p95")
        assert 0.25 < canary <= 0.5 and 0.01 < stable <= 0.05  # each pod's own histogram, told apart by hash
        assert prometheus.value(ttft_p95_query(NS, "other", "30s")) is None
        assert prometheus.value(error_ratio_query(NS, "c2", "30s")) == 0.0  # no 5xx series yet reads as 0

        series = {s["metric"]["pod"]: s["metric"] for s in prometheus.query("vllm:time_to_first_token_seconds_count")}
        assert set(series) == {"llm-inference-s1-aaaaa", "llm-inference-c2-bbbbb"}
        labels = series["llm-inference-c2-bbbbb"]
        assert labels["namespace"] == NS and labels["rollouts_pod_template_hash"] == "c2"
        assert labels["app_kubernetes_io_instance"] == "llm-inference"
        assert (labels["job"], labels["endpoint"], labels["container"]) == ("llm-demo/llm-inference", "http", "vllm")

        # the canary pod stops being Ready: it drops out of the targets
        store.update(POD, NS, "llm-inference-c2-bbbbb", lambda p: p["status"]["conditions"][0].update(status="False"))
        prometheus.sync(store)

        def scraped_pods() -> set[str] | None:
            pods = {t["labels"]["pod"] for t in prometheus.active_targets()}
            return pods if pods == {"llm-inference-s1-aaaaa"} else None

        eventually(scraped_pods, "the not-Ready canary pod to leave the targets")
    finally:
        prometheus.close()
    prometheus.close()  # idempotent
    assert pid and not processes.group_alive(pid)


@needs_prometheus
def test_pod_monitor_changes_reload_and_bad_ones_are_skipped(tmp_path: Path) -> None:
    store = Store()
    good = chart_pod_monitor()
    store.create(POD_MONITOR, NS, good)
    with Prometheus(tmp_path / "prom") as prometheus:
        prometheus.sync(store)
        store.update(
            POD_MONITOR, NS, "llm-inference", lambda m: m["spec"]["podMetricsEndpoints"][0].update(interval="2s")
        )
        bad = {**good, "metadata": {"name": "broken"}}
        bad["spec"] = {**good["spec"], "podMetricsEndpoints": [{"port": "http", "interval": "soon"}]}
        store.create(POD_MONITOR, NS, bad)
        prometheus.sync(store)  # reloads with the new interval; the broken one is left out, not the whole config
        loaded = yaml.safe_load(prometheus.query_config())
        assert [(j["job_name"], j["scrape_interval"]) for j in loaded["scrape_configs"]] == [
            ("podMonitor/llm-demo/llm-inference/0", "2s")
        ]
        assert "interval 'soon' is not a duration" in prometheus.skipped["llm-demo/broken"]
        store.delete(POD_MONITOR, NS, "llm-inference")
        prometheus.sync(store)
        assert not yaml.safe_load(prometheus.query_config()).get("scrape_configs")
        assert not list(prometheus.targets_dir.glob("*.json"))


def test_missing_binary_names_the_install() -> None:
    with pytest.raises(TerminalError, match="make prometheus") as caught:
        Prometheus(Path("/nonexistent"), binary="/nonexistent/prometheus").start()
    assert "apt-get install prometheus" in str(caught.value)


def test_durations_and_label_names_as_prometheus_reads_them() -> None:
    assert [seconds(d) for d in ("1s", "1m30s", "500ms", "2h", "soon", "")] == [1, 90, 0.5, 7200, None, None]
    assert label_name(HASH_LABEL) == "rollouts_pod_template_hash"
    assert label_name("app.kubernetes.io/instance") == "app_kubernetes_io_instance"
