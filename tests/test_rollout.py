"""rollout.py: the phase as the Argo CLI reads it, and every canary decision, as tables (no I/O)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from pipeline.config import CanaryPolicy
from pipeline.gates import GateResult, GateRow, Verdict
from pipeline.rollout import Abort, Done, ObservedRollout, Promote, Wait, decide, observe_rollout, passing_streak

POLICY = CanaryPolicy(consecutive_passes=2, check_interval_s=10, step_timeout_s=600)

# A canary paused at its first pause step (step 1 of 4), generation observed.
PAUSED = ObservedRollout(
    generation=3,
    observed_generation="3",
    phase="Paused",
    message="CanaryPauseStep",
    step_index=1,
    step_count=4,
    current_pod_hash="new",
    stable_rs="old",
    pause_reasons=("CanaryPauseStep",),
    controller_pause=True,
)
PROGRESSING = replace(PAUSED, phase="Progressing", message="", pause_reasons=(), controller_pause=False)
DEADLINE = replace(
    PROGRESSING, phase="Degraded", message="ProgressDeadlineExceeded: timed out",
    condition_reasons=("ProgressDeadlineExceeded",),
)  # fmt: skip
ABORTED = replace(PROGRESSING, phase="Degraded", aborted=True, condition_reasons=("RolloutAborted",))
HEALTHY = replace(PROGRESSING, phase="Healthy", step_index=4, stable_rs="new")


def check(verdict: Verdict, why: str = "ttft_p95 ok") -> GateResult:
    row = GateRow(name="ttft_p95", value=100.0, limit="<= 200", verdict=verdict, why=why)
    return GateResult(gate="canary", rows=[row])


PASS, FAIL, DOUBT = check("pass"), check("fail", "ttft_p95 450 ms > 200 ms"), check("inconclusive", "too few requests")


@pytest.mark.parametrize(
    ("seen", "expected"),
    [
        (PAUSED, "Paused"),
        (replace(PAUSED, observed_generation="2"), "Progressing"),  # the controller has not seen the spec yet
        (replace(PAUSED, observed_generation=None), "Progressing"),
        (replace(PAUSED, pause_reasons=()), "Progressing"),  # controllerPause without conditions: being unpaused
        (replace(PAUSED, phase="Degraded"), "Degraded"),
        (HEALTHY, "Healthy"),
        (replace(HEALTHY, phase=None), "Progressing"),
        (replace(HEALTHY, phase="Weird"), "Progressing"),
    ],
)
def test_client_phase_reads_like_the_argo_cli(seen: ObservedRollout, expected: str) -> None:
    assert seen.client_phase == expected


@pytest.mark.parametrize(
    ("seen", "checks", "elapsed", "action", "reason_has"),
    [
        # at a pause step: checks decide
        (PAUSED, [], 0, Wait, "0/2 good checks"),
        (PAUSED, [PASS], 20, Wait, "1/2 good checks"),
        (PAUSED, [PASS, PASS], 30, Promote, "2/2 good checks in a row at step 1/4"),
        (PAUSED, [PASS, FAIL, PASS, PASS], 30, Abort, "ttft_p95 450 ms > 200 ms"),  # any breach fails the step
        (PAUSED, [PASS, FAIL], 30, Abort, "canary check failed at step 1/4"),
        (PAUSED, [PASS, DOUBT], 30, Wait, "last check inconclusive"),  # inconclusive breaks the streak
        (PAUSED, [DOUBT, PASS, PASS], 30, Promote, "2/2"),
        (PAUSED, [PASS], 601, Abort, "step_timeout_s=600s with 1/2"),
        (PAUSED, [PASS, PASS], 601, Promote, "2/2"),  # enough passes before the timeout is read
        # timed pause: the controller ends it; checks still guard it
        (replace(PAUSED, step_pause_s=60.0), [PASS, PASS], 30, Wait, "ends by itself"),
        (replace(PAUSED, step_pause_s=60.0), [FAIL], 30, Abort, "canary check failed"),
        # other pauses
        (replace(PAUSED, spec_paused=True, pause_reasons=(), controller_pause=False), [], 30, Wait, "paused by hand"),
        (replace(PAUSED, spec_paused=True), [], 601, Abort, "paused by hand"),
        (replace(PAUSED, pause_reasons=("InconclusiveAnalysisRun",)), [], 30, Abort, "inconclusive"),
        # progressing between pauses
        (PROGRESSING, [], 30, Wait, "canary progressing at step 1/4"),
        (PROGRESSING, [], 601, Abort, "did not finish within step_timeout_s=600s"),
        (replace(PAUSED, observed_generation="2"), [], 30, Wait, "not observed the new spec"),
        (replace(PAUSED, pause_reasons=()), [], 30, Wait, "canary progressing"),  # being unpaused
        # the end
        (HEALTHY, [], 0, Done, "Healthy on the new template after 4 steps"),
        (replace(HEALTHY, stable_rs="old"), [], 0, Wait, "not finished"),
        (HEALTHY, [FAIL], 0, Abort, "canary check failed"),
        # failures the controller reports
        (DEADLINE, [], 30, Abort, "Degraded (ProgressDeadlineExceeded)"),
        (ABORTED, [], 0, Abort, "RolloutAborted"),
        (replace(PROGRESSING, aborted=True), [], 0, Abort, "status.abort is set"),
    ],
)
def test_decide(seen: ObservedRollout, checks: list[GateResult], elapsed: float, action: type, reason_has: str) -> None:
    decision = decide(seen, POLICY, checks, step_elapsed_s=elapsed)
    assert isinstance(decision, action), decision
    assert reason_has in decision.reason


def test_wait_at_a_pause_step_asks_for_a_check_and_paces_it() -> None:
    first = decide(PAUSED, POLICY, [], 0)
    later = decide(PAUSED, POLICY, [PASS], 10)
    assert isinstance(first, Wait) and first.check and first.after_s == 0
    assert isinstance(later, Wait) and later.check and later.after_s == POLICY.check_interval_s
    assert not decide(PROGRESSING, POLICY, [], 0).check  # nothing to check between pause steps


def test_consecutive_passes_follow_the_policy() -> None:
    strict = CanaryPolicy(consecutive_passes=3)
    assert isinstance(decide(PAUSED, strict, [PASS, PASS], 0), Wait)
    assert isinstance(decide(PAUSED, strict, [PASS, PASS, PASS], 0), Promote)
    assert passing_streak([PASS, DOUBT, PASS, PASS]) == 2
    assert passing_streak([]) == 0


def _rollout(status: dict[str, Any], steps: list[dict[str, Any]], generation: int = 2) -> dict[str, Any]:
    spec = {"strategy": {"canary": {"steps": steps}}, "template": {}}
    return {"metadata": {"generation": generation}, "spec": spec, "status": status}


def test_observe_rollout_reads_the_fields_that_matter() -> None:
    steps = [{"setWeight": 25}, {"pause": {"duration": "10m"}}, {"pause": {}}]
    seen = observe_rollout(
        _rollout(
            {
                "phase": "Paused",
                "observedGeneration": "2",
                "currentStepIndex": 1,
                "currentPodHash": "b",
                "stableRS": "a",
                "pauseConditions": [{"reason": "CanaryPauseStep", "startTime": "2026-01-01T00:00:00Z"}],
                "controllerPause": True,
                "conditions": [{"type": "Progressing", "reason": "ReplicaSetUpdated"}],
            },
            steps,
        )
    )
    assert (seen.client_phase, seen.step, seen.step_pause_s, seen.finished) == ("Paused", "step 1/3", 600.0, False)
    assert seen.pause_reasons == ("CanaryPauseStep",) and seen.condition_reasons == ("ReplicaSetUpdated",)
    fresh = observe_rollout(_rollout({}, steps))  # nothing observed yet: no status at all
    assert fresh.client_phase == "Progressing" and fresh.step_index is None and fresh.step_pause_s is None
    timed = [{}, {"pause": {"duration": 30}}]
    numeric = observe_rollout(_rollout({"observedGeneration": 2, "currentStepIndex": 1}, timed))
    assert numeric.observed_generation == "2" and numeric.step_pause_s == 30.0
