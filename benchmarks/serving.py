"""vLLM against `transformers serve` on the same artifact and load; lm-eval through vLLM against in-process HF.

Goal (issue 13): the gates measure the engine production runs, at a cost this machine can carry. For each
engine: start-up time (spawn to /health), peak RSS of the whole server process tree, output tokens/s and TTFT
p95 under the same closed-loop load. Then the smoke suite through vLLM (server start included) against
lm-eval's in-process HF run: wall time and the score difference per metric.

    .venv/bin/python benchmarks/serving.py --json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from pipeline import tinymodel
from pipeline.config import LoadProfile
from pipeline.evaluate import LocalWeights, evaluate, load_suite
from pipeline.evaluate.endpoint import evaluate_served
from pipeline.loadtest import synthetic_prompts
from pipeline.loadtest.served import measure
from pipeline.serve import Engine, local_server


class PeakRss:
    """Samples the resident memory of a process and all its descendants until stopped; keeps the peak."""

    def __init__(self) -> None:
        self.peak = 0
        self._pid = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def watch(self, pid: int) -> None:
        self._pid = pid
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            try:
                root = psutil.Process(self._pid)
                tree = [root, *root.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in tree))
            except psutil.Error:
                continue

    def stop(self) -> float:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        return round(self.peak / 2**30, 2)


def _engine(engine: Engine, model: Path, profile: LoadProfile, logs: Path) -> dict[str, Any]:
    rss = PeakRss()
    prompts = synthetic_prompts(profile.prompt_tokens, model)
    with local_server(model, engine=engine, log_dir=logs, continuous_batching=True) as server:
        rss.watch(server.pid)
        # the same requests for both engines (the small model stops after ~1 token on synthetic prompts)...
        report = measure(server, profile, prompts, ignore_eos=False)
        # ...and, on vLLM only (transformers serve has no such field), every request decoding max_tokens
        full = measure(server, profile, prompts) if engine == "vllm" else None
    figures: dict[str, Any] = {
        "served_by": server.served_by,
        "startup_s": server.startup_s,
        "peak_rss_gib": rss.stop(),
        "output_tokens_per_s": report.output_tokens_per_s,
        "output_tokens_mean": report.output_tokens.mean,
        "ttft_p95_ms": report.ttft_ms.p95,
        "e2e_p95_ms": report.e2e_ms.p95,
        "errors": report.errors,
    }
    if full is not None:
        figures["ignore_eos"] = {
            "output_tokens_per_s": full.output_tokens_per_s,
            "output_tokens_mean": full.output_tokens.mean,
            "ttft_p95_ms": full.ttft_ms.p95,
            "server_ttft_p95_ms": full.server.ttft_ms.p95 if full.server else None,
            "server_itl_p50_ms": full.server.itl_ms.p50 if full.server else None,
            "server_requests": full.server.requests if full.server else None,
        }
    return figures


def _eval(model: Path, logs: Path) -> dict[str, Any]:
    suite = load_suite("smoke")
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        hf = evaluate(LocalWeights(model), suite, cache_dir=Path(tmp) / "hf")
        hf_s = time.perf_counter() - started
        started = time.perf_counter()
        served = evaluate_served(model, suite, cache_dir=Path(tmp) / "vllm", log_dir=logs)
        vllm_s = time.perf_counter() - started
    diffs = {}
    for task, spec in suite.tasks.items():
        for metric in spec.metrics:
            ours, theirs = hf.metric(task, metric), served.metric(task, metric)
            if ours is not None and theirs is not None:
                diffs[f"{task} {metric}"] = {"hf": ours.value, "vllm": theirs.value, "stderr_hf": ours.stderr}
    return {"hf_in_process_s": round(hf_s, 1), "vllm_served_s": round(vllm_s, 1), "scores": diffs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--json", action="store_true", help="print one JSON object of figures")
    args = parser.parse_args()
    model = tinymodel.build().path
    profile = LoadProfile(
        concurrency=args.concurrency, max_requests=args.requests, warmup_s=0, prompt_tokens=64, max_tokens=32,
        duration_s=600, api="completions",
    )  # fmt: skip
    figures: dict[str, Any] = {"cpu_count": os.cpu_count(), "requests": args.requests, "concurrency": args.concurrency}
    with tempfile.TemporaryDirectory() as tmp:
        engines: tuple[Engine, ...] = ("vllm", "transformers")
        for engine in engines:
            figures[engine] = _engine(engine, model, profile, Path(tmp) / engine)
        figures["eval_smoke"] = _eval(model, Path(tmp) / "eval")
    if args.json:
        sys.stdout.write(json.dumps(figures) + "\n")
    else:
        sys.stdout.write(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
