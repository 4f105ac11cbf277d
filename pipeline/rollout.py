"""Pure canary decisions: (observed Rollout, policy, check results) -> Wait | Promote | Abort | Done.

No I/O here: :mod:`pipeline.kube` reads the Rollout into an :class:`ObservedRollout`, the caller runs the checks
(a short load test through the canary Service, Prometheus metrics) and feeds their :class:`GateResult` s in, and
:func:`decide` says what to do next and why. The phase is read in Argo's order (``../shared/ARGO.md``, "How a
client reads the phase"): :func:`rollout_phase` as argo-rollouts' ``GetRolloutPhase`` (what ``kubectl argo
rollouts`` shows), :func:`argocd_health` as Argo CD's ``health.lua``. The patches that act on the decisions are
:mod:`pipeline.kube.rollouts`'s (status only: the pipeline never patches a Rollout's spec, Git owns it).

Example:
    >>> seen = ObservedRollout(generation=2, observed_generation="2", phase="Paused", step_index=1, step_count=4,
    ...                        current_pod_hash="b", stable_rs="a", pause_reasons=("CanaryPauseStep",),
    ...                        controller_pause=True)
    >>> decide(seen, CanaryPolicy(consecutive_passes=2), checks=[], step_elapsed_s=0.0).kind
    'wait'
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pipeline.config import CanaryPolicy
from pipeline.gates import GateResult

Phase = Literal["Healthy", "Progressing", "Paused", "Degraded"]
Health = Literal["Healthy", "Progressing", "Suspended", "Degraded"]
PHASES: tuple[Phase, ...] = ("Healthy", "Progressing", "Paused", "Degraded")
DEGRADED_REASONS = ("RolloutAborted", "ProgressDeadlineExceeded")
WORKLOAD_GENERATION = "rollout.argoproj.io/workload-generation"


@dataclass(frozen=True)
class Condition:
    """One entry of ``status.conditions``."""

    type: str
    reason: str = ""
    message: str = ""


@dataclass(frozen=True)
class ObservedRollout:
    """The fields of a Rollout that the phase and the decisions depend on (spec and status), as read from the API.

    ``stable_rs`` is ``status.stableRS``, or ``status.canary.stableRS`` on objects from before Rollouts v0.8.
    """

    generation: int
    observed_generation: str | None
    phase: str | None
    step_index: int | None
    step_count: int
    current_pod_hash: str | None
    stable_rs: str | None
    message: str = ""
    pause_reasons: tuple[str, ...] = ()
    controller_pause: bool = False
    aborted: bool = False
    promote_full: bool = False
    spec_paused: bool = False
    conditions: tuple[Condition, ...] = ()
    step_pause_s: float | None = None  # the current step's pause duration, when it is a timed pause
    weight: int | None = None  # the canary weight in force: the last setWeight at or before the current step
    # what the computed phase (no status.phase) and the observation checks read
    has_status: bool = True
    strategy: str = "canary"  # "canary", "blueGreen", or "" (none: an invalid spec)
    steps_listed: bool = True  # spec.strategy.canary.steps is present (possibly empty)
    traffic_routing: bool = False
    spec_replicas: int = 1
    replicas: int = 0
    updated_replicas: int = 0
    available_replicas: int = 0
    active_selector: str | None = None  # blue-green: status.blueGreen.activeSelector
    restarting: bool = False  # spec.restartAt set and not yet status.restartedAt
    workload_ref: bool = False
    annotated: bool = False  # metadata.annotations present (Argo CD's check looks at the workload only then)
    workload_generation: str | None = None  # the rollout.argoproj.io/workload-generation annotation
    workload_observed_generation: str | None = None

    @property
    def condition_reasons(self) -> tuple[str, ...]:
        return tuple(c.reason for c in self.conditions)

    @property
    def generation_observed(self) -> bool:
        """The controller has seen this generation: compared as numbers, as Argo does.

        A missing or non-numeric ``observedGeneration`` (a hash, Rollouts <= v0.9) or one larger than the
        generation counts as observed.
        """
        observed = _number(self.observed_generation)
        return observed is None or observed >= self.generation

    @property
    def unpausing(self) -> bool:
        """A client cleared the pause conditions and the controller has not reacted yet (``IsUnpausing``)."""
        return self.controller_pause and not self.pause_reasons

    @property
    def legacy(self) -> bool:
        """No numeric observedGeneration, or a larger one: a Rollouts <= v0.9 object (Argo CD's actions' test)."""
        observed = _number(self.observed_generation)
        return observed is None or observed > self.generation

    @property
    def client_phase(self) -> Phase:
        """The phase as ``kubectl argo rollouts get`` shows it (:func:`rollout_phase`)."""
        return rollout_phase(self)[0]

    @property
    def client_message(self) -> str:
        return rollout_phase(self)[1]

    @property
    def finished(self) -> bool:
        """The update is over: the current template is the stable one."""
        return self.stable_rs is not None and self.stable_rs == self.current_pod_hash

    @property
    def step(self) -> str:
        """ "step 2/4" for messages."""
        index = self.step_count if self.step_index is None else self.step_index
        return f"step {index}/{self.step_count}"


def _number(value: Any) -> int | None:
    """A generation as Go's ``strconv.Atoi`` reads it: None for a missing or non-numeric value."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value
    return int(value) if re.fullmatch(r"[+-]?\d+", str(value)) else None


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def observe_rollout(obj: dict[str, Any]) -> ObservedRollout:
    """Read a Rollout object (spec and status, as the API returns it) into an :class:`ObservedRollout`."""
    meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
    status = obj.get("status") or {}
    strategy = spec.get("strategy") or {}
    canary = strategy.get("canary")
    steps = (canary or {}).get("steps")
    steps_list = steps if isinstance(steps, list) else []
    index = status.get("currentStepIndex")
    step = steps_list[index] if isinstance(index, int) and 0 <= index < len(steps_list) else {}
    duration = (step.get("pause") or {}).get("duration") if "pause" in step else None
    conditions = status.get("conditions")
    annotations = meta.get("annotations")
    stable = status.get("stableRS")
    if stable is None:
        stable = (status.get("canary") or {}).get("stableRS")
    restart_at = spec.get("restartAt")
    return ObservedRollout(
        generation=_number(meta.get("generation")) or 0,
        observed_generation=_text(status.get("observedGeneration")),
        phase=status.get("phase"),
        message=status.get("message") or "",
        step_index=index if isinstance(index, int) else None,
        step_count=len(steps_list),
        current_pod_hash=status.get("currentPodHash"),
        stable_rs=stable,
        pause_reasons=tuple(str(c.get("reason", "")) for c in status.get("pauseConditions") or []),
        controller_pause=bool(status.get("controllerPause")),
        aborted=bool(status.get("abort")),
        promote_full=bool(status.get("promoteFull")),
        spec_paused=bool(spec.get("paused")),
        conditions=tuple(
            Condition(str(c.get("type", "")), str(c.get("reason", "")), str(c.get("message", "")))
            for c in (conditions if isinstance(conditions, list) else [])
        ),
        step_pause_s=None if duration is None else duration_seconds(duration),
        weight=0 if status.get("abort") else weight_at(steps_list, index),
        has_status=obj.get("status") is not None,
        strategy="blueGreen" if "blueGreen" in strategy else "canary" if canary is not None else "",
        steps_listed=steps is not None,
        traffic_routing=bool((canary or {}).get("trafficRouting")),
        spec_replicas=1 if spec.get("replicas") is None else int(spec["replicas"]),
        replicas=int(status.get("replicas") or 0),
        updated_replicas=int(status.get("updatedReplicas") or 0),
        available_replicas=int(status.get("availableReplicas") or 0),
        active_selector=(status.get("blueGreen") or {}).get("activeSelector"),
        restarting=restart_at is not None and str(restart_at) != str(status.get("restartedAt")),
        workload_ref=spec.get("workloadRef") is not None,
        annotated=annotations is not None,
        workload_generation=_text((annotations or {}).get(WORKLOAD_GENERATION)),
        workload_observed_generation=_text(status.get("workloadObservedGeneration")),
    )


