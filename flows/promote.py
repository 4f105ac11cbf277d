"""The promote flow: the library's promotion (pipeline.promotion) with each step and effect a Prefect task.

The sequence and every decision are :func:`pipeline.promotion.promote`'s; this flow reads the configuration
once, hands it over typed with :class:`flows.steps.PrefectHooks` (tasks with retries and caching, the
environment's concurrency slot, the approval pause, the UI artifacts), and returns the record as JSON. The
failure and crash hooks revert what a failed run committed on a cluster; a process killed outright runs no hook,
and re-running the promotion with the same id converges instead (the commit is found by its trailer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from flows.steps import PrefectHooks, gitops_for
from pipeline import promotion
from pipeline.config import load_config
from pipeline.gitops.commits import live_promotions
from pipeline.quantize import Backend, Method


def revert_after_failure(flow: Any, flow_run: Any, state: Any) -> None:
    """on_failure / on_crashed: revert the promotion a failed or crashed run committed (found by its Flow-Run
    trailer), aborting the Rollout first; if that fails, the error it logs says what a person must do."""
    from flows.rollback import revert_step

    params = flow_run.parameters
    cfg = load_config(params.get("config", "promotion.yaml"))
    env_name = params["env"]
    if cfg.environment(env_name).executor != "kubernetes":
        return  # nothing runs after the commit locally: a failure there changes nothing that needs undoing
    workdir = params.get("workdir")
    where = Path(workdir) if workdir else None
    for entry in live_promotions(gitops_for(cfg, where).history(env_name)):
        if entry.flow_run == str(flow_run.id):
            reason = f"flow run {flow_run.name} ended {state.name}: {state.message or ''}"[:200]
            revert_step.fn(cfg, env_name, entry.promotion_id, reason, where)


@flow(name="promote", log_prints=True, on_failure=[revert_after_failure], on_crashed=[revert_after_failure])
def promote(
    model: str,
    env: str,
    config: str = "promotion.yaml",
    method: Method | None = None,
    backend: Backend | None = None,
    promotion_id: str | None = None,
    workdir: str | None = None,
) -> dict[str, Any]:
    """Promote ``model`` (org/name[@rev] or a local directory) to ``env``; returns the PromotionRecord as JSON.

    Raises:
        TerminalError: a gate failed (nothing was committed), a step was refused, or the canary was reverted.
    """
    record = promotion.promote(
        load_config(config),
        env,
        model,
        method=method,
        backend=backend,
        promotion_id=promotion_id,
        workdir=Path(workdir) if workdir else None,
        hooks=PrefectHooks(),
    )
    return record.model_dump(mode="json")


@flow(name="resume", log_prints=True, on_failure=[revert_after_failure], on_crashed=[revert_after_failure])
def resume(env: str, promotion_id: str, config: str = "promotion.yaml", workdir: str | None = None) -> dict[str, Any]:
    """Finish a pull-request promotion after its merge: take the slot again, walk the canary (on a cluster).

    Raises:
        TerminalError: not merged yet, reverted meanwhile, or the canary was reverted.
    """
    record = promotion.resume(
        load_config(config), env, promotion_id, workdir=Path(workdir) if workdir else None, hooks=PrefectHooks()
    )
    return record.model_dump(mode="json")
