"""How fast a failed canary is rolled back: from the failed check to Rollout aborted, revert pushed, refresh asked.

Goals (issue 7): 1 s, 2 s, 2 s. For scale: without the refresh annotation Argo CD notices a commit only at its
next poll (120 s + up to 60 s of jitter), and Flagger rolls back after interval x threshold failed checks.

Each run: a fresh bare GitOps repo from the template, a promotion committed and pushed, the fake Kubernetes API
(real HTTP, the official client) with the Argo simulators, the canary synced and paused at its first step;
then `pipeline.canary.revert` runs as it does right after a failed check, and its stage timings are read.
The peer is the same revert done by hand with the git CLI (`git revert` + `git push`) in the same run.

    .venv/bin/python benchmarks/rollback.py --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from pipeline.canary import revert  # noqa: E402
from pipeline.config import ArgoCDApp, CanaryPolicy, RolloutRef, load_config  # noqa: E402
from pipeline.gitops import GitOps, Promotion, init_repo  # noqa: E402
from pipeline.kube import Backoff, Kube  # noqa: E402
from sandbox.cluster import FakeCluster, rollout_manifest  # noqa: E402

VALUES = "envs/staging/values.yaml"
STEPS = [{"setWeight": 10}, {"pause": {}}, {"setWeight": 100}]


def one_run(work: Path, n: int) -> dict[str, float]:
    env = load_config(ROOT / "examples" / "cluster" / "promotion.yaml").environment("staging")
    env = env.model_copy(
        update={
            "argocd": ArgoCDApp(application="llm-inference-staging"),
            "rollout": RolloutRef(name="llm-inference", namespace="llm-staging"),
            "canary": CanaryPolicy(sync_timeout_s=30, step_timeout_s=30),
        }
    )
    remote = work / f"remote-{n}.git"
    init_repo(remote)
    gitops = GitOps.open(str(remote), work / f"work-{n}")
    cluster = FakeCluster()
    try:
        cluster.create_rollout("llm-staging", rollout_manifest("llm-inference", STEPS))
        cluster.with_argocd(str(remote)).add_application(
            "llm-inference-staging", VALUES, "llm-staging", "llm-inference"
        )
        cluster.tick()
        kube = Kube(cluster.api_client, Backoff(first_s=0.01, max_s=0.05))
        promotion = Promotion(env="staging", model="org/m", revision="a" * 40, artifact=f"art-{n:04d}")
        commit = gitops.promote(promotion, VALUES).commit
        assert env.argocd is not None
        kube.request_refresh(env.argocd)
        with cluster.running():
            kube.wait_synced(env.argocd, commit, 30)
            result = revert(kube, gitops, "staging", env, promotion.id, "benchmark: canary check failed")
        # the peer: the same Git work by hand, on a second promotion
        peer_promotion = Promotion(env="staging", model="org/m", revision="b" * 40, artifact=f"peer-{n:04d}")
        gitops.promote(peer_promotion, VALUES)
        clone = work / f"peer-{n}"
        subprocess.run(["git", "clone", "-q", str(remote), str(clone)], check=True)
        start = time.perf_counter()
        subprocess.run(["git", "-C", str(clone), "revert", "--no-edit", "HEAD"], check=True, capture_output=True)
        subprocess.run(["git", "-C", str(clone), "push", "-q", "origin", "HEAD:main"], check=True, capture_output=True)
        result.timings["peer_git_revert_push_s"] = round(time.perf_counter() - start, 4)
        return result.timings
    finally:
        cluster.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rollback-bench-") as tmp:
        runs = [one_run(Path(tmp), n) for n in range(args.runs)]
    median = {key: round(statistics.median(r[key] for r in runs), 4) for key in runs[0]}
    result = {
        "runs": args.runs,
        "median_s": median,
        "goals_s": {"aborted_s": 1.0, "revert_pushed_s": 2.0, "refresh_requested_s": 2.0},
        "met": median["aborted_s"] <= 1 and median["revert_pushed_s"] <= 2 and median["refresh_requested_s"] <= 2,
        "push_vs_git_cli": round(
            (median["revert_pushed_s"] - median["aborted_s"]) / median["peer_git_revert_push_s"], 2
        ),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for key, value in median.items():
        print(f"{key:26} {value * 1000:8.1f} ms")
    print("goals met" if result["met"] else "goals NOT met")


if __name__ == "__main__":
    main()
