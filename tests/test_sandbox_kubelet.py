"""The sandbox's kubelet and Job controller: pods scheduled onto simulated GPU nodes and run as real processes."""

from __future__ import annotations

import base64
import json
import os
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from pipeline import processes
from pipeline.errors import TerminalError
from pipeline.kube import Backoff, Kube
from sandbox.apiserver import FakeApiServer
from sandbox.cluster import FakeCluster
from sandbox.containers import Runtime, map_paths, rewrite_argv
from sandbox.jobs import JobController
from sandbox.kubelet import Kubelet
from sandbox.pods import host_port, is_ready
from sandbox.scheduler import schedule
from sandbox.store import BY_KIND, Obj
from sandbox.workloads import add_gpu_node

ROOT = Path(__file__).resolve().parent.parent
POD, JOB, SECRET, PVC = BY_KIND["Pod"], BY_KIND["Job"], BY_KIND["Secret"], BY_KIND["PersistentVolumeClaim"]
NS = "llm-staging"
WEB_IMAGE = "sandbox.test/web"
# a tiny HTTP server: /health answers 200, / says which port it was given (after the kubelet's rewriting)
WEB = """
import http.server, sys
port = int(next(a for a in sys.argv[1:] if a.startswith('--port=')).split('=')[1])
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f'hello from {port}'.encode()
        self.send_response(200); self.send_header('Content-Length', str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
http.server.HTTPServer(('127.0.0.1', port), H).serve_forever()
"""
T = TypeVar("T")


def web(container: Obj) -> list[str]:
    return [sys.executable, "-c", WEB, *[str(a) for a in container.get("args") or []]]


class Clock:
    """The kubelet's back-off clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def server() -> Iterator[FakeApiServer]:
    api = FakeApiServer().start()
    add_gpu_node(api, "gpu-a", {"pool": "l4"}, 1)
    try:
        yield api
    finally:
        api.stop()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def kubelet(server: FakeApiServer, tmp_path: Path, clock: Clock) -> Iterator[Kubelet]:
    node = Kubelet(server, tmp_path / "sandbox", Runtime(images={WEB_IMAGE: web}), clock=clock)
    try:
        yield node
    finally:
        node.close()


def until(kubelet: Kubelet, check: Callable[[], T | None], *also: Any, timeout_s: float = 30.0) -> T:
    """Tick the controllers until ``check`` returns something truthy (then return it)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for controller in also:
            controller.tick()
        kubelet.tick()
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not reached within {timeout_s}s")


def pod(name: str, containers: list[Obj], **spec: Any) -> Obj:
    return {"metadata": {"name": name, "labels": {"app": name}}, "spec": {"containers": containers, **spec}}


def web_container(**extra: Any) -> Obj:
    probe = {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 1}
    return {
        "name": "web",
        "image": f"{WEB_IMAGE}:1",
        "args": ["--port=8000"],
        "ports": [{"name": "http", "containerPort": 8000}],
        "readinessProbe": probe,
        **extra,
    }


def get(server: FakeApiServer, name: str, ns: str = NS) -> Obj:
    return server.store.get(POD, ns, name)


def ready_pod(server: FakeApiServer, name: str) -> Obj | None:
    found = get(server, name)
    return found if is_ready(found) else None


def state(obj: Obj, which: str = "containerStatuses") -> Obj:
    return obj["status"][which][0]


def test_a_gpu_pod_is_scheduled_started_ready_reachable_and_killed_when_deleted(
    server: FakeApiServer, kubelet: Kubelet
) -> None:
    gpu = {"limits": {"nvidia.com/gpu": "1"}}
    server.store.create(POD, NS, pod("web", [web_container(resources=gpu)], nodeSelector={"pool": "l4"}))
    ready = until(kubelet, lambda: ready_pod(server, "web"))
    assert ready["spec"]["nodeName"] == "gpu-a" and ready["status"]["phase"] == "Running"
    assert ready["status"]["podIP"] == "127.0.0.1"
    port = host_port(ready, "http")
    assert port is not None and port != 8000
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as answer:
        assert answer.read().decode() == f"hello from {port}", "--port=8000 was rewritten to the host port"
    [pid] = kubelet.pids()
    server.store.delete(POD, NS, "web")
    until(kubelet, lambda: not processes.group_alive(pid))
    assert kubelet.pids() == [] and kubelet.read_log(NS, "web", None) is None


