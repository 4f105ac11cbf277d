"""The promote flow end to end on the fake cluster: staging, then prod, to Healthy; a failing canary is reverted.

Everything is real but the cluster: the Prefect flow (test server), the GitOps repo (a bare remote from the
template), the quantized artifact and its eval report, the canary load checks against a streaming server. The
fake Kubernetes API (with Argo CD and Argo Rollouts simulated) is reached through a kubeconfig, as a real cluster
would be. The Jobs' pods are simulated: each prints, as its last log line, the StepResult the real step returned
when this test ran it here (tests/test_steps.py runs the Job's real entrypoint as a process).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from pipeline.cache import preload
from pipeline.errors import TerminalError
from pipeline.evaluate import LocalWeights, evaluate, load_suite
from pipeline.gitops import GitOps, Promotion, init_repo
from pipeline.quantize import Artifact
from pipeline.steps import StepResult, StoredArtifact, manifest_digest
from pipeline.verify import VerifyResult
from sandbox.cluster import FakeCluster, rollout_manifest
from sandbox.store import BY_KIND
from sandbox.workloads import JobPlan, add_gpu_node
from tests.loadservers import MODEL, Behaviour, running

ROOT = Path(__file__).resolve().parent.parent
STEPS = [{"setWeight": 50}, {"pause": {}}, {"setWeight": 100}]


@pytest.fixture
def world(tmp_path: Path, quantized: Callable[[str, str], Artifact], monkeypatch: pytest.MonkeyPatch) -> Iterator[dict]:
    remote = tmp_path / "gitops.git"
    init_repo(remote)
    cluster = FakeCluster()
    kubeconfig = cluster.write_kubeconfig(tmp_path / "kubeconfig")  # the pipeline ServiceAccount's token
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    argocd = cluster.with_argocd(str(remote))
    for env in ("staging", "prod"):
        cluster.create_rollout(f"llm-{env}", rollout_manifest("llm-inference", STEPS))
        argocd.add_application(f"llm-inference-{env}", f"envs/{env}/values.yaml", f"llm-{env}", "llm-inference")
    add_gpu_node(cluster.server, "gpu-1", {"cloud.google.com/gke-accelerator": "nvidia-l4"}, gpus=4)
    cluster.tick()
    # What the Jobs print: the real quantize, preload and evaluate results of the small model.
    artifact = quantized("llmcompressor", "gptq")
    entry = preload(Path(artifact.path), tmp_path / "pvc")
    report = evaluate(LocalWeights(Path(entry.path)), load_suite("smoke"))
    digest = manifest_digest(artifact)
    stored = StoredArtifact(artifact_id=artifact.id, manifest_digest=digest, uri="file:///models", files=artifact.files)
    # The verify Job's answer as its vLLM sidecar would give it (the sidecar itself is tested in test_vllm*.py).
    verified = VerifyResult(
        digest=digest, passed=True, served_by="vllm 0.32.0", args_sha256="", completion=" Paris",
        prompt_logprobs=4, verified_at=datetime.now(UTC).isoformat(),
    )  # fmt: skip
    outputs = {"quantize": artifact, "publish": stored, "preload": entry, "verify": verified, "evaluate": report}
    for step, output in outputs.items():
        result = StepResult[type(output)](  # type: ignore[misc]
            step=step, status="succeeded", started_at=datetime.now(UTC), seconds=1.0, output=output
        )
        cluster.jobs.plan(f"modelctl-{step}", JobPlan(log=f"working\n{result.model_dump_json()}\n"))
    try:
        yield {"cluster": cluster, "remote": remote, "tmp": tmp_path, "artifact": artifact}
    finally:
        cluster.close()


def config_for(world: dict, endpoint: str, duration_s: float = 0.6, concurrency: int = 4) -> str:
    cfg = yaml.safe_load((ROOT / "examples" / "cluster" / "promotion.yaml").read_text())
    cfg["gitops"]["url"] = str(world["remote"])
    cfg["model"]["served_name"] = MODEL
    # The example's Hub store cannot be reached here: the Jobs' answers are canned, and the reports the flow
    # keeps by manifest digest go to a local store.
    cfg["artifacts"] = {"store": "local", "path": str(world["tmp"] / "artifact-store")}
    for env in cfg["environments"].values():
        env["endpoint"] = endpoint
        env["approval"] = {"required": False}
        env["canary"] = {"checks": ["load"], "consecutive_passes": 1, "check_interval_s": 0.01,
                         "step_timeout_s": 30, "sync_timeout_s": 30}  # fmt: skip
        env["gates"]["load"]["profile"] = {"concurrency": concurrency, "duration_s": duration_s, "warmup_s": 0.1,
                                           "prompt_tokens": 8, "max_tokens": 4}  # fmt: skip
        env["gates"]["load"]["slo"]["min_requests"] = 5
        env["gates"]["load"]["slo"]["latency_ms"] = {"ttft_p95": 250}
        env["gates"]["eval"] = {"suite": "smoke"}
    path = world["tmp"] / "promotion.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def history(world: dict, env: str) -> list[str]:
    entries = GitOps.open(str(world["remote"]), world["tmp"] / f"look-{env}").history(env)
    return [f"{e.action}:{e.reverts if e.action == 'revert' else e.artifact}" for e in entries]


@pytest.mark.slow
@pytest.mark.prefect
def test_staging_then_prod_walk_to_healthy(prefect_harness: None, tiny_model: Path, world: dict) -> None:
    from flows.promote import promote

    cluster: FakeCluster = world["cluster"]
    artifact_id = world["artifact"].id
    with running(Behaviour()) as canary:
        config = config_for(world, canary.url)
        with cluster.running():
            with pytest.raises(TerminalError, match="prod requires staging first"):
                promote(str(tiny_model), "prod", config=config, method="gptq", workdir=str(world["tmp"] / "w"))
            staging = promote(str(tiny_model), "staging", config=config, method="gptq", workdir=str(world["tmp"] / "w"))
            prod = promote(str(tiny_model), "prod", config=config, method="gptq", workdir=str(world["tmp"] / "w"))
    for record in (staging, prod):
        assert record["decision"] == "promoted" and record["rollout"]["final"] == "done", record["reason"]
        assert record["eval_gate"]["rows"] and record["artifact"]["id"] == artifact_id
        assert record["artifact"]["manifest_digest"] == manifest_digest(world["artifact"]), "the same bytes"
    assert history(world, "staging") == [f"promote:{artifact_id}"]
    assert history(world, "prod") == [f"promote:{artifact_id}"]
    for env in ("staging", "prod"):
        rollout = cluster.rollout(f"llm-{env}", "llm-inference")
        assert (
            rollout["status"]["phase"] == "Healthy"
            and rollout["status"]["stableRS"] == rollout["status"]["currentPodHash"]
        )
    jobs, _ = cluster.store.list(BY_KIND["Job"], None)
    ran = sorted(
        (j["metadata"]["labels"]["modelctl.io/environment"], j["metadata"]["labels"]["modelctl.io/step"]) for j in jobs
    )
    steps = ("evaluate", "preload", "publish", "quantize", "verify")
    assert ran == [(env, step) for env in ("prod", "staging") for step in steps], "each step one Job, reused on re-run"
    # The refused run asked for quantize and publish; the re-run asked for them again (answered 409: reused)
    # and for preload, verify and evaluate.
    assert len(cluster.server.sent("create", "/namespaces/llm-prod/jobs")) == 7


def live_before(world: dict) -> None:
    """An earlier promotion to staging, live: committed, synced by Argo CD and promoted in full (a first version)."""
    cluster: FakeCluster = world["cluster"]
    earlier = Promotion(
        env="staging", model="org/earlier", revision="c" * 40, artifact="awq-w4a16-earlier", format="awq-w4a16",
        quantization="compressed-tensors",
    )  # fmt: skip
    GitOps.open(str(world["remote"]), world["tmp"] / "earlier").promote(earlier, "envs/staging/values.yaml")
    refresh = {"argocd.argoproj.io/refresh": "normal"}
    cluster.update("Application", "argocd", "llm-inference-staging",
                   lambda app: app["metadata"].setdefault("annotations", {}).update(refresh))  # fmt: skip
    cluster.tick(2)
    cluster.update("Rollout", "llm-staging", "llm-inference", lambda r: r["status"].update(promoteFull=True))
    cluster.tick(2)
    status = cluster.rollout("llm-staging", "llm-inference")["status"]
    assert status["stableRS"] == status["currentPodHash"] and status["phase"] == "Healthy", status


@pytest.mark.slow
@pytest.mark.prefect
def test_a_canary_that_breaches_its_slo_is_reverted(prefect_harness: None, tiny_model: Path, world: dict) -> None:
    from flows.promote import promote

    cluster: FakeCluster = world["cluster"]
    live_before(world)  # a version runs already: this one is walked through its canary, not promoted in full
    before = cluster.rollout("llm-staging", "llm-inference")["spec"]["template"]
    with running(Behaviour(ttft_delay=0.5)) as slow_canary:
        config = config_for(world, slow_canary.url, duration_s=3.0, concurrency=10)  # >= 20 requests for a p95
        with cluster.running(), pytest.raises(TerminalError, match="was reverted") as info:
            promote(str(tiny_model), "staging", config=config, method="gptq", workdir=str(world["tmp"] / "w"))
    assert "ttft_p95" in str(info.value)
    entries = history(world, "staging")
    assert entries[0].startswith("revert:") and entries[1] == f"promote:{world['artifact'].id}"
    rollout = cluster.rollout("llm-staging", "llm-inference")
    assert rollout["spec"]["template"] == before and rollout["status"]["phase"] == "Healthy"
