"""The sandbox's Service proxies: traffic reaches the Ready pods a Service selects, as kube-proxy sends it.

Pods are small stdlib HTTP servers on 127.0.0.1 described by Pod objects in a Store (host port annotation and Ready
condition written here, as the kubelet would).
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sandbox.pods import HASH_LABEL, HOST_PORTS
from sandbox.services import HOST_PORT, POD, SERVICE, ServiceProxies
from sandbox.store import Store

NS = "llm-demo"
APP = {"app.kubernetes.io/name": "llm-inference", "app.kubernetes.io/instance": "llm-inference"}
RELEASE_STREAM = threading.Event()  # the streaming pod sends its second piece only once the test saw the first


class _PodHandler(BaseHTTPRequestHandler):
    """Answers with the pod's name; /stream sends two pieces, the second only after the client got the first."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        name = self.server.pod_name  # type: ignore[attr-defined]
        if self.path == "/stream":
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"data: first\n\n")
            self.wfile.flush()
            RELEASE_STREAM.wait(timeout=10)
            self.wfile.write(b"data: second\n\n")
            self.wfile.flush()
            return
        body = name.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def pods() -> Iterator[dict[str, int]]:
    """Three pod servers: their names -> the host ports they listen on."""
    servers = {}
    for name in ("pod-a", "pod-b", "pod-c"):
        server = ThreadingHTTPServer(("127.0.0.1", 0), _PodHandler)
        server.daemon_threads = True
        server.pod_name = name  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers[name] = server
    yield {name: server.server_address[1] for name, server in servers.items()}
    for server in servers.values():
        server.shutdown()
        server.server_close()


def add_pod(store: Store, name: str, host_port: int, pod_hash: str, ready: bool = True) -> None:
    store.create(
        POD,
        NS,
        {
            "metadata": {
                "name": name,
                "labels": {**APP, HASH_LABEL: pod_hash},
                "annotations": {HOST_PORTS: json.dumps({"8000": host_port})},
            },
            "spec": {"containers": [{"name": "vllm", "ports": [{"name": "http", "containerPort": 8000}]}]},
            "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
        },
    )


def add_service(store: Store, name: str, selector: dict[str, str]) -> None:
    spec = {"selector": selector, "ports": [{"name": "http", "port": 8000, "targetPort": "http"}]}
    store.create(SERVICE, NS, {"metadata": {"name": name}, "spec": spec})


def get(url_port: int, path: str = "/") -> str:
    """One request on a new connection (as kube-proxy balances per connection)."""
    connection = http.client.HTTPConnection("127.0.0.1", url_port, timeout=5)
    try:
        connection.request("GET", path)
        return connection.getresponse().read().decode()
    finally:
        connection.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def store(pods: dict[str, int]) -> Store:
    store = Store()
    add_pod(store, "pod-a", pods["pod-a"], "stable1")
    add_pod(store, "pod-b", pods["pod-b"], "canary2")
    add_pod(store, "pod-c", pods["pod-c"], "canary2", ready=False)
    add_service(store, "llm-inference", APP)
    add_service(store, "llm-inference-canary", {**APP, HASH_LABEL: "canary2"})
    return store


def test_users_service_spreads_connections_over_ready_pods_only(store: Store) -> None:
    proxies = ServiceProxies(store)
    try:
        proxies.tick()
        port = proxies.port(NS, "llm-inference")
        seen = Counter(get(port) for _ in range(40))
        assert set(seen) == {"pod-a", "pod-b"}  # pod-c is not Ready: it gets nothing
        assert min(seen.values()) >= 10  # a fair share each
        service = store.get(SERVICE, NS, "llm-inference")
        assert service["metadata"]["annotations"][HOST_PORT] == str(port)
        assert proxies.url(NS, "llm-inference") == f"http://127.0.0.1:{port}"
    finally:
        proxies.close()


