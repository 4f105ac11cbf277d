"""The guard: a change to an environment's values that the pipeline did not make is vetted like a promotion.

    newest values commit since the last guarded one -> made by the pipeline? nothing to do
        -> take the environment's slot -> resolve what it points at (pinned revision, artifact in the store)
        -> ran here before and passed? fast path: canary checks only
        -> else the environment's gates on the committed bytes (stored reports by manifest digest first)
        -> gates refuse: revert (naming the commit and its author) before its canary finishes
        -> gates pass: drive and check the canary as for a promotion (pipeline.canary.deploy), reverting on failure
        -> a guarded record (records/<env>/<id>.json, Action: guarded | unvetted)

An unpinned revision or an artifact missing from the store is reverted with the reason when the environment sets
``guard.enforce``; otherwise the change is recorded as unvetted. The guard's record names the commit it picked up,
so a second run finds nothing new. Plain library code: the Prefect deployment (flows/guard_flow.py) and
`modelctl guard` only call :func:`guard`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pipeline.config import Environment, PromotionConfig
from pipeline.errors import TerminalError
from pipeline.evaluate.gate import eval_gate
from pipeline.evaluate.report import EvalReport, baseline_from_record
from pipeline.evaluate.suite import load_suite
from pipeline.gates import GateResult
from pipeline.gitops import GitOps
from pipeline.gitops.commits import live_promotions
from pipeline.gitops.guarded import (
    ValuesCommit,
    changes_model,
    last_guarded,
    made_by_pipeline,
    record_at,
    values_at,
    values_commits,
    write_guard_record,
)
from pipeline.gitops.values import get_key
from pipeline.gitops.verify import stored_eval
from pipeline.loadtest.report import LoadReport
from pipeline.record import ArtifactSummary, GuardedChange, PromotionRecord, RolloutOutcome, new_promotion_id
from pipeline.store.base import ArtifactStore, StoredArtifact

if TYPE_CHECKING:
    from pipeline.canary import Check
    from pipeline.kube import Kube

SHA = re.compile(r"^[0-9a-f]{40}$")
Slot = Callable[[str, str], AbstractContextManager[Any]]


@dataclass(frozen=True)
class GuardResult:
    """What one guard run did in one environment: nothing (and why), or the record of the change it vetted."""

    env: str
    action: Literal["nothing", "guarded"]
    reason: str
    record: PromotionRecord | None = None


@dataclass
class World:
    """What the guard acts on; tests hand in the fake cluster's and a checks function."""

    cfg: PromotionConfig
    env_name: str
    gitops: GitOps
    store: ArtifactStore | None
    kube: Kube | None
    check: Check | None

    @property
    def env(self) -> Environment:
        return self.cfg.environments[self.env_name]


def _local_slot(env: str, holder: str) -> AbstractContextManager[Any]:
    from pipeline.slot import environment_slot

    return environment_slot(env, holder, renew_every_s=60.0)


def guard(
    cfg: PromotionConfig,
    env_name: str,
    *,
    gitops: GitOps | None = None,
    store: ArtifactStore | None = None,
    kube: Kube | None = None,
    check: Check | None = None,
    slot: Slot = _local_slot,
    workdir: Path | None = None,
) -> GuardResult:
    """Pick up the newest change to ``env_name``'s values that the pipeline did not make, once, and vet it.

    Raises:
        LeaseHeld: a promotion holds the environment (the guard tries again on its next run).
        TerminalError: a revert could not be completed (the message says what is left to do).
    """
    env = cfg.environment(env_name)
    gitops = gitops or GitOps.from_settings(cfg.gitops, workdir)
    if store is None and cfg.artifacts is not None:
        from pipeline.store import store_from_settings

        store = store_from_settings(cfg.artifacts)
    if kube is None and env.executor == "kubernetes":
        from pipeline.kube import Kube

        kube = Kube.connect()
    world = World(cfg, env_name, gitops, store, kube, check)
    found = _candidate(world)
    if isinstance(found, str):
        return GuardResult(env_name, "nothing", found)
    with slot(env_name, f"guard {found.commit[:12]}"), _cluster_lease(world, found):
        found = _candidate(world)  # again, holding the slot: a promotion may have finished meanwhile
        if isinstance(found, str):
            return GuardResult(env_name, "nothing", found)
        record = _vet(world, found)
    return GuardResult(env_name, "guarded", record.reason, record)


def _candidate(world: World) -> ValuesCommit | str:
    """The change to guard, or why there is none."""
    tip = world.gitops.sync()
    since = last_guarded(world.gitops, world.env_name)
    values_file = world.env.values_file
    for change in values_commits(world.gitops, values_file, since):
        if made_by_pipeline(world.gitops, world.env_name, change.commit):
            return f"the newest change to {values_file} ({change.commit[:12]}) is the pipeline's"
        if changes_model(world.gitops, change.commit, values_file):
            return change
    return f"no change to the model in {values_file} since {(since or tip)[:12]}"


