"""The project's Rollout reading and patches against Argo CD's own published tests (../shared/argo, see its README).

Every object of ``rollout/health_test.yaml`` is read by :func:`pipeline.rollout.argocd_health` (status and message,
as ``health.lua``) and by :func:`pipeline.rollout.rollout_phase` (the phase the pipeline decides on, Paused read as
Suspended), and by the simulated controller's phase; every case of ``rollout/actions/action_test.yaml`` for an
action the pipeline uses goes through the pipeline's patch builder, and the patched object must equal Argo's
expected output. The fixtures are read from ../shared/argo ($MODELCTL_SHARED_ARGO), never copied here.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.config import CanaryPolicy
from pipeline.kube.rollouts import abort_patch, promote_full_patch, promote_patch, retry_patch
from pipeline.rollout import ObservedRollout, Wait, argocd_health, decide, observe_rollout, rollout_phase
from sandbox.cluster import rollout_manifest
from sandbox.rollouts import ROLLOUT, RolloutsSimulator, controller_phase
from sandbox.store import Store

ROOT = Path(__file__).resolve().parent.parent
ARGO = Path(os.environ.get("MODELCTL_SHARED_ARGO", ROOT.parent / "shared" / "argo")) / "rollout"
ABSENT = f"Argo CD's Rollout test data not found at {ARGO.parent} (set MODELCTL_SHARED_ARGO to its folder)"
SUSPENDED = {"Paused": "Suspended"}
PATCHES: dict[str, Callable[[ObservedRollout], dict[str, Any] | None]] = {
    "resume": promote_patch,  # the pipeline's promote (one step), as `kubectl argo rollouts promote`
    "promote-full": promote_full_patch,
    "abort": lambda seen: abort_patch(),
    "retry": lambda seen: retry_patch(),
}
NOT_USED = {  # Argo CD actions the pipeline never sends
    "restart": "the pipeline never restarts pods (a new template comes from Git)",
    "skip-current-step": "the pipeline promotes a pause step after its checks; it has no step skipping",
}


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def cases(listing: str, key: str) -> list[Any]:
    """The entries of an Argo test listing as pytest params (one skipped param when the data is absent)."""
    if not (ARGO / listing).is_file():
        return [pytest.param(None, marks=pytest.mark.skip(reason=ABSENT))]
    entries = load(ARGO / listing)[key]
    return [pytest.param(e, id=f"{e.get('action', 'health')}:{e['inputPath']}") for e in entries]


HEALTH = cases("health_test.yaml", "tests")
ACTIONS = cases("actions/action_test.yaml", "actionTests")


@pytest.mark.parametrize("case", HEALTH)
def test_argocd_health_reads_every_object_as_argo_cd_does(case: dict[str, Any]) -> None:
    seen = observe_rollout(load(ARGO / case["inputPath"]))
    status, message = argocd_health(seen)
    assert status == case["healthStatus"]["status"]
    assert message == case["healthStatus"].get("message", message)  # the message, where Argo's test names one


@pytest.mark.parametrize("case", HEALTH)
def test_the_pipeline_reads_every_object_with_argo_cds_status(case: dict[str, Any]) -> None:
    """The phase decisions use (GetRolloutPhase's order) agrees with Argo CD on every object."""
    phase, _ = rollout_phase(observe_rollout(load(ARGO / case["inputPath"])))
    assert SUSPENDED.get(phase, phase) == case["healthStatus"]["status"]


@pytest.mark.parametrize("case", HEALTH)
def test_the_simulated_controller_computes_the_phase_argo_cd_expects(case: dict[str, Any]) -> None:
    """What the fake controller writes into status.phase, for every object whose phase a controller computes
    (no status.phase yet, generation observed): the same status as Argo CD reads."""
    obj = load(ARGO / case["inputPath"])
    seen = observe_rollout(obj)
    if (
        seen.phase is not None
        or case["healthStatus"].get("message") == "Waiting for rollout spec update to be observed"
    ):
        pytest.skip("the phase comes from status.phase or from observation, not from the controller")
    phase, _ = controller_phase(obj)
    assert SUSPENDED.get(phase, phase) == case["healthStatus"]["status"]


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (what the API server does with a merge-patch+json body)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def without_nulls(obj: Any) -> Any:
    """Argo's expected objects write a removed field as ``field: null`` (Lua's nil): compare them as absent."""
    if isinstance(obj, dict):
        return {k: without_nulls(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [without_nulls(v) for v in obj]
    return obj


@pytest.mark.parametrize("case", ACTIONS)
def test_the_pipelines_patches_do_what_argo_cds_actions_do(case: dict[str, Any]) -> None:
    action = case["action"]
    if action in NOT_USED:
        pytest.skip(NOT_USED[action])
    assert action in PATCHES, f"a new Argo CD action {action!r}: decide whether the pipeline uses it"
    before = load(ARGO / "actions" / case["inputPath"])
    want = without_nulls(load(ARGO / "actions" / case["expectedOutputPath"]))
    seen = observe_rollout(before)
    patch = PATCHES[action](seen)
    assert patch is None or set(patch) == {"status"}, "the pipeline patches only rollouts/status, never spec"
    got = without_nulls(merge_patch(before, patch or {}))
    if seen.spec_paused and not want["spec"].get("paused"):
        # Argo CD's resume also sets spec.paused=false. A spec.paused set by hand is left to a person (Git owns
        # the spec; the pipeline never patches it), so that one field is not compared, and decide waits for them.
        assert got["spec"]["paused"] is True
        want["spec"]["paused"] = True
        decision = decide(seen, CanaryPolicy(), [], step_elapsed_s=0)
        assert isinstance(decision, Wait) and "paused by hand" in decision.reason
    assert got == want


# the simulated controller reacts to the pipeline's status patches as ../shared/ARGO.md describes ---------------
def test_the_simulated_controller_reacts_to_the_status_patches_as_argo_does() -> None:
    store = Store()
    sim = RolloutsSimulator(store)
    steps = [{"setWeight": 50}, {"pause": {}}, {"setWeight": 100}, {"pause": {}}]
    store.create(ROLLOUT, "ns", rollout_manifest("llm", steps), keep_status=False)
    sim.tick()

    def seen() -> ObservedRollout:
        return observe_rollout(store.get(ROLLOUT, "ns", "llm"))

    def send(patch: dict[str, Any] | None) -> None:
        assert patch is not None and set(patch) == {"status"}
        store.patch(ROLLOUT, "ns", "llm", patch, "application/merge-patch+json", "status")

    def read() -> tuple[str, str, int | None]:
        now = seen()
        return now.client_phase, argocd_health(now)[0], now.step_index

    store.update(ROLLOUT, "ns", "llm", lambda obj: obj["spec"]["template"]["metadata"].update(labels={"v": "2"}))
    assert read()[:2] == ("Progressing", "Progressing")  # the new generation is not observed yet
    sim.set_canary_ready("ns", "llm", ready=False)
    sim.tick()
    assert read() == ("Progressing", "Progressing", 0)  # stuck in the setWeight step: its pods never get ready
    send(promote_patch(seen()))  # no pause condition: promote moves the step index on, and the controller follows
    sim.tick()
    assert read() == ("Paused", "Suspended", 1) and seen().pause_reasons == ("CanaryPauseStep",)
    sim.set_canary_ready("ns", "llm", ready=True)
    send(promote_patch(seen()))  # clears the pause condition ...
    assert read() == ("Progressing", "Suspended", 1)  # ... kubectl reads "unpausing" until the controller reacts
    assert promote_patch(seen()) is None  # and a second promote sent now would skip a step
    sim.tick()
    assert read() == ("Paused", "Suspended", 3)
    send(abort_patch())
    sim.tick()
    assert read() == ("Degraded", "Degraded", 0) and "RolloutAborted" in seen().client_message
    send(retry_patch())
    sim.tick()
    assert read() == ("Paused", "Suspended", 1) and not seen().aborted
    send(promote_full_patch(seen()))
    sim.tick()
    assert read()[:2] == ("Healthy", "Healthy") and seen().finished
    assert promote_full_patch(seen()) is None and promote_patch(seen()) is None  # nothing left to promote
