"""Background analysis in the sandbox: the chart's own AnalysisTemplate (rendered by Helm for the sandbox environment)
run by the Rollouts simulator against a small fake Prometheus over HTTP. A good canary's run keeps passing and ends
Successful when the Rollout completes; a slow one fails its run and the Rollout aborts; no data is inconclusive
and pauses it; no Prometheus at all means analysis off, said in the Rollout's status."""

from __future__ import annotations

import json
import math
import random
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.gitops import CHART, Promotion, edit_values
from sandbox.analysis import ANALYSISRUN, evaluate_result
from sandbox.analysis_factory import ANALYSISTEMPLATE
from sandbox.cluster import FakeClock, rollout_manifest
from sandbox.expressions import ConditionError, evaluate
from sandbox.pods import HASH_LABEL
from sandbox.replicasets import POD, SERVICE
from sandbox.rollout_analysis import ANALYSIS_OFF, INCONCLUSIVE
from sandbox.rollouts import ROLLOUT, RolloutsSimulator
from sandbox.store import Obj, Store

helm = pytest.importorskip("helm_python", reason="needs helm-python-sdk (Helm's renderer, offline)")

GITOPS = Path(__file__).resolve().parent.parent / "gitops"
NS = "llm-sandbox"
NAME = "llm-inference"
PROMOTION = Promotion(
    env="sandbox", model="org/tiny", revision="a" * 40, artifact="tiny-3f9a2c", format="bf16", quantization="none",
    served_name="tiny-llama",
)  # fmt: skip
Answer = Callable[[str], list[float] | None]  # query -> vector values (None: an HTTP 500)


@pytest.fixture(scope="module")
def chart() -> dict[str, Obj]:
    """The sandbox environment's rendering of the real chart, by kind/name."""
    values = yaml.safe_load(edit_values((GITOPS / "envs" / "sandbox" / "values.yaml").read_text(), PROMOTION.changes()))
    with helm.Chart.load(str(GITOPS / CHART)) as loaded:
        manifests = loaded.render(values=values, name=NAME, namespace=NS)
    docs = [doc for text in manifests.values() for doc in yaml.safe_load_all(text) if doc]
    return {f"{doc['kind']}/{doc['metadata']['name']}": doc for doc in docs}


class FakePrometheus:
    """/api/v1/query on 127.0.0.1, answering each query with ``answer(query)`` as an instant vector."""

    def __init__(self) -> None:
        self.answer: Answer = lambda query: []
        self.queries: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urllib.parse.urlparse(self.path)
                query = urllib.parse.parse_qs(url.query).get("query", [""])[0]
                outer.queries.append(query)
                values = outer.answer(query) if url.path == "/api/v1/query" else None
                if values is None:
                    body, code = {"status": "error", "errorType": "internal", "error": "down for the test"}, 500
                else:
                    result = [{"metric": {}, "value": [0, repr(v) if not math.isnan(v) else "NaN"]} for v in values]
                    body, code = {"status": "success", "data": {"resultType": "vector", "result": result}}, 200
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def prometheus() -> Iterator[FakePrometheus]:
    fake = FakePrometheus()
    yield fake
    fake.close()
    assert not fake.thread.is_alive()


def answers(ttft: list[float], errors: list[float]) -> Answer:
    return lambda query: ttft if "time_to_first_token" in query else errors