@contextmanager
def _cluster_lease(world: World, found: ValuesCommit) -> Iterator[None]:
    """On a cluster, the environment's Lease too: no promotion may start while the guard walks a canary."""
    if world.kube is None or world.env.rollout is None:
        yield
        return
    with world.kube.hold_lease(world.env_name, world.env.rollout.namespace, f"guard {found.commit[:12]}"):
        yield


def _vet(world: World, found: ValuesCommit) -> PromotionRecord:
    values = values_at(world.gitops, found.commit, world.env.values_file)
    repo, revision = str(get_key(values, "model.repo") or ""), str(get_key(values, "model.revision") or "")
    artifact_id = str(get_key(values, "model.artifact") or "")
    change = GuardedChange(commit=found.commit, author=found.author, subject=found.subject, vetted=True)
    summary = ArtifactSummary(id=artifact_id, format=str(get_key(values, "model.format") or ""))
    record = PromotionRecord(
        id=new_promotion_id(), env=world.env_name, commit=found.commit, guarded=change,
        model={"repo": repo, "sha": revision} if repo and SHA.match(revision) else None,
        artifact=summary if artifact_id else None,
    )  # fmt: skip
    stored = world.store.lookup(artifact_id) if world.store is not None and artifact_id else None
    missing = _missing(world, revision, artifact_id, stored)
    if missing:
        return _unvetted_or_revert(world, record, missing)
    assert stored is not None and record.artifact is not None
    summary = summary.model_copy(update={"manifest_digest": stored.manifest_digest, "uri": stored.uri})
    record = record.model_copy(update={"artifact": summary})
    if _ran_before(world, found.commit, artifact_id, stored.manifest_digest):
        change = change.model_copy(update={"fast_path": True})
        record = record.model_copy(update={"guarded": change})
        return _canary(world, record, f"{artifact_id} ran in {world.env_name} before and passed its gates")
    gates, record, not_run = _judge(world, record, stored)
    if not_run:
        return _unvetted_or_revert(world, record, not_run)
    failed = [g for g in gates if not g.passed]
    if failed:
        reason = "; ".join(g.summary() for g in failed)
        return _revert(world, record, f"the gates refused it: {reason}")
    return _canary(world, record, "every gate passed" if gates else "the environment configures no gate")


def _missing(world: World, revision: str, artifact_id: str, stored: StoredArtifact | None) -> str:
    if not SHA.match(revision):
        return f"model.revision {revision or '(empty)'!r} is not a pinned 40-hex commit sha"
    if not artifact_id:
        return "model.artifact is empty"
    if world.store is None:
        return "promotion.yaml has no `artifacts:` store to find the artifact in"
    if stored is None:
        return f"artifact {artifact_id} is not in {world.store.describe}"
    return ""


def _ran_before(world: World, commit: str, artifact_id: str, digest: str) -> bool:
    """The environment ran these bytes before, committed by the pipeline or vetted by the guard, and they passed."""
    history = world.gitops.history(world.env_name)
    reverted = {e.reverts for e in history if e.action == "revert"}
    for entry in history:
        if entry.artifact != artifact_id or entry.commit == commit or entry.promotion_id in reverted:
            continue
        if entry.action not in ("promote", "guarded"):
            continue
        seen = record_at(world.gitops, entry.commit, world.env_name, entry.promotion_id)
        if seen is None or seen.decision != "promoted":
            continue
        seen_digest = seen.artifact.manifest_digest if seen.artifact else None
        if seen_digest in (None, digest):
            return True
    return False


def _judge(
    world: World, record: PromotionRecord, stored: StoredArtifact
) -> tuple[list[GateResult], PromotionRecord, str]:
    """The environment's gates on the committed bytes: reports kept by manifest digest first, else measured here
    (local executor). Returns the gate results, the record with them, and which gate could not run ("" if none)."""
    env, gates = world.env, []
    assert world.store is not None
    if env.gates.eval is not None:
        gate = env.gates.eval
        report = stored_eval(world.store, stored.manifest_digest)
        if report is None and env.executor == "local":
            report = _evaluate(world, stored)
        if report is None:
            return [], record, (
                f"the eval gate (suite {gate.suite}) has not run on {stored.artifact_id} ({stored.manifest_digest}) "
                "and cannot run from here on a cluster"
            )  # fmt: skip
        baseline = baseline_from_record(_baseline(world))
        result = eval_gate(report, baseline, load_suite(gate.suite), gate.policy)
        record = record.model_copy(update={"eval_report": report, "eval_gate": result})
        gates.append(result)
    if env.gates.load is not None and all(g.passed for g in gates):
        data = world.store.get_report(stored.manifest_digest, "load")
        if data is not None:
            from pipeline.loadtest import gate as load_gate

            load = LoadReport.model_validate(data)
            result = load_gate(load, env.gates.load.slo)
            record = record.model_copy(update={"load_report": load, "load_gate": result})
            gates.append(result)
    return gates, record, ""