def weight_at(steps: list[Any], index: Any) -> int | None:
    """The canary weight in force at step ``index``: the last ``setWeight`` at or before it (None before any, or
    with no step index). Past the last step the canary has completed: 100, as Argo Rollouts promotes it fully."""
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        return None
    if index >= len(steps):
        return 100
    weights = [s.get("setWeight") for s in steps[: index + 1] if isinstance(s, dict)]
    found = [w for w in weights if isinstance(w, int) and not isinstance(w, bool)]
    return found[-1] if found else None


def duration_seconds(duration: Any) -> float:
    """An Argo duration ("30s", "10m", "1h", or a number of seconds) in seconds."""
    text = str(duration).strip()
    units = {"s": 1, "m": 60, "h": 3600}
    return float(text[:-1]) * units[text[-1]] if text[-1:] in units else float(text)


# reading the phase ---------------------------------------------------------------------------------------------
def rollout_phase(seen: ObservedRollout) -> tuple[Phase, str]:
    """Phase and message as argo-rollouts' ``GetRolloutPhase`` (``utils/rollout/rolloututil.go``) reads them.

    In order: the generation not observed; unpausing; a ``workloadRef`` whose workload generation is not observed
    (Argo resolves the template from the Deployment); ``status.phase`` when set (an unknown one reads as
    Progressing, named in the message); else :func:`calculate_phase`.
    """
    if not seen.generation_observed:
        return "Progressing", "waiting for rollout spec update to be observed"
    if seen.unpausing:
        return "Progressing", "waiting for rollout to unpause"
    wanted, observed = _number(seen.workload_generation), _number(seen.workload_observed_generation)
    if seen.workload_ref and wanted is not None and observed is not None and wanted != observed:
        return "Progressing", "waiting for rollout spec update to be observed for the reference workload"
    if seen.phase:
        if seen.phase in PHASES:
            return seen.phase, seen.message
        return "Progressing", f"unknown phase {seen.phase!r}: {seen.message}"
    return calculate_phase(seen)


