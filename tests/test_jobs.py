"""Steps as Kubernetes Jobs on the GPU pool: the manifest, and the create/wait/fail paths on the fake cluster."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster.fake import FakeCluster
from cluster.store import BY_KIND
from cluster.workloads import JobPlan

from pipeline.config import load_config
from pipeline.errors import TerminalError
from pipeline.jobs import job_manifest, job_name, run_step
from pipeline.kube import Backoff, Kube

ROOT = Path(__file__).resolve().parent.parent
CONFIG = load_config(ROOT / "examples" / "cluster" / "promotion.yaml")
STAGING = CONFIG.environment("staging")
ARGS = ["Qwen/Qwen2.5-7B-Instruct@" + "c" * 40, "--method", "awq", "--out", "/models/artifacts"]


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


def test_quantize_job_runs_on_the_gpu_pool_with_the_cache_mounted() -> None:
    job = job_manifest("quantize", ARGS, "staging", STAGING)
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["image"] == "ghcr.io/example-org/modelctl:0.1.0"
    assert container["command"] == ["python", "-m", "pipeline", "quantize", *ARGS, "--json"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert container["volumeMounts"] == [{"name": "model-cache", "mountPath": "/models"}]
    assert pod["volumes"] == [{"name": "model-cache", "persistentVolumeClaim": {"claimName": "model-cache"}}]
    token = next(e for e in container["env"] if e["name"] == "HF_TOKEN")
    assert token == {
        "name": "HF_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token", "optional": True}},
    }
    assert pod["restartPolicy"] == "Never" and pod["serviceAccountName"] == "modelctl"
    assert job["metadata"]["namespace"] == "llm-staging"
    assert job["spec"]["backoffLimit"] == 1 and job["spec"]["ttlSecondsAfterFinished"] == 3600


def test_preload_job_asks_for_no_gpu() -> None:
    job = job_manifest("preload", ["/models/artifacts/x", "--cache-root", "/models"], "staging", STAGING)
    [container] = job["spec"]["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in container["resources"]["limits"]


def test_job_names_are_stable_and_dns_safe() -> None:
    name = job_name("quantize", "staging", ARGS)
    assert name == job_name("quantize", "staging", ARGS)
    assert name != job_name("quantize", "staging", [*ARGS, "--samples", "8"])
    assert len(name) <= 63 and name.replace("-", "").isalnum() and name == name.lower()


def test_local_environment_cannot_run_jobs(tmp_path: Path) -> None:
    local = load_config(ROOT / "examples" / "local" / "promotion.yaml").environment("local")
    with pytest.raises(TerminalError, match="cannot run Jobs"):
        job_manifest("quantize", ARGS, "local", local)
    assert run_step("quantize", ARGS, "local", local, lambda: {"ran": "here"}) == {"ran": "here"}


def test_job_result_is_read_from_its_log(kube: Kube, cluster: FakeCluster) -> None:
    result = {"id": "awq-w4a16-g128-0123456789abcdef", "skipped": False}
    cluster.jobs.plan("modelctl-quantize", JobPlan(log="loading\nquantizing\n" + json.dumps(result) + "\n"))

    def not_here() -> dict[str, object]:
        raise AssertionError("a kubernetes environment must not run the step in-process")

    with cluster.running():
        assert run_step("quantize", ARGS, "staging", STAGING, not_here, kube) == result
        again = run_step("quantize", ARGS, "staging", STAGING, not_here, kube)  # the same Job, not a new one
    assert again == result
    jobs, _ = cluster.store.list(BY_KIND["Job"], None)
    assert len(jobs) == 1


def test_failed_job_reports_its_log_without_the_token(kube: Kube, cluster: FakeCluster) -> None:
    secret = "hf_" + "LeakyTokenValue123456"
    cluster.jobs.plan("modelctl-quantize", JobPlan(exit_code=1, log=f"CUDA out of memory\nusing token {secret}\n"))
    with cluster.running(), pytest.raises(TerminalError, match="CUDA out of memory") as info:
        run_step("quantize", ARGS, "staging", STAGING, dict, kube)
    assert secret not in str(info.value)