def test_a_pod_marked_for_deletion_is_killed_then_removed(server: FakeApiServer, kubelet: Kubelet) -> None:
    server.store.create(POD, NS, pod("web", [web_container()]))
    until(kubelet, lambda: ready_pod(server, "web"))
    [pid] = kubelet.pids()
    server.store.update(POD, NS, "web", lambda p: p["metadata"].update(deletionTimestamp="2026-01-01T00:00:00Z"))
    kubelet.tick()
    assert server.store.list(POD, NS)[0] == [], "the kubelet confirmed the deletion"
    until(kubelet, lambda: not processes.group_alive(pid))


@pytest.mark.parametrize(
    ("node_spec", "pod_spec", "message"),
    [
        (
            {},
            {"resources": {"limits": {"nvidia.com/gpu": "2"}}},
            "0/1 nodes are available: 1 Insufficient nvidia.com/gpu.",
        ),
        ({}, {"nodeSelector": {"pool": "h100"}}, "1 node(s) didn't match Pod's node affinity/selector"),
        (
            {"taints": [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]},
            {},
            "1 node(s) had untolerated taint {nvidia.com/gpu: present}",
        ),
    ],
)
def test_a_pod_that_fits_no_node_stays_pending_and_says_why(
    server: FakeApiServer, kubelet: Kubelet, node_spec: Obj, pod_spec: Obj, message: str
) -> None:
    if node_spec:
        server.store.update(BY_KIND["Node"], "", "gpu-a", lambda n: n["spec"].update(node_spec))
    resources = pod_spec.pop("resources", {})
    server.store.create(POD, NS, pod("web", [web_container(resources=resources)], **pod_spec))
    kubelet.tick()
    found = get(server, "web")
    [condition] = found["status"]["conditions"]
    assert found["status"]["phase"] == "Pending" and "nodeName" not in found["spec"]
    assert condition["reason"] == "Unschedulable" and message in condition["message"]
    assert kubelet.pids() == []

    def fits(node: Obj) -> None:
        node["metadata"]["labels"]["pool"] = "h100"
        node["spec"]["taints"] = []
        node["status"]["allocatable"]["nvidia.com/gpu"] = "2"

    server.store.update(BY_KIND["Node"], "", "gpu-a", fits)
    kubelet.tick()
    assert get(server, "web")["spec"]["nodeName"] == "gpu-a", "retried on the next tick"


def test_the_scheduler_counts_gpus_held_and_honours_tolerations() -> None:
    node = {
        "metadata": {"name": "n", "labels": {}},
        "spec": {"taints": [{"key": "nvidia.com/gpu", "effect": "NoSchedule"}]},
        "status": {"allocatable": {"nvidia.com/gpu": "1"}, "conditions": [{"type": "Ready", "status": "True"}]},
    }
    tolerant = {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}
    wants = {"containers": [{"resources": {"requests": {"nvidia.com/gpu": "1"}}}], **tolerant}
    assert schedule({"spec": wants}, [node], []) == ("n", "")
    holder: Obj = {"spec": {**wants, "nodeName": "n"}, "status": {"phase": "Running"}}
    assert schedule({"spec": wants}, [node], [holder])[1] == "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."
    holder["status"]["phase"] = "Succeeded"
    assert schedule({"spec": wants}, [node], [holder])[0] == "n", "a finished pod holds no GPU"


def test_mount_paths_map_to_host_dirs_and_back() -> None:
    mounts = {"/models": "/tmp/sb/volumes/ns/cache"}
    request = json.dumps({"model_dir": "/models/tiny", "cache_root": "/models", "other": "/modelsx/a"})
    mapped = map_paths(request, mounts)
    assert json.loads(mapped) == {
        "model_dir": "/tmp/sb/volumes/ns/cache/tiny",
        "cache_root": "/tmp/sb/volumes/ns/cache",
        "other": "/modelsx/a",
    }, "whole paths and prefixes only"
    assert map_paths("/data/models/x --m=/models/y", mounts) == "/data/models/x --m=/tmp/sb/volumes/ns/cache/y"
    back = {host: mount for mount, host in mounts.items()}
    assert map_paths("saved /tmp/sb/volumes/ns/cache/tiny-awq", back) == "saved /models/tiny-awq"
    argv = rewrite_argv(["--port", "8000", "--port=8000", "http://127.0.0.1:8000/x", "/models"], mounts, {8000: 4123})
    assert argv == ["--port", "4123", "--port=4123", "http://127.0.0.1:4123/x", "/tmp/sb/volumes/ns/cache"]


