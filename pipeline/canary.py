"""After the commit: see Argo CD apply it, walk the canary step by step with checks, and revert on any failure.

The decisions are :func:`pipeline.rollout.decide`'s; the API calls are :class:`pipeline.kube.Kube`'s; the Git
side is :class:`pipeline.gitops.GitOps`'s. This module only sequences them and keeps the evidence:

    deploy:  refresh Argo CD -> wait until the exact commit is live -> walk the canary -> RolloutOutcome
    revert:  abort the Rollout (traffic back to stable at once) -> git revert + push -> refresh Argo CD
             -> wait until the revert is live and the Rollout is Healthy on the old template

If the revert itself fails, the Rollout stays aborted (users are on the stable version) and the error says
exactly what a person must do to make Git agree with the cluster.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from pipeline.config import Environment
from pipeline.errors import PipelineError, TerminalError
from pipeline.gates import GateResult
from pipeline.gitops import GitOps
from pipeline.kube import Kube, LeaseHold
from pipeline.record import RevertResult, RolloutOutcome, StepEvent
from pipeline.rollout import Abort, Done, ObservedRollout, Promote, Wait, decide

Check = Callable[[ObservedRollout], GateResult]
Clock = Callable[[], float]

__all__ = ["RevertResult", "RolloutOutcome", "StepEvent", "deploy", "figures", "guarded", "revert", "walk"]


def _require_cluster(env_name: str, env: Environment) -> None:
    """Raises: TerminalError when the environment has no Argo CD application or Rollout to drive."""
    if env.argocd is None or env.rollout is None:
        raise TerminalError(
            f"environment {env_name} has no Argo CD application or Rollout: the canary needs a cluster",
            hint="set argocd and rollout for it in promotion.yaml (see examples/cluster/promotion.yaml)",
        )


@contextmanager
def guarded(kube: Kube, env_name: str, env: Environment, holder: str, canary_replicas: int = 1) -> Iterator[LeaseHold]:
    """Hold the environment's promotion Lease for the whole block, after checking the GPU pool has room.

    Run the commit inside the block: a second promotion of the same environment is refused with who holds the
    Lease and since when, and a pool without free GPUs for the canary is refused with the numbers, both before
    anything reaches Git.

    Raises:
        TerminalError: the Lease is held by another promotion, or the pool lacks GPUs.
    """
    _require_cluster(env_name, env)
    assert env.rollout is not None
    with kube.hold_lease(env_name, env.rollout.namespace, holder) as hold:
        kube.require_gpus(env.gpu_pool, replicas=canary_replicas)
        yield hold


def walk(
    kube: Kube,
    env_name: str,
    env: Environment,
    check: Check,
    started: float,
    events: list[StepEvent],
    first_version: bool = False,
) -> Abort | Done:
    """Step the canary until it is done or must be aborted: check at each pause, promote after N passes.

    ``first_version``: nothing ran before this version (the chart's stable ReplicaSet is the empty one, with no
    model), so there is no stable to compare a canary with: the update is promoted in full at once, as Argo
    Rollouts does by itself for a Rollout's very first template.
    """
    _require_cluster(env_name, env)
    assert env.rollout is not None
    policy = env.canary
    checks: list[GateResult] = []
    step: int | None = -1
    step_since = kube.clock()
    full = False
    while True:
        seen = kube.rollout(env.rollout)
        if first_version and not full and not seen.finished:
            kube.promote(env.rollout, full=True)
            full = True
            reason = "first version: no stable version to compare a canary with; promoted in full"
            events.append(StepEvent(at=seen.step, action="promote", reason=reason, seconds=kube.clock() - started))
            continue
        if seen.step_index != step:
            step, checks, step_since = seen.step_index, [], kube.clock()
        action = decide(seen, policy, checks, step_elapsed_s=kube.clock() - step_since)
        elapsed = round(kube.clock() - started, 3)
        if isinstance(action, Wait):
            if full:  # promoted in full: no checks, wait for the new version to be stable
                kube.sleep(min(action.after_s or policy.check_interval_s, policy.check_interval_s))
            elif action.check:
                result = check(seen)
                checks.append(result)
                events.append(
                    StepEvent(
                        at=seen.step,
                        action="check",
                        reason=result.summary(),
                        seconds=elapsed,
                        weight=seen.weight,
                        figures=figures(result),
                        verdict=result.verdict,
                    )
                )
                if result.verdict != "fail":
                    kube.sleep(policy.check_interval_s)
            else:
                kube.sleep(action.after_s)
            continue
        if isinstance(action, Promote):
            kube.promote(env.rollout)
            events.append(
                StepEvent(at=seen.step, action="promote", reason=action.reason, seconds=elapsed, weight=seen.weight)
            )
            checks = []
            continue
        events.append(
            StepEvent(at=seen.step, action=action.kind, reason=action.reason, seconds=elapsed, weight=seen.weight)
        )
        return action


def figures(result: GateResult) -> dict[str, float | None]:
    """The figures a check's verdict came from: row name -> value for each row with a value, and
    ``"<name> baseline"`` -> baseline for a row compared with one (the metrics check's stable TTFT p95)."""
    found: dict[str, float | None] = {}
    for row in result.rows:
        if row.value is not None:
            found.setdefault(row.name, row.value)
        if row.baseline is not None:
            found.setdefault(f"{row.name} baseline", row.baseline)
    return found


def deploy(
    kube: Kube,
    gitops: GitOps,
    env_name: str,
    env: Environment,
    commit: str,
    promotion_id: str,
    check: Check,
    first_version: bool = False,
) -> RolloutOutcome:
    """Make ``commit`` live through Argo CD and walk its canary (promoted in full when it is the environment's
    ``first_version``: see :func:`walk`); on any failure, revert.

    Raises:
        TerminalError: the revert itself failed (the message says what is left to do by hand).
    """
    _require_cluster(env_name, env)
    assert env.argocd is not None
    started = kube.clock()
    events: list[StepEvent] = []
    kube.request_refresh(env.argocd)  # do not wait for Argo CD's 2-3 minute poll
    try:
        kube.wait_synced(env.argocd, commit, env.canary.sync_timeout_s)
        events.append(
            StepEvent(at="sync", action="synced", reason=f"{commit[:12]} is live", seconds=kube.clock() - started)
        )
        action = walk(kube, env_name, env, check, started, events, first_version)
    except PipelineError as exc:
        action = Abort(f"{exc.what}")
    if isinstance(action, Done):
        return RolloutOutcome(final="done", reason=action.reason, steps=events)
    result = revert(kube, gitops, env_name, env, promotion_id, action.reason, steps=events)
    events.append(
        StepEvent(at="revert", action="revert", reason=f"reverted: {action.reason}", seconds=kube.clock() - started)
    )
    return RolloutOutcome(final="reverted", reason=action.reason, steps=events, revert=result)


def revert(
    kube: Kube,
    gitops: GitOps,
    env_name: str,
    env: Environment,
    promotion_id: str,
    reason: str,
    clock: Clock = time.perf_counter,
    steps: list[StepEvent] | None = None,
) -> RevertResult:
    """Abort first (traffic to stable now), then revert in Git, push, refresh, and wait for Healthy. ``steps``
    (the canary's timeline so far) go into the revert's record in Git.

    Raises:
        TerminalError: a stage failed; the Rollout is left aborted and the message says what to do.
    """
    _require_cluster(env_name, env)
    assert env.argocd is not None and env.rollout is not None
    t0 = clock()
    timings: dict[str, float] = {}
    in_flight = not kube.rollout(env.rollout).finished
    if in_flight:  # an update is under way: send its traffic back to stable before anything else
        kube.abort(env.rollout)
    timings["aborted_s"] = round(clock() - t0, 4)
    try:
        outcome = RolloutOutcome(final="reverted", reason=reason, steps=steps) if steps else None
        commit = gitops.revert(promotion_id, reason=reason, env=env_name, values_file=env.values_file, rollout=outcome)
    except PipelineError as exc:
        raise TerminalError(
            f"the Rollout {env.rollout.namespace}/{env.rollout.name} is aborted (traffic is on the stable version), "
            f"but reverting promotion {promotion_id} in Git failed: {exc.what}",
            hint=f"revert it by hand (`modelctl rollback --env {env_name}` or `git revert` of its commit, then push) "
            "so Argo CD does not re-apply the failed version; until then leave the Rollout aborted",
        ) from None
    timings["revert_pushed_s"] = round(clock() - t0, 4)
    kube.request_refresh(env.argocd)
    timings["refresh_requested_s"] = round(clock() - t0, 4)
    try:
        kube.wait_synced(env.argocd, commit.commit, env.canary.sync_timeout_s, accept_suspended=False)
        kube.wait_rollout(
            env.rollout, lambda seen: seen.client_phase == "Healthy" and seen.finished, env.canary.step_timeout_s
        )
    except PipelineError as exc:
        raise TerminalError(
            f"the revert {commit.commit[:12]} of promotion {promotion_id} is pushed, but the cluster did not settle "
            f"on it: {exc.what}",
            hint=f"check `argocd app get {env.argocd.application}` and `kubectl argo rollouts get rollout "
            f"{env.rollout.name} -n {env.rollout.namespace}`; the Rollout stays aborted until it does",
        ) from None
    timings["healthy_s"] = round(clock() - t0, 4)
    return RevertResult(
        promotion_id=promotion_id, revert_commit=commit.commit, aborted=in_flight, pushed=commit.pushed, timings=timings
    )
