"""The watch flow (scheduled): when the tracked model has a new revision, promote it to the first environment.

The tracked model is ``model.source`` in promotion.yaml (``org/name@branch`` or a local directory). Its revision
is pinned now and compared with the revision live in the first environment of the promotion order (read from
Git); a new one starts the promote flow as a subflow, an unchanged one is a skip. In pull-request mode a
merged promotion whose record still says "waiting" is resumed first (`modelctl promote --resume`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.promote import promote, resume
from flows.steps import RETRIES, gitops_for
from pipeline import steps
from pipeline.config import load_config
from pipeline.errors import TerminalError
from pipeline.gitops.commits import live_promotions
from pipeline.promotion import waiting_for_merge
from pipeline.source import ModelSource


@task(name="resolve", cache_policy=NO_CACHE, timeout_seconds=300, **RETRIES)
def resolve_step(request: steps.ResolveRequest) -> ModelSource:
    source: ModelSource = steps.run(request).value()
    return source


@flow(name="watch", log_prints=True)
def watch(config: str = "promotion.yaml", workdir: str | None = None) -> dict[str, Any]:
    """Promote the tracked model's new revision, if there is one, to the first environment."""
    logger = get_run_logger()
    cfg = load_config(config)
    if not cfg.model.source:
        raise TerminalError("promotion.yaml tracks no model", hint="set model.source to org/name@branch to watch it")
    first = cfg.promotion_order()[0]
    source = resolve_step(steps.ResolveRequest(ref=cfg.model.source, policy=steps.source_policy(cfg.model)))
    gitops = gitops_for(cfg, Path(workdir) if workdir else None)
    pending = waiting_for_merge(gitops, first) if cfg.gitops.mode == "pull-request" else None
    if pending is not None:  # its pull request was merged since: finish it (the same as `promote --resume`)
        logger.info("promotion %s to %s was merged: resuming it", pending, first)
        resume(first, pending, config=config, workdir=workdir)
        return {"env": first, "revision": source.sha, "promoted": None, "resumed": pending}
    live = live_promotions(gitops.history(first))
    if live and live[0].model == source.repo and live[0].revision == source.sha:
        logger.info("%s is already live in %s: nothing to do", source.ref, first)
        return {"env": first, "revision": source.sha, "promoted": None}
    ref = source.path if source.kind == "local" and source.path else f"{source.repo}@{source.sha}"
    logger.info("new revision %s: promoting it to %s", source.ref, first)
    record = promote(ref, first, config=config, workdir=workdir)
    return {"env": first, "revision": source.sha, "promoted": record["id"]}
