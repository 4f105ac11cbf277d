"""The promote flow: resolve -> quantize -> preload -> evaluate -> load-test -> commit -> sync -> canary -> record.

Everything before the commit only produces evidence; nothing reaches Git unless every gate passed. On a cluster
everything after the commit runs in a transaction whose rollback is the revert (pipeline.canary.revert), and the
flow's failure and crash hooks revert too, or leave the Rollout aborted and say so. A re-run with the same
promotion id converges: the commit is found by its trailer, never made twice.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context
from prefect.transactions import transaction

from flows.approve import wait_for_approval
from flows.gates import eval_job, eval_step, load_step
from flows.guard import environment_slot
from flows.reports import publish
from flows.steps import (
    RETRIES,
    artifacts_root,
    commit_step,
    gitops_for,
    preload_job,
    preload_step,
    quantize_job,
    quantize_step,
    resolve_step,
)
from pipeline.config import Environment, load_config
from pipeline.errors import TerminalError
from pipeline.gates import GateResult
from pipeline.gitops import GitOps, Promotion
from pipeline.gitops.commits import live_promotions
from pipeline.loadtest import LoadReport
from pipeline.quantize import Artifact, Backend, Method, Recipe
from pipeline.record import PromotionRecord, new_promotion_id
from pipeline.source import SourcePolicy


def _flow_run_id() -> str:
    try:
        return str(get_run_context().flow_run.id)  # type: ignore[union-attr]
    except Exception:  # outside a flow run (a plain call in a test)
        return ""


def check_requires(gitops: GitOps, env_name: str, env: Environment, artifact: Artifact) -> None:
    """An environment with ``requires`` only takes an artifact whose promotion there is live in Git.

    Raises:
        TerminalError: a required environment never took (or reverted) this artifact.
    """
    for needed in env.requires:
        live = live_promotions(gitops.history(needed))
        if not any(entry.artifact == artifact.id for entry in live):
            raise TerminalError(
                f"{env_name} requires {needed} first, and {artifact.id} is not live in {needed}",
                hint=f"promote the same model and recipe to {needed} first (`modelctl promote ... --env {needed}`)",
            )


@contextmanager
def cluster_guard(env_name: str, env: Environment, holder: str) -> Iterator[None]:
    """On a cluster: hold the environment's Lease and check the GPU pool before the commit; locally: nothing."""
    if env.executor != "kubernetes":
        yield
        return
    from pipeline.canary import guarded
    from pipeline.kube import Kube

    with guarded(Kube.connect(), env_name, env, holder):
        yield


@task(name="deploy", cache_policy=NO_CACHE, timeout_seconds=6 * 3600, **RETRIES)
def deploy_step(
    config: str, env_name: str, commit: str, promotion_id: str, model: str, workdir: str | None
) -> dict[str, Any]:
    """Make the commit live and walk its canary (reverting on failure): the cluster half of a promotion."""
    from pipeline.canary import deploy
    from pipeline.checks import canary_checks
    from pipeline.kube import Kube

    cfg = load_config(config)
    env = cfg.environment(env_name)
    gitops = gitops_for(cfg, Path(workdir) if workdir else None)
    outcome = deploy(Kube.connect(), gitops, env_name, env, commit, promotion_id, canary_checks(env_name, env, model))
    return outcome.model_dump(mode="json")


def _revert_on_rollback(config: str, env_name: str, promotion_id: str, workdir: str | None) -> Any:
    def hook(txn: Any) -> None:
        from flows.rollback import revert_step

        revert_step.fn(
            config,
            env_name,
            promotion_id,
            "the promotion flow failed after its commit",
            Path(workdir) if workdir else None,
        )

    return hook


