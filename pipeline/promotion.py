"""The promotion as a plain sequence of typed steps, with every decision; callable without Prefect.

    resolve -> quantize -> publish -> [requires] -> preload -> verify -> evaluate -> load-test -> decide
        -> approval -> commit -> (pull-request mode: wait for merge, resume later) -> canary -> record

Configuration is read once by the caller and passed typed: nothing here reads promotion.yaml, so editing it
while a promotion runs changes nothing in that run. Everything before the commit only produces evidence;
nothing reaches Git unless every gate passed. The decisions live here: the rejection (the gates are measured
and judged by their kind in :mod:`pipeline.gating`), the serving format, where each step runs
(:func:`pipeline.jobs.execute`), the `requires` check on manifest digests, and the revert of a canary that failed.

An orchestrator wraps the effects through :class:`Hooks`: each step (a request and the function that runs it),
each effect (commit, canary, revert), the environment's slot, the approval and the published report. The flow
in flows/ makes them Prefect tasks (retries, caching, concurrency, approval, artifacts); the default hooks just
call through, so a program, a test or a plain CLI can promote without Prefect.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pipeline.config import Environment, PromotionConfig
from pipeline.errors import Decided, TerminalError
from pipeline.gating import PromotionRejected, judge, replica_scale, serving_values, verify
from pipeline.gitops import CommitResult, GitOps, Promotion
from pipeline.gitops.commits import live_promotions
from pipeline.jobs import execute
from pipeline.quantize import Artifact, Backend, Method, Recipe
from pipeline.record import ArtifactSummary, PromotionRecord, RolloutOutcome, new_promotion_id
from pipeline.source import ModelSource
from pipeline.steps import (
    AnyRequest,
    PreloadRequest,
    PublishRequest,
    QuantizeRequest,
    ResolveRequest,
    StepResult,
    StoredArtifact,
    source_policy,
)

T = TypeVar("T")
Execute = Callable[[AnyRequest], StepResult[Any]]


class Hooks:
    """How an orchestrator wraps what a promotion does. The defaults call straight through."""

    flow_run: str = ""

    def step(self, request: AnyRequest, run: Execute) -> StepResult[Any]:
        """Run one step (a flow makes it a task: retries on TransientError, caching on the request)."""
        return run(request)

    def effect(self, name: str, run: Callable[[], T]) -> T:
        """Run one effect on the outside world: ``commit``, ``canary``, ``revert``."""
        return run()

    def slot(self, env: str) -> AbstractContextManager[None]:
        """Hold the environment's one promotion slot for the block."""
        return nullcontext()

    def approve(self, env: str, timeout_s: float, what: str) -> str:
        """Wait for a person to approve ``what``; returns who approved.

        Raises:
            TerminalError: rejected, timed out, or (here) nobody can be asked.
        """
        raise TerminalError(
            f"{env} requires manual approval, and this promotion runs without anyone to ask",
            hint="run it through the promote flow (`modelctl promote`), which pauses for `modelctl approve`",
        )

    def report(self, record: PromotionRecord, env: Environment) -> None:
        """Show the finished (or rejected) record: the flow publishes it as Prefect artifacts."""

    def progress(self, step: str, status: str) -> None:
        """Called before each step (``started``) and after it (its status)."""


Listener = Callable[[str, str], None]
_listeners: list[Listener] = []


@contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Tell ``listener(step, status)`` of each step of the promotions this process runs in the block (``started``,
    then its status), whatever hooks wrap them: how a CLI prints one line per step while a flow runs them."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


def _tell(hooks: Hooks, step: str, status: str) -> None:
    hooks.progress(step, status)
    for listener in list(_listeners):
        listener(step, status)


