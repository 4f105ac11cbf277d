"""Argo Rollouts: read the phase as Argo does; promote, promote-full, abort, retry as status merge patches.

The pipeline never patches a Rollout's spec (Git owns it; Argo CD's self-heal would undo it): every patch goes
to the ``rollouts/status`` subresource, as ../shared/ARGO.md lists them. A ``spec.paused`` set by hand is left to
a person (:func:`pipeline.rollout.decide` waits for it). A controller without the status subresource (Rollouts
<= v0.9) answers 404 there: the same status fields then go to the object, still without ``spec.paused``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kubernetes.client.exceptions import ApiException

from pipeline.config import RolloutRef
from pipeline.errors import TerminalError
from pipeline.kube.client import ARGO, KubeClient, Patch
from pipeline.rollout import ObservedRollout, observe_rollout

StatusPatch = dict[str, Any]  # {"status": {...}}: a JSON merge patch
_NO_STATUS_SUBRESOURCE = object()


# the status patches (pure) --------------------------------------------------------------------------------------------
def promote_patch(seen: ObservedRollout) -> StatusPatch | None:
    """One step, as ``kubectl argo rollouts promote`` (its status part; a hand-set ``spec.paused`` is left alone).

    Clears the pause conditions; with none (a canary in a setWeight or analysis step) also moves
    ``currentStepIndex`` on by one, capped at the number of steps. None when there is nothing to send, and, unlike
    the CLI, while an earlier promote is still being applied (unpausing: a second one would skip a step) or once
    the update is finished.
    """
    if seen.unpausing or seen.finished:
        return None
    if seen.pause_reasons:
        return {"status": {"pauseConditions": None}}
    if seen.strategy == "canary" and seen.step_count:
        index = seen.step_index or 0
        return {
            "status": {"pauseConditions": None, "currentStepIndex": index + 1 if index < seen.step_count else index}
        }
    return None


def promote_full_patch(seen: ObservedRollout) -> StatusPatch | None:
    """Skip every remaining step: ``{"status":{"promoteFull":true}}``, only while the update is not finished.

    A legacy object (Rollouts <= v0.9, see :attr:`ObservedRollout.legacy`) has no promoteFull: as Argo CD's
    promote-full action does, remove ``status.abort`` and set ``currentStepIndex`` to the number of steps.
    """
    if not seen.has_status or seen.finished:
        return None
    if not seen.legacy:
        return {"status": {"promoteFull": True}}
    if seen.strategy != "canary":
        return None  # Argo CD offers no full promotion of a legacy blue-green Rollout
    status: dict[str, Any] = {"abort": None}
    if seen.steps_listed:
        status["currentStepIndex"] = seen.step_count
    return {"status": status}


def abort_patch() -> StatusPatch:
    """Traffic back to stable at once; ``spec.template`` keeps the new version until Git reverts it."""
    return {"status": {"abort": True}}


def retry_patch() -> StatusPatch:
    """Retry an aborted update: remove the abort flag, as Argo CD's retry action does."""
    return {"status": {"abort": None}}


class Rollouts(KubeClient):
    """Argo Rollouts: read the phase as Argo does; promote, abort, retry with Argo's status patches."""

    # Argo Rollouts ---------------------------------------------------------------------------------------------
    def rollout_object(self, ref: RolloutRef) -> dict[str, Any]:
        what = f"read Rollout {ref.namespace}/{ref.name}"
        obj: dict[str, Any] = self.call(
            what, self.custom.get_namespaced_custom_object, *ARGO, ref.namespace, "rollouts", ref.name
        )
        return obj

    def rollout(self, ref: RolloutRef) -> ObservedRollout:
        """The Rollout as rollout.py sees it (``.client_phase`` is the phase the Argo CLI shows)."""
        return observe_rollout(self.rollout_object(ref))

    def _patch_status(self, ref: RolloutRef, body: StatusPatch | None, verb: str) -> list[Patch]:
        """Send ``body`` to rollouts/status; on 404 (no status subresource) to the object, if it exists."""
        if body is None:
            return []
        what = f"{verb} Rollout {ref.namespace}/{ref.name}"

        def status(*args: Any, **kwargs: Any) -> Any:
            try:
                return self.custom.patch_namespaced_custom_object_status(*args, **kwargs)
            except ApiException as exc:
                if exc.status == 404:
                    return _NO_STATUS_SUBRESOURCE
                raise

        answer = self.call(what, status, *ARGO, ref.namespace, "rollouts", ref.name, body)
        if answer is not _NO_STATUS_SUBRESOURCE:
            return [("status", body)]
        self.rollout_object(ref)  # a Rollout that is gone answers 404 here too, with the usual error
        self.call(what, self.custom.patch_namespaced_custom_object, *ARGO, ref.namespace, "rollouts", ref.name, body)
        return [("object", body)]

    def promote(self, ref: RolloutRef, full: bool = False) -> list[Patch]:
        """Promote one step (or fully) with :func:`promote_patch` / :func:`promote_full_patch`; returns what was
        sent (nothing when there is nothing to promote). Re-reads on 409."""

        def attempt() -> list[Patch]:
            seen = self.rollout(ref)
            return self._patch_status(ref, promote_full_patch(seen) if full else promote_patch(seen), "promote")

        return self._retry_conflicts(f"promote Rollout {ref.name}", attempt)

    def abort(self, ref: RolloutRef) -> list[Patch]:
        """Send traffic back to stable now: ``{"status":{"abort":true}}``. The template is left as it is."""
        return self._retry_conflicts("abort", lambda: self._patch_status(ref, abort_patch(), "abort"))

    def retry(self, ref: RolloutRef) -> list[Patch]:
        """Retry an aborted update: ``{"status":{"abort":null}}`` (the flag removed)."""
        return self._retry_conflicts("retry", lambda: self._patch_status(ref, retry_patch(), "retry"))

    def wait_rollout(
        self, ref: RolloutRef, until: Callable[[ObservedRollout], bool], timeout_s: float
    ) -> ObservedRollout:
        """Poll the Rollout with bounded backoff until ``until`` holds.

        Raises:
            TerminalError: it did not within ``timeout_s`` (with the phase and message last seen).
        """
        deadline, n = self.clock() + timeout_s, 0
        while True:
            seen = self.rollout(ref)
            if until(seen):
                return seen
            if self.clock() >= deadline:
                raise TerminalError(
                    f"Rollout {ref.namespace}/{ref.name} did not reach the expected state within {timeout_s:g}s; "
                    f"last seen {seen.client_phase} at {seen.step}: {seen.client_message or 'no message'}",
                    hint=f"look at `kubectl argo rollouts get rollout {ref.name} -n {ref.namespace}`",
                )
            self.sleep(min(self.backoff.delay(n), max(0.0, deadline - self.clock())))
            n += 1
