"""The sandbox's users (sandbox/traffic.py) against a stdlib stand-in of vLLM's streaming completions endpoint."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sandbox.traffic import UserTraffic


@dataclass
class StandIn:
    """What the stand-in server saw, and how it answers: "ok" (streams 3 chunks), "error" (HTTP 500), "hang"."""

    mode: str = "ok"
    bodies: list[dict[str, object]] = field(default_factory=list)
    peers: list[tuple[str, int]] = field(default_factory=list)
    open_now: int = 0
    most_open: int = 0
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""


def make_handler(seen: StandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with seen.lock:
                seen.bodies.append(body)
                seen.peers.append(self.client_address)
                seen.open_now += 1
                seen.most_open = max(seen.most_open, seen.open_now)
            try:
                if seen.mode == "hang":
                    seen.release.wait(30)
                    return
                if seen.mode == "error" or self.path != "/v1/completions":
                    self.send_response(500)
                    self.end_headers()
                    self.wfile.write(b"engine dead: EngineCore exited")
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                for token in ("a", "b", "c"):
                    self.wfile.write(f"data: {json.dumps({'choices': [{'text': token}]})}\n\n".encode())
                    self.wfile.flush()
                self.wfile.write(b"data: [DONE]\n\n")
            finally:
                with seen.lock:
                    seen.open_now -= 1

    return Handler


@pytest.fixture
def server() -> Iterator[StandIn]:
    seen = StandIn()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(seen))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    seen.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield seen
    finally:
        seen.release.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    """Wait for a condition (not a timing assertion: the deadline only stops a broken test)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.02)


def test_users_stream_completions_each_on_a_new_connection(server: StandIn) -> None:
    users = UserTraffic(server.url, "tiny-llama", rate_rps=50, prompts=["Hello", "Bonjour"], max_tokens=8, seed=1)
    with users:
        wait_until(lambda: users.stats().ok >= 6, "six answered requests")
    assert not users.alive
    stats = users.stats()
    assert stats.errors == 0 and stats.last_error is None and stats.ok >= 6
    body = server.bodies[0]
    assert body["model"] == "tiny-llama" and body["stream"] is True and body["max_tokens"] == 8
    assert {b["prompt"] for b in server.bodies} <= {"Hello", "Bonjour"}
    assert len(set(server.peers)) == len(server.peers), "every request came on a connection of its own"


def test_errors_are_counted_and_the_last_one_kept_for_status(server: StandIn) -> None:
    server.mode = "error"
    with UserTraffic(server.url, "tiny-llama", rate_rps=50, prompts=["Hello"], poisson=False) as users:
        wait_until(lambda: users.stats().errors >= 3, "three failed requests")
    stats = users.stats()
    assert stats.ok == 0
    assert stats.last_error is not None and "HTTP 500" in stats.last_error and "engine dead" in stats.last_error
    assert "last error: HTTP 500" in stats.line()


def test_stop_cuts_requests_in_flight_and_leaves_no_thread(server: StandIn) -> None:
    server.mode = "hang"  # a pod that never answers
    users = UserTraffic(server.url, "tiny-llama", rate_rps=50, prompts=["Hello"], max_in_flight=2, timeout_s=60)
    users.start()
    wait_until(lambda: users.stats().in_flight == 2 and users.stats().dropped > 0, "two requests hanging, more dropped")
    assert server.most_open <= 2, "never more than max_in_flight requests at once"
    users.stop()
    assert not users.alive, "stop() returned with request threads still running"
    stats = users.stats()
    assert stats.in_flight == 0 and stats.errors == 0, "requests cut by stop() are not the server's errors"


def test_a_rate_of_zero_sends_nothing_and_bad_arguments_are_refused(server: StandIn) -> None:
    with UserTraffic(server.url, "tiny-llama", rate_rps=0, prompts=["Hello"]) as users:
        assert users.alive
    assert users.stats().sent == 0 and not users.alive
    with pytest.raises(ValueError, match="http://host:port"):
        UserTraffic("127.0.0.1:8000", "m", rate_rps=1, prompts=["x"])
    with pytest.raises(ValueError, match="prompts"):
        UserTraffic(server.url, "m", rate_rps=1, prompts=[])
