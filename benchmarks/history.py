"""`history` and `current` on a GitOps repo with 10,000 promotion commits (goal: each under 0.5 s).

The repo is built with ``git fast-import``: every commit edits an environment's values file and adds its
PromotionRecord, with the trailers the pipeline writes, cycling over three environments. Then a clone is opened
with ``GitOps.open`` and each call is timed several times; the figures are medians. The peer, measured in the same
run, is a bare ``git log`` over the same commits: the floor any trailer reader pays.

    .venv/bin/python benchmarks/history.py --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.gitops import GitOps, init_repo  # noqa: E402
from pipeline.record import PromotionRecord, new_promotion_id  # noqa: E402

ENVS = ("prod", "staging", "local")
GOAL_S = 0.5


def build(remote: Path, commits: int) -> None:
    """Append ``commits`` promotion commits to the template repo at ``remote`` with one fast-import."""
    init_repo(remote)
    values = {env: (ROOT / "gitops" / "envs" / env / "values.yaml").read_text() for env in ENVS}
    start_ms = int(time.time() * 1000) - commits * 1000
    chunks: list[bytes] = []

    def data(text: str) -> None:
        raw = text.encode()
        chunks.append(b"data %d\n%s\n" % (len(raw), raw))

    for i in range(commits):
        env, pid, sha = ENVS[i % len(ENVS)], new_promotion_id(start_ms + i * 1000), f"{i:040x}"
        artifact = f"model-awq-{i:06d}"
        text = (
            values[env].replace('artifact: ""', f'artifact: "{artifact}"').replace('revision: ""', f'revision: "{sha}"')
        )
        record = PromotionRecord(id=pid, env=env, decision="promoted", artifact={"id": artifact}, model={"sha": sha})
        message = (
            f"promote({env}): org/model@{sha[:12]} awq-w4a16 {artifact}\n\nPromotion-Id: {pid}\nEnvironment: {env}\n"
            f"Action: promote\nModel: org/model\nRevision: {sha}\nArtifact: {artifact}\nFormat: awq-w4a16\n"
            f"Eval: pass: fact_recall 0.99\nLatency: pass: ttft_p95 120 ms\n"
        )
        stamp = (start_ms + i * 1000) // 1000
        chunks.append(b"commit refs/heads/main\n")
        chunks.append(b"committer modelctl <modelctl@localhost> %d +0000\n" % stamp)
        data(message)
        if i == 0:
            chunks.append(b"from refs/heads/main^0\n")
        chunks.append(f"M 100644 inline envs/{env}/values.yaml\n".encode())
        data(text)
        chunks.append(f"M 100644 inline records/{env}/{pid}.json\n".encode())
        data(record.to_json())
    subprocess.run(["git", "-C", str(remote), "fast-import", "--quiet"], input=b"".join(chunks), check=True)


def median_s(call: Callable[[], Any], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commits", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--json", action="store_true", help="print one JSON object of figures")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="modelctl-bench-history-") as tmp:
        remote, work = Path(tmp) / "remote.git", Path(tmp) / "work"
        started = time.perf_counter()
        build(remote, args.commits)
        build_s = time.perf_counter() - started
        repo = GitOps.open(str(remote), work)
        entries = repo.history("prod")
        assert len(entries) == (args.commits + 2) // 3, len(entries)
        latest = repo.current("local")
        assert latest is not None and latest.env == "local"
        figures = {
            "commits": args.commits,
            "runs": args.runs,
            "history_all_s": median_s(lambda: repo.history("prod"), args.runs),
            "history_all_entries": len(entries),
            "history_20_s": median_s(lambda: repo.history("prod", limit=20), args.runs),
            "current_s": median_s(lambda: repo.current("staging"), args.runs),
            "current_worst_env_s": max(median_s(lambda e=env: repo.current(e), args.runs) for env in ENVS),
            "peer_git_log_s": median_s(
                lambda: subprocess.run(["git", "-C", str(work), "log", "--format=%H"], capture_output=True, check=True),
                args.runs,
            ),
            "goal_s": GOAL_S,
            "build_s": round(build_s, 2),
        }
        figures["ratio_history_all_vs_git_log"] = figures["history_all_s"] / figures["peer_git_log_s"]
        figures["met"] = max(figures["history_all_s"], figures["current_worst_env_s"]) < GOAL_S
    if args.json:
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}))
        return
    for key, value in figures.items():
        print(f"{key:30} {value:.4f}" if isinstance(value, float) else f"{key:30} {value}")


if __name__ == "__main__":
    main()