@dataclass
class Run:
    """One promotion in progress: the typed configuration it was started with, and what it has found so far."""

    cfg: PromotionConfig
    env_name: str
    gitops: GitOps
    hooks: Hooks
    record: PromotionRecord
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def env(self) -> Environment:
        return self.cfg.environments[self.env_name]

    def step(self, request: AnyRequest) -> Any:
        """Run a step through the hooks where the environment runs it; returns its typed output."""
        _tell(self.hooks, request.step, "started")
        try:
            result = self.hooks.step(request, self._execute)
        except BaseException:
            _tell(self.hooks, request.step, "failed")
            raise
        self.timings[request.step] = result.seconds
        _tell(self.hooks, request.step, result.status)
        return result.value()

    def _execute(self, request: AnyRequest) -> StepResult[Any]:
        kube = None
        if self.env.executor == "kubernetes":
            from pipeline.kube import Kube

            kube = Kube.connect()
        return execute(request, self.env_name, self.env, kube, serving=serving_values(self))

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        _tell(self.hooks, name, "started")
        status = "failed"
        try:
            yield
            status = "done"
        finally:
            self.timings[name] = round(time.perf_counter() - started, 3)
            _tell(self.hooks, name, status)


def artifacts_root(env: Environment) -> Path:
    """Where quantized artifacts are built for ``env``: beside the preloaded entries on the cache volume."""
    return Path(env.cache.root) / ".artifacts"


def serving_format(artifact: Artifact) -> str:
    """The quantization name vLLM is given for the artifact's format (the chart's ``model.quantization``);
    ``none`` for an unquantized artifact: the chart then passes no ``--quantization`` flag."""
    return {"compressed-tensors": "compressed-tensors", "unquantized": "none"}.get(artifact.format, "awq")


def check_requires(gitops: GitOps, env_name: str, env: Environment, stored: StoredArtifact) -> None:
    """An environment with ``requires`` takes only the bytes live (and evaluated) in each required environment.

    Raises:
        TerminalError: a required environment does not run this artifact, or runs other bytes under its id.
    """
    for needed in env.requires:
        live = [e for e in live_promotions(gitops.history(needed)) if e.artifact == stored.artifact_id]
        if not live:
            raise TerminalError(
                f"{env_name} requires {needed} first, and {stored.artifact_id} is not live in {needed}",
                hint=f"promote the same model and recipe to {needed} first (`modelctl promote ... --env {needed}`)",
            )
        seen = gitops.record(needed, live[0].promotion_id).artifact
        digest = seen.manifest_digest if seen else None
        if digest is not None and digest != stored.manifest_digest:
            raise TerminalError(
                f"{env_name} requires the bytes {needed} evaluated: {needed} runs {stored.artifact_id} as {digest}, "
                f"this build is {stored.manifest_digest}",
                hint=f"preload the artifact {needed} published instead of a rebuilt or changed copy",
            )


