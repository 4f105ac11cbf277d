"""Our load generator against its peers, on the same local streaming servers, in one run.

Goals (issue 5): added latency at most 1 ms at a low rate; at least 1,500 req/s sustained within 5 % of the
target on 2 cores (at least 6 times guidellm's); TTFT within 1 ms + 2 % of a server's known delay; start-up
under 1 s. Clients: modelctl (pipeline.loadtest), bare aiohttp and bare httpx (the same open-loop driver,
no reporting), and, from benchmarks/.peers-venv (created on first use: they conflict with the project's pins),
guidellm and locust. Servers: tests/loadservers.py in its own process, one instant and one with a fixed
delay before the first token.

    .venv/bin/python benchmarks/loadgen.py --json            # everything (several minutes)
    .venv/bin/python benchmarks/loadgen.py --json --quick    # fewer rates, our clients only
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / "benchmarks" / ".peers-venv"
MODEL = "tiny-test-model"
DELAY_S = 0.050
RATES = [100, 250, 500, 1000, 1500, 2000, 2500, 3000, 4000]


# --- clients, each run as its own process: `loadgen.py client NAME URL RATE SECONDS` prints one JSON line -----


def _client_modelctl(url: str, rate: float, seconds: float) -> dict[str, Any]:
    from pipeline.config import LoadProfile
    from pipeline.loadtest import Target, run_load, synthetic_prompts

    max_requests = 1 if seconds == 0 else None
    profile = LoadProfile(
        rate=rate, duration_s=max(seconds, 0.001), warmup_s=0, max_tokens=8, max_requests=max_requests
    )
    report = run_load(Target(url, MODEL), profile, synthetic_prompts(16), timeout_s=30)
    return {
        "n": report.requests_total,
        "errors": report.requests_total - report.successes,
        "achieved": report.achieved_rate,
        "ttft_ms": report.ttft_ms.p50,
        "e2e_ms": report.e2e_ms.p50,
    }


async def _bare(url: str, rate: float, seconds: float, kind: str) -> dict[str, Any]:
    """The thinnest open-loop streaming client: send at the due times, time the first content chunk and the end."""
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi " * 16}], "max_tokens": 8,
                       "stream": True}).encode()  # fmt: skip
    full = url + "/v1/chat/completions"
    ttft: list[float] = []
    e2e: list[float] = []
    ends: list[float] = []
    errors = 0

    async def one_aiohttp(session: Any) -> None:
        nonlocal errors
        start = time.perf_counter()
        first = None
        try:
            async with session.post(full, data=body, headers={"content-type": "application/json"}) as resp:
                async for line in resp.content:
                    if first is None and b'"content"' in line:
                        first = time.perf_counter()
        except Exception:
            errors += 1
            return
        end = time.perf_counter()
        ttft.append((first or end) - start)
        e2e.append(end - start)
        ends.append(end)

    async def one_httpx(client: Any) -> None:
        nonlocal errors
        start = time.perf_counter()
        first = None
        try:
            async with client.stream("POST", full, content=body, headers={"content-type": "application/json"}) as r:
                async for line in r.aiter_lines():
                    if first is None and '"content"' in line:
                        first = time.perf_counter()
        except Exception:
            errors += 1
            return
        end = time.perf_counter()
        ttft.append((first or end) - start)
        e2e.append(end - start)
        ends.append(end)

    if kind == "aiohttp":
        import aiohttp

        client: Any = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        one: Any = one_aiohttp
    else:
        import httpx

        client = httpx.AsyncClient(limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))
        one = one_httpx
    n = 1 if seconds == 0 else int(rate * seconds)
    t0 = time.perf_counter()
    tasks = []
    async with client:
        for i in range(n):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(client)))
        await asyncio.gather(*tasks)
    ends.sort()
    achieved = (len(ends) - 1) / (ends[-1] - ends[0]) if len(ends) > 1 and ends[-1] > ends[0] else None
    return {
        "n": n,
        "errors": errors,
        "achieved": achieved,
        "ttft_ms": statistics.median(ttft) * 1000 if ttft else None,
        "e2e_ms": statistics.median(e2e) * 1000 if e2e else None,
    }


def _raw_socket(url: str, rate: float, seconds: float) -> dict[str, Any]:
    """The floor: one blocking keep-alive socket, one request at a time. What the server and the wire cost."""
    import socket

    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi " * 16}], "max_tokens": 8,
                       "stream": True}).encode()  # fmt: skip
    head = f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
    request = head.encode() + b"content-length: %d\r\n\r\n" % len(body) + body
    sock = socket.create_connection((host, int(port)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    ttft: list[float] = []
    e2e: list[float] = []
    n = 1 if seconds == 0 else int(rate * seconds)
    t0 = time.perf_counter()
    for i in range(n):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        start = time.perf_counter()
        sock.sendall(request)
        got = b""
        first = None
        while not got.endswith(b"0\r\n\r\n"):
            got += sock.recv(65536)
            if first is None and b'"content"' in got:
                first = time.perf_counter()
        end = time.perf_counter()
        ttft.append((first or end) - start)
        e2e.append(end - start)
    sock.close()
    return {"n": n, "errors": 0, "achieved": None, "ttft_ms": statistics.median(ttft) * 1000,
            "e2e_ms": statistics.median(e2e) * 1000}  # fmt: skip


def _client_main(name: str, url: str, rate: float, seconds: float) -> None:
    if name == "modelctl":
        result = _client_modelctl(url, rate, seconds)
    elif name == "raw-socket":
        result = _raw_socket(url, rate, seconds)
    else:
        result = asyncio.run(_bare(url, rate, seconds, name.removeprefix("bare-")))
    print(json.dumps(result), flush=True)


# --- peers from the separate venv ------------------------------------------------------------------------

LOCUSTFILE = """
import json, time
from locust import FastHttpUser, constant_throughput, task, events
BODY = json.dumps({"model": "%s", "messages": [{"role": "user", "content": "hi " * 16}], "max_tokens": 8,
                   "stream": True})
