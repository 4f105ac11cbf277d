"""A simulator of the Argo Rollouts controller (v1.9 canary semantics, as ../shared/ARGO.md describes them).

It reconciles every Rollout in the store on each explicit :meth:`RolloutsSimulator.tick`, so tests are
deterministic; a clock can be injected to let timed pauses and progress deadlines pass without sleeping.
Knobs: :meth:`set_canary_ready` (a canary whose pods never become ready: unhealthy or stuck Pending) and
:meth:`hold` (the controller does not reconcile the Rollout at all: the generation stays unobserved).

Two modes. Count mode (the default): replica sets are counts in the simulator, readiness follows the knobs.
Pods mode (``pods=True``): the simulator owns Pod objects per pod-template hash, as the real controller's
ReplicaSets do (:mod:`sandbox.replicasets`), a kubelet runs them, and readiness is their Ready condition; the old
ReplicaSet is scaled down only once the new one is Ready. In both, the canary and stable Services' selectors are
pinned to their hashes, and background analysis runs against ``prometheus_url`` (:mod:`sandbox.rollout_analysis`;
off without one). The Rollout's status carries what a client reads: phase, message, currentStepIndex,
currentPodHash, stableRS, pauseConditions, controllerPause, abort, abortedAt, promoteFull, conditions,
observedGeneration (a string), replica counts and status.canary's analysis run.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pipeline.rollout import calculate_phase, observe_rollout

from .replicasets import ReplicaSets, point_services
from .rollout_analysis import INCONCLUSIVE, RolloutAnalysis, pause
from .store import BY_KIND, Obj, Store

ROLLOUT = BY_KIND["Rollout"]
Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def controller_phase(obj: Obj) -> tuple[str, str]:
    """status.phase and status.message as the v1 controller writes them: ``CalculateRolloutPhase`` on the
    object's spec and status (the project's reading of it, held to Argo's fixtures in test_argo_conformance)."""
    return calculate_phase(observe_rollout(obj))


def pod_hash(template: Any) -> str:
    """The pod-template hash: stable for equal templates, different for different ones."""
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]


def duration_seconds(value: Any) -> float:
    """Argo durations: an integer (seconds) or a string such as "30s", "10m", "1h"."""
    if isinstance(value, int | float):
        return float(value)
    m = re.fullmatch(r"(\d+)(s|m|h)?", str(value).strip())
    if not m:
        raise ValueError(f"not a duration: {value!r}")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]


@dataclass
class _State:
    """What the controller knows that the status does not show: replicas per pod hash, last progress."""

    replicas: dict[str, int] = field(default_factory=dict)
    ready: dict[str, int] = field(default_factory=dict)
    last_progress: datetime | None = None
    revision: int = 1  # the Rollout's revision as the controller numbers it: the first template is 1
    desired: dict[str, int] = field(default_factory=dict)  # pods mode: what the pods should be per hash
    surge: str | None = None  # pods mode: the hash whose readiness gates scaling the others down
    abort_message: str = ""  # why the controller aborted (a failed AnalysisRun), for the Progressing condition