def promote(
    cfg: PromotionConfig,
    env_name: str,
    ref: str,
    *,
    method: Method | None = None,
    backend: Backend | None = None,
    promotion_id: str | None = None,
    workdir: Path | None = None,
    hooks: Hooks | None = None,
) -> PromotionRecord:
    """Promote ``ref`` (org/name[@rev] or a local directory) to ``env_name``; returns the record.

    In pull-request mode the record comes back ``waiting`` once the branch is pushed (the slot is released);
    :func:`resume` finishes it after the merge.

    Raises:
        TerminalError: a gate failed (nothing was committed), a step was refused, or the canary was reverted.
    """
    hooks = hooks or Hooks()
    env = cfg.environment(env_name)
    pid = promotion_id or new_promotion_id()
    record = PromotionRecord(id=pid, env=env_name, flow_run=hooks.flow_run or None)
    run = Run(cfg, env_name, GitOps.from_settings(cfg.gitops, workdir), hooks, record)
    with hooks.slot(env_name):
        policy = source_policy(cfg.model)
        source: ModelSource = run.step(ResolveRequest(ref=ref, policy=policy))
        recipe = Recipe.from_config(cfg.model.quantization, method)
        chosen = backend or cfg.model.quantization.backend
        quantize = QuantizeRequest(
            source=source, recipe=recipe, backend=chosen, out_root=str(artifacts_root(env)), policy=policy
        )
        artifact: Artifact = run.step(quantize)
        stored: StoredArtifact = run.step(PublishRequest(artifact_dir=artifact.path, store=cfg.artifacts))
        run.record = run.record.model_copy(
            update={"model": source, "artifact": ArtifactSummary.of(artifact, stored.manifest_digest, stored.uri)}
        )
        running = already_live(run.gitops, env_name, artifact.id, stored.manifest_digest)
        if running is not None and running.id != pid:  # the same bytes run there: nothing to measure or commit
            return _already_runs(run, running)  # (a re-run of that promotion's own id converges below instead)
        check_requires(run.gitops, env_name, env, stored)
        preload = PreloadRequest(
            artifact_dir=artifact.path,
            cache_root=env.cache.root,
            expected_digest=stored.manifest_digest,
            store=cfg.artifacts,
            artifact_id=artifact.id,
        )
        entry = run.step(preload)
        verify(run, entry.path, artifact.id)
        gates = judge(run, entry.path)
        failed = [g for g in gates if not g.passed]
        if failed:
            reason = "; ".join(g.summary() for g in failed)
            run.record = run.record.model_copy(
                update={"decision": "rejected", "reason": reason, "timings": run.timings}
            )
            hooks.report(run.record, env)
            raise PromotionRejected(run.record, artifact.id)
        promotion = Promotion(
            id=pid,
            env=env_name,
            model=source.repo,
            revision=source.sha,
            artifact=artifact.id,
            format=artifact.recipe.name,
            quantization=serving_format(artifact),
            served_name=cfg.model.served_name,
            eval=run.record.eval_gate.summary() if run.record.eval_gate else "",
            latency=run.record.load_gate.summary() if run.record.load_gate else "",
            scale=replica_scale(run),
            flow_run=hooks.flow_run,
        )
        if env.approval.required:
            with run.timed("approval"):
                hooks.approve(env_name, env.approval.timeout_s, artifact.id)
        decision = "promoted"
        if cfg.gitops.mode == "pull-request":  # the committed record says so until resume() finishes it
            decision = "waiting"
        run.record = run.record.model_copy(
            update={"decision": decision, "reason": "every gate passed", "timings": run.timings}
        )
        with cluster_guard(run):
            with run.timed("commit"):
                commit = hooks.effect("commit", lambda: run.gitops.promote(promotion, env.values_file, run.record))
            run.record = run.record.model_copy(update={"commit": commit.commit})
            if _waits_for_merge(cfg, commit):
                return _waiting(run, commit)
            _deploy(run, commit.commit, cfg.model.served_name or source.repo)
    return _finish(run)


def already_live(gitops: GitOps, env_name: str, artifact_id: str, digest: str) -> PromotionRecord | None:
    """The record of the promotion that runs ``artifact_id`` as these bytes (manifest ``digest``) in ``env_name``
    now, per the GitOps history; None when anything else (or nothing, or a merge still waited for) runs there."""
    gitops.sync()
    live = live_promotions(gitops.history(env_name))
    if not live or live[0].artifact != artifact_id:
        return None
    try:
        record = gitops.record(env_name, live[0].promotion_id)
    except TerminalError:  # a change without a record (a person's): what its bytes are is not known
        return None
    seen = record.artifact.manifest_digest if record.artifact else None
    if record.decision != "promoted" or seen != digest:
        return None
    return record.model_copy(update={"commit": record.commit or live[0].commit})


def _already_runs(run: Run, running: PromotionRecord) -> PromotionRecord:
    """A repeat of what already runs: a skip that keeps the running promotion's id, commit and evidence."""
    commit = (running.commit or "-")[:12]
    reason = (
        f"{run.env_name} already runs {running.artifact.id if running.artifact else '-'} with these bytes "
        f"(promotion {running.id}, commit {commit}): nothing was measured or committed"
    )
    run.record = running.model_copy(
        update={"decision": "skipped", "reason": reason, "timings": run.timings, "flow_run": run.hooks.flow_run or None}
    )
    run.hooks.report(run.record, run.env)
    return run.record


def waiting_for_merge(gitops: GitOps, env_name: str) -> str | None:
    """The live promotion of ``env_name`` whose record still says it waits for its merge (merged, not resumed)."""
    live = live_promotions(gitops.history(env_name))
    if live and gitops.record(env_name, live[0].promotion_id).decision == "waiting":
        return live[0].promotion_id
    return None


