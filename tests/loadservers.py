"""Small real streaming OpenAI-compatible servers on 127.0.0.1, for the load-test tests and benchmarks (test-only).

One asyncio HTTP/1.1 server (keep-alive, chunked server-sent events) whose behaviour is set by a Behaviour:
healthy, a fixed delay before the first token, HTTP 500s, hanging (the client times out), streams cut short
(the connection is dropped mid-stream), or a fixed number of slots that cannot keep up with the offered rate.
Like `transformers serve`, it rejects unknown request fields and answers only for its one model name.

Run in a thread for tests (``with running(Behaviour(...)) as server: server.url``) or as a process for the
benchmarks (``python tests/loadservers.py --port 0 --ttft-delay 0.05`` prints ``READY <url>``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

MODEL = "tiny-test-model"
KNOWN_FIELDS = {"model", "messages", "prompt", "max_tokens", "stream", "temperature", "top_p", "seed", "stop"}


@dataclass(frozen=True)
class Behaviour:
    """How the server answers. Delays are in seconds."""

    tokens: int = 8
    ttft_delay: float = 0.0
    itl: float = 0.0
    status: int = 200
    hang: bool = False
    cut_after: int | None = None  # drop the connection after this many tokens
    slots: int | None = None  # at most this many requests generate at once (the rest queue)
    service_time: float = 0.0  # seconds a slot is held per request
    done_marker: bool = True  # send `data: [DONE]` at the end (transformers serve does not)
    strict: bool = True  # refuse unknown request fields and other model names, as `transformers serve` does


@dataclass
class Counters:
    requests: int = 0
    rejected: list[str] = field(default_factory=list)
    authorizations: set[str] = field(default_factory=set)
    ttft_s: list[float] = field(default_factory=list)  # what the server measured, as vLLM's histogram counts it
    waiting: int = 0  # requests queued for a slot right now (vllm:num_requests_waiting)


BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5)
TTFT_METRIC = "vllm:time_to_first_token_seconds"


def metrics_text(counters: Counters) -> bytes:
    """vLLM's metric names in Prometheus text format: the TTFT histogram and the waiting-queue gauge."""
    lines = [f"# TYPE {TTFT_METRIC} histogram"]
    for bound in BUCKETS:
        count = sum(1 for v in counters.ttft_s if v <= bound)
        lines.append(f'{TTFT_METRIC}_bucket{{le="{bound}",model_name="{MODEL}"}} {count}')
    lines.append(f'{TTFT_METRIC}_bucket{{le="+Inf",model_name="{MODEL}"}} {len(counters.ttft_s)}')
    lines.append(f'{TTFT_METRIC}_count{{model_name="{MODEL}"}} {len(counters.ttft_s)}')
    lines.append(f'{TTFT_METRIC}_sum{{model_name="{MODEL}"}} {sum(counters.ttft_s)}')
    lines += ["# TYPE vllm:num_requests_waiting gauge", f'vllm:num_requests_waiting{{model_name="{MODEL}"}} '
              f"{counters.waiting}"]  # fmt: skip
    return ("\n".join(lines) + "\n").encode()


def _chunk(payload: dict[str, object]) -> bytes:
    data = b"data: " + json.dumps(payload).encode() + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(data), data)


def _done() -> bytes:
    data = b"data: [DONE]\n\n"
    return b"%x\r\n%s\r\n" % (len(data), data)


