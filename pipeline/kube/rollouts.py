"""Argo Rollouts: the phase as the Argo CLI reads it; promote, promote-full, abort, retry."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipeline.config import RolloutRef
from pipeline.errors import TerminalError
from pipeline.kube.client import ARGO, KubeClient, Patch
from pipeline.rollout import ObservedRollout, observe_rollout


class Rollouts(KubeClient):
    """Argo Rollouts: read the phase as the CLI does; promote, abort, retry with the CLI's patches."""

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

    def _patch(self, ref: RolloutRef, patches: list[Patch], verb: str) -> list[Patch]:
        for target, body in patches:
            fn = (
                self.custom.patch_namespaced_custom_object_status
                if target == "status"
                else self.custom.patch_namespaced_custom_object
            )
            self.call(
                f"{verb} Rollout {ref.namespace}/{ref.name}", fn, *ARGO, ref.namespace, "rollouts", ref.name, body
            )
        return patches

    def promote(self, ref: RolloutRef, full: bool = False) -> list[Patch]:
        """Promote one step (or fully) with the patches the Argo CLI sends; returns them. Re-reads on 409.

        Unlike the CLI, it sends nothing while an earlier promote is still being applied (controllerPause set, no
        pause condition left), so a repeated call never skips a step.
        """

        def attempt() -> list[Patch]:
            obj = self.rollout_object(ref)
            seen = observe_rollout(obj)
            patches: list[Patch] = []
            if full:
                if seen.spec_paused:
                    patches.append(("object", {"spec": {"paused": False}}))
                if seen.current_pod_hash != seen.stable_rs:
                    patches.append(("status", {"status": {"promoteFull": True}}))
            elif seen.spec_paused:
                patches.append(("object", {"spec": {"paused": False}}))
            elif seen.controller_pause and not seen.pause_reasons:
                return []  # an earlier promote is being applied: promoting again would skip a step
            else:
                status: dict[str, Any] = {"pauseConditions": None}
                if not seen.pause_reasons:
                    if seen.finished or seen.step_index is None or seen.step_index >= seen.step_count:
                        return []  # nothing left to promote
                    status["currentStepIndex"] = seen.step_index + 1
                if "InconclusiveAnalysisRun" in seen.pause_reasons:
                    status["controllerPause"] = False
                patches.append(("status", {"status": status}))
            return self._patch(ref, patches, "promote")

        return self._retry_conflicts(f"promote Rollout {ref.name}", attempt)

    def abort(self, ref: RolloutRef) -> list[Patch]:
        """Send traffic back to stable now: ``{"status":{"abort":true}}``. The template is left as it is."""
        return self._retry_conflicts(
            "abort", lambda: self._patch(ref, [("status", {"status": {"abort": True}})], "abort")
        )

    def retry(self, ref: RolloutRef) -> list[Patch]:
        """Retry an aborted update: ``{"status":{"abort":false}}``."""
        return self._retry_conflicts(
            "retry", lambda: self._patch(ref, [("status", {"status": {"abort": False}})], "retry")
        )

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
                    f"last seen {seen.client_phase} at {seen.step}: {seen.message or 'no message'}",
                    hint=f"look at `kubectl argo rollouts get rollout {ref.name} -n {ref.namespace}`",
                )
            self.sleep(min(self.backoff.delay(n), max(0.0, deadline - self.clock())))
            n += 1