def calculate_phase(seen: ObservedRollout) -> tuple[Phase, str]:
    """``CalculateRolloutPhase``: the phase from spec and status (what the controller writes into status.phase).

    Two readings of pre-v0.8 objects follow Argo CD's check, which Go's v1 types cannot see: ``stable_rs`` falls
    back to ``status.canary.stableRS``, and a blue-green Rollout with no stableRS at all (v0.7) is not held back.
    """
    for c in seen.conditions:
        if c.type == "InvalidSpec":
            return "Degraded", f"InvalidSpec: {c.message}"
        if c.reason in DEGRADED_REASONS:
            return "Degraded", f"{c.reason}: {c.message}"
    if seen.spec_paused:
        return "Paused", "manually paused"
    if seen.pause_reasons:
        return "Paused", seen.pause_reasons[0]
    if seen.restarting:
        return "Progressing", "rollout is restarting"
    if seen.updated_replicas < seen.spec_replicas:
        return "Progressing", "more replicas need to be updated"
    if seen.available_replicas < seen.updated_replicas:
        return "Progressing", "updated replicas are still becoming available"
    if seen.strategy == "blueGreen":
        if not seen.active_selector or seen.active_selector != seen.current_pod_hash:
            return "Progressing", "active service cutover pending"
        if seen.stable_rs and not seen.finished:
            return "Progressing", "waiting for post-promotion verification to complete"
    elif seen.strategy == "canary":
        if not seen.traffic_routing and seen.replicas > seen.updated_replicas:
            return "Progressing", "old replicas are pending termination"
        if not seen.stable_rs or not seen.finished:
            return "Progressing", "waiting for all steps to complete"
    return "Healthy", ""


def argocd_health(seen: ObservedRollout) -> tuple[Health, str]:
    """Status and message of Argo CD's health check for Rollouts (``health.lua``): Paused reads as Suspended.

    It differs from :func:`rollout_phase` where its source does: no ``status`` at all is not observed; no
    unpausing rule; conditions count only as ``Progressing`` ones; a pause condition before ``spec.paused``;
    old replicas count even with a traffic router; its own messages.
    """
    wanted, observed = _number(seen.workload_generation), _number(seen.workload_observed_generation)
    workload_seen = not (seen.workload_ref and seen.annotated) or wanted == observed
    if not seen.has_status or not seen.generation_observed or not workload_seen:
        return "Progressing", "Waiting for rollout spec update to be observed"
    if seen.phase is not None:
        return ("Suspended" if seen.phase == "Paused" else seen.phase), seen.message  # type: ignore[return-value]
    for c in seen.conditions:
        if c.type == "InvalidSpec" or (c.type == "Progressing" and c.reason in DEGRADED_REASONS):
            return "Degraded", c.message
    if seen.pause_reasons or seen.spec_paused:
        return "Suspended", "Rollout is paused"
    if seen.current_pod_hash is None:
        return "Progressing", "Waiting for rollout to finish: status has not been reconciled."
    if seen.updated_replicas < seen.spec_replicas:
        return "Progressing", "Waiting for roll out to finish: More replicas need to be updated"
    if seen.available_replicas < seen.updated_replicas:
        return "Progressing", "Waiting for roll out to finish: updated replicas are still becoming available"
    if seen.strategy == "blueGreen":
        if seen.active_selector != seen.current_pod_hash:
            return "Progressing", "active service cutover pending"
        if seen.stable_rs and not seen.finished:
            return "Progressing", "waiting for analysis to complete"
    elif seen.strategy == "canary":
        if seen.replicas > seen.updated_replicas:
            return "Progressing", "Waiting for roll out to finish: old replicas are pending termination"
        if not seen.stable_rs or not seen.finished:
            return "Progressing", "Waiting for rollout to finish steps"
    return "Healthy", ""


