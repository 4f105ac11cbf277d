"""A canary Rollout's analysis, as argo-rollouts' rollout/analysis.go: background runs and analysis steps.

Background (``spec.strategy.canary.analysis``): from ``startingStep`` on, while a canary is in flight
(``currentPodHash != stableRS``, not aborted, not promoted in full), the Rollout owns one AnalysisRun
``<rollout>-<hash>-<revision>`` (:mod:`sandbox.analysis_factory`). Failed or Error aborts the Rollout
(``status.abort``; the Progressing condition's message carries the run's message), Inconclusive pauses it
(InconclusiveAnalysisRun) until a client promotes, which starts a new run. A completed or rolled-back Rollout
terminates its run (then Successful). A step ``- analysis: {templates, args}``: its run
``<rollout>-<hash>-<revision>-<index>`` must end Successful for the step to complete; Failed/Error abort and
Inconclusive pauses as above. Every AnalysisRun not completed is measured by :class:`sandbox.analysis.AnalysisRuns`
each tick. Without a Prometheus no run is made: ``status.canary``'s run status says "analysis off" (an analysis
step then waits; a person may promote past it).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from .analysis import ANALYSISRUN, COMPLETED, AnalysisRuns
from .analysis_factory import STEP_INDEX, AnalysisSetupError, create_run
from .pods import HASH_LABEL
from .store import ApiError, Obj, Store

INCONCLUSIVE = "InconclusiveAnalysisRun"
ANALYSIS_OFF = "analysis off: no Prometheus in this sandbox, so the Rollout's AnalysisRuns are not run"
BACKGROUND, STEP = "currentBackgroundAnalysisRunStatus", "currentStepAnalysisRunStatus"
Key = tuple[str, str, str]  # namespace, rollout, which run (BACKGROUND or STEP)


def _canary(rollout: Obj) -> Obj:
    return ((rollout.get("spec") or {}).get("strategy") or {}).get("canary") or {}


def _background(rollout: Obj) -> Obj:
    analysis = _canary(rollout).get("analysis") or {}
    return analysis if analysis.get("templates") else {}


def _step(rollout: Obj) -> tuple[int | None, Obj]:
    """The current step's index and its ``analysis`` ({} when the current step is not an analysis step)."""
    index, steps = (rollout.get("status") or {}).get("currentStepIndex"), _canary(rollout).get("steps") or []
    if index is None or not 0 <= int(index) < len(steps):
        return None, {}
    analysis = steps[int(index)].get("analysis") or {}
    return int(index), analysis if analysis.get("templates") else {}


def _pause_reasons(status: Obj) -> set[str]:
    return {c.get("reason", "") for c in status.get("pauseConditions") or []}


