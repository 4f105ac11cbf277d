"""Prefect around the library's promotion: each step and effect a task, the slot a concurrency limit.

:class:`PrefectHooks` is what flows/promote.py hands to :func:`pipeline.promotion.promote`: the library owns the
sequence and every decision; here each step becomes a task with retries for TransientError only, a timeout, and
a cache key on its identity where its result is an immutable thing (a pinned source's build, a warm cache
entry, an evaluation). Prefect's default cache policy includes the run id, so these set keys that do not.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, TypeVar

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State, TaskRun
from prefect.context import TaskRunContext, get_run_context
from prefect.tasks import Task

from flows.approve import wait_for_approval
from flows.guard import environment_slot
from flows.reports import publish
from pipeline.config import Environment, PromotionConfig
from pipeline.errors import TransientError
from pipeline.gitops import GitOps
from pipeline.promotion import Execute, Hooks
from pipeline.record import PromotionRecord
from pipeline.steps import AnyRequest, EvaluateRequest, PreloadRequest, QuantizeRequest, StepResult

T = TypeVar("T")


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
TIMEOUT_S = {"resolve": 300, "publish": 3600, "verify": 1800, "loadtest": 3600, "capacity": 3600}


@functools.cache
def result_schema(step: str) -> str:
    """A short hash of the shape of ``step``'s result: Prefect keeps cached results as pickles, and a pickle of an
    older shape (a field added since) must not come back as the result of a newer modelctl."""
    from pipeline.steps import OUTPUTS

    shape = json.dumps(OUTPUTS[step].model_json_schema(), sort_keys=True) if step in OUTPUTS else step
    return hashlib.sha256(shape.encode()).hexdigest()[:8]


def step_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    """The identity of a step's result, or None (no caching) for steps that must run every time."""
    key = _step_key(parameters["request"], parameters["env_name"])
    return None if key is None else f"{key}-{result_schema(parameters['request'].step)}"


def _step_key(request: AnyRequest, where: str) -> str | None:
    if isinstance(request, QuantizeRequest):  # only while the artifact is on disk: a deleted one is rebuilt
        if not Path(request.out_root).is_dir():
            return None  # on a cluster the artifact is on the volume, not here: the Job's own skip decides
        ident = request.artifact_id()
        return f"quantize-{where}-{ident}-{'present' if request.built() else 'absent'}"
    if isinstance(request, PreloadRequest):  # only while the cache entry is complete
        from pipeline.cache import artifact_plan, is_warm

        try:
            plan = artifact_plan(Path(request.artifact_dir))
        except Exception:
            return None  # on a cluster the artifact is on the volume, not here: the Job's own skip decides
        warm = is_warm(plan, Path(request.cache_root))
        root = hashlib.sha256(request.cache_root.encode()).hexdigest()[:12]
        return f"preload-{where}-{plan.entry_id}-{root}-{request.expected_digest}-{'warm' if warm else 'cold'}"
    if isinstance(request, EvaluateRequest) and request.use_cache and Path(request.model_dir).is_dir():
        from pipeline.evaluate import LocalWeights, load_suite
        from pipeline.evaluate.run import cache_key, subject_of

        # what was evaluated (the weights' hash, not their path), the suite's content, lm-eval's version
        key = cache_key(subject_of(LocalWeights(Path(request.model_dir))), load_suite(request.suite), "hf")
        values = hashlib.sha256(repr(sorted((request.values or {}).items())).encode()).hexdigest()[:12]
        return f"evaluate-{where}-{key}-{request.engine or 'in-process'}-{values}"  # the engine that served it too
    return None


def _run_step(request: AnyRequest, env_name: str, execute: Execute) -> StepResult[Any]:
    return execute(request)


class PrefectHooks(Hooks):
    """The library's hooks as Prefect: tasks, the environment's concurrency slot, the approval pause, artifacts."""

    def __init__(self) -> None:
        try:
            self.flow_run = str(get_run_context().flow_run.id)  # type: ignore[union-attr]
        except Exception:  # outside a flow run (a plain call in a test)
            self.flow_run = ""
        self.env_name = ""

    def step(self, request: AnyRequest, run: Execute) -> StepResult[Any]:
        timeout = TIMEOUT_S.get(request.step, 6 * 3600)
        wrapped = task(name=request.step, cache_key_fn=step_key, timeout_seconds=timeout, **RETRIES)(_run_step)
        return wrapped(request, self.env_name, run)

    def effect(self, name: str, run: Callable[[], T]) -> T:
        wrapped = task(name=name, cache_policy=NO_CACHE, timeout_seconds=6 * 3600, **RETRIES)(run)
        return wrapped()

    def slot(self, env: str) -> AbstractContextManager[None]:
        self.env_name = env
        return environment_slot(env)

    def approve(self, env: str, timeout_s: float, what: str) -> str:
        answer = wait_for_approval(env, timeout_s, what)
        return answer.approver

    def report(self, record: PromotionRecord, env: Environment) -> None:
        publish(record, env)


def gitops_for(cfg: PromotionConfig, workdir: Path | None = None) -> GitOps:
    """The pipeline's clone of the GitOps repo named in the configuration."""
    return GitOps.from_settings(cfg.gitops, workdir)