@dataclass(frozen=True)
class Wait:
    """Nothing to do yet; look again after ``after_s``. ``check`` says a canary check should run first."""

    reason: str
    after_s: float
    check: bool = False
    kind: Literal["wait"] = "wait"


@dataclass(frozen=True)
class Promote:
    """Promote the Rollout past its current pause step."""

    reason: str
    kind: Literal["promote"] = "promote"


@dataclass(frozen=True)
class Abort:
    """Abort the Rollout (traffic back to stable) and revert."""

    reason: str
    kind: Literal["abort"] = "abort"


@dataclass(frozen=True)
class Done:
    """The canary completed: the new template is stable and Healthy."""

    reason: str
    kind: Literal["done"] = "done"


Action = Wait | Promote | Abort | Done


def passing_streak(checks: Sequence[GateResult]) -> int:
    """How many checks passed in a row, counting back from the newest."""
    streak = 0
    for result in reversed(checks):
        if not result.passed:
            break
        streak += 1
    return streak


def decide(seen: ObservedRollout, policy: CanaryPolicy, checks: Sequence[GateResult], step_elapsed_s: float) -> Action:
    """The next action for a canary, with the reason a person reads in the record.

    ``checks`` are the results of canary checks at the current step, oldest first (the caller starts a new list
    when the step index changes); ``step_elapsed_s`` is how long the Rollout has been at this step. A step passes
    after ``policy.consecutive_passes`` good checks in a row, fails on any failed check, and fails when it lasts
    longer than ``policy.step_timeout_s``. Inconclusive checks neither pass nor fail: they break the streak.
    """
    phase = seen.client_phase
    poll = min(policy.check_interval_s, 5.0)
    over_time = step_elapsed_s > policy.step_timeout_s
    timeout = f"{seen.step} did not finish within step_timeout_s={policy.step_timeout_s:g}s"

    if phase == "Degraded":
        reason = next((r for r in seen.condition_reasons if r in DEGRADED_REASONS or r == "InvalidSpec"), "Degraded")
        message = seen.client_message
        detail = f": {message}" if message else ""
        return Abort(f"the Rollout is Degraded ({reason}){detail}")
    if seen.aborted:
        return Abort("the Rollout was aborted (status.abort is set)")
    failed = [c for c in checks if c.verdict == "fail"]
    if failed:
        return Abort(f"canary check failed at {seen.step}: {failed[-1].summary()}")
    if phase == "Healthy" and seen.finished:
        return Done(f"the Rollout is Healthy on the new template after {seen.step_count} steps")
    if phase == "Paused":
        if seen.spec_paused:  # the pipeline never patches spec (Git owns it): a person resumes it, or not
            return (
                Abort(f"{timeout} (paused by hand: spec.paused, left to a person to resume)")
                if over_time
                else Wait(
                    "paused by hand (spec.paused): the pipeline never changes a Rollout's spec, so it waits for a "
                    "person to resume it (kubectl argo rollouts promote)",
                    poll,
                )
            )
        if "InconclusiveAnalysisRun" in seen.pause_reasons or "InconclusiveExperiment" in seen.pause_reasons:
            return Abort(f"Argo analysis was inconclusive at {seen.step}; a canary is not promoted on doubt")
        return _at_pause_step(seen, policy, checks, over_time, timeout)
    message = seen.client_message or "no message"
    if over_time:
        return Abort(f"{timeout} (still {phase}: {message})")
    if phase == "Healthy":
        return Wait(f"Healthy but not finished (stableRS {seen.stable_rs} != {seen.current_pod_hash})", poll)
    if not seen.generation_observed:
        return Wait("the controller has not observed the new spec yet", poll)
    return Wait(f"canary progressing at {seen.step}: {message}", poll)


def _at_pause_step(
    seen: ObservedRollout, policy: CanaryPolicy, checks: Sequence[GateResult], over_time: bool, timeout: str
) -> Action:
    """At a canary pause step: check, promote after enough good checks in a row, or give up at the timeout."""
    streak, need = passing_streak(checks), policy.consecutive_passes
    if streak >= need:
        if seen.step_pause_s is not None:
            return Wait(
                f"{streak}/{need} good checks; the timed pause at {seen.step} ends by itself",
                policy.check_interval_s,
                check=True,
            )
        return Promote(f"{streak}/{need} good checks in a row at {seen.step}")
    if over_time:
        return Abort(f"{timeout} with {streak}/{need} good checks in a row")
    reason = f"{streak}/{need} good checks in a row at {seen.step}"
    if checks and checks[-1].verdict == "inconclusive":
        reason += f" (last check inconclusive: {checks[-1].summary()})"
    return Wait(reason, 0.0 if not checks else policy.check_interval_s, check=True)
