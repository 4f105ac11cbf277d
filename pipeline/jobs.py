"""Run a pipeline step here, or as a Kubernetes Job on the GPU pool: the same entrypoint either way.

With ``executor: local`` the step is a function call. With ``executor: kubernetes`` it becomes a batch Job that
runs ``python -m pipeline <step> ... --json`` in the pipeline image, on the environment's GPU node pool, with
the cache PVC mounted at the cache root and the Hub token from a Secret. The Job prints its result as one JSON
line last; the pipeline reads it from the pod log. Job names are derived from the step's arguments, so a
re-run finds the Job it already started instead of starting another.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from pipeline.config import Environment
from pipeline.errors import TerminalError

if TYPE_CHECKING:
    from pipeline.kube import Kube

Step = Literal["quantize", "preload", "evaluate"]
GPU_STEPS: tuple[Step, ...] = ("quantize", "evaluate")
ONE_LINE_JSON = "MODELCTL_JSON_ONE_LINE"


def job_name(step: Step, env_name: str, args: list[str]) -> str:
    """A stable, DNS-safe name: the same step with the same arguments is the same Job."""
    digest = hashlib.sha256(json.dumps([step, env_name, args]).encode()).hexdigest()[:10]
    return f"modelctl-{step}-{env_name}"[:52] + f"-{digest}"


def job_manifest(step: Step, args: list[str], env_name: str, env: Environment) -> dict[str, Any]:
    """The batch/v1 Job that runs ``step`` for ``env``.

    Raises:
        TerminalError: the environment is not set up to run Jobs (no image, PVC or Rollout namespace).
    """
    if env.image is None or env.cache.pvc is None or env.rollout is None:
        raise TerminalError(
            f"environment {env_name} cannot run Jobs: it needs image, cache.pvc and rollout.namespace",
            hint="set them in promotion.yaml (executor: kubernetes requires them)",
        )
    name = job_name(step, env_name, args)
    labels = {"app.kubernetes.io/name": "modelctl", "modelctl.io/step": step, "modelctl.io/environment": env_name}
    resources: dict[str, dict[str, str]] = {
        "requests": {"cpu": env.jobs.cpu, "memory": env.jobs.memory},
        "limits": {"memory": env.jobs.memory},
    }
    if step in GPU_STEPS and env.gpu_pool.gpus_per_replica > 0:
        gpus = str(env.gpu_pool.gpus_per_replica)
        resources["requests"][env.gpu_pool.resource] = gpus
        resources["limits"][env.gpu_pool.resource] = gpus
    environment: list[dict[str, Any]] = [
        {"name": ONE_LINE_JSON, "value": "1"},
        {"name": "MODELCTL_CACHE", "value": f"{env.cache.root}/.modelctl"},
        {"name": "HF_HOME", "value": f"{env.cache.root}/.huggingface"},
    ]
    if env.jobs.hub_token_secret:
        environment.append(
            {
                "name": "HF_TOKEN",
                "valueFrom": {"secretKeyRef": {"name": env.jobs.hub_token_secret, "key": "token", "optional": True}},
            }
        )
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "serviceAccountName": env.jobs.service_account,
        "containers": [
            {
                "name": step,
                "image": env.image,
                "command": ["python", "-m", "pipeline", step, *args, "--json"],
                "env": environment,
                "resources": resources,
                "volumeMounts": [{"name": "model-cache", "mountPath": env.cache.root}],
            }
        ],
        "volumes": [{"name": "model-cache", "persistentVolumeClaim": {"claimName": env.cache.pvc}}],
    }
    if env.gpu_pool.node_selector:
        pod_spec["nodeSelector"] = dict(env.gpu_pool.node_selector)
    if env.gpu_pool.tolerations:
        pod_spec["tolerations"] = [t.model_dump(exclude_none=True) for t in env.gpu_pool.tolerations]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": env.rollout.namespace, "labels": labels},
        "spec": {
            "backoffLimit": env.jobs.backoff_limit,
            "ttlSecondsAfterFinished": env.jobs.ttl_seconds_after_finished,
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }


def result_from_logs(logs: dict[str, str], where: str) -> dict[str, Any]:
    """The step's result: the last line of the pod log that is a JSON object.

    Raises:
        TerminalError: no pod printed a result.
    """
    for text in logs.values():
        for line in reversed(text.strip().splitlines()):
            if line.startswith("{"):
                try:
                    value = json.loads(line)
                except ValueError:
                    continue
                if isinstance(value, dict):
                    return value
    raise TerminalError(f"{where} finished but printed no JSON result", hint="read its logs with kubectl logs")


def run_step(
    step: Step,
    args: list[str],
    env_name: str,
    env: Environment,
    local: Callable[[], dict[str, Any]],
    kube: Kube | None = None,
) -> dict[str, Any]:
    """Run a step where the environment says: ``local()`` in this process, or a Job through ``kube``.

    Raises:
        TerminalError: the Job failed (with its logs) or printed no result; or no cluster connection was given.
    """
    if env.executor == "local":
        return local()
    if kube is None:
        raise TerminalError(f"environment {env_name} runs steps as Kubernetes Jobs but no cluster connection was given")
    manifest = job_manifest(step, args, env_name, env)
    namespace = manifest["metadata"]["namespace"]
    job = kube.run_job(namespace, manifest, timeout_s=env.jobs.timeout_s)
    logs = kube.job_logs(namespace, job.name, tail_lines=5)
    return result_from_logs(logs, f"Job {namespace}/{job.name}")
