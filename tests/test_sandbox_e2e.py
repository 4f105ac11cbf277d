"""Promotions on the sandbox: the real chart synced by the Argo CD simulator, pods as real processes (vLLM, the
pipeline's Jobs), Services as real proxies, users sending traffic, the canary judged on vLLM's own metrics read
from a real Prometheus. Only the API server and the Argo controllers are simulated.

One sandbox for the module (its vLLM pods are the slow part), walked in order:
1. the first version: a whole promotion, every step a Job, up and Healthy, Git and the cluster agreeing;
2. a candidate as fast as stable: its canary passes the metrics check against stable and is promoted;
3. a slower candidate (a deeper copy with the same answers): TTFT p95 over the tolerance against stable -> abort ->
   revert -> Healthy on the old template;
4. a canary whose vLLM exits at start: CrashLoopBackOff -> ProgressDeadlineExceeded -> Degraded -> revert;
5. a values change that breaks the chart: the sync fails with Helm's error, nothing is applied, the commit is
   reverted;
and at the end, closing the sandbox leaves no process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.canary import deploy
from pipeline.checks import canary_checks
from pipeline.config import Environment, PromotionConfig, load_config
from pipeline.gitops import GitOps, Promotion, edit_values
from pipeline.kube import Kube
from pipeline.promotion import promote
from pipeline.record import RolloutOutcome
from pipeline.tinymodel import SLOW_INTERMEDIATE, SLOW_LAYERS, deepen
from sandbox.agreement import Agreement
from sandbox.agreement import check as agreement
from sandbox.box import RELEASE, SERVED_NAME, Sandbox, SandboxEnv, SandboxSettings
from sandbox.pods import HASH_LABEL, is_ready
from sandbox.store import BY_KIND

ROOT = Path(__file__).resolve().parent.parent
ENV = SandboxEnv()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (ROOT / ".venv-vllm" / "bin" / "python").exists(), reason="needs vLLM: `make vllm`"),
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="needs Prometheus: `make prometheus`"),
]


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    """One sandbox for the module, with users sending 2 requests/s through the users' Service."""
    sandbox = Sandbox(SandboxSettings(workdir=tmp_path_factory.mktemp("sandbox"), traffic_rps=2.0))
    sandbox.start()
    old = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = str(sandbox.kubeconfig)  # the pipeline's identity, as on a real cluster
    try:
        yield sandbox
    finally:
        sandbox.close()
        if old is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = old


@pytest.fixture(scope="module")
def cfg(box: Sandbox) -> PromotionConfig:
    return load_config(box.config)


