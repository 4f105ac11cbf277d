"""Run a step request here, or as a Kubernetes Job on the GPU pool: the same entrypoint either way.

With ``executor: local`` a step is a function call (:func:`pipeline.steps.run`). With ``executor: kubernetes``
the request, serialized as JSON, becomes the argument of a batch Job running ``python -m pipeline step run
--request JSON`` in the pipeline image, on the environment's GPU pool (for the steps that need a GPU), with the
cache PVC mounted at the cache root and the Hub token from a Secret. The entrypoint validates the request,
runs it and prints its StepResult as the last line of its log; the executor validates that result as the
step's typed output, and a failed result raises the same kind of error it failed with. Job names are derived
from the request, so a re-run finds the Job it already started instead of starting another.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

from pipeline.config import Environment
from pipeline.errors import TerminalError
from pipeline.progress import Progress
from pipeline.steps import AnyRequest, StepResult, parse_result, run

if TYPE_CHECKING:
    from pipeline.kube import Kube

GPU_STEPS = ("quantize", "verify", "evaluate")
SERVED_STEPS = ("verify", "evaluate", "loadtest")  # vLLM runs beside them in the Job's pod (pipeline/vllm.py)
JOB_STEPS = ("quantize", "publish", "preload", "verify", "evaluate")
ONE_LINE_JSON = "MODELCTL_JSON_ONE_LINE"


def request_json(request: AnyRequest) -> str:
    """The request as the Job receives it: compact JSON, keys sorted (the same request is the same text)."""
    return json.dumps(request.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


def job_name(request: AnyRequest, env_name: str) -> str:
    """A stable, DNS-safe name: the same request for the same environment is the same Job."""
    digest = hashlib.sha256(f"{env_name}\n{request_json(request)}".encode()).hexdigest()[:10]
    return f"modelctl-{request.step}-{env_name}"[:52] + f"-{digest}"


def job_command(request: AnyRequest) -> list[str]:
    """The container command: the pipeline's own entrypoint, with the request as its one argument."""
    return ["python", "-m", "pipeline", "step", "run", "--request", request_json(request)]


def job_manifest(
    request: AnyRequest, env_name: str, env: Environment, serving: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The batch/v1 Job that runs ``request`` for ``env``.

    For the steps that measure the served model (``SERVED_STEPS``), ``serving`` (the environment's chart values)
    adds vLLM as a second container of the pod, image and args from the chart; the step talks to it over localhost.

    Raises:
        TerminalError: the environment is not set up to run Jobs (no image, PVC or Rollout namespace).
    """
    if env.image is None or env.cache.pvc is None or env.rollout is None:
        raise TerminalError(
            f"environment {env_name} cannot run Jobs: it needs image, cache.pvc and rollout.namespace",
            hint="set them in promotion.yaml (executor: kubernetes requires them)",
        )
    step = request.step
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
        token_env = getattr(getattr(request, "policy", None), "token_env", "HF_TOKEN")
        environment.append(
            {
                "name": token_env,
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
                "command": job_command(request),
                "env": environment,
                "resources": resources,
                "volumeMounts": [{"name": "model-cache", "mountPath": env.cache.root}],
            }
        ],
        "volumes": [{"name": "model-cache", "persistentVolumeClaim": {"claimName": env.cache.pvc}}],
    }
    model_path = getattr(request, "model_dir", None) or getattr(request, "artifact_dir", None)
    if serving is not None and step in SERVED_STEPS and model_path:
        from pipeline.vllm import with_sidecar

        with_sidecar(pod_spec, serving, str(model_path), env.gpu_pool.resource)
    if env.gpu_pool.node_selector:
        pod_spec["nodeSelector"] = dict(env.gpu_pool.node_selector)
    if env.gpu_pool.tolerations:
        pod_spec["tolerations"] = [t.model_dump(exclude_none=True) for t in env.gpu_pool.tolerations]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": job_name(request, env_name), "namespace": env.rollout.namespace, "labels": labels},
        "spec": {
            "backoffLimit": env.jobs.backoff_limit,
            "ttlSecondsAfterFinished": env.jobs.ttl_seconds_after_finished,
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }


def result_from_logs(step: str, logs: dict[str, str], where: str) -> StepResult[Any] | None:
    """The step's result: the last line of a pod log that is a valid StepResult of ``step``; None when none is."""
    for text in logs.values():
        for line in reversed(text.strip().splitlines()):
            if line.startswith("{"):
                try:
                    return parse_result(step, line, where)
                except TerminalError:
                    continue
    return None


def execute(
    request: AnyRequest,
    env_name: str,
    env: Environment,
    kube: Kube | None = None,
    progress: Progress | None = None,
    serving: dict[str, Any] | None = None,
) -> StepResult[Any]:
    """Run ``request`` where the environment says: in this process, or as a Job through ``kube``.

    ``serving`` (the environment's chart values) gives the Jobs of ``SERVED_STEPS`` their vLLM sidecar.

    Resolve and load-test always run here (they need no GPU and no cache volume of the cluster).

    Raises:
        TerminalError / TransientError: the step failed (the kind it failed with, also from inside a Job); the
            Job printed no result; or a Job was needed and no cluster connection was given.
    """
    if env.executor == "local" or request.step not in JOB_STEPS:
        return run(request, progress)
    if kube is None:
        raise TerminalError(f"environment {env_name} runs steps as Kubernetes Jobs but no cluster connection was given")
    manifest = job_manifest(request, env_name, env, serving)
    namespace, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
    where = f"Job {namespace}/{name}"
    try:
        kube.run_job(namespace, manifest, timeout_s=env.jobs.timeout_s)
    except TerminalError:
        found = result_from_logs(request.step, kube.job_logs(namespace, name, tail_lines=5), where)
        if found is not None and found.failure is not None:
            raise found.failure.error() from None  # the step's own error, transient or terminal
        raise
    result = result_from_logs(request.step, kube.job_logs(namespace, name, tail_lines=5), where)
    if result is None:
        raise TerminalError(f"{where} finished but printed no {request.step} result", hint="read its logs with kubectl")
    result.value()  # a failed result raises its error
    return result