RESULTS = []
class Streamer(FastHttpUser):
    wait_time = constant_throughput(%f)
    @task
    def chat(self):
        start = time.perf_counter()
        first = None
        with self.client.post("/v1/chat/completions", data=BODY, headers={"content-type": "application/json"},
                              stream=True, catch_response=True) as resp:
            while True:
                chunk = resp.stream.read(4096)
                if not chunk:
                    break
                if first is None and b'"content"' in chunk:
                    first = time.perf_counter()
            end = time.perf_counter()
            RESULTS.append(((first or end) - start, end - start, end))
@events.quitting.add_listener
def dump(environment, **kw):
    with open("%s", "w") as f:
        json.dump(RESULTS, f)
"""


def peers_venv(log: list[str]) -> Path | None:
    """benchmarks/.peers-venv with guidellm and locust (created on first use); None when it cannot be made."""
    python = PEERS / "bin" / "python"
    if not (PEERS / "bin" / "guidellm").exists() or not (PEERS / "bin" / "locust").exists():
        try:
            subprocess.run([sys.executable, "-m", "venv", str(PEERS)], check=True)
            pip = [str(python), "-m", "pip", "install", "--quiet"]
            subprocess.run([*pip, "torch==2.13.0"], check=False)  # the CPU wheel from find-links, if offered
            subprocess.run([*pip, "guidellm", "locust"], check=True)
        except (subprocess.CalledProcessError, OSError) as exc:
            log.append(f"peers venv unavailable: {exc}")
            return None
    return PEERS


def _run_locust(venv: Path, url: str, rate: float, seconds: float) -> dict[str, Any]:
    users = max(1, min(int(rate / 20), 200))  # each user paces itself to rate/users
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.json"
        file = Path(tmp) / "locustfile.py"
        file.write_text(LOCUSTFILE % (MODEL, rate / users, out))
        cmd = [str(venv / "bin" / "locust"), "-f", str(file), "--headless", "-u", str(users), "-r", str(users),
               "-t", f"{max(int(seconds), 1)}s", "--host", url, "--only-summary", "--stop-timeout", "5"]  # fmt: skip
        subprocess.run(cmd, capture_output=True, timeout=seconds + 90, check=False)
        rows = json.loads(out.read_text()) if out.exists() else []
    ends = sorted(r[2] for r in rows)
    achieved = (len(ends) - 1) / (ends[-1] - ends[0]) if len(ends) > 1 and ends[-1] > ends[0] else None
    return {
        "n": len(rows),
        "errors": None,
        "achieved": achieved,
        "ttft_ms": statistics.median(r[0] for r in rows) * 1000 if rows else None,
        "e2e_ms": statistics.median(r[1] for r in rows) * 1000 if rows else None,
    }


def _run_guidellm(venv: Path, url: str, rate: float, seconds: float, tokenizer: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        cmd = [str(venv / "bin" / "guidellm"), "run",
               "--backend", f"kind=openai_http,target={url},model={MODEL}",
               "--profile", f"kind=constant,rate={rate}",
               "--constraint", f"kind=max_duration,seconds={max(seconds, 1)}",
               "--tokenizer", f"kind=huggingface_auto,model={tokenizer}",
               "--data", "kind=synthetic_text,prompt_tokens=16,output_tokens=8",
               "--output", f"kind=json,path={out}", "--disable-console-interactive"]  # fmt: skip
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "GUIDELLM__LOGGING__DISABLED": "1"}
        started = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 180, check=False, env=env)
        wall = time.perf_counter() - started
        if not out.exists():
            return {"n": 0, "errors": None, "achieved": None, "ttft_ms": None, "e2e_ms": None, "wall_s": wall,
                    "failure": (proc.stderr or proc.stdout)[-600:]}  # fmt: skip
        data = json.loads(out.read_text())
    return {**_guidellm_figures(data), "wall_s": wall - 1.0 if seconds == 0 else wall}  # start-up: less the 1 s run


def _guidellm_figures(data: dict[str, Any]) -> dict[str, Any]:
    """Read guidellm's JSON report (benchmarks[0].metrics) into the same figures."""
    bench = data["benchmarks"][0]
    metrics = bench["metrics"]

    def median(name: str) -> float | None:
        return _stat(metrics, name, "median")

    totals = metrics.get("request_totals") or {}
    return {
        "n": totals.get("total") or totals.get("successful"),
        "errors": totals.get("errored"),
        "achieved": _stat(metrics, "requests_per_second", "mean"),
        "ttft_ms": median("time_to_first_token_ms"),
        "e2e_ms": (median("request_latency") or 0) * 1000 or None,
    }