def test_the_chart_vllm_container_and_the_pipeline_image_become_local_commands(tmp_path: Path) -> None:
    runtime = Runtime(vllm_python=tmp_path / "vllm-python", pipeline_python=tmp_path / "python")
    chart = {
        "name": "vllm",
        "image": "registry.example/vllm/vllm-openai:v0.32.0",
        "command": ["vllm", "serve"],
        "args": ["/models/tiny", "--served-model-name=llm", "--port=8000", "--max-model-len=256"],
    }
    argv, env = runtime.argv(chart)
    assert argv == [
        str(tmp_path / "vllm-python"),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        "/models/tiny",
        "--served-model-name=llm",
        "--max-model-len=256",
        "--host",
        "127.0.0.1",
        "--port",
        "8000",
    ]
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    step: Obj = {"name": "quantize", "image": "ghcr.io/example-org/modelctl:0.1.0"}
    step["command"] = ["python", "-m", "pipeline", "step", "run", "--request", "{}"]
    assert runtime.argv(step)[0] == [str(tmp_path / "python"), "-m", "pipeline", "step", "run", "--request", "{}"]


def test_env_comes_from_values_and_secrets_and_a_missing_required_secret_blocks_the_start(
    server: FakeApiServer, kubelet: Kubelet
) -> None:
    encoded = base64.b64encode(b"s3cret").decode()
    server.store.create(SECRET, NS, {"metadata": {"name": "hf"}, "data": {"token": encoded}})
    ref = {"secretKeyRef": {"name": "hf", "key": "token"}}
    env = [
        {"name": "PLAIN", "value": "v"},
        {"name": "TOKEN", "valueFrom": ref},
        {"name": "ABSENT", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "k", "optional": True}}},
    ]
    show = "import os; print(os.environ['PLAIN'], os.environ['TOKEN'], os.environ.get('ABSENT', 'unset'))"
    main = {"name": "main", "image": "any", "command": ["python", "-c", show], "env": env}
    server.store.create(POD, NS, pod("env", [main], restartPolicy="Never"))
    until(kubelet, lambda: get(server, "env")["status"].get("phase") == "Succeeded")
    assert kubelet.read_log(NS, "env", None) == "v s3cret unset\n"

    required = {**main, "env": [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "k"}}}]}
    server.store.create(POD, NS, pod("blocked", [required], restartPolicy="Never"))
    waiting = until(kubelet, lambda: state(get(server, "blocked"))["state"].get("waiting", {}).get("message"))
    assert state(get(server, "blocked"))["state"]["waiting"]["reason"] == "CreateContainerConfigError"
    assert '"nope"' in waiting and "TOKEN" in waiting
    assert get(server, "blocked")["status"]["phase"] == "Pending"


def test_an_image_the_sandbox_cannot_run_waits_in_err_image_pull(server: FakeApiServer, kubelet: Kubelet) -> None:
    server.store.create(POD, NS, pod("odd", [{"name": "main", "image": "redis:7"}]))
    until(kubelet, lambda: "waiting" in state(get(server, "odd"))["state"])
    waiting = state(get(server, "odd"))["state"]["waiting"]
    assert waiting["reason"] == "ErrImagePull" and "redis:7" in waiting["message"]
    assert "vllm-openai" in waiting["message"] and kubelet.pids() == []


def test_a_crashing_always_pod_backs_off_and_restarts(server: FakeApiServer, kubelet: Kubelet, clock: Clock) -> None:
    crash = {"name": "main", "image": "any", "command": ["python", "-c", "print('boom'); raise SystemExit(3)"]}
    server.store.create(POD, NS, pod("crash", [crash]))
    status = until(
        kubelet, lambda: state(get(server, "crash"))["state"].get("waiting", {}).get("reason") == "CrashLoopBackOff"
    )
    assert status
    found = get(server, "crash")
    assert not is_ready(found) and state(found)["restartCount"] == 0
    assert state(found)["lastState"]["terminated"]["exitCode"] == 3
    assert "back-off 10s" in state(found)["state"]["waiting"]["message"]
    kubelet.tick()
    assert state(get(server, "crash"))["restartCount"] == 0, "no restart before the back-off ends"
    clock.now += 10
    until(kubelet, lambda: state(get(server, "crash"))["restartCount"] == 1)
    until(kubelet, lambda: "back-off 20s" in str(state(get(server, "crash"))["state"]))
    assert kubelet.read_log(NS, "crash", "main") == "boom\nboom\n"


def test_a_failing_liveness_probe_kills_and_restarts_the_container(
    server: FakeApiServer, kubelet: Kubelet, clock: Clock
) -> None:
    dead = {"exec": {"command": ["python", "-c", "raise SystemExit(1)"]}, "periodSeconds": 1, "failureThreshold": 2}
    server.store.create(POD, NS, pod("web", [web_container(livenessProbe=dead)]))
    until(kubelet, lambda: ready_pod(server, "web"))
    waiting = until(kubelet, lambda: state(get(server, "web"))["state"].get("waiting"))
    assert waiting["reason"] == "CrashLoopBackOff" and not is_ready(get(server, "web"))
    assert state(get(server, "web"))["lastState"]["terminated"]["exitCode"] == 143, "ended by SIGTERM"
    clock.now += 10
    until(kubelet, lambda: state(get(server, "web"))["restartCount"] == 1)