def test_selector_change_reroutes_and_readiness_counts_per_connection(store: Store) -> None:
    proxies = ServiceProxies(store)
    try:
        proxies.tick()
        port = proxies.port(NS, "llm-inference-canary")
        assert {get(port) for _ in range(6)} == {"pod-b"}
        # Argo Rollouts re-pins the Service to the stable hash: new connections go there at once
        store.update(
            SERVICE, NS, "llm-inference-canary", lambda s: s["spec"]["selector"].update({HASH_LABEL: "stable1"})
        )
        assert {get(port) for _ in range(6)} == {"pod-a"}
        # pod-c becomes Ready with the hash the Service now selects: it takes its share
        store.update(POD, NS, "pod-c", lambda p: p["status"]["conditions"][0].update(status="True"))
        store.update(POD, NS, "pod-c", lambda p: p["metadata"]["labels"].update({HASH_LABEL: "stable1"}))
        assert {get(port) for _ in range(6)} == {"pod-a", "pod-c"}
    finally:
        proxies.close()


def test_no_ready_backend_is_a_connection_error(store: Store) -> None:
    proxies = ServiceProxies(store)
    try:
        proxies.tick()
        port = proxies.port(NS, "llm-inference-canary")
        store.update(POD, NS, "pod-b", lambda p: p["status"]["conditions"][0].update(status="False"))
        with pytest.raises(ConnectionError):
            get(port)
    finally:
        proxies.close()


def test_streamed_response_arrives_in_pieces(store: Store) -> None:
    RELEASE_STREAM.clear()
    proxies = ServiceProxies(store)
    try:
        proxies.tick()
        with socket.create_connection(("127.0.0.1", proxies.port(NS, "llm-inference-canary")), timeout=5) as sock:
            sock.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
            received = b""
            while b"data: first" not in received:  # a buffering proxy would time out here
                chunk = sock.recv(4096)
                assert chunk, "the stream ended before its first piece"
                received += chunk
            assert b"data: second" not in received
            RELEASE_STREAM.set()
            while chunk := sock.recv(4096):
                received += chunk
        assert b"data: second" in received
    finally:
        RELEASE_STREAM.set()
        proxies.close()


def test_half_close_is_passed_on(store: Store) -> None:
    """The client ends its side after the request and still reads the whole answer."""
    proxies = ServiceProxies(store)
    try:
        proxies.tick()
        with socket.create_connection(("127.0.0.1", proxies.port(NS, "llm-inference-canary")), timeout=5) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            sock.shutdown(socket.SHUT_WR)
            received = b""
            while chunk := sock.recv(4096):
                received += chunk
        assert received.startswith(b"HTTP/1.1 200") and received.endswith(b"pod-b")
    finally:
        proxies.close()


def test_deleted_service_stops_listening_unless_its_port_was_assigned(store: Store) -> None:
    assigned = free_port()
    proxies = ServiceProxies(store, ports={(NS, "llm-inference"): assigned})
    try:
        assert proxies.port(NS, "llm-inference") == assigned  # listened on before the Service was seen
        proxies.tick()
        canary = proxies.port(NS, "llm-inference-canary")
        assert get(assigned) in {"pod-a", "pod-b"}
        store.delete(SERVICE, NS, "llm-inference")
        store.delete(SERVICE, NS, "llm-inference-canary")
        proxies.tick()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", canary), timeout=5).close()
        with pytest.raises(LookupError, match="llm-inference-canary"):
            proxies.port(NS, "llm-inference-canary")
        with pytest.raises(ConnectionError):  # still listening, with no Service: no backends
            get(assigned)
    finally:
        proxies.close()


def test_close_leaves_no_listener_and_no_thread(store: Store) -> None:
    proxies = ServiceProxies(store, ports={(NS, "later"): free_port()})
    proxies.tick()
    ports = [proxies.port(NS, name) for name in ("llm-inference", "llm-inference-canary", "later")]
    open_stream = socket.create_connection(("127.0.0.1", ports[0]), timeout=5)  # an idle connection in flight
    try:
        assert get(ports[1]) == "pod-b"
        proxies.close()
        proxies.close()  # idempotent
        for port in ports:
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
        assert open_stream.recv(10) == b""  # the open connection was ended too
        assert not [t.name for t in threading.enumerate() if t.name.startswith("svc-")]
    finally:
        open_stream.close()


def test_port_in_use_is_a_clear_error(store: Store) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"llm-demo/llm-inference on 127.0.0.1:{port}"):
            ServiceProxies(store, ports={(NS, "llm-inference"): port})
