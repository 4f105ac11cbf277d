"""Wall time of the smoke suite on the small model: cold (empty result cache) and cached, in-process and via the CLI.

Goal (issue 4): re-evaluating the same thing returns in about a second. Each round evaluates the small model on
the smoke suite with an empty cache (cold), then again (cached), and runs the peer: our own scorer
(``tinymodel.score``) on the same 120 questions, both ways, so the ratio says what lm-eval's machinery costs on
top. The CLI figures are whole `modelctl evaluate --json` processes (imports included), cold and cached. Figures
are medians over rounds.

    .venv/bin/python evaluations/benchmark.py --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from pipeline import tinymodel
from pipeline.evaluate import LocalWeights, evaluate, load_suite


def _timed(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def _cli(model: Path, cache: Path) -> float:
    cmd = [sys.executable, "-m", "pipeline", "evaluate", str(model), "--suite", "smoke", "--json"]
    env = {**os.environ, "MODELCTL_CACHE": str(cache)}
    started = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON object of figures")
    args = parser.parse_args()
    model = tinymodel.build().path
    suite = load_suite("smoke")
    cold, cached, peer, cli_cold, cli_cached = [], [], [], [], []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            cache = Path(tmp)
            run = partial(evaluate, LocalWeights(model), suite, cache_dir=cache)
            cold.append(_timed(run))
            cached.append(_timed(run))
            peer.append(_timed(partial(tinymodel.score, model)))
        with tempfile.TemporaryDirectory() as tmp:
            cli_cold.append(_cli(model, Path(tmp)))
            cli_cached.append(_cli(model, Path(tmp)))
    figures = {
        "rounds": args.rounds,
        "smoke_cold_s": round(statistics.median(cold), 3),
        "smoke_cached_s": round(statistics.median(cached), 4),
        "peer_tinymodel_score_s": round(statistics.median(peer), 3),
        "cold_vs_peer_ratio": round(statistics.median(cold) / statistics.median(peer), 2),
        "cli_cold_s": round(statistics.median(cli_cold), 3),
        "cli_cached_s": round(statistics.median(cli_cached), 3),
        "cpu_count": os.cpu_count(),
    }
    if args.json:
        sys.stdout.write(json.dumps(figures) + "\n")
    else:
        for key, value in figures.items():
            sys.stdout.write(f"{key:24} {value}\n")


if __name__ == "__main__":
    main()