def _stat(metrics: dict[str, Any], name: str, which: str) -> float | None:
    try:
        return float(metrics[name]["successful"][which])
    except (KeyError, TypeError, ValueError):
        return None


# --- the run ---------------------------------------------------------------------------------------------


def _server(*args: str) -> tuple[subprocess.Popen[str], str]:
    cmd = [sys.executable, str(ROOT / "tests" / "loadservers.py"), "--lenient", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    return proc, line.split()[1]


def _ours(name: str, url: str, rate: float, seconds: float) -> dict[str, Any]:
    started = time.perf_counter()
    cmd = [sys.executable, __file__, "client", name, url, str(rate), str(seconds)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120, check=True, cwd=ROOT)
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "wall_s": time.perf_counter() - started}


def measure(runners: dict[str, Any], instant: str, delayed: str, repeats: dict[str, int]) -> dict[str, Any]:
    """The figures for every client, interleaved (each phase runs every client back to back, so that load from
    elsewhere on the machine falls on all of them alike): latency at a low rate, TTFT on the delayed server,
    start-up, then the rate ladder until each client falls below 95 % of its target."""
    low: dict[str, list[Any]] = {n: [] for n in runners}
    delay: dict[str, list[Any]] = {n: [] for n in runners}
    start: dict[str, list[Any]] = {n: [] for n in runners}
    for i in range(max(repeats.values())):
        for name, run in runners.items():
            if i < repeats[name]:
                low[name].append(run(instant, 20, 3)["e2e_ms"])
                delay[name].append(run(delayed, 20, 3)["ttft_ms"])
                start[name].append(run(instant, 20, 0)["wall_s"])
    sustained = dict.fromkeys(runners, 0)
    steps: dict[str, list[Any]] = {n: [] for n in runners}
    climbing = [n for n in runners if n != "raw-socket"]  # one blocking socket has no rate to climb
    for rate in RATES:
        for name in list(climbing):
            r = runners[name](instant, rate, 3)
            ok = r["achieved"] is not None and r["achieved"] >= 0.95 * rate and not r.get("errors")
            steps[name].append({"target": rate, "achieved": r["achieved"] and round(r["achieved"], 1), "ok": ok})
            if ok:
                sustained[name] = rate
            else:
                climbing.remove(name)
    return {
        name: {
            "e2e_low_rate_ms": _med(low[name]),
            "ttft_delayed_ms": _med(delay[name]),
            "ttft_minus_delay_ms": _diff(_med(delay[name]), DELAY_S * 1000),
            "startup_s": _med(start[name]),
            "sustained_rps": sustained[name],
            "rate_steps": steps[name],
        }
        for name in runners
    }