class RolloutsSimulator:
    """Reconciles Rollouts in ``store``. Thread-safe with respect to API clients (atomic store updates)."""

    def __init__(
        self,
        store: Store,
        clock: Clock = utcnow,
        *,
        pods: bool = False,
        prometheus_url: str | None = None,
        rng: random.Random | None = None,
    ) -> None:
        """``pods``: own Pod objects (a kubelet runs them) instead of counts; ``prometheus_url``: the Prometheus
        every AnalysisTemplate's address maps to (None: analysis off, said in the Rollout's status)."""
        self.store = store
        self.clock = clock
        self.pods = pods
        self.replicasets = ReplicaSets(store, rng)
        self.analysis = RolloutAnalysis(store, prometheus_url, clock)
        self.unready: dict[tuple[str, str], str] = {}  # canary pods never ready, with the reason shown
        self.held: set[tuple[str, str]] = set()
        self._state: dict[tuple[str, str], _State] = {}

    def set_canary_ready(self, namespace: str, name: str, ready: bool, reason: str = "CrashLoopBackOff") -> None:
        """Make the canary pods of a Rollout (un)able to become ready: a crashing or unschedulable canary."""
        if ready:
            self.unready.pop((namespace, name), None)
        else:
            self.unready[(namespace, name)] = reason

    def hold(self, namespace: str, name: str, held: bool = True) -> None:
        """Stop (or resume) reconciling a Rollout: its new generation stays unobserved."""
        (self.held.add if held else self.held.discard)((namespace, name))

    def tick(self) -> None:
        """Reconcile every Rollout once."""
        items, _ = self.store.list(ROLLOUT, None)
        keys = [(item["metadata"]["namespace"], item["metadata"]["name"]) for item in items]
        todo = [(key, item) for key, item in zip(keys, items, strict=True) if key not in self.held]
        for key, item in todo:  # analysis runs made or stopped, then measured: outside the store lock (HTTP)
            self.analysis.sync(item, self._state.setdefault(key, _State()).revision)
        self.analysis.measure()
        for key, _ in todo:
            updated = self.store.update(ROLLOUT, key[0], key[1], functools.partial(self._reconcile, key))
            self.analysis.sync(updated, self._state[key].revision)  # a completed or aborted Rollout stops its runs
        self.replicasets.collect_garbage({item["metadata"]["uid"] for item in items})
        for key in [k for k in self._state if k not in set(keys)]:  # a deleted Rollout: a new one starts afresh
            del self._state[key]
            self.analysis.forget(*key)

    # the controller ------------------------------------------------------------------------------------------
    def _reconcile(self, key: tuple[str, str], obj: Obj) -> None:
        now = self.clock()
        state = self._state.setdefault(key, _State())
        spec, status = obj.get("spec") or {}, obj.setdefault("status", {})
        steps: list[Obj] = ((spec.get("strategy") or {}).get("canary") or {}).get("steps") or []
        want = int(spec.get("replicas", 1))
        current = pod_hash(spec.get("template") or {})
        stable = status.get("stableRS")

        if stable is None:  # first sight: the first template is stable at once, without steps
            status.update(stableRS=current, currentPodHash=current, currentStepIndex=len(steps))
            self._want(state, {current: want})
            stable, state.last_progress = current, now
            self._progressing(status, now, "NewReplicaSetAvailable", "Rollout is healthy")
        elif current != status.get("currentPodHash"):
            if current == stable:  # template back to stable: clear abort and pauses, no steps
                self._clear_update(status)
                status.update(currentPodHash=current, currentStepIndex=len(steps))
                self._want(state, {current: want})
                state.abort_message, state.revision = "", state.revision + 1  # the old ReplicaSet gets a new one
                self._progressing(status, now, "RolloutCompleted", "Rollback to stable ReplicaSets")
            else:  # a new revision: start the canary at step 0
                self._clear_update(status)
                state.revision += 1
                status.update(currentPodHash=current, currentStepIndex=0)
                if self.pods:
                    self._want(state, {stable: want, current: 0}, surge=current)
                else:
                    state.replicas = {stable: want, current: 0}
                    state.ready = {stable: want, current: 0}
                state.last_progress, state.abort_message = now, ""
                self._progressing(status, now, "ReplicaSetUpdated", f"Updated Rollout to revision {state.revision}")

        canary_status, abort_message = self.analysis.apply(obj)
        if abort_message and not state.abort_message:
            state.abort_message = abort_message
        if current != stable:
            self._canary(key, obj, state, steps, want, now)
        if self.pods:
            if status["currentPodHash"] == status["stableRS"]:
                self._want(state, {current: want})  # steady: follow spec.replicas (a scale by hand or KEDA)
            self._observe(obj, state, want, now)
        aborted = bool(status.get("abort")) and status["currentPodHash"] != status["stableRS"]
        point_services(self.store, obj, status["stableRS"] if aborted else status["currentPodHash"], status["stableRS"])
        status.update(
            observedGeneration=str(obj["metadata"].get("generation", 1)),
            replicas=sum(state.replicas.values()),
            updatedReplicas=state.replicas.get(status["currentPodHash"], 0),
            readyReplicas=sum(state.ready.values()),
            availableReplicas=sum(state.ready.values()),
        )
        status["canary"] = canary_status
        status["selector"] = f"rollouts-pod-template-hash={status['currentPodHash']}"
        status.pop("phase", None)
        status.pop("message", None)
        phase, message = controller_phase(obj)
        status["phase"] = phase
        if message:
            status["message"] = message

    def _canary(
        self, key: tuple[str, str], obj: Obj, state: _State, steps: list[Obj], want: int, now: datetime
    ) -> None:
        spec, status = obj["spec"], obj["status"]
        current, stable = status["currentPodHash"], status["stableRS"]
        if status.get("abort"):  # traffic back to stable at once, step index reset
            if self.pods:
                self._want(state, {stable: want, current: 0})
            else:
                state.replicas, state.ready = {stable: want, current: 0}, {stable: want, current: 0}
            status["currentStepIndex"] = 0
            status.pop("pauseConditions", None)
            status["controllerPause"] = False
            status.setdefault("abortedAt", rfc3339(now))
            if self._reason(status) != "RolloutAborted":
                message = f"Rollout aborted update to revision {state.revision}"
                message += f": {state.abort_message}" if state.abort_message else ""
                self._progressing(status, now, "RolloutAborted", message)
            return
        if self._reason(status) == "RolloutAborted":  # retry: {"status":{"abort":false}}
            status.pop("abortedAt", None)
            state.last_progress, state.abort_message = now, ""
            self._progressing(status, now, "ReplicaSetUpdated", "Rollout is resumed")
        if status.get("promoteFull"):  # skip every remaining step and pause
            status["currentStepIndex"] = len(steps)
            status.pop("pauseConditions", None)
            status["controllerPause"] = False
        if spec.get("paused") or INCONCLUSIVE in {c.get("reason") for c in status.get("pauseConditions") or []}:
            self._deadline(obj, state, now)
            return
        while True:
            index = int(status.get("currentStepIndex") or 0)
            if index >= len(steps):  # after the last step the new ReplicaSet becomes stable, when ready
                if self._scale(key, obj, state, (current, stable), want, 0, want, now):
                    status["stableRS"] = current
                    status.pop("promoteFull", None)
                    self._want(state, {current: want})
                    self._progressing(status, now, "NewReplicaSetAvailable", "Rollout is healthy")
                break
            step = steps[index]
            if "setWeight" in step:
                weight = int(step["setWeight"])
                canary = 0 if weight == 0 else min(want, max(1, math.ceil(want * weight / 100)))
                stable_count = 0 if weight >= 100 else max(1, want - canary)
                if not self._scale(key, obj, state, (current, stable), canary, stable_count, want, now):
                    break
            elif "pause" in step and not self._pause(status, step["pause"] or {}, now):
                break
            elif "analysis" in step:
                run = self.analysis.step_run(obj, index)
                state.last_progress = now  # waiting on an analysis is not a stuck ReplicaSet
                if run is None:
                    break
                phase, message = run["status"]["phase"], run["status"].get("message", "")
                if phase in ("Failed", "Error"):
                    status["abort"] = True
                    state.abort_message = state.abort_message or message or f"AnalysisRun {phase}"
                    self._canary(key, obj, state, steps, want, now)
                    return
                if phase == "Inconclusive":
                    pause(status, run)
                    break
            self._advance(status, state, now)
        self._deadline(obj, state, now)

    def _scale(
        self,
        key: tuple[str, str],
        obj: Obj,
        state: _State,
        hashes: tuple[str, str],
        canary: int,
        stable_n: int,
        want: int,
        now: datetime,
    ) -> bool:
        """Scale both ReplicaSets; True when the canary's pods are all ready (a weight step is then done). In pods
        mode the stable ReplicaSet shrinks only once the canary's pods are Ready."""
        current, stable = hashes
        desired = {stable: stable_n, current: canary} if stable != current else {current: want}
        if self.pods:
            self._want(state, desired, surge=current)
            before = state.ready.get(current)
            counts = self.replicasets.sync(obj, state.desired, state.surge)
            state.replicas, state.ready = counts.replicas, counts.ready
            if counts.ready.get(current, 0) != before:
                state.last_progress = now
            return counts.ready.get(current, 0) >= canary and counts.replicas.get(stable, 0) <= desired[stable]
        state.replicas = desired
        ready_canary = 0 if key in self.unready else canary
        if state.ready.get(current) != ready_canary:
            state.last_progress = now
        state.ready = {stable: stable_n, current: ready_canary}
        return ready_canary == canary

    def _want(self, state: _State, desired: dict[str, int], surge: str | None = None) -> None:
        """The replica counts per hash: taken as they are in count mode, what the pods are synced to in pods mode."""
        if self.pods:
            state.desired, state.surge = dict(desired), surge
        else:
            state.replicas, state.ready = dict(desired), dict(desired)

    def _observe(self, obj: Obj, state: _State, want: int, now: datetime) -> None:
        """Pods mode: sync the pods to what is wanted and count them; with no canary in flight, pods that never get
        Ready (a crashing first version) reach the progress deadline too, and recover from it once they are."""
        status = obj["status"]
        before = state.ready.get(status["currentPodHash"])
        counts = self.replicasets.sync(obj, state.desired, state.surge)
        state.replicas, state.ready = counts.replicas, counts.ready
        if status["currentPodHash"] != status["stableRS"]:
            return
        ready = counts.ready.get(status["currentPodHash"], 0)
        if ready != before:
            state.last_progress = now
        if ready >= want and counts.replicas.get(status["currentPodHash"], 0) == sum(counts.replicas.values()):
            if self._reason(status) == "ProgressDeadlineExceeded":
                self._progressing(status, now, "NewReplicaSetAvailable", "Rollout is healthy")
        else:
            self._deadline(obj, state, now)

    def _pause(self, status: Obj, pause: Obj, now: datetime) -> bool:
        """A pause step: True when it is over (promoted by a client, or its duration has passed)."""
        conditions = [c for c in status.get("pauseConditions") or [] if c.get("reason") == "CanaryPauseStep"]
        if "duration" in pause:
            if not conditions:
                if status.get("controllerPause"):
                    return True  # promoted by a client before the duration was up
                status["pauseConditions"] = [{"reason": "CanaryPauseStep", "startTime": rfc3339(now)}]
                status["controllerPause"] = True
                return False
            started = parse_time(conditions[0]["startTime"])
            return now >= started + timedelta(seconds=duration_seconds(pause["duration"]))
        if conditions:
            return False
        if status.get("controllerPause"):
            return True  # a client cleared the pause condition: that is "promote"
        status["pauseConditions"] = [{"reason": "CanaryPauseStep", "startTime": rfc3339(now)}]
        status["controllerPause"] = True
        return False

    def _advance(self, status: Obj, state: _State, now: datetime) -> None:
        status["currentStepIndex"] = int(status.get("currentStepIndex") or 0) + 1
        status.pop("pauseConditions", None)
        status["controllerPause"] = False
        state.last_progress = now

    def _deadline(self, obj: Obj, state: _State, now: datetime) -> None:
        """No progress for progressDeadlineSeconds (paused time excepted) -> ProgressDeadlineExceeded."""
        status = obj["status"]
        if self._reason(status) == "ProgressDeadlineExceeded":
            return
        if status.get("pauseConditions") or obj["spec"].get("paused") or state.last_progress is None:
            state.last_progress = now if status.get("pauseConditions") else state.last_progress
            return
        limit = float(obj["spec"].get("progressDeadlineSeconds", 600))
        if now - state.last_progress > timedelta(seconds=limit):
            message = f'ReplicaSet "{obj["metadata"]["name"]}-{status["currentPodHash"]}" has timed out progressing.'
            self._progressing(status, now, "ProgressDeadlineExceeded", message, ok=False)

    # status bookkeeping --------------------------------------------------------------------------------------
    @staticmethod
    def _clear_update(status: Obj) -> None:
        for key in ("abort", "abortedAt", "pauseConditions", "promoteFull"):
            status.pop(key, None)
        status["controllerPause"] = False

    @staticmethod
    def _progressing(status: Obj, now: datetime, reason: str, message: str, ok: bool = True) -> None:
        conditions = [c for c in status.get("conditions") or [] if c["type"] != "Progressing"]
        old = next((c for c in status.get("conditions") or [] if c["type"] == "Progressing"), None)
        flag = "True" if ok and reason != "RolloutAborted" else "False"
        since = old["lastTransitionTime"] if old and old["status"] == flag else rfc3339(now)
        conditions.append(
            {
                "type": "Progressing",
                "status": flag,
                "reason": reason,
                "message": message,
                "lastTransitionTime": since,
                "lastUpdateTime": rfc3339(now),
            }
        )
        status["conditions"] = conditions

    @staticmethod
    def _reason(status: Obj) -> str:
        return next((c["reason"] for c in status.get("conditions") or [] if c["type"] == "Progressing"), "")