class Server:
    """The server's logic; one coroutine per connection."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.counters = Counters()
        self._slots = asyncio.Semaphore(behaviour.slots) if behaviour.slots else None

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                    elif name.strip().lower() == b"authorization":
                        self.counters.authorizations.add(value.strip().decode())
                body = await reader.readexactly(length) if length else b""
                path = head.split(b" ", 2)[1]
                if not await self.answer(path, body, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, asyncio.CancelledError):
            pass  # the client left, or the server is stopping
        finally:
            writer.close()

    async def answer(self, path: bytes, body: bytes, writer: asyncio.StreamWriter) -> bool:
        """Write one response; False when the connection must close."""
        if path == b"/health":
            writer.write(_plain(200, b'{"status":"ok"}'))
            return True
        if path == b"/metrics":
            writer.write(_plain(200, metrics_text(self.counters)))
            return True
        started = time.perf_counter()
        self.counters.requests += 1
        b = self.behaviour
        try:
            request = json.loads(body)
        except ValueError:
            writer.write(_plain(400, b'{"error":"body is not JSON"}'))
            return True
        unknown = sorted(set(request) - KNOWN_FIELDS)
        refused = b.strict and (unknown or request.get("model") != MODEL)
        if refused or path not in (b"/v1/chat/completions", b"/v1/completions"):
            self.counters.rejected.append(f"{path.decode()} unknown={unknown} model={request.get('model')}")
            writer.write(_plain(422, json.dumps({"error": f"unknown fields {unknown} or model"}).encode()))
            return True
        if b.hang:
            await asyncio.sleep(3600)
        if b.status != 200:
            writer.write(_plain(b.status, b'{"error":"internal error"}'))
            return True
        if self._slots is not None:
            self.counters.waiting += 1
            async with self._slots:
                self.counters.waiting -= 1
                await asyncio.sleep(b.service_time)
        chat = path == b"/v1/chat/completions"
        n = min(int(request.get("max_tokens") or b.tokens), b.tokens)
        head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        writer.write(head + (_chunk({"choices": [{"index": 0, "delta": {"role": "assistant"}}]}) if chat else b""))
        if b.ttft_delay:
            await asyncio.sleep(b.ttft_delay)
        for i in range(n):
            if b.cut_after is not None and i >= b.cut_after:
                await writer.drain()
                writer.transport.abort()
                return False
            if i and b.itl:
                await asyncio.sleep(b.itl)
            choice = {"index": 0, "delta": {"content": f" t{i}"}} if chat else {"index": 0, "text": f" t{i}"}
            writer.write(_chunk({"choices": [choice]}))
            if i == 0:
                self.counters.ttft_s.append(time.perf_counter() - started)
            if b.itl or i == 0:
                await writer.drain()
        end = {"index": 0, "finish_reason": "length", **({"delta": {}} if chat else {"text": ""})}
        usage = {"completion_tokens": n, "prompt_tokens": 1, "total_tokens": n + 1}
        writer.write(_chunk({"choices": [end], "usage": usage}) + (_done() if b.done_marker else b"") + b"0\r\n\r\n")
        await writer.drain()
        return True


def _plain(status: int, body: bytes) -> bytes:
    return b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
        status,
        len(body),
        body,
    )


@dataclass
class Running:
    url: str
    server: Server

    @property
    def counters(self) -> Counters:
        return self.server.counters


@contextmanager
def running(behaviour: Behaviour) -> Iterator[Running]:
    """Serve ``behaviour`` on 127.0.0.1 and a free port from a background thread, for the block's duration."""
    loop = asyncio.new_event_loop()
    server = Server(behaviour)  # asyncio primitives bind to a loop on first use (Python >= 3.10)
    ready = threading.Event()
    box: dict[str, object] = {}

    async def main() -> None:
        srv = await asyncio.start_server(server.connection, "127.0.0.1", 0)
        box["port"] = srv.sockets[0].getsockname()[1]
        box["srv"] = srv
        ready.set()
        await srv.serve_forever()

    thread = threading.Thread(target=lambda: _run_quietly(loop, main()), daemon=True)
    thread.start()
    ready.wait(10)
    try:
        yield Running(f"http://127.0.0.1:{box['port']}", server)
    finally:
        loop.call_soon_threadsafe(lambda: [t.cancel() for t in asyncio.all_tasks(loop)])
        thread.join(10)


def _run_quietly(loop: asyncio.AbstractEventLoop, coro: object) -> None:
    asyncio.set_event_loop(loop)
    with contextlib.suppress(asyncio.CancelledError, RuntimeError):
        loop.run_until_complete(coro)  # type: ignore[arg-type]


def main() -> None:
    """Run one server in this process until killed (for benchmarks): prints ``READY <url>``."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--ttft-delay", type=float, default=0.0)
    parser.add_argument("--itl", type=float, default=0.0)
    parser.add_argument("--lenient", action="store_true", help="accept any fields and model (for peer clients)")
    args = parser.parse_args()

    async def serve() -> None:
        behaviour = Behaviour(tokens=args.tokens, ttft_delay=args.ttft_delay, itl=args.itl, strict=not args.lenient)
        server = Server(behaviour)
        srv = await asyncio.start_server(server.connection, "127.0.0.1", args.port, backlog=4096)
        print(f"READY http://127.0.0.1:{srv.sockets[0].getsockname()[1]}", flush=True)
        await srv.serve_forever()

    started = time.perf_counter()
    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        print(f"stopped after {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