class Sandbox:
    """A bare store with the chart's Rollout, Services and AnalysisTemplate, the simulator in pods mode, and the
    tests as the kubelet (pods made Ready by hand)."""

    def __init__(self, chart: dict[str, Obj], prometheus_url: str | None, rollout: Obj | None = None) -> None:
        self.store, self.clock = Store(), FakeClock()
        for key, doc in chart.items():
            kind = key.split("/")[0]
            if kind in ("Service", "AnalysisTemplate"):
                self.store.create(SERVICE if kind == "Service" else ANALYSISTEMPLATE, NS, doc)
        self.store.create(ROLLOUT, NS, rollout or chart[f"Rollout/{NAME}"], keep_status=False)
        self.sim = RolloutsSimulator(
            self.store, clock=self.clock, pods=True, prometheus_url=prometheus_url, rng=random.Random(3)
        )

    def status(self) -> Any:
        return self.store.get(ROLLOUT, NS, NAME)["status"]

    def ready_all(self) -> None:
        def ready(obj: Obj) -> None:
            obj["status"] = {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}

        for pod in self.store.list(POD, NS)[0]:
            self.store.update(POD, NS, pod["metadata"]["name"], ready)

    def tick(self, advance_s: float = 0) -> Any:
        """Time passes; the controller reconciles, the kubelet makes every pod Ready, the controller again."""
        self.clock.advance(advance_s)
        self.sim.tick()
        self.ready_all()
        self.sim.tick()
        return self.status()

    def runs(self) -> list[Obj]:
        return self.store.list(ANALYSISRUN, NS)[0]

    def to_canary_pause(self, artifact: str = "tiny-deeper") -> str:
        """Healthy, then a new artifact: the canary's pods Ready, at the pause step (startingStep 1)."""
        runs = self.runs()
        assert self.tick()["phase"] == "Healthy" and len(self.runs()) == len(runs)  # no analysis of a first deploy

        def new_artifact(obj: Obj) -> None:
            obj["spec"]["template"]["metadata"]["annotations"]["modelctl.io/artifact"] = artifact

        self.store.update(ROLLOUT, NS, NAME, new_artifact)
        self.sim.tick()  # step 0 (setWeight 50): before the starting step, no run
        assert len(self.runs()) == len(runs) and self.status()["currentStepIndex"] == 0
        paused = self.tick()
        assert (paused["currentStepIndex"], paused["phase"]) == (1, "Paused")
        return str(paused["currentPodHash"])

    def promote(self) -> None:
        patch = {"status": {"pauseConditions": None}}
        self.store.patch(ROLLOUT, NS, NAME, patch, "application/merge-patch+json", "status")


def test_the_charts_conditions_read_no_data_as_inconclusive_never_as_a_pass(chart: dict[str, Obj]) -> None:
    metrics = {m["name"]: m for m in chart[f"AnalysisTemplate/{NAME}-vllm"]["spec"]["metrics"]}
    ttft = metrics["ttft-p95"]
    assert evaluate_result(ttft, [0.2]) == "Successful"
    assert evaluate_result(ttft, [0.9]) == "Failed"
    assert evaluate_result(ttft, []) == "Inconclusive"  # no series at all
    assert evaluate_result(ttft, [math.nan]) == "Inconclusive"  # series, but no requests in the window
    assert evaluate_result(metrics["error-ratio"], [0.0]) == "Successful"
    assert evaluate_result(metrics["error-ratio"], [0.5]) == "Failed"


@pytest.mark.parametrize(
    ("condition", "result", "expected"),
    [
        ("result[0] <= 0.5 || isNaN(result[0])", [math.nan], True),
        ("len(result) == 0", [], True),
        ("len(result) > 0 && result[0] < 1", [], False),  # short-circuit: result[0] is never read
        ("not (result > 2) and true", 3.0, False),
        ("asFloat('1.5') * 2 == 3 && -result[1] < 0", [0, 2], True),
    ],
)
def test_conditions_are_evaluated_as_argo_does(condition: str, result: Any, expected: bool) -> None:
    assert evaluate(condition, result) is expected


@pytest.mark.parametrize("condition", ["result[0] < 1", "__import__('os')", "result.x", "1 +", "result[0]"])
def test_a_condition_that_cannot_be_evaluated_is_an_error_never_a_verdict(condition: str) -> None:
    with pytest.raises(ConditionError):
        evaluate(condition, [] if condition == "result[0] < 1" else [0.2])


