"""Prefect tasks around the library's steps: retries for TransientError only, caching on identities, timeouts.

Every task is a thin call into ``pipeline``; the business logic stays there, callable without Prefect. Tasks
whose result is an immutable thing identified by its inputs (a pinned source, an artifact id) cache across flow
runs on those inputs: Prefect's default cache policy includes the run id, so these set one that does not.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State, TaskRun
from prefect.context import TaskRunContext
from prefect.tasks import Task

from pipeline.cache import CacheEntry, artifact_plan, is_warm, preload
from pipeline.config import Environment, PromotionConfig
from pipeline.errors import TerminalError, TransientError
from pipeline.gitops import CommitResult, GitOps, Promotion
from pipeline.jobs import Step, run_step
from pipeline.quantize import Artifact, Backend, Recipe, quantize
from pipeline.quantize.recipe import MANIFEST, artifact_id, calibration_sha256, load_calibration
from pipeline.record import PromotionRecord
from pipeline.source import ModelSource, SourcePolicy, resolve


def only_transient(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry a task run only when it failed with a TransientError (never a failed gate or bad input)."""
    try:
        state.result(raise_on_failure=True)
    except TransientError:
        return True
    except Exception:
        return False
    return False


RETRIES: dict[str, Any] = {"retries": 3, "retry_delay_seconds": [2, 10, 30], "retry_condition_fn": only_transient}


def quantize_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Cache on the artifact's identity, and only while the artifact is on disk (a deleted one is rebuilt)."""
    recipe: Recipe = parameters["recipe"]
    calibration = calibration_sha256(load_calibration(recipe.calibration))
    ident = artifact_id(parameters["source"], recipe, parameters["backend"], calibration)
    present = (Path(parameters["out_root"]) / ident / MANIFEST).is_file()
    return f"quantize-{ident}-{'present' if present else 'absent'}"


def preload_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Cache on (artifact id, cache root), and only while the cache entry is complete."""
    plan = artifact_plan(Path(parameters["artifact_dir"]))
    root = Path(parameters["cache_root"])
    warm = is_warm(plan, root)
    return f"preload-{plan.entry_id}-{hashlib.sha256(str(root).encode()).hexdigest()[:12]}-{'warm' if warm else 'cold'}"


@task(name="resolve", cache_policy=NO_CACHE, timeout_seconds=300, **RETRIES)
def resolve_step(ref: str, policy: SourcePolicy) -> ModelSource:
    return resolve(ref, policy)


@task(name="quantize", cache_key_fn=quantize_key, timeout_seconds=6 * 3600, **RETRIES)
def quantize_step(
    source: ModelSource, recipe: Recipe, out_root: Path, backend: Backend, policy: SourcePolicy
) -> Artifact:
    return quantize(source, recipe, out_root, backend, policy=policy)


@task(name="preload", cache_key_fn=preload_key, timeout_seconds=6 * 3600, **RETRIES)
def preload_step(artifact_dir: Path, cache_root: Path) -> CacheEntry:
    return preload(artifact_dir, cache_root)


@task(name="commit", cache_policy=NO_CACHE, timeout_seconds=300, **RETRIES)
def commit_step(gitops: GitOps, promotion: Promotion, values_file: str, record: PromotionRecord) -> CommitResult:
    return gitops.promote(promotion, values_file, record)


def gitops_for(cfg: PromotionConfig, workdir: Path | None = None) -> GitOps:
    """The pipeline's clone of the GitOps repo named in the configuration."""
    return GitOps.from_settings(cfg.gitops, workdir)


def artifacts_root(env: Environment) -> Path:
    """Where quantized artifacts are built for ``env``: beside the preloaded entries on the cache volume."""
    return Path(env.cache.root) / ".artifacts"


def on_cluster(step: Step, args: list[str], env_name: str, env: Environment) -> dict[str, Any]:
    """Run a step as a Kubernetes Job on the environment's GPU pool and return its JSON result."""
    from pipeline.kube import Kube

    def not_here() -> dict[str, Any]:
        raise TerminalError(f"{step} for {env_name} must run on the cluster, not here")

    return run_step(step, args, env_name, env, not_here, Kube.connect())


@task(name="quantize-job", cache_policy=NO_CACHE, timeout_seconds=6 * 3600, **RETRIES)
def quantize_job(source: ModelSource, recipe: Recipe, backend: Backend, env_name: str, env: Environment) -> Artifact:
    """The quantize step as a Job on the GPU pool, writing to the cache PVC (``python -m pipeline quantize``)."""
    ref = source.path if source.kind == "local" and source.path else f"{source.repo}@{source.sha}"
    args = [ref, "--method", recipe.method, "--backend", backend, "--out", str(artifacts_root(env))]
    args += ["--samples", str(recipe.calibration.samples), "--max-seq-len", str(recipe.calibration.max_seq_len)]
    args += ["--symmetric" if recipe.symmetric else "--asymmetric"]
    return Artifact.model_validate(on_cluster("quantize", args, env_name, env))


@task(name="preload-job", cache_policy=NO_CACHE, timeout_seconds=6 * 3600, **RETRIES)
def preload_job(artifact: Artifact, env_name: str, env: Environment) -> CacheEntry:
    """The preload step as a Job with the cache PVC mounted (``python -m pipeline preload``)."""
    args = [artifact.path, "--cache-root", env.cache.root]
    return CacheEntry.model_validate(on_cluster("preload", args, env_name, env))
