"""The guard flow (scheduled every few minutes): vet the changes people commit to the GitOps repo.

Each environment (or the one named) gets one pass of :func:`pipeline.guard.guard`: a new commit to its values
that the pipeline did not make is gated, walked through its canary or reverted, and recorded as guarded. An
environment whose slot a promotion holds is skipped this time; the next scheduled run picks the change up. The
guarded record is published as the run's artifacts, like a promotion's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.guard import environment_slot
from flows.reports import publish
from pipeline.config import load_config
from pipeline.errors import LeaseHeld
from pipeline.guard import guard as guard_once


@task(name="guard-environment", cache_policy=NO_CACHE)
def guard_environment(config: str, env: str, workdir: str | None) -> dict[str, Any]:
    """One guard pass over one environment; a held slot is a skip, not a failure."""
    cfg = load_config(config)
    try:
        result = guard_once(
            cfg,
            env,
            workdir=Path(workdir) if workdir else None,
            slot=lambda name, holder: environment_slot(name, wait_s=0.0, holder=holder),
        )
    except LeaseHeld as exc:
        get_run_logger().info("%s is busy (%s): the next run guards it", env, exc.what)
        return {"env": env, "action": "busy", "reason": exc.what}
    if result.record is not None:
        publish(result.record, cfg.environments[env])
    get_run_logger().info("%s: %s: %s", env, result.action, result.reason)
    return {"env": env, "action": result.action, "reason": result.reason, "record": result.record and result.record.id}


@flow(name="guard", log_prints=True)
def guard(config: str = "promotion.yaml", env: str | None = None, workdir: str | None = None) -> list[dict[str, Any]]:
    """Guard every environment (or ``env``): people's commits to their values are vetted like promotions."""
    cfg = load_config(config)
    names = [env] if env else cfg.promotion_order()
    return [guard_environment(config, name, workdir) for name in names]
