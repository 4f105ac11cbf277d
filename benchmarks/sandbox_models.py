"""The sandbox demo's models measured in vLLM: the stable (v2) and the slow canary (v3) served side by side.

The sandbox runs one stable and one canary pod on the same 2 cores, each a vLLM process, under the same light
user traffic. This benchmark does the same outside the sandbox: it builds v2 (the clean small model) and v3
(``tinymodel deepen`` of v2), starts one vLLM server for each (``--enforce-eager --max-model-len 256``,
``VLLM_CPU_KVCACHE_SPACE=1``, as the sandbox's chart values do), measures each one's start time (process start
to ``/health`` answering 200) and RSS (the server's whole process tree), then sends both the same open-loop
streaming completions at the same time and reports TTFT p50/p95 per server, from the client and from vLLM's own
``vllm:time_to_first_token_seconds`` histogram (the window between two ``/metrics`` scrapes). Figures are
medians over rounds. ``--startup-variants`` also times v2's start under other env/flags (one at a time).

Measured 2026-12-01 on the 2-core machine while other sessions ran up to 3 more vLLM servers (load average 6-20),
v3 = 12x1024, 1.5 req/s per server, 90-token prompts, 16 streamed tokens: v3/v2 TTFT p95 (client, vLLM) 8.3/18.3,
4.6/3.2 (split cores), 9.8/9.3 (split, no multiprocessing), 7.0/7.0 (auto, no multiprocessing); start 39-83 s
(41 s with VLLM_ENABLE_V1_MULTIPROCESSING=0 when least loaded); RSS 3.04-3.07 GB, 2.41-2.45 GB without
multiprocessing. Start-time variants (v2, one start each): default 82 s, VLLM_ENABLE_V1_MULTIPROCESSING=0 46 s,
--max-num-seqs 16 --max-num-batched-tokens 512 96 s (no help), both 47 s.

    .venv/bin/python benchmarks/sandbox_models.py --json
    .venv/bin/python benchmarks/sandbox_models.py --v3 4x512 6x1024 --bind split --rounds 1 --json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline import tinymodel  # noqa: E402
from pipeline.config import LoadProfile  # noqa: E402
from pipeline.loadtest.generator import load  # noqa: E402
from pipeline.loadtest.metrics import TTFT, scrape, window_stats  # noqa: E402
from pipeline.loadtest.prompts import synthetic_prompts  # noqa: E402
from pipeline.loadtest.report import LoadReport, Target  # noqa: E402
from pipeline.tinymodel_deepen import deepen  # noqa: E402

VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
BASE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
BASE_ARGS = ["--max-model-len", "256", "--enforce-eager"]
# Start-time variants tried with --startup-variants: (label, extra env, extra args).
VARIANTS: list[tuple[str, dict[str, str], list[str]]] = [
    ("baseline", {}, []),
    ("VLLM_ENABLE_V1_MULTIPROCESSING=0", {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}, []),
    ("--max-num-seqs 16 --max-num-batched-tokens 512", {}, ["--max-num-seqs", "16", "--max-num-batched-tokens", "512"]),
    (
        "both of the above",
        {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
        ["--max-num-seqs", "16", "--max-num-batched-tokens", "512"],
    ),
]


@dataclass
class Server:
    """One vLLM server process (its own process group) and what was measured of it."""

    name: str
    model: Path
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    started: float
    ready_s: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(
    name: str, model: Path, logs: Path, env: dict[str, str] | None = None, args: list[str] | None = None
) -> Server:
    """Start a vLLM OpenAI server for ``model`` in its own process group."""
    port = free_port()
    log = logs / f"{name}-{port}.log"
    argv = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
    argv += ["--served-model-name", name, "--port", str(port), "--host", "127.0.0.1", *BASE_ARGS, *(args or [])]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **BASE_ENV, **(env or {})},
            start_new_session=True,
        )
    return Server(name, model, port, proc, log, time.perf_counter())


def wait_ready(server: Server, timeout_s: float = 240.0) -> float:
    """Seconds from process start to ``/health`` answering 200.

    Raises:
        RuntimeError: the server exited or did not answer in time (with the end of its log).
    """
    deadline = server.started + timeout_s
    while time.perf_counter() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited {server.proc.returncode}:\n{server.log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2.0).status_code == 200:
                server.ready_s = time.perf_counter() - server.started
                return server.ready_s
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{server.name} not ready after {timeout_s} s:\n{server.log.read_text()[-3000:]}")


def rss_mb(server: Server) -> float:
    """Resident memory of the server's whole process tree (API server and engine core), MB."""
    try:
        root = psutil.Process(server.proc.pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return round(total / 1e6, 1)


def stop(server: Server) -> None:
    """Stop the server's process group: SIGTERM, then SIGKILL after 15 s; nothing is left behind."""
    if server.proc.poll() is None:
        try:
            os.killpg(server.proc.pid, signal.SIGTERM)
            server.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait(timeout=15)
        except ProcessLookupError:
            pass
    with contextlib.suppress(ProcessLookupError):  # stragglers in the group (the engine core)
        os.killpg(server.proc.pid, signal.SIGKILL)


async def _shared_load(servers: list[Server], profile: LoadProfile, prompts: Any) -> list[LoadReport]:
    targets = [Target(s.url, s.name, extra_body=(("ignore_eos", True),)) for s in servers]
    return list(await asyncio.gather(*(load(t, profile, prompts) for t in targets)))


def measure_round(servers: list[Server], profile: LoadProfile, prompts: Any) -> dict[str, dict[str, Any]]:
    """Both servers under the same load at the same time: client and server TTFT per server."""
    before = {s.name: scrape(s.url) for s in servers}
    reports = asyncio.run(_shared_load(servers, profile, prompts))
    out: dict[str, dict[str, Any]] = {}
    for server, report in zip(servers, reports, strict=True):
        after = scrape(server.url)
        vllm = window_stats(before[server.name], after, TTFT)
        out[server.name] = {
            "client_ttft_p50_ms": report.ttft_ms.p50,
            "client_ttft_p95_ms": report.ttft_ms.p95,
            "vllm_ttft_p50_ms": vllm.p50,
            "vllm_ttft_p95_ms": vllm.p95,
            "requests": report.requests_total,
            "ok": report.successes,
            "errors": report.errors,
        }
    return out


def idle_ttft_ms(server: Server, prompts: Any, max_tokens: int, requests: int = 6) -> float | None:
    """Median client TTFT of ``requests`` sequential requests with nothing else sent: the service time."""
    profile = LoadProfile(
        concurrency=1, max_requests=requests, duration_s=60.0, warmup_s=0.0, max_tokens=max_tokens, api="completions"
    )
    target = Target(server.url, server.name, extra_body=(("ignore_eos", True),))
    return asyncio.run(load(target, profile, prompts)).ttft_ms.p50


def _median(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return round(statistics.median(values), 1) if values else None


def startup_variants(model: Path, logs: Path, rounds: int) -> dict[str, Any]:
    """v2's start time (median of ``rounds``) under each variant in VARIANTS, one server at a time."""
    results: dict[str, Any] = {}
    for label, env, args in VARIANTS:
        times = []
        for _ in range(rounds):
            server = start("v2", model, logs, env, args)
            try:
                times.append(round(wait_ready(server), 1))
            finally:
                stop(server)
        results[label] = {"start_s": statistics.median(times), "runs": times}
    return results


def bind_env(bind: str, core: int) -> dict[str, str]:
    """vLLM's OpenMP binding for a server: ``auto`` (vLLM's default: every server's compute on core 0, core 1
    reserved for its scheduler), ``split`` (this server's compute on its own core), ``nobind``."""
    if bind == "split":
        return {"VLLM_CPU_OMP_THREADS_BIND": str(core)}
    if bind == "nobind":
        return {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"}
    return {}


def summarize(server: Server, rows: list[dict[str, Any]], rss: list[float]) -> dict[str, Any]:
    return {
        "start_s": round(server.ready_s or 0.0, 1),
        "rss_mb_idle": rss[0],
        "rss_mb_max": max(rss),
        **{k: _median(rows, k) for k in rows[0] if k.endswith("_ms")},
        "rounds": rows,
    }


def parse_shape(text: str) -> tuple[int, int]:
    layers, _, width = text.partition("x")
    return int(layers), int(width or tinymodel.ARCH["intermediate_size"])


def compare(opts: argparse.Namespace, v2: Path, work: Path, result: dict[str, Any]) -> None:
    """Start v2, then each v3 shape in turn beside it; both under the same load; fills ``result``."""
    prompts = synthetic_prompts(opts.prompt_tokens, v2)
    profile = LoadProfile(
        rate=opts.rate,
        duration_s=opts.duration,
        warmup_s=3.0,
        prompt_tokens=opts.prompt_tokens,
        max_tokens=opts.max_tokens,
        api="completions",
    )
    started: list[Server] = []
    try:
        extra = dict(item.split("=", 1) for item in opts.env)
        stable = start("v2", v2, work, {**extra, **bind_env(opts.bind, 0)})
        started.append(stable)
        result["v2_start_s"] = round(wait_ready(stable), 1)
        stable_rss = [rss_mb(stable)]
        result["v2_idle_ttft_p50_ms"] = idle_ttft_ms(stable, prompts, opts.max_tokens)
        for shape in opts.v3:
            layers, width = parse_shape(shape)
            v3 = deepen(v2, work / f"v3-{shape}", layers, width)
            canary = start("v3", v3, work, {**extra, **bind_env(opts.bind, 1)})
            started.append(canary)
            wait_ready(canary)
            canary_rss = [rss_mb(canary)]
            idle = idle_ttft_ms(canary, prompts, opts.max_tokens)
            rounds = []
            for _ in range(opts.rounds):
                rounds.append(measure_round([stable, canary], profile, prompts))
                stable_rss.append(rss_mb(stable))
                canary_rss.append(rss_mb(canary))
            stop(canary)
            entry: dict[str, Any] = {
                "layers": layers,
                "intermediate": width,
                "v3_idle_ttft_p50_ms": idle,
                "v2": summarize(stable, [r["v2"] for r in rounds], stable_rss[-1 - opts.rounds :]),
                "v3": summarize(canary, [r["v3"] for r in rounds], canary_rss),
            }
            for source in ("client", "vllm"):
                a, b = entry["v2"][f"{source}_ttft_p95_ms"], entry["v3"][f"{source}_ttft_p95_ms"]
                entry[f"ttft_p95_ratio_{source}"] = round(b / a, 2) if a and b else None
            result["candidates"][shape] = entry
    finally:
        for server in started:
            stop(server)
    left = [s.proc.pid for s in started if s.proc.poll() is None]
    assert not left, f"servers left running: {left}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = f"{tinymodel.SLOW_LAYERS}x{tinymodel.SLOW_INTERMEDIATE}"
    parser.add_argument(
        "--v3", nargs="*", default=[default], help="v3 shapes LAYERSxINTERMEDIATE to try in turn (none: starts only)"
    )
    parser.add_argument("--bind", choices=["auto", "split", "nobind"], default="auto", help="OpenMP core binding")
    parser.add_argument("--env", nargs="*", default=[], help="KEY=VALUE for both servers' environment")
    parser.add_argument("--rate", type=float, default=1.5, help="requests/s sent to EACH server")
    parser.add_argument("--duration", type=float, default=40.0, help="seconds of measured load per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=90)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--startup-variants", action="store_true", help="also time v2's start under other flags")
    parser.add_argument("--startup-rounds", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    opts = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout's SIGTERM still stops the servers

    result: dict[str, Any] = {
        "load": {
            "rate_per_server": opts.rate,
            "duration_s": opts.duration,
            "rounds": opts.rounds,
            "prompt_tokens": opts.prompt_tokens,
            "max_tokens": opts.max_tokens,
            "stream": True,
            "ignore_eos": True,
        },
        "bind": opts.bind,
        "env": opts.env,
        "cores": os.cpu_count(),
        "candidates": {},
    }
    with tempfile.TemporaryDirectory(prefix="sandbox-models-") as tmp:
        work = Path(tmp)
        v2 = tinymodel.build(work / "v2").path
        if opts.startup_variants:
            result["startup_variants"] = startup_variants(v2, work, opts.startup_rounds)
        if opts.v3:
            compare(opts, v2, work, result)
    if opts.json:
        print(json.dumps(result, indent=2))
        return 0
    for shape, entry in result["candidates"].items():
        print(f"v3 = {shape}:")
        for key in ("v2", "v3"):
            r = entry[key]
            print(
                f"  {key}: start {r['start_s']} s, RSS {r['rss_mb_max']} MB, TTFT p50/p95 client "
                f"{r['client_ttft_p50_ms']}/{r['client_ttft_p95_ms']} ms, vLLM {r['vllm_ttft_p50_ms']}/"
                f"{r['vllm_ttft_p95_ms']} ms"
            )
        print(f"  TTFT p95 v3/v2: client {entry['ttft_p95_ratio_client']}, vLLM {entry['ttft_p95_ratio_vllm']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