def test_a_good_canary_passes_its_analysis_and_the_run_ends_successful(
    chart: dict[str, Obj], prometheus: FakePrometheus
) -> None:
    prometheus.answer = answers(ttft=[0.2], errors=[0.0])
    box = Sandbox(chart, prometheus.url)
    v2 = box.to_canary_pause()
    [run] = box.runs()
    assert run["metadata"]["name"] == f"{NAME}-{v2}-2" and run["metadata"]["labels"][HASH_LABEL] == v2
    assert {a["name"]: a["value"] for a in run["spec"]["args"]} == {"namespace": NS, "canary-hash": v2}
    assert prometheus.queries == []  # initialDelay 20s: nothing measured yet
    box.tick(20)
    box.tick(10)
    run = box.store.get(ANALYSISRUN, NS, run["metadata"]["name"])
    assert run["status"]["phase"] == "Running"
    results = {r["name"]: r for r in run["status"]["metricResults"]}
    assert results["ttft-p95"]["successful"] == 2 and results["error-ratio"]["successful"] == 2
    assert results["ttft-p95"]["measurements"][-1]["value"] == "[0.2]"
    assert all(f'rollouts_pod_template_hash="{v2}"' in q and f'namespace="{NS}"' in q for q in prometheus.queries)
    shown = box.status()["canary"]["currentBackgroundAnalysisRunStatus"]
    assert (shown["name"], shown["status"]) == (run["metadata"]["name"], "Running")
    box.promote()
    done = box.tick()
    assert (done["phase"], done["stableRS"]) == ("Healthy", v2)
    run = box.store.get(ANALYSISRUN, NS, run["metadata"]["name"])
    assert run["spec"]["terminate"] is True and run["status"]["phase"] == "Successful"
    assert "currentBackgroundAnalysisRunStatus" not in box.tick()["canary"]  # nothing in flight
    v3 = box.to_canary_pause("tiny-third")  # the next version gets its own run
    assert sorted(r["metadata"]["name"] for r in box.runs()) == sorted([f"{NAME}-{v2}-2", f"{NAME}-{v3}-3"])


def test_a_slow_canary_fails_its_analysis_and_the_rollout_aborts(
    chart: dict[str, Obj], prometheus: FakePrometheus
) -> None:
    prometheus.answer = answers(ttft=[1.7], errors=[0.0])  # p95 TTFT over the chart's 0.5 s
    box = Sandbox(chart, prometheus.url)
    v2 = box.to_canary_pause()
    box.tick(20)
    box.tick(10)
    assert box.status()["phase"] == "Paused"  # failed (2) is not > failureLimit (2) yet
    aborted = box.tick(10)
    [run] = box.runs()
    assert run["status"]["phase"] == "Failed"
    why = 'Metric "ttft-p95" assessed Failed due to failed (3) > failureLimit (2)'
    assert run["status"]["message"] == why
    assert aborted["abort"] is True and aborted["phase"] == "Degraded"
    assert aborted["message"] == f"RolloutAborted: Rollout aborted update to revision 2: {why}"
    shown = aborted["canary"]["currentBackgroundAnalysisRunStatus"]
    assert (shown["name"], shown["status"]) == (run["metadata"]["name"], "Failed")
    assert box.store.list(POD, NS, labels=f"{HASH_LABEL}={v2}")[0] == []  # the canary's pods are gone
    assert box.store.get(SERVICE, NS, f"{NAME}-canary")["spec"]["selector"][HASH_LABEL] == aborted["stableRS"]


def test_no_data_is_inconclusive_and_pauses_the_rollout_until_promoted(
    chart: dict[str, Obj], prometheus: FakePrometheus
) -> None:
    prometheus.answer = answers(ttft=[], errors=[])  # no requests reach the canary
    box = Sandbox(chart, prometheus.url)
    box.to_canary_pause()
    first = box.runs()[0]["metadata"]["name"]
    status = box.tick(20)
    for _ in range(3):
        status = box.tick(10)
    [run] = box.runs()
    assert run["status"]["phase"] == "Inconclusive"
    assert "inconclusive (4) > inconclusiveLimit (3)" in run["status"]["message"]
    assert status["phase"] == "Paused" and INCONCLUSIVE in [c["reason"] for c in status["pauseConditions"]]
    assert status["canary"]["currentBackgroundAnalysisRunStatus"]["status"] == "Inconclusive"
    assert not status.get("abort")  # doubt pauses; it never aborts
    box.promote()  # a person decides to go on: a new run starts, and the Rollout goes on
    status = box.tick()
    names = sorted(r["metadata"]["name"] for r in box.runs())
    assert names == [first, f"{first}.1"]
    assert status["phase"] == "Healthy"
    assert box.store.get(ANALYSISRUN, NS, f"{first}.1")["status"]["phase"] == "Successful"  # ended with the canary


