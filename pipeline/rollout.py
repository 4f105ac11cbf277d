"""Pure canary decisions: (observed Rollout status, policy, check results) -> Wait | Promote | Abort | Done.

No I/O here: :mod:`pipeline.kube` reads the Rollout into an :class:`ObservedRollout`, the caller runs the checks
(a short load test through the canary Service, Prometheus metrics) and feeds their :class:`GateResult` s in, and
:func:`decide` says what to do next and why. The phase is read the way ``kubectl argo rollouts`` reads it.

Example:
    >>> seen = ObservedRollout(generation=2, observed_generation="2", phase="Paused", step_index=1, step_count=4,
    ...                        current_pod_hash="b", stable_rs="a", pause_reasons=("CanaryPauseStep",),
    ...                        controller_pause=True)
    >>> decide(seen, CanaryPolicy(consecutive_passes=2), checks=[], step_elapsed_s=0.0).kind
    'wait'
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pipeline.config import CanaryPolicy
from pipeline.gates import GateResult

Phase = Literal["Healthy", "Progressing", "Paused", "Degraded"]
DEGRADED_REASONS = ("RolloutAborted", "ProgressDeadlineExceeded")


@dataclass(frozen=True)
class ObservedRollout:
    """The fields of a Rollout that decisions depend on (spec and status), as read from the API."""

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
    condition_reasons: tuple[str, ...] = ()
    step_pause_s: float | None = None  # the current step's pause duration, when it is a timed pause

    @property
    def client_phase(self) -> Phase:
        """The phase as ``kubectl argo rollouts get`` shows it.

        An unobserved generation is Progressing (the controller has not seen the spec yet); a controller pause
        without pause conditions is Progressing (being unpaused); otherwise ``status.phase``.
        """
        if self.observed_generation != str(self.generation):
            return "Progressing"
        if self.controller_pause and not self.pause_reasons:
            return "Progressing"
        if self.phase in ("Healthy", "Progressing", "Paused", "Degraded"):
            return self.phase  # type: ignore[return-value]
        return "Progressing"

    @property
    def finished(self) -> bool:
        """The update is over: the current template is the stable one."""
        return self.stable_rs is not None and self.stable_rs == self.current_pod_hash

    @property
    def step(self) -> str:
        """ "step 2/4" for messages."""
        index = self.step_count if self.step_index is None else self.step_index
        return f"step {index}/{self.step_count}"


def observe_rollout(obj: dict[str, Any]) -> ObservedRollout:
    """Read a Rollout object (spec and status, as the API returns it) into an :class:`ObservedRollout`."""
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    steps = ((spec.get("strategy") or {}).get("canary") or {}).get("steps") or []
    index = status.get("currentStepIndex")
    step = steps[index] if isinstance(index, int) and 0 <= index < len(steps) else {}
    duration = (step.get("pause") or {}).get("duration") if "pause" in step else None
    observed = status.get("observedGeneration")
    return ObservedRollout(
        generation=int((obj.get("metadata") or {}).get("generation") or 0),
        observed_generation=None if observed is None else str(observed),
        phase=status.get("phase"),
        message=status.get("message") or "",
        step_index=index,
        step_count=len(steps),
        current_pod_hash=status.get("currentPodHash"),
        stable_rs=status.get("stableRS"),
        pause_reasons=tuple(c.get("reason", "") for c in status.get("pauseConditions") or []),
        controller_pause=bool(status.get("controllerPause")),
        aborted=bool(status.get("abort")),
        promote_full=bool(status.get("promoteFull")),
        spec_paused=bool(spec.get("paused")),
        condition_reasons=tuple(c.get("reason", "") for c in status.get("conditions") or []),
        step_pause_s=None if duration is None else duration_seconds(duration),
    )


def duration_seconds(duration: Any) -> float:
    """An Argo duration ("30s", "10m", "1h", or a number of seconds) in seconds."""
    text = str(duration).strip()
    units = {"s": 1, "m": 60, "h": 3600}
    return float(text[:-1]) * units[text[-1]] if text[-1:] in units else float(text)


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
        reason = next((r for r in seen.condition_reasons if r in DEGRADED_REASONS), "Degraded")
        detail = f": {seen.message}" if seen.message else ""
        return Abort(f"the Rollout is Degraded ({reason}){detail}")
    if seen.aborted:
        return Abort("the Rollout was aborted (status.abort is set)")
    failed = [c for c in checks if c.verdict == "fail"]
    if failed:
        return Abort(f"canary check failed at {seen.step}: {failed[-1].summary()}")
    if phase == "Healthy" and seen.finished:
        return Done(f"the Rollout is Healthy on the new template after {seen.step_count} steps")
    if phase == "Paused":
        if seen.spec_paused:
            return (
                Abort(f"{timeout} (paused by hand: spec.paused)")
                if over_time
                else Wait("paused by hand (spec.paused); waiting for a person to resume it", poll)
            )
        if "InconclusiveAnalysisRun" in seen.pause_reasons or "InconclusiveExperiment" in seen.pause_reasons:
            return Abort(f"Argo analysis was inconclusive at {seen.step}; a canary is not promoted on doubt")
        return _at_pause_step(seen, policy, checks, over_time, timeout)
    if over_time:
        return Abort(f"{timeout} (still {phase}: {seen.message or 'no message'})")
    if phase == "Healthy":
        return Wait(f"Healthy but not finished (stableRS {seen.stable_rs} != {seen.current_pod_hash})", poll)
    if seen.observed_generation != str(seen.generation):
        return Wait("the controller has not observed the new spec yet", poll)
    return Wait(f"canary progressing at {seen.step}", poll)


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
