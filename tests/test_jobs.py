"""Steps as Kubernetes Jobs on the GPU pool: the manifest carries the typed request; the Job's result comes back
typed, its failure with the kind it failed with; the create/wait/fail paths run on the fake cluster."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.errors import TerminalError, TransientError
from pipeline.jobs import execute, job_manifest, job_name
from pipeline.kube import Backoff, Kube
from pipeline.quantize import Recipe
from pipeline.source import ModelSource, SourcePolicy
from pipeline.steps import PreloadRequest, PublishRequest, QuantizeRequest, StepFailure, StepResult, StoredArtifact
from sandbox.cluster import FakeCluster
from sandbox.store import BY_KIND
from sandbox.workloads import JobPlan

ROOT = Path(__file__).resolve().parent.parent
CONFIG = load_config(ROOT / "examples" / "cluster" / "promotion.yaml")
STAGING = CONFIG.environment("staging")
SOURCE = ModelSource(kind="hub", repo="Qwen/Qwen2.5-7B-Instruct", sha="c" * 40, files=[])
QUANTIZE = QuantizeRequest(
    source=SOURCE,
    recipe=Recipe.from_config(CONFIG.model.quantization),
    backend="llmcompressor",
    out_root="/models/.artifacts",
    policy=SourcePolicy(token_env="ORG_HF_TOKEN"),
)
PUBLISH = PublishRequest(artifact_dir="/models/.artifacts/awq-w4a16-g128-0123456789abcdef")


@pytest.fixture
def cluster() -> Iterator[FakeCluster]:
    fake = FakeCluster()
    try:
        yield fake
    finally:
        fake.close()


@pytest.fixture
def kube(cluster: FakeCluster) -> Kube:
    return Kube(cluster.api_client, Backoff(attempts=4, first_s=0.01, max_s=0.05, request_timeout_s=1))


def printed(result: StepResult[StoredArtifact] | StepResult[None]) -> str:
    return "loading\nworking\n" + result.model_dump_json() + "\n"


def test_quantize_job_carries_the_whole_request_to_the_gpu_pool() -> None:
    job = job_manifest(QUANTIZE, "staging", STAGING)
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["image"] == "ghcr.io/example-org/modelctl:0.1.0"
    assert container["command"][:6] == ["python", "-m", "pipeline", "step", "run", "--request"]
    assert QuantizeRequest.model_validate_json(container["command"][6]) == QUANTIZE, "nothing dropped on the way"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert container["volumeMounts"] == [{"name": "model-cache", "mountPath": "/models"}]
    assert pod["volumes"] == [{"name": "model-cache", "persistentVolumeClaim": {"claimName": "model-cache"}}]
    token = next(e for e in container["env"] if "valueFrom" in e)
    assert token == {
        "name": "ORG_HF_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token", "optional": True}},
    }, "the token reaches the variable the source policy reads"
    assert pod["restartPolicy"] == "Never" and pod["serviceAccountName"] == "modelctl"
    assert job["metadata"]["namespace"] == "llm-staging"
    assert job["spec"]["backoffLimit"] == 1 and job["spec"]["ttlSecondsAfterFinished"] == 3600


def test_preload_and_publish_jobs_ask_for_no_gpu() -> None:
    for request in (PUBLISH, PreloadRequest(artifact_dir=PUBLISH.artifact_dir, cache_root="/models")):
        [container] = job_manifest(request, "staging", STAGING)["spec"]["template"]["spec"]["containers"]
        assert "nvidia.com/gpu" not in container["resources"]["limits"]


def test_job_names_are_stable_and_dns_safe() -> None:
    name = job_name(QUANTIZE, "staging")
    assert name == job_name(QUANTIZE.model_copy(), "staging")
    changed = QUANTIZE.model_copy(update={"recipe": QUANTIZE.recipe.model_copy(update={"group_size": 64})})
    assert name != job_name(changed, "staging"), "a different recipe is a different Job"
    assert len(name) <= 63 and name.replace("-", "").isalnum() and name == name.lower()


def test_local_environment_cannot_run_jobs(tmp_path: Path) -> None:
    local = load_config(ROOT / "examples" / "local" / "promotion.yaml").environment("local")
    with pytest.raises(TerminalError, match="cannot run Jobs"):
        job_manifest(QUANTIZE, "local", local)
    with pytest.raises(TerminalError, match="not a finished artifact"):  # run here, in this process
        execute(PublishRequest(artifact_dir=str(tmp_path)), "local", local)


def test_job_result_is_read_typed_from_its_log(kube: Kube, cluster: FakeCluster) -> None:
    stored = StoredArtifact(
        artifact_id="awq-w4a16-g128-0123456789abcdef", manifest_digest="sha256:" + "ab" * 32, uri="file:///x", files=[]
    )
    result = StepResult[StoredArtifact](
        step="publish", status="succeeded", started_at=datetime.now(UTC), seconds=1.5, output=stored
    )
    cluster.jobs.plan("modelctl-publish", JobPlan(log=printed(result)))
    with cluster.running():
        got = execute(PUBLISH, "staging", STAGING, kube)
        again = execute(PUBLISH, "staging", STAGING, kube)  # the same Job, not a new one
    assert isinstance(got.output, StoredArtifact) and got.value() == stored == again.value()
    jobs, _ = cluster.store.list(BY_KIND["Job"], None)
    assert len(jobs) == 1


def test_a_job_that_printed_a_wrong_result_is_refused(kube: Kube, cluster: FakeCluster) -> None:
    cluster.jobs.plan("modelctl-publish", JobPlan(log=json.dumps({"id": "not a publish result"}) + "\n"))
    with cluster.running(), pytest.raises(TerminalError, match="printed no publish result"):
        execute(PUBLISH, "staging", STAGING, kube)


def test_a_transient_failure_inside_the_job_stays_transient(kube: Kube, cluster: FakeCluster) -> None:
    failure = StepFailure(kind="transient", what="the Hub answered 503", hint="try again")
    result = StepResult[None](
        step="publish", status="failed", started_at=datetime.now(UTC), seconds=0.2, failure=failure
    )
    cluster.jobs.plan("modelctl-publish", JobPlan(exit_code=75, log=printed(result)))
    with cluster.running(), pytest.raises(TransientError, match="the Hub answered 503"):
        execute(PUBLISH, "staging", STAGING, kube)


def test_failed_job_reports_its_log_without_the_token(kube: Kube, cluster: FakeCluster) -> None:
    secret = "hf_" + "LeakyTokenValue123456"
    cluster.jobs.plan("modelctl-quantize", JobPlan(exit_code=1, log=f"CUDA out of memory\nusing token {secret}\n"))
    with cluster.running(), pytest.raises(TerminalError, match="CUDA out of memory") as info:
        execute(QUANTIZE, "staging", STAGING, kube)
    assert secret not in str(info.value)
