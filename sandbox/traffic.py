"""The sandbox's users: streaming OpenAI completions sent to the users' Service at a steady rate, in the background.

Their requests are what give the stable and canary pods their TTFT samples in Prometheus, so the canary check has
figures to compare. Each request opens a NEW connection (the Service proxy spreads requests by connection, so
about N% of them reach the canary at weight N), streams its answer to the end, and is counted as ok or error; the
last error's text is kept for ``modelctl sandbox status``. At most ``max_in_flight`` requests run at once: when
the pods are slower than the rate, the extra arrivals are dropped (counted), never queued without bound.

Example:
    >>> with UserTraffic("http://127.0.0.1:8080", "tiny", rate_rps=2, prompts=["Hi"]) as users:  # doctest: +SKIP
    ...     time.sleep(10)
    ...     users.stats().ok
"""

from __future__ import annotations

import contextlib
import http.client
import json
import random
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass(frozen=True)
class TrafficStats:
    """What the users saw so far."""

    sent: int
    ok: int
    errors: int
    dropped: int
    in_flight: int
    last_error: str | None

    def line(self) -> str:
        """One line for a status display."""
        text = f"{self.ok} ok, {self.errors} errors, {self.dropped} dropped, {self.in_flight} in flight"
        return text + (f" (last error: {self.last_error})" if self.last_error else "")


class UserTraffic:
    """A background thread sending streaming ``/v1/completions`` to ``url`` at ``rate_rps`` (Poisson arrivals, or
    evenly spaced with ``poisson=False``); ``start()`` / ``stop()``, or use it as a context manager."""

    def __init__(
        self,
        url: str,
        model: str,
        rate_rps: float,
        prompts: Sequence[str],
        max_tokens: int = 16,
        *,
        poisson: bool = True,
        max_in_flight: int = 4,
        timeout_s: float = 60.0,
        seed: int | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"url must be http://host:port, got {url!r}")
        if not prompts:
            raise ValueError("prompts must not be empty")
        if rate_rps < 0 or max_in_flight < 1:
            raise ValueError("rate_rps must be >= 0 and max_in_flight >= 1")
        self.host, self.port = parts.hostname, parts.port or 80
        self.path = parts.path.rstrip("/") + "/v1/completions"
        self.model, self.rate_rps, self.prompts, self.max_tokens = model, rate_rps, list(prompts), max_tokens
        self.poisson, self.timeout_s = poisson, timeout_s
        self._slots = threading.BoundedSemaphore(max_in_flight)
        self._random = random.Random(seed)
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._sent = self._ok = self._errors = self._dropped = 0
        self._last_error: str | None = None
        self._open: set[http.client.HTTPConnection] = set()
        self._workers: set[threading.Thread] = set()
        self._thread: threading.Thread | None = None

    # lifecycle --------------------------------------------------------------------------------------------------
    def start(self) -> UserTraffic:
        if self._thread is not None:
            raise RuntimeError("UserTraffic is already started")
        self._thread = threading.Thread(target=self._dispatch, name="sandbox-users", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop sending, cut the requests in flight (their sockets are shut down) and join every thread."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:  # again and again: a request may have been connecting a moment ago
            with self._lock:
                connections, workers = list(self._open), [w for w in self._workers if w.is_alive()]
            if not workers:
                return
            for conn in connections:
                if conn.sock is not None:
                    with contextlib.suppress(OSError):
                        conn.sock.shutdown(socket.SHUT_RDWR)
            workers[0].join(0.05)

    @property
    def alive(self) -> bool:
        """True while the dispatcher or any request thread still runs."""
        with self._lock:
            workers = [w for w in self._workers if w.is_alive()]
        return bool(workers) or (self._thread is not None and self._thread.is_alive())

    def __enter__(self) -> UserTraffic:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stats(self) -> TrafficStats:
        with self._lock:
            return TrafficStats(
                sent=self._sent,
                ok=self._ok,
                errors=self._errors,
                dropped=self._dropped,
                in_flight=len(self._open),
                last_error=self._last_error,
            )

    # sending ----------------------------------------------------------------------------------------------------
    def _gap(self) -> float:
        return self._random.expovariate(self.rate_rps) if self.poisson else 1.0 / self.rate_rps

    def _dispatch(self) -> None:
        while not self._stopping.is_set():
            if self.rate_rps == 0:
                self._stopping.wait(0.5)
                continue
            if self._stopping.wait(self._gap()):
                return
            if not self._slots.acquire(blocking=False):
                with self._lock:
                    self._dropped += 1
                continue
            prompt = self._random.choice(self.prompts)
            worker = threading.Thread(target=self._request, args=(prompt,), name="sandbox-user", daemon=True)
            with self._lock:
                self._workers = {w for w in self._workers if w.is_alive()}
                self._workers.add(worker)
            worker.start()

    def _request(self, prompt: str) -> None:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)  # a new connection each
        with self._lock:
            self._sent += 1
            self._open.add(conn)
        try:
            error = "stopped" if self._stopping.is_set() else self._stream(conn, prompt)
        except (OSError, http.client.HTTPException) as exc:
            error = f"{type(exc).__name__}: {exc}"
        finally:
            conn.close()
            with self._lock:
                self._open.discard(conn)
            self._slots.release()
        if self._stopping.is_set() and error is not None:
            return  # cut by stop(): not the server's fault
        with self._lock:
            if error is None:
                self._ok += 1
            else:
                self._errors += 1
                self._last_error = error[:300]

    def _stream(self, conn: http.client.HTTPConnection, prompt: str) -> str | None:
        """Send one streaming completion and read it to the end; the error's text, or None when it streamed."""
        body = {"model": self.model, "prompt": prompt, "max_tokens": self.max_tokens, "stream": True}
        conn.request("POST", self.path, json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            text = response.read(300).decode("utf-8", "replace").strip()
            return f"HTTP {response.status}: {text}"
        chunks = 0
        while True:
            line = response.readline()
            if not line:
                return "the stream ended before [DONE]" if chunks else "an empty answer"
            text = line.decode("utf-8", "replace").strip()
            if not text.startswith("data:"):
                continue
            data = text[5:].strip()
            if data == "[DONE]":
                return None if chunks else "no tokens before [DONE]"
            try:
                chunk = json.loads(data)
            except ValueError:
                return f"not JSON in the stream: {data[:100]}"
            if isinstance(chunk, dict) and chunk.get("error"):
                return f"error in the stream: {json.dumps(chunk['error'])[:200]}"
            chunks += 1