def test_tcp_socket_probes_connect_to_the_pods_port(server: FakeApiServer, kubelet: Kubelet, clock: Clock) -> None:
    """Readiness on the named port passes once the server listens; liveness on a port nothing listens on fails."""
    listening = {"tcpSocket": {"port": "http"}, "periodSeconds": 1}
    server.store.create(POD, NS, pod("tcp", [web_container(readinessProbe=listening)]))
    assert until(kubelet, lambda: ready_pod(server, "tcp"))["status"]["phase"] == "Running"
    closed = {"tcpSocket": {"port": 1}, "periodSeconds": 1, "failureThreshold": 2}
    server.store.create(POD, NS, pod("closed", [web_container(livenessProbe=closed)]))
    waiting = until(kubelet, lambda: state(get(server, "closed"))["state"].get("waiting"))
    assert waiting["reason"] == "CrashLoopBackOff" and not is_ready(get(server, "closed"))


def test_a_native_sidecar_starts_first_and_is_stopped_when_the_main_container_ends(
    server: FakeApiServer, kubelet: Kubelet
) -> None:
    ready_file = "import os, sys; sys.exit(0 if os.path.exists('/work/ready') else 1)"
    sidecar = web_container(
        restartPolicy="Always",
        startupProbe={"exec": {"command": ["python3", "-c", ready_file]}, "periodSeconds": 1, "failureThreshold": 600},
        volumeMounts=[{"name": "scratch", "mountPath": "/work"}],
    )
    check = (
        "import urllib.request, os; print(os.environ['URL'], urllib.request.urlopen(os.environ['URL']).read().decode())"
    )
    url = [{"name": "URL", "value": "http://127.0.0.1:8000/"}]
    main = {"name": "main", "image": "any", "command": ["python", "-c", check], "env": url}
    spec = {"initContainers": [sidecar], "restartPolicy": "Never", "volumes": [{"name": "scratch", "emptyDir": {}}]}
    server.store.create(POD, NS, pod("sc", [main], **spec))
    until(
        kubelet,
        lambda: get(server, "sc")["status"].get("initContainerStatuses", [{}])[0].get("state", {}).get("running"),
    )
    for _ in range(20):
        kubelet.tick()
        time.sleep(0.05)
    found = get(server, "sc")
    assert found["status"]["phase"] == "Pending" and "waiting" in state(found)["state"], "main waits for startup"
    [sidecar_pid] = kubelet.pids()
    run = kubelet.runs[(NS, "sc")]
    Path(run.containers[0].mounts["/work"], "ready").touch()  # the sidecar's startup probe passes now
    done = until(kubelet, lambda: get(server, "sc")["status"]["phase"] == "Succeeded")
    assert done
    port = host_port(get(server, "sc"), 8000)
    log = kubelet.read_log(NS, "sc", None)
    assert log == f"http://127.0.0.1:8000/ hello from {port}\n", "main reached the sidecar on its localhost:8000"
    until(kubelet, lambda: not processes.group_alive(sidecar_pid))
    assert kubelet.pids() == []


def test_nothing_outlives_close(server: FakeApiServer, tmp_path: Path) -> None:
    node = Kubelet(server, tmp_path / "k")
    spawn = "import subprocess, time; subprocess.Popen(['sleep', '300']); time.sleep(300)"
    server.store.create(POD, NS, pod("long", [{"name": "main", "image": "any", "command": ["python", "-c", spawn]}]))
    until(node, lambda: state(get(server, "long"))["state"].get("running"))
    [pgid] = node.pids()
    until(node, lambda: len(processes.group_members(pgid)) == 2)  # the child and its grandchild
    node.close()
    node.close()  # idempotent
    assert not processes.group_alive(pgid), "the whole process group is gone"


@pytest.fixture
def cluster() -> Iterator[FakeCluster]:
    fake = FakeCluster()
    add_gpu_node(fake.server, "gpu-a", {"pool": "l4"}, 1)
    try:
        yield fake
    finally:
        fake.close()


