"""rollout.py: the phase as Argo reads it, rule by rule, every canary decision, and the status patches, as tables.

No cluster: the patches' 404 fallback runs against a stub of the custom-objects API.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from pipeline.config import CanaryPolicy, RolloutRef
from pipeline.errors import TerminalError
from pipeline.gates import GateResult, GateRow, Verdict
from pipeline.kube.client import Backoff
from pipeline.kube.rollouts import Rollouts, abort_patch, promote_full_patch, promote_patch, retry_patch
from pipeline.rollout import (
    Abort,
    Condition,
    Done,
    ObservedRollout,
    Promote,
    Wait,
    argocd_health,
    decide,
    observe_rollout,
    passing_streak,
    rollout_phase,
)

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
    conditions=(Condition("Progressing", "ProgressDeadlineExceeded", "timed out"),),
)  # fmt: skip
ABORTED = replace(
    PROGRESSING, phase="Degraded", aborted=True, conditions=(Condition("Progressing", "RolloutAborted", "aborted"),)
)
HEALTHY = replace(PROGRESSING, phase="Healthy", step_index=4, stable_rs="new")


def check(verdict: Verdict, why: str = "ttft_p95 ok") -> GateResult:
    row = GateRow(name="ttft_p95", value=100.0, limit="<= 200", verdict=verdict, why=why)
    return GateResult(gate="canary", rows=[row])


PASS, FAIL, DOUBT = check("pass"), check("fail", "ttft_p95 450 ms > 200 ms"), check("inconclusive", "too few requests")


# No status.phase (older controllers, or not reconciled yet): the phase is computed from spec and status.
COMPUTED = replace(
    HEALTHY, phase=None, message="", spec_replicas=2, replicas=2, updated_replicas=2, available_replicas=2
)
INVALID = Condition("InvalidSpec", "InvalidSpec", "missing strategy")


@pytest.mark.parametrize(
    ("seen", "expected", "message_has"),
    [
        (PAUSED, "Paused", "CanaryPauseStep"),  # status.phase and status.message when set
        # 1. the generation, compared as numbers
        (replace(PAUSED, observed_generation="2"), "Progressing", "spec update to be observed"),
        (replace(PAUSED, observed_generation="4"), "Paused", ""),  # larger: a v0.9 hash that is all digits
        (replace(PAUSED, observed_generation="7d9f8c"), "Paused", ""),  # a hash (Rollouts <= v0.9)
        (replace(PAUSED, observed_generation=None), "Paused", ""),  # missing
        (replace(PAUSED, observed_generation="03"), "Paused", ""),  # numeric, not a string comparison
        # 2. unpausing: controllerPause with no pause condition left
        (replace(PAUSED, pause_reasons=()), "Progressing", "waiting for rollout to unpause"),
        # 3. a workloadRef whose workload generation the controller has not seen
        (replace(HEALTHY, workload_ref=True, workload_generation="2", workload_observed_generation="1"), "Progressing",
         "reference workload"),
        (replace(HEALTHY, workload_ref=True, workload_generation="1", workload_observed_generation="1"), "Healthy", ""),
        (replace(HEALTHY, workload_ref=True, workload_generation=None, workload_observed_generation="1"), "Healthy",
         ""),
        # 4. status.phase when set (an unknown one is named, and read as Progressing)
        (replace(PAUSED, phase="Degraded", message="InvalidSpec"), "Degraded", "InvalidSpec"),
        (replace(HEALTHY, phase="Weird"), "Progressing", "unknown phase 'Weird'"),
        # 5. computed
        (COMPUTED, "Healthy", ""),
        (replace(COMPUTED, conditions=(INVALID,)), "Degraded", "InvalidSpec: missing strategy"),
        (replace(COMPUTED, conditions=ABORTED.conditions), "Degraded", "RolloutAborted: aborted"),
        (replace(COMPUTED, conditions=DEADLINE.conditions), "Degraded", "ProgressDeadlineExceeded: timed out"),
        (replace(COMPUTED, spec_paused=True), "Paused", "manually paused"),
        (replace(COMPUTED, pause_reasons=("CanaryPauseStep",), controller_pause=True), "Paused", "CanaryPauseStep"),
        (replace(COMPUTED, restarting=True), "Progressing", "restarting"),
        (replace(COMPUTED, updated_replicas=1), "Progressing", "more replicas need to be updated"),
        (replace(COMPUTED, available_replicas=1), "Progressing", "still becoming available"),
        (replace(COMPUTED, replicas=3), "Progressing", "old replicas are pending termination"),
        (replace(COMPUTED, replicas=3, traffic_routing=True), "Healthy", ""),  # a router keeps old pods a while
        (replace(COMPUTED, stable_rs="old"), "Progressing", "waiting for all steps to complete"),
        (replace(COMPUTED, stable_rs=None), "Progressing", "waiting for all steps to complete"),
        (replace(COMPUTED, strategy="blueGreen", active_selector="old"), "Progressing", "cutover pending"),
        (replace(COMPUTED, strategy="blueGreen", active_selector="new"), "Healthy", ""),
        (replace(COMPUTED, strategy="blueGreen", active_selector="new", stable_rs="old"), "Progressing",
         "post-promotion"),
    ],
)  # fmt: skip
def test_rollout_phase_follows_argos_order(seen: ObservedRollout, expected: str, message_has: str) -> None:
    phase, message = rollout_phase(seen)
    assert (seen.client_phase, phase) == (expected, expected)
    assert message_has in message


@pytest.mark.parametrize(
    ("seen", "expected", "message_has"),
    [
        (replace(COMPUTED, has_status=False), "Progressing", "spec update to be observed"),  # no status at all
        (replace(PAUSED, pause_reasons=()), "Suspended", "CanaryPauseStep"),  # no unpausing rule: status.phase
        (replace(COMPUTED, conditions=(Condition("Other", "RolloutAborted", "x"),)), "Healthy", ""),
        (replace(COMPUTED, conditions=(Condition("Progressing", "RolloutAborted", "x"),)), "Degraded", "x"),
        (replace(COMPUTED, replicas=3, traffic_routing=True), "Progressing", "old replicas"),
        (replace(COMPUTED, current_pod_hash=None), "Progressing", "not been reconciled"),
        (replace(COMPUTED, spec_paused=True), "Suspended", "Rollout is paused"),
        (replace(HEALTHY, workload_ref=True, annotated=True, workload_observed_generation="1"), "Progressing",
         "spec update to be observed"),  # annotations without the workload generation: Lua's nil ~= 1
    ],
)  # fmt: skip
def test_argocd_health_keeps_its_own_differences(seen: ObservedRollout, expected: str, message_has: str) -> None:
    status, message = argocd_health(seen)
    assert status == expected and message_has in message


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
        (replace(PAUSED, spec_paused=True, pause_reasons=(), controller_pause=False), [], 30, Wait, "a person"),
        (
            replace(PAUSED, spec_paused=True, pause_reasons=(), controller_pause=False),
            [PASS, PASS],
            30,
            Wait,
            "never changes a Rollout's spec",
        ),  # good checks do not make the pipeline resume a pause set by hand
        (replace(PAUSED, spec_paused=True), [], 601, Abort, "paused by hand"),
        (replace(PAUSED, pause_reasons=("InconclusiveAnalysisRun",)), [], 30, Abort, "inconclusive"),
        # progressing between pauses
        (PROGRESSING, [], 30, Wait, "canary progressing at step 1/4"),
        (replace(PROGRESSING, phase=None, updated_replicas=0), [], 30, Wait, "more replicas need to be updated"),
        (PROGRESSING, [], 601, Abort, "did not finish within step_timeout_s=600s"),
        (replace(PAUSED, observed_generation="2"), [], 30, Wait, "not observed the new spec"),
        (replace(PAUSED, pause_reasons=()), [], 30, Wait, "waiting for rollout to unpause"),
        (replace(PAUSED, observed_generation="7d9f8c"), [PASS, PASS], 30, Promote, "2/2"),  # a hash: observed
        # the end
        (HEALTHY, [], 0, Done, "Healthy on the new template after 4 steps"),
        (replace(HEALTHY, stable_rs="old"), [], 0, Wait, "not finished"),
        (HEALTHY, [FAIL], 0, Abort, "canary check failed"),
        # failures the controller reports
        (DEADLINE, [], 30, Abort, "Degraded (ProgressDeadlineExceeded)"),
        (ABORTED, [], 0, Abort, "RolloutAborted"),
        (
            replace(COMPUTED, stable_rs="old", conditions=(INVALID,)),
            [],
            0,
            Abort,
            "(InvalidSpec): InvalidSpec: missing",
        ),
        (replace(COMPUTED, stable_rs="old", conditions=ABORTED.conditions), [], 0, Abort, "RolloutAborted: aborted"),
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


# the status patches ----------------------------------------------------------------------------------------------
AT_WEIGHT = replace(PROGRESSING, step_index=2)  # in a setWeight step: no pause condition
LEGACY = replace(PROGRESSING, observed_generation="7d9f8c", aborted=True, step_index=0)


@pytest.mark.parametrize(
    ("seen", "expected"),
    [
        (PAUSED, {"status": {"pauseConditions": None}}),  # at a pause step: clear the pause conditions only
        (AT_WEIGHT, {"status": {"pauseConditions": None, "currentStepIndex": 3}}),  # no pause: the next step
        (replace(AT_WEIGHT, step_index=None), {"status": {"pauseConditions": None, "currentStepIndex": 1}}),
        (replace(AT_WEIGHT, step_index=4), {"status": {"pauseConditions": None, "currentStepIndex": 4}}),  # capped
        (replace(PAUSED, pause_reasons=()), None),  # unpausing: the first promote is not applied yet
        (HEALTHY, None),  # nothing left to promote
        (replace(AT_WEIGHT, strategy="blueGreen", step_count=0), None),
        (replace(AT_WEIGHT, step_count=0), None),  # a canary without steps
        (replace(PROGRESSING, spec_paused=True, step_count=0), None),  # a pause set by hand is left to a person
    ],
)
def test_promote_patch_is_the_clis_status_patch(seen: ObservedRollout, expected: dict[str, Any] | None) -> None:
    assert promote_patch(seen) == expected


@pytest.mark.parametrize(
    ("seen", "expected"),
    [
        (PAUSED, {"status": {"promoteFull": True}}),
        (HEALTHY, None),  # currentPodHash == stableRS: nothing to do
        (replace(PAUSED, has_status=False), None),
        (LEGACY, {"status": {"abort": None, "currentStepIndex": 4}}),  # Argo CD's action on Rollouts <= v0.9
        (replace(LEGACY, observed_generation="9"), {"status": {"abort": None, "currentStepIndex": 4}}),  # larger
        (replace(LEGACY, steps_listed=False, step_count=0), {"status": {"abort": None}}),
        (replace(LEGACY, strategy="blueGreen"), None),
    ],
)
def test_promote_full_patch(seen: ObservedRollout, expected: dict[str, Any] | None) -> None:
    assert promote_full_patch(seen) == expected


def test_abort_and_retry_patches_touch_only_the_abort_flag() -> None:
    assert abort_patch() == {"status": {"abort": True}}
    assert retry_patch() == {"status": {"abort": None}}  # removed (null), not set to false


class StubApi:
    """The custom-objects API of a cluster whose controller has no status subresource (Rollouts <= v0.9)."""

    def __init__(self, obj: dict[str, Any] | None, status_code: int = 404) -> None:
        self.obj, self.status_code, self.sent = obj, status_code, []  # type: list[tuple[str, Any]]

    def get_namespaced_custom_object(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if self.obj is None:
            raise ApiException(status=404, reason="Not Found")
        return self.obj

    def patch_namespaced_custom_object_status(self, *args: Any, **kwargs: Any) -> None:
        raise ApiException(status=self.status_code, reason="Not Found" if self.status_code == 404 else "Forbidden")

    def patch_namespaced_custom_object(self, *args: Any, **kwargs: Any) -> None:
        self.sent.append(("object", args[-1]))


def rollouts(api: StubApi) -> Rollouts:
    kube = Rollouts(ApiClient(), Backoff(attempts=1), sleep=lambda s: None)
    kube.custom = api  # type: ignore[assignment]
    return kube


REF = RolloutRef(name="llm", namespace="staging")
PAUSED_OBJ = _rollout(
    {"observedGeneration": "5f6d8c", "currentStepIndex": 1, "currentPodHash": "b", "stableRS": "a",
     "pauseConditions": [{"reason": "CanaryPauseStep"}], "controllerPause": True},
    [{"setWeight": 50}, {"pause": {}}],
)  # fmt: skip


def test_a_404_on_the_status_subresource_sends_the_status_fields_to_the_object() -> None:
    api = StubApi({**PAUSED_OBJ, "spec": {**PAUSED_OBJ["spec"], "paused": True}})
    assert rollouts(api).promote(REF) == [("object", {"status": {"pauseConditions": None}})]
    assert api.sent == [("object", {"status": {"pauseConditions": None}})]  # spec.paused stays a person's
    assert rollouts(api).abort(REF) == [("object", {"status": {"abort": True}})]


def test_a_missing_rollout_or_a_refusal_is_an_error_not_a_fallback() -> None:
    with pytest.raises(TerminalError, match="404"):
        rollouts(StubApi(None)).abort(REF)
    refused = StubApi(PAUSED_OBJ, status_code=403)
    with pytest.raises(TerminalError, match="403"):
        rollouts(refused).promote(REF)
    assert refused.sent == []