def test_an_unreachable_prometheus_errors_the_run_after_the_consecutive_error_limit(chart: dict[str, Obj]) -> None:
    prometheus = FakePrometheus()
    prometheus.answer = lambda query: None  # HTTP 500 for every query
    try:
        box = Sandbox(chart, prometheus.url)
        box.to_canary_pause()
        box.tick(20)
        for _ in range(3):
            assert box.tick(10)["phase"] == "Paused"  # 4 errors in a row are tolerated
        aborted = box.tick(10)
    finally:
        prometheus.close()
    [run] = box.runs()
    assert run["status"]["phase"] == "Error"
    assert "consecutiveErrors (5) > consecutiveErrorLimit (4)" in run["status"]["message"]
    assert "down for the test" in run["status"]["message"]
    assert aborted["phase"] == "Degraded" and aborted["abort"] is True


def test_without_prometheus_analysis_is_off_and_said_so(chart: dict[str, Obj]) -> None:
    box = Sandbox(chart, None)
    box.to_canary_pause()
    box.tick(60)
    assert box.runs() == []
    assert box.status()["canary"]["currentBackgroundAnalysisRunStatus"]["message"] == ANALYSIS_OFF


STEP_TEMPLATE = {
    "metadata": {"name": "smoke"},
    "spec": {
        "args": [{"name": "hash"}],
        "metrics": [
            {
                "name": "p95",
                "count": 2,
                "interval": "10s",
                "successCondition": "len(result) > 0 && result[0] < 1",
                "failureCondition": "len(result) > 0 && result[0] >= 1",
                "provider": {"prometheus": {"address": "http://anywhere:9090", "query": 'p95{h="{{args.hash}}"}'}},
            }
        ],
    },
}


@pytest.mark.parametrize(("value", "outcome"), [(0.3, "passes"), (1.5, "aborts")])
def test_an_analysis_step_gates_the_canary(prometheus: FakePrometheus, value: float, outcome: str) -> None:
    prometheus.answer = lambda query: [value]
    args = [{"name": "hash", "valueFrom": {"podTemplateHashValue": "Latest"}}]
    steps = [{"setWeight": 50}, {"analysis": {"templates": [{"templateName": "smoke"}], "args": args}}]
    box = Sandbox({}, prometheus.url, rollout=rollout_manifest(NAME, steps, replicas=2))
    box.store.create(ANALYSISTEMPLATE, NS, STEP_TEMPLATE)
    assert box.tick()["phase"] == "Healthy"
    box.store.update(ROLLOUT, NS, NAME, lambda obj: obj["spec"]["template"]["metadata"]["labels"].update(v="2"))
    box.tick()
    status = box.tick()  # the run made at the step shows in the status on the next reconcile
    v2 = status["currentPodHash"]
    [run] = box.runs()
    assert run["metadata"]["name"] == f"{NAME}-{v2}-2-1" and prometheus.queries == [f'p95{{h="{v2}"}}']
    if outcome == "passes":
        assert status["currentStepIndex"] == 1 and status["phase"] == "Progressing"
        assert status["canary"]["currentStepAnalysisRunStatus"]["status"] == "Running"  # 1 of 2 measurements
        status = box.tick(10)
        assert (status["phase"], status["stableRS"]) == ("Healthy", v2)
        assert box.store.get(ANALYSISRUN, NS, run["metadata"]["name"])["status"]["phase"] == "Successful"
    else:  # failureLimit 0: the first failed measurement fails the run
        assert status["phase"] == "Degraded" and status["abort"] is True
        assert 'Metric "p95" assessed Failed due to failed (1) > failureLimit (0)' in status["message"]
        assert status["stableRS"] != v2