def _baseline(world: World) -> PromotionRecord | None:
    """The record of the newest live promotion that has one (a forged trailer names no record: skipped)."""
    for entry in live_promotions(world.gitops.history(world.env_name)):
        record = record_at(world.gitops, entry.commit, world.env_name, entry.promotion_id)
        if record is not None:
            return record
    return None


def _evaluate(world: World, stored: StoredArtifact) -> EvalReport:
    """Evaluate the stored bytes here (preloaded into the environment's cache), and keep the report by digest."""
    from pipeline.jobs import execute
    from pipeline.steps import EvaluateRequest
    from pipeline.store import fetch_into_cache

    assert world.store is not None and world.env.gates.eval is not None
    gate = world.env.gates.eval
    entry = fetch_into_cache(world.store, stored.artifact_id, stored.manifest_digest, Path(world.env.cache.root))
    request = EvaluateRequest(model_dir=str(entry.path), suite=gate.suite, policy=gate.policy)
    report: EvalReport = execute(request, world.env_name, world.env).value()
    world.store.put_report(stored.manifest_digest, "eval", report)
    return report


def _who(record: PromotionRecord) -> str:
    assert record.guarded is not None
    return f"commit {record.guarded.commit[:12]} by {record.guarded.author}"


def _unvetted_or_revert(world: World, record: PromotionRecord, why: str) -> PromotionRecord:
    if world.env.guard.enforce:
        return _revert(world, record, why)
    assert record.guarded is not None
    change = record.guarded.model_copy(update={"vetted": False})
    record = record.model_copy(
        update={"guarded": change, "decision": "skipped", "reason": f"unvetted: {why} ({_who(record)})"}
    )
    return _write(world, record)


def _revert(world: World, record: PromotionRecord, why: str) -> PromotionRecord:
    """Revert the person's commit before its canary finishes: abort the Rollout first on a cluster."""
    assert record.guarded is not None
    reason = f"guard reverted {_who(record)}: {why}"
    commit = record.guarded.commit
    rollout = None
    if world.kube is not None:
        from pipeline.canary import revert

        result = revert(world.kube, world.gitops, world.env_name, world.env, commit, reason)
        rollout = RolloutOutcome(final="reverted", reason=reason, revert=result)
    else:
        world.gitops.revert(commit, reason=reason, env=world.env_name, values_file=world.env.values_file)
    record = record.model_copy(update={"decision": "reverted", "reason": reason, "rollout": rollout})
    return _write(world, record)


def _canary(world: World, record: PromotionRecord, why: str) -> PromotionRecord:
    """Drive and check the canary as for a promotion (on a cluster); it reverts the commit itself on failure."""
    assert record.guarded is not None
    if world.kube is None:
        return _write(world, record.model_copy(update={"decision": "promoted", "reason": why}))
    from pipeline.canary import deploy
    from pipeline.checks import canary_checks

    values = values_at(world.gitops, record.guarded.commit, world.env.values_file)
    served = world.cfg.model.served_name or str(get_key(values, "model.servedName") or get_key(values, "model.repo"))
    check = world.check or canary_checks(world.env_name, world.env, served)
    tip = world.gitops.sync()  # Argo CD applies the branch's tip, which carries this change
    commit, kube = record.guarded.commit, world.kube
    try:
        outcome = deploy(kube, world.gitops, world.env_name, world.env, tip, commit, check)
    except Exception as exc:  # as a promotion does: anything that breaks the walk reverts before it propagates
        from pipeline.canary import revert

        revert(kube, world.gitops, world.env_name, world.env, commit, f"guard failed on {_who(record)}: {exc}"[:300])
        raise
    if outcome.final == "done":
        update = {"decision": "promoted", "reason": f"{why}; canary: {outcome.reason}", "rollout": outcome}
    else:
        update = {"decision": "reverted", "reason": f"guard reverted {_who(record)}: {outcome.reason}"}
        update["rollout"] = outcome
    return _write(world, record.model_copy(update=update))


def _write(world: World, record: PromotionRecord) -> PromotionRecord:
    """Commit the guarded record. Its trailers name what runs after it, as a revert's do (the values before the
    person's commit when it was reverted), so history's newest entry always says what runs."""
    now = values_at(world.gitops, world.gitops.sync(), world.env.values_file)
    keys = {"Model": "model.repo", "Revision": "model.revision", "Artifact": "model.artifact", "Format": "model.format"}
    trailers = {trailer: str(get_key(now, key) or "") for trailer, key in keys.items()}
    eval_line = record.eval_gate.summary() if record.eval_gate else ""
    trailers |= {"Eval": eval_line, "Reason": record.reason, "Guarded-Commit": record.commit or ""}
    result = write_guard_record(world.gitops, record, trailers)
    if not result.pushed and not result.skipped:
        raise TerminalError(f"the guard's record {record.id} was not pushed", hint="run the guard again")
    return record