def revert_after_failure(flow: Any, flow_run: Any, state: Any) -> None:
    """on_failure / on_crashed: a failed or crashed run reverts the promotion it committed (found by its Flow-Run
    trailer), aborting the Rollout first; if that fails, the error it logs says what a person must do.

    A process killed outright runs no hook: re-running the promotion with the same id converges instead.
    """
    from flows.rollback import revert_step

    params = flow_run.parameters
    cfg = load_config(params.get("config", "promotion.yaml"))
    env_name = params["env"]
    if cfg.environment(env_name).executor != "kubernetes":
        return  # nothing runs after the commit locally: a failure there changes nothing that needs undoing
    workdir = params.get("workdir")
    gitops = gitops_for(cfg, Path(workdir) if workdir else None)
    for entry in live_promotions(gitops.history(env_name)):
        if entry.flow_run == str(flow_run.id):
            reason = f"flow run {flow_run.name} ended {state.name}: {state.message or ''}"[:200]
            revert_step.fn(
                params.get("config", "promotion.yaml"), env_name, entry.promotion_id, reason, workdir and Path(workdir)
            )


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
        TerminalError: a gate failed (nothing was committed), or a step was refused.
    """
    logger = get_run_logger()
    cfg = load_config(config)
    environment = cfg.environment(env)
    pid = promotion_id or new_promotion_id()
    record = PromotionRecord(id=pid, env=env, flow_run=_flow_run_id() or None)
    timings: dict[str, float] = {}
    where = Path(workdir) if workdir else None

    def timed(name: str, started: float) -> None:
        timings[name] = round(time.perf_counter() - started, 3)

    with environment_slot(env):
        started = time.perf_counter()
        policy = SourcePolicy(
            allow_pickle=cfg.model.allow_pickle,
            trust_remote_code=cfg.model.trust_remote_code,
            token_env=cfg.model.hub_token_env,
        )
        source = resolve_step(model, policy)
        timed("resolve", started)
        recipe = Recipe.from_config(cfg.model.quantization, method)
        started = time.perf_counter()
        chosen = backend or cfg.model.quantization.backend
        on_cluster = environment.executor == "kubernetes"
        if on_cluster:
            artifact = quantize_job(source, recipe, chosen, env, environment)
        else:
            artifact = quantize_step(source, recipe, artifacts_root(environment), chosen, policy)
        timed("quantize", started)
        gitops = gitops_for(cfg, where)
        check_requires(gitops, env, environment, artifact)
        started = time.perf_counter()
        if on_cluster:
            entry = preload_job(artifact, env, environment)
        else:
            entry = preload_step(Path(artifact.path), Path(environment.cache.root))
        timed("preload", started)
        record = record.model_copy(
            update={
                "model": source.model_dump(mode="json"),
                "artifact": artifact.model_dump(mode="json", exclude={"source"}),
            }
        )
        gates: list[GateResult] = []
        load_report: LoadReport | None = None
        if environment.gates.eval is not None:
            started = time.perf_counter()
            baseline = gitops.baseline(env)
            if on_cluster:
                report, result = eval_job(entry.path, environment.gates.eval, baseline, env, environment)
            else:
                report, result = eval_step(Path(entry.path), environment.gates.eval, baseline)
            timed("evaluate", started)
            record = record.model_copy(update={"eval_report": report, "eval_gate": result})
            gates.append(result)
        if environment.gates.load is not None and environment.executor == "local" and all(g.passed for g in gates):
            started = time.perf_counter()
            report, result = load_step(Path(entry.path), environment.gates.load, cfg.model.served_name)
            load_report = LoadReport.model_validate(report)
            timed("loadtest", started)
            record = record.model_copy(update={"load_report": report, "load_gate": result})
            gates.append(result)
        failed = [g for g in gates if not g.passed]
        if failed:
            reason = "; ".join(g.summary() for g in failed)
            record = record.model_copy(update={"decision": "rejected", "reason": reason, "timings": timings})
            publish(record, environment, load_report)
            logger.error("rejected, nothing committed: %s", reason)
            raise TerminalError(f"{artifact.id} was rejected for {env}, nothing was committed: {reason}")
        promotion = Promotion(
            id=pid,
            env=env,
            model=source.repo,
            revision=source.sha,
            artifact=artifact.id,
            format=artifact.recipe.name,
            quantization="compressed-tensors" if artifact.format == "compressed-tensors" else "awq",
            served_name=cfg.model.served_name,
            eval=next((g.summary() for g in gates if g.gate.startswith("eval")), ""),
            latency=next((g.summary() for g in gates if g.gate.startswith("load")), ""),
            flow_run=record.flow_run or "",
        )
        if environment.approval.required:
            started = time.perf_counter()
            answer = wait_for_approval(env, environment.approval.timeout_s, artifact.id)
            timed("approval", started)
            logger.info("approved by %s: %s", answer.approver, answer.comment or "-")
        record = record.model_copy(update={"decision": "promoted", "reason": "every gate passed", "timings": timings})
        with cluster_guard(env, environment, record.flow_run or pid):
            started = time.perf_counter()
            commit = commit_step(gitops, promotion, environment.values_file, record)
            timed("commit", started)
            logger.info("%s %s", "already committed" if commit.skipped else "committed", commit.commit[:12])
            record = record.model_copy(update={"commit": commit.commit})
            if on_cluster:
                started = time.perf_counter()
                served = cfg.model.served_name or source.repo
                with transaction(key=f"canary-{pid}") as txn:
                    txn.stage(pid, on_rollback_hooks=[_revert_on_rollback(config, env, pid, workdir)])
                    outcome = deploy_step(config, env, commit.commit, pid, served, workdir)
                timed("canary", started)
                decision = "promoted" if outcome["final"] == "done" else "reverted"
                update = {"rollout": outcome, "decision": decision, "reason": outcome["reason"]}
                record = record.model_copy(update=update)
        record = record.model_copy(update={"timings": timings})
    publish(record, environment, load_report)
    if record.decision == "reverted":
        raise TerminalError(f"promotion {pid} to {env} was reverted: {record.reason}")
    return record.model_dump(mode="json")