@pytest.fixture(scope="module")
def repo(box: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> GitOps:
    return GitOps.open(str(box.gitops), tmp_path_factory.mktemp("gitops-work"))


def env_of(cfg: PromotionConfig) -> Environment:
    return cfg.environment(ENV.name)


def agree(box: Sandbox) -> Agreement:
    return agreement(box.admin_kubeconfig, box.gitops, ENV.name, ENV.values_file, ENV.application, ENV.namespace)


def rollout(box: Sandbox) -> dict[str, Any]:
    return box.store.get(BY_KIND["Rollout"], ENV.namespace, RELEASE)


def release_pods(box: Sandbox) -> list[dict[str, Any]]:
    items, _ = box.store.list(BY_KIND["Pod"], ENV.namespace)
    return [p for p in items if (p["metadata"].get("labels") or {}).get("app.kubernetes.io/name") == "llm-inference"]


def place(box: Sandbox, model: Path, artifact: str) -> None:
    """Put a model on the environment's cache volume under ``artifact`` (what the preload Job does)."""
    assert box.kubelet is not None
    shutil.copytree(model, box.kubelet.volume_dir(ENV.namespace, "model-cache") / artifact, dirs_exist_ok=True)


def commit_candidate(repo: GitOps, artifact: str) -> tuple[str, str]:
    """The pipeline's own promotion commit for ``artifact`` (already on the volume); (promotion id, commit)."""
    promotion = Promotion(
        env=ENV.name, model="local/tiny", revision="b" * 40, artifact=artifact, format="unquantized",
        quantization="none", served_name=SERVED_NAME,
    )  # fmt: skip
    return promotion.id, repo.promote(promotion, ENV.values_file).commit


def person_commit(box: Sandbox, work: Path, changes: dict[str, Any], message: str) -> str:
    """A person's commit to the environment's values (no pipeline trailers), pushed; returns its sha."""
    if not work.exists():
        subprocess.run(["git", "clone", "-q", str(box.gitops), str(work)], check=True)
    git = ["git", "-C", str(work), "-c", "user.name=person", "-c", "user.email=person@localhost"]
    subprocess.run([*git, "pull", "-q", "--ff-only", "origin", "main"], check=True)
    path = work / ENV.values_file
    path.write_text(edit_values(path.read_text(), changes))
    subprocess.run([*git, "commit", "-qam", message], check=True)
    subprocess.run([*git, "push", "-q", "origin", "HEAD:main"], check=True)
    return subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()


def walk(box: Sandbox, cfg: PromotionConfig, repo: GitOps, commit: str, promotion_id: str) -> RolloutOutcome:
    env = env_of(cfg)
    return deploy(Kube.connect(), repo, ENV.name, env, commit, promotion_id, canary_checks(ENV.name, env, SERVED_NAME))


def checks_of(outcome: RolloutOutcome) -> list[dict[str, Any]]:
    return [
        {"verdict": e.verdict, "weight": e.weight, **(e.figures or {})} for e in outcome.steps if e.action == "check"
    ]


def test_the_first_version_is_promoted_through_jobs_and_comes_up_healthy(
    box: Sandbox, cfg: PromotionConfig, tiny_model: Path, tmp_path: Path
) -> None:
    record = promote(cfg, ENV.name, str(tiny_model), method="none", workdir=tmp_path / "work")
    assert record.decision == "promoted", record.reason
    assert record.rollout is not None and record.rollout.final == "done", record.rollout
    assert any("first version" in e.reason for e in record.rollout.steps), "nothing to compare: promoted in full"
    jobs, _ = box.store.list(BY_KIND["Job"], ENV.namespace)
    ran = {j["metadata"]["labels"]["modelctl.io/step"]: j for j in jobs}
    # the eval suite ran in the verify Job, against its vLLM sidecar: one vLLM start for both
    assert set(ran) == {"quantize", "publish", "preload", "verify"}, sorted(ran)
    assert record.eval_gate is not None and record.eval_gate.passed and record.eval_report is not None
    assert record.verify is not None and record.verify.eval_report is None, "the report is kept once, as eval_report"
    assert "evaluate" not in record.timings
    for step, job in ran.items():
        done = {c["type"] for c in (job.get("status") or {}).get("conditions") or [] if c["status"] == "True"}
        assert done == {"Complete"}, (step, job.get("status"))
    assert record.served_by and record.served_by.startswith("vllm"), "verify and the eval ran beside a vLLM sidecar"
    state = agree(box)
    assert state.agree, state.summary()
    assert record.artifact is not None and state.git_artifact == record.artifact.id
    ready = [p for p in release_pods(box) if is_ready(p)]
    assert [p["metadata"]["labels"][HASH_LABEL] for p in ready] == [rollout(box)["status"]["stableRS"]]


def test_a_canary_as_fast_as_stable_passes_on_prometheus_and_is_promoted(
    box: Sandbox, cfg: PromotionConfig, repo: GitOps, tiny_model: Path
) -> None:
    place(box, tiny_model, "unquantized-same-speed")
    promotion_id, commit = commit_candidate(repo, "unquantized-same-speed")
    outcome = walk(box, cfg, repo, commit, promotion_id)
    assert outcome.final == "done", outcome.reason
    checks = checks_of(outcome)
    passed = [c for c in checks if c["verdict"] == "pass"]
    assert len(passed) >= env_of(cfg).canary.consecutive_passes and all(c["weight"] == 50 for c in passed)
    ttft = "canary ttft_p95 vs stable"
    assert all(c[ttft] is not None and c[f"{ttft} baseline"] is not None for c in passed), "figures from Prometheus"
    state = agree(box)
    assert state.agree and state.git_artifact == "unquantized-same-speed", state.summary()


def test_a_slower_canary_breaches_its_ttft_tolerance_against_stable_and_is_reverted(
    box: Sandbox, cfg: PromotionConfig, repo: GitOps, tiny_model: Path, tmp_path: Path
) -> None:
    before = rollout(box)["spec"]["template"]
    deepen(tiny_model, tmp_path / "deep", SLOW_LAYERS, SLOW_INTERMEDIATE)  # the same answers, far more compute
    place(box, tmp_path / "deep", "unquantized-deeper")
    promotion_id, commit = commit_candidate(repo, "unquantized-deeper")
    outcome = walk(box, cfg, repo, commit, promotion_id)
    assert outcome.final == "reverted", outcome.reason
    assert "canary ttft_p95 vs stable" in outcome.reason, outcome.reason
    failed = [c for c in checks_of(outcome) if c["verdict"] == "fail"]
    ratio = env_of(cfg).canary.max_ttft_ratio_vs_stable
    canary_ms, stable_ms = failed[-1]["canary ttft_p95 vs stable"], failed[-1]["canary ttft_p95 vs stable baseline"]
    assert canary_ms > ratio * stable_ms, failed[-1]
    assert outcome.revert is not None and outcome.revert.aborted and outcome.revert.pushed
    assert rollout(box)["spec"]["template"] == before, "the Rollout runs the old template again"
    state = agree(box)
    assert state.agree and state.git_artifact == "unquantized-same-speed", state.summary()


def test_a_canary_whose_vllm_exits_goes_degraded_and_is_reverted(
    box: Sandbox, cfg: PromotionConfig, repo: GitOps, tiny_model: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    config = json.loads((broken / "config.json").read_text())
    config["architectures"] = ["NoSuchModelForCausalLM"]  # vLLM refuses it and exits
    (broken / "config.json").write_text(json.dumps(config))
    place(box, broken, "unquantized-broken")
    changes = {"model.artifact": "unquantized-broken", "progressDeadlineSeconds": 60}  # the schema's minimum
    sha = person_commit(box, tmp_path / "person", changes, "try the broken build, with a short progress deadline")
    outcome = walk(box, cfg, repo, sha, sha)
    assert outcome.final == "reverted", outcome.reason
    assert "Degraded" in outcome.reason and "progress" in outcome.reason.lower(), outcome.reason
    pod_logs = (box.workdir / "pods").glob(f"{ENV.namespace}_{RELEASE}-*.log")
    logs = [p.read_text(errors="replace") for p in pod_logs if p.is_file()]
    assert any("NoSuchModelForCausalLM" in text for text in logs), "the canary's vLLM itself refused and exited"
    assert not [p for p in release_pods(box) if "unquantized-broken" in json.dumps(p["spec"])], "its pods are gone"
    state = agree(box)
    assert state.agree and state.git_artifact == "unquantized-same-speed", state.summary()


def test_a_values_change_that_breaks_the_chart_fails_the_sync_applies_nothing_and_is_reverted(
    box: Sandbox, cfg: PromotionConfig, repo: GitOps, tmp_path: Path
) -> None:
    env = env_of(cfg)
    assert env.argocd is not None
    managed = ("Rollout", "Service", "PodMonitor", "AnalysisTemplate", "PersistentVolumeClaim")
    before = {k: [o["spec"] for o in box.store.list(BY_KIND[k], ENV.namespace)[0]] for k in managed}
    sha = person_commit(box, tmp_path / "person", {"replicas": "two"}, "two replicas, as a word")
    kube = Kube.connect()
    kube.request_refresh(env.argocd)

    def comparison_error() -> bool:
        app = box.store.get(BY_KIND["Application"], "argocd", ENV.application)
        return any(c.get("type") == "ComparisonError" for c in (app.get("status") or {}).get("conditions") or [])

    box.wait(comparison_error, 60, "Argo CD reports the chart does not render")
    time.sleep(1)  # a few more reconciles: still nothing applied
    after = {k: [o["spec"] for o in box.store.list(BY_KIND[k], ENV.namespace)[0]] for k in managed}
    assert after == before, "nothing of the broken render was applied"
    outcome = walk(box, cfg, repo, sha, sha)
    assert outcome.final == "reverted" and "replicas" in outcome.reason, outcome.reason
    state = agree(box)
    assert state.agree and state.git_artifact == "unquantized-same-speed", state.summary()


def test_closing_the_sandbox_leaves_no_process(box: Sandbox) -> None:
    assert box.kubelet is not None and box.prometheus is not None
    assert box.prometheus.proc is not None
    pids = [*box.kubelet.pids(), box.prometheus.proc.pid]
    assert len(pids) >= 2, "the sandbox runs processes: its vLLM pod and Prometheus"
    box.close()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower(), pid