def resume(
    cfg: PromotionConfig,
    env_name: str,
    promotion_id: str,
    *,
    workdir: Path | None = None,
    hooks: Hooks | None = None,
) -> PromotionRecord:
    """Finish a pull-request promotion once its branch is merged: take the slot again, then the canary.

    Raises:
        TerminalError: the promotion is not merged yet (nothing is done), was reverted, or its canary was.
    """
    hooks = hooks or Hooks()
    cfg.environment(env_name)
    gitops = GitOps.from_settings(cfg.gitops, workdir)
    merged = next((e for e in gitops.history(env_name) if e.promotion_id == promotion_id), None)
    if merged is None or merged.action != "promote":
        raise TerminalError(
            f"promotion {promotion_id} is not merged into {cfg.gitops.branch} of the GitOps repo yet",
            hint=f"merge its pull request (branch modelctl/{env_name}/{promotion_id}), then resume it again",
        )
    if merged not in live_promotions(gitops.history(env_name)):
        raise TerminalError(f"promotion {promotion_id} was merged and then reverted: there is nothing to resume")
    stored = gitops.record(env_name, promotion_id)
    update = {"commit": merged.commit, "flow_run": hooks.flow_run or stored.flow_run, "decision": "promoted"}
    record = stored.model_copy(update=update)
    run = Run(cfg, env_name, gitops, hooks, record, dict(stored.timings))
    with hooks.slot(env_name), cluster_guard(run):
        served = cfg.model.served_name or (stored.model.repo if stored.model else merged.model)
        _deploy(run, merged.commit, served)
    return _finish(run)


@contextmanager
def cluster_guard(run: Run) -> Iterator[None]:
    """On a cluster: hold the environment's Lease and check the GPU pool before the commit; locally: nothing."""
    if run.env.executor != "kubernetes":
        yield
        return
    from pipeline.canary import guarded
    from pipeline.kube import Kube

    with guarded(Kube.connect(), run.env_name, run.env, run.hooks.flow_run or run.record.id):
        yield


def _waits_for_merge(cfg: PromotionConfig, commit: CommitResult) -> bool:
    return cfg.gitops.mode == "pull-request" and not commit.skipped and bool(commit.branch)


def _waiting(run: Run, commit: CommitResult) -> PromotionRecord:
    reason = (
        f"waiting for merge: branch {commit.branch} holds commit {commit.commit[:12]}; after the merge run "
        f"`modelctl promote --resume {run.record.id} --env {run.env_name}`"
    )
    update = {"decision": "waiting", "reason": reason, "branch": commit.branch, "timings": run.timings}
    run.record = run.record.model_copy(update=update)
    run.hooks.report(run.record, run.env)
    return run.record


def _deploy(run: Run, commit: str, served: str) -> None:
    """On a cluster: make ``commit`` live and walk its canary; any error on the way reverts before it propagates."""
    if run.env.executor != "kubernetes":
        return
    from pipeline.canary import deploy, revert
    from pipeline.checks import canary_checks
    from pipeline.kube import Kube

    env, name, pid = run.env, run.env_name, run.record.id
    # Nothing live before this promotion: the chart's stable ReplicaSet is the empty one, no canary to compare.
    first = not [e for e in live_promotions(run.gitops.history(name)) if e.promotion_id != pid]
    with run.timed("canary"):
        try:
            outcome: RolloutOutcome = run.hooks.effect(
                "canary",
                lambda: deploy(
                    Kube.connect(), run.gitops, name, env, commit, pid, canary_checks(name, env, served), first
                ),
            )
        except Exception as exc:
            why = f"the promotion failed after its commit: {exc}"[:300]
            run.hooks.effect("revert", lambda: revert(Kube.connect(), run.gitops, name, env, pid, why))
            raise
    decision = "promoted" if outcome.final == "done" else "reverted"
    run.record = run.record.model_copy(update={"rollout": outcome, "decision": decision, "reason": outcome.reason})


def _finish(run: Run) -> PromotionRecord:
    run.record = run.record.model_copy(update={"timings": run.timings})
    run.hooks.report(run.record, run.env)
    if run.record.decision == "reverted":
        raise PromotionReverted(run.record)
    return run.record


class PromotionReverted(Decided):
    """The canary failed and the promotion was reverted; ``record`` is the finished record (with its timeline)."""

    def __init__(self, record: PromotionRecord) -> None:
        super().__init__(f"promotion {record.id} to {record.env} was reverted: {record.reason}")
        self.record = record

    def __reduce__(self) -> tuple[Any, ...]:  # pickled with its record (Prefect may keep a flow's exception)
        return (type(self), (self.record,))
