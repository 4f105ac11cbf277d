"""The rollback flow: back to the previous promotion, or to a named one, through the same revert path.

On a cluster each newer promotion is reverted with pipeline.canary.revert (abort first if an update is in flight,
then Git, then wait for Argo CD and a Healthy Rollout); locally it is a Git revert. The configuration is read
once per run and passed on typed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.steps import RETRIES, gitops_for
from pipeline.config import PromotionConfig, load_config
from pipeline.gitops.commits import rollback_targets


@task(name="revert", cache_policy=NO_CACHE, timeout_seconds=3600, **RETRIES)
def revert_step(cfg: PromotionConfig, env: str, promotion_id: str, reason: str, workdir: Path | None) -> dict[str, Any]:
    environment = cfg.environment(env)
    gitops = gitops_for(cfg, workdir)
    if environment.executor == "kubernetes":
        from pipeline.canary import revert
        from pipeline.kube import Kube

        result = revert(Kube.connect(), gitops, env, environment, promotion_id, reason)
        return result.model_dump(mode="json")
    commit = gitops.revert(promotion_id, reason=reason)
    return {"promotion_id": promotion_id, "revert_commit": commit.commit, "pushed": commit.pushed}


@flow(name="rollback", log_prints=True)
def rollback(
    env: str, config: str = "promotion.yaml", to: str | None = None, reason: str = "", workdir: str | None = None
) -> dict[str, Any]:
    """Revert the live promotion of ``env`` (or every promotion newer than ``to``), newest first."""
    logger = get_run_logger()
    cfg = load_config(config)
    cfg.environment(env)
    where = Path(workdir) if workdir else None
    targets = rollback_targets(gitops_for(cfg, where).history(env), to)
    if not targets:
        logger.info("%s already runs promotion %s: nothing to roll back", env, to)
        return {"env": env, "reverted": [], "now": to}
    why = reason or (f"rollback of {env} to {to}" if to else f"rollback of {env} to the previous promotion")
    reverted = [revert_step(cfg, env, t.promotion_id, why, where) for t in targets]
    now = gitops_for(cfg, where).history(env)
    return {"env": env, "reverted": reverted, "now": now[0].commit if now else None}