def job(name: str, code: str, backoff_limit: int = 1) -> Obj:
    container = {
        "name": "step",
        "image": "ghcr.io/example-org/modelctl:0.1.0",
        "command": ["python", "-c", code],
        "volumeMounts": [{"name": "model-cache", "mountPath": "/models"}],
    }
    volumes = [{"name": "model-cache", "persistentVolumeClaim": {"claimName": "model-cache"}}]
    spec = {"restartPolicy": "Never", "containers": [container], "volumes": volumes}
    return {"metadata": {"name": name}, "spec": {"backoffLimit": backoff_limit, "template": {"spec": spec}}}


def run_job(cluster: FakeCluster, kubelet: Kubelet, manifest: Obj) -> Any:
    """The pipeline's own Kube.run_job, with the controllers ticking beside it."""
    import threading

    kube = Kube(cluster.api_client, Backoff(attempts=4, first_s=0.05, max_s=0.2, request_timeout_s=5))
    controller, stop = JobController(cluster.store), threading.Event()

    def loop() -> None:
        while not stop.is_set():
            controller.tick()
            kubelet.tick()
            stop.wait(0.05)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        return kube.run_job(NS, manifest, timeout_s=60), kube
    finally:
        stop.set()
        thread.join()


def test_a_job_runs_its_pod_and_its_log_names_the_mount_path(cluster: FakeCluster, tmp_path: Path) -> None:
    cluster.store.create(PVC, NS, {"metadata": {"name": "model-cache"}, "spec": {}})
    kubelet = Kubelet(cluster.server, tmp_path / "k")
    (kubelet.volume_dir(NS, "model-cache") / "tiny").mkdir()
    try:
        code = "import json, os, sys; print(json.dumps({'dir': sys.argv[1], 'seen': os.path.isdir(sys.argv[1])}))"
        manifest = job("quantize-1", code)
        manifest["spec"]["template"]["spec"]["containers"][0]["args"] = ["/models/tiny"]
        (result, kube) = run_job(cluster, kubelet, manifest)
        assert result.succeeded
        finished = cluster.store.get(JOB, NS, "quantize-1")["status"]
        assert finished["succeeded"] == 1 and finished["conditions"][0]["type"] == "Complete"
        assert cluster.store.get(PVC, NS, "model-cache")["status"]["phase"] == "Bound"
        [(pod_name, log)] = kube.job_logs(NS, "quantize-1").items()
        assert pod_name.startswith("quantize-1-")
        assert json.loads(log) == {"dir": "/models/tiny", "seen": True}, "the process saw the volume at /models"
        pod_labels = cluster.store.get(POD, NS, pod_name)["metadata"]["labels"]
        assert pod_labels["job-name"] == "quantize-1" and "controller-uid" in pod_labels
    finally:
        kubelet.close()


def test_a_failing_job_is_retried_until_its_backoff_limit_then_failed(cluster: FakeCluster, tmp_path: Path) -> None:
    kubelet = Kubelet(cluster.server, tmp_path / "k")
    try:
        with pytest.raises(TerminalError, match="BackoffLimitExceeded") as failure:
            run_job(cluster, kubelet, job("broken", "print('cannot load /models/x'); raise SystemExit(4)"))
        assert "cannot load /models/x" in str(failure.value), "the pods' logs are in the error"
        pods, _ = cluster.store.list(POD, NS, "job-name=broken")
        assert [p["status"]["phase"] for p in pods] == ["Failed", "Failed"], "backoffLimit 1: two pods"
        status = cluster.store.get(JOB, NS, "broken")["status"]
        assert (
            status["failed"] == 2
            and status["conditions"][-1]["message"] == "Job has reached the specified backoff limit"
        )
    finally:
        kubelet.close()


def test_each_vllm_container_gets_its_own_core_while_others_share_none(server: FakeApiServer, tmp_path: Path) -> None:
    """vLLM binds its threads to core 0 by default: a stable and a canary pod would share one core. The kubelet binds
    each vLLM container to the least used core (a CPU manager's static policy); other containers are not bound."""
    node = Kubelet(server, tmp_path / "sandbox", Runtime(images={"vllm/vllm-openai": web, WEB_IMAGE: web}))
    try:
        for name in ("stable", "canary"):
            server.store.create(POD, NS, pod(name, [web_container(image="vllm/vllm-openai:v0.32.0")]))
        server.store.create(POD, NS, pod("other", [web_container()]))
        until(node, lambda: all(ready_pod(server, n) for n in ("stable", "canary", "other")))
        bound = {key[1]: run.containers[0].env.get("VLLM_CPU_OMP_THREADS_BIND") for key, run in node.runs.items()}
    finally:
        node.close()
    cores = os.cpu_count() or 1
    assert bound["other"] is None
    assert {bound["stable"], bound["canary"]} == ({"0", "1"} if cores >= 2 else {"0"})