def _med(values: list[Any]) -> float | None:
    clean = [v for v in values if v is not None]
    return round(statistics.median(clean), 3) if clean else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="our clients only (no peers venv)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokenizer", type=Path, help="tokenizer dir for guidellm (default: the small model)")
    args = parser.parse_args()
    log: list[str] = []
    runners: dict[str, Any] = {
        name: (lambda u, r, s, n=name: _ours(n, u, r, s))
        for name in ("raw-socket", "modelctl", "bare-aiohttp", "bare-httpx")
    }
    repeats = dict.fromkeys(runners, args.repeats)
    venv = None if args.quick else peers_venv(log)
    if venv is not None:
        tokenizer = args.tokenizer
        if tokenizer is None:
            from pipeline import tinymodel

            tokenizer = tinymodel.build().path
        runners["locust"] = lambda u, r, s: (
            _run_locust(venv, u, r, s) | {"wall_s": _timed_locust(venv, u) if s == 0 else 0}
        )
        runners["guidellm"] = lambda u, r, s: _run_guidellm(venv, u, r, s, tokenizer)
        repeats |= {"locust": args.repeats, "guidellm": 1}  # guidellm: ~25 s a run
    instant_proc, instant = _server("--tokens", "8")
    delayed_proc, delayed = _server("--tokens", "8", "--ttft-delay", str(DELAY_S))
    try:
        results = measure(runners, instant, delayed, repeats)
    finally:
        instant_proc.terminate()
        delayed_proc.terminate()
    floor = results.pop("raw-socket")
    allowed = 1 + 0.02 * DELAY_S * 1000
    for r in results.values():
        r["added_latency_ms"] = _diff(r["e2e_low_rate_ms"], floor["e2e_low_rate_ms"])
        r["ttft_error_ms"] = _diff(r["ttft_delayed_ms"], floor["ttft_delayed_ms"])
        r["goals"] = {
            "added_latency<=1ms": r["added_latency_ms"] is not None and r["added_latency_ms"] <= 1.0,
            "sustained>=1500": r["sustained_rps"] >= 1500,
            "ttft_error<=1ms+2%": r["ttft_error_ms"] is not None and abs(r["ttft_error_ms"]) <= allowed,
            "startup<1s": r["startup_s"] is not None and r["startup_s"] < 1.0,
        }
    summary: dict[str, Any] = {
        "cores": os.cpu_count(),
        "delay_ms": DELAY_S * 1000,
        "ttft_allowed_error_ms": allowed,
        "floor_raw_socket": floor,
        "clients": results,
        "log": log,
    }
    if results.get("guidellm", {}).get("sustained_rps"):
        summary["modelctl_vs_guidellm_rate"] = round(
            results["modelctl"]["sustained_rps"] / results["guidellm"]["sustained_rps"], 2
        )
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"{'client':14} {'added ms':>9} {'sustained':>10} {'ttft err ms':>12} {'start s':>8}")
    for name, r in results.items():
        print(f"{name:14} {r['added_latency_ms']!s:>9} {r['sustained_rps']!s:>10} {r['ttft_error_ms']!s:>12} "
              f"{r['startup_s']!s:>8}")  # fmt: skip


def _diff(value: float | None, floor: float | None) -> float | None:
    return None if value is None or floor is None else round(value - floor, 3)


def _timed_locust(venv: Path, url: str) -> float:
    """Start-up: the wall time of a 1 s locust run, less that second."""
    started = time.perf_counter()
    _run_locust(venv, url, 1, 1)
    return time.perf_counter() - started - 1.0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "client":
        sys.path.insert(0, str(ROOT))
        _client_main(sys.argv[2], sys.argv[3], float(sys.argv[4]), float(sys.argv[5]))
    else:
        main()