class RolloutAnalysis:
    """The Rollouts controller's side of analysis; ``prometheus_url`` None turns it off."""

    def __init__(self, store: Store, prometheus_url: str | None, clock: Callable[[], datetime]) -> None:
        self.store = store
        self.runs = AnalysisRuns(store, prometheus_url, clock) if prometheus_url else None
        self.current: dict[Key, str] = {}
        self.problem: dict[Key, str] = {}

    @property
    def enabled(self) -> bool:
        return self.runs is not None

    def sync(self, rollout: Obj, revision: int) -> None:
        """Create or terminate the Rollout's runs (``reconcileAnalysisRuns``), outside the store lock."""
        meta, status = rollout["metadata"], rollout.get("status") or {}
        background, step = (meta["namespace"], meta["name"], BACKGROUND), (meta["namespace"], meta["name"], STEP)
        index, step_analysis = _step(rollout)
        runs = {key: self._current(key, status) for key in (background, step)}
        step_run = runs[step]
        if step_run is not None and step_run["metadata"]["labels"].get(STEP_INDEX) != str(index):
            self._stop(step, step_run, forget=True)  # a step analysis is over once its step is
            runs[step] = None
        wanted = {background: _background(rollout), step: step_analysis}
        if self.runs is None or status.get("abort") or status.get("promoteFull") or not status.get("stableRS"):
            for key, run in runs.items():  # an aborted Rollout still shows the run that aborted it
                self._stop(key, run, forget=self.runs is None or not wanted[key])
            return
        start = wanted[background].get("startingStep")
        before_start = start is not None and index is not None and index < int(start)
        promoted = status.get("stableRS") == status.get("currentPodHash") or not status.get("currentPodHash")
        for key, analysis in wanted.items():
            if not analysis or promoted or (key == background and before_start):
                self._stop(key, runs[key], forget=True)
            elif INCONCLUSIVE in _pause_reasons(status) or (key == step and status.get("pauseConditions")):
                continue
            elif self._needs_new(runs[key], status):
                try:
                    run = create_run(self.store, rollout, analysis, revision, None if key == background else index)
                except AnalysisSetupError as exc:
                    self.problem[key] = str(exc)
                    continue
                self.problem.pop(key, None)
                self.current[key] = run["metadata"]["name"]
                self.runs.reconcile(run["metadata"]["namespace"], run["metadata"]["name"])  # starts at once

    def measure(self) -> None:
        """The AnalysisRun controller: every run not completed takes the measurements that are due."""
        if self.runs is None:
            return
        for run in self.store.list(ANALYSISRUN, None)[0]:
            if (run.get("status") or {}).get("phase") not in COMPLETED:
                self.runs.reconcile(run["metadata"]["namespace"], run["metadata"]["name"])

    def apply(self, obj: Obj) -> tuple[Obj, str | None]:
        """Inside the Rollout's reconcile: its ``status.canary`` (the runs' names and phases) and, when the
        background run failed, the abort message; an inconclusive background run adds its pause here."""
        meta, status = obj["metadata"], obj.setdefault("status", {})
        canary: Obj = {}
        abort: str | None = None
        for field, wanted in ((BACKGROUND, bool(_background(obj))), (STEP, bool(_step(obj)[1]))):
            key = (meta["namespace"], meta["name"], field)
            run = self._current(key, status)
            if not wanted and run is None:
                continue
            if self.runs is None:
                canary[field] = {"name": "", "status": "", "message": ANALYSIS_OFF}
            elif key in self.problem:
                canary[field] = {"name": "", "status": "Error", "message": f"analysis not started: {self.problem[key]}"}
            elif run is not None:
                phase, message = _outcome(run)
                canary[field] = {"name": run["metadata"]["name"], "status": phase}
                if message:
                    canary[field]["message"] = message
                in_flight = status.get("stableRS") != status.get("currentPodHash") and not status.get("abort")
                if field == BACKGROUND and in_flight:
                    if phase == "Inconclusive":
                        pause(status, run)
                    elif phase in ("Failed", "Error"):
                        status["abort"] = True
                        abort = message or f"AnalysisRun {phase}"
        return canary, abort

    def step_run(self, obj: Obj, index: int) -> Obj | None:
        """The analysis run of step ``index`` once it has completed; None while it runs (or when there is none)."""
        key = (obj["metadata"]["namespace"], obj["metadata"]["name"], STEP)
        run = self._current(key, obj.get("status") or {})
        if run is None or run["metadata"]["labels"].get(STEP_INDEX) != str(index):
            return None
        return run if _outcome(run)[0] in COMPLETED else None

    def forget(self, namespace: str, name: str) -> None:
        """A deleted Rollout: its runs go with it (garbage-collected by owner)."""
        for field in (BACKGROUND, STEP):
            self.current.pop((namespace, name, field), None)
            self.problem.pop((namespace, name, field), None)

    # helpers -------------------------------------------------------------------------------------------------
    def _current(self, key: Key, status: Obj) -> Obj | None:
        """The Rollout's run for its current pod hash; a run of another hash (a superseded canary) is stopped."""
        name = self.current.get(key)
        if not name:
            return None
        try:
            run = self.store.get(ANALYSISRUN, key[0], name)
        except ApiError:
            self.current.pop(key, None)
            return None
        if run["metadata"].get("labels", {}).get(HASH_LABEL) != status.get("currentPodHash"):
            self._stop(key, run, forget=True)
            return None
        return run

    def _stop(self, key: Key, run: Obj | None, forget: bool) -> None:
        if run is not None and self.runs is not None:
            self.runs.terminate(key[0], run["metadata"]["name"])
        if forget:
            self.current.pop(key, None)
            self.problem.pop(key, None)

    @staticmethod
    def _needs_new(run: Obj | None, status: Obj) -> bool:
        """``needsNewAnalysisRun``: none yet; an inconclusive one the Rollout was promoted past; after an abort."""
        if run is None:
            return True
        phase = (run.get("status") or {}).get("phase")
        if status.get("controllerPause") and "CanaryPauseStep" not in _pause_reasons(status):
            return phase == "Inconclusive"
        return status.get("abortedAt") is not None


def _outcome(run: Obj) -> tuple[str, str]:
    run_status = run.get("status") or {}
    return run_status.get("phase") or "Pending", run_status.get("message", "")


def pause(status: Obj, run: Obj) -> None:
    """Pause the Rollout for an inconclusive run (once; a client's promote clears it)."""
    if INCONCLUSIVE in _pause_reasons(status):
        return
    run_status = run.get("status") or {}
    start = run_status.get("completedAt") or run_status.get("startedAt") or ""
    status["pauseConditions"] = [*(status.get("pauseConditions") or []), {"reason": INCONCLUSIVE, "startTime": start}]
    status["controllerPause"] = True
