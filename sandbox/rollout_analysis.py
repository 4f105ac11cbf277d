"""Background analysis of a canary Rollout (``spec.strategy.canary.analysis``), as argo-rollouts' rollout/analysis.go.

From ``startingStep`` on, while a canary is in flight (``currentPodHash != stableRS``, not aborted, not promoted
in full), the Rollout owns one AnalysisRun ``<rollout>-<hash>-<revision>`` made from its AnalysisTemplates (in
its namespace) with the args resolved: ``value``, or ``valueFrom.podTemplateHashValue`` Latest (currentPodHash) /
Stable (stableRS), or ``valueFrom.fieldRef`` ``metadata.name|namespace``. Its outcome acts on the Rollout:
Failed or Error aborts it (``status.abort``; the Progressing condition's message carries the run's message),
Inconclusive pauses it (InconclusiveAnalysisRun) until a client promotes, which starts a new run. A completed or
rolled-back Rollout terminates its run (then Successful). Without a Prometheus the runs are not made, and the
Rollout's ``status.canary.currentBackgroundAnalysisRunStatus.message`` says "analysis off".
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from datetime import datetime

from .analysis import ANALYSISRUN, COMPLETED, AnalysisRuns
from .pods import HASH_LABEL
from .replicasets import owner_reference
from .store import BY_KIND, ApiError, Obj, Store

ANALYSISTEMPLATE = BY_KIND["AnalysisTemplate"]
INCONCLUSIVE = "InconclusiveAnalysisRun"
ANALYSIS_OFF = "analysis off: no Prometheus in this sandbox, so the Rollout's AnalysisRuns are not run"
REVISION = "rollout.argoproj.io/revision"
Key = tuple[str, str]


class AnalysisSetupError(Exception):
    """The run cannot be made (a template missing, an argument unresolved): shown in the Rollout's status."""


def _analysis(rollout: Obj) -> Obj:
    analysis = ((rollout.get("spec") or {}).get("strategy") or {}).get("canary", {}).get("analysis") or {}
    return analysis if analysis.get("templates") else {}


def _pause_reasons(status: Obj) -> set[str]:
    return {c.get("reason", "") for c in status.get("pauseConditions") or []}


class BackgroundAnalysis:
    """The Rollouts controller's side of background analysis; ``prometheus_url`` None turns it off."""

    def __init__(self, store: Store, prometheus_url: str | None, clock: Callable[[], datetime]) -> None:
        self.store = store
        self.runs = AnalysisRuns(store, prometheus_url, clock) if prometheus_url else None
        self.current: dict[Key, str] = {}
        self.problem: dict[Key, str] = {}

    def sync(self, rollout: Obj, revision: int) -> None:
        """Create, measure or terminate the Rollout's run (outside the store lock: measuring queries Prometheus)."""
        key = (rollout["metadata"]["namespace"], rollout["metadata"]["name"])
        status = rollout.get("status") or {}
        run = self._current(key, status)
        analysis = _analysis(rollout)
        if not analysis or self.runs is None:
            self._stop(key, run, forget=True)
            return
        if status.get("abort") or status.get("promoteFull") or not status.get("stableRS"):
            self._stop(key, run, forget=False)  # an aborted Rollout still shows the run that aborted it
            return
        index, start = status.get("currentStepIndex"), analysis.get("startingStep")
        before_start = start is not None and index is not None and int(index) < int(start)
        if status.get("stableRS") == status.get("currentPodHash") or not status.get("currentPodHash") or before_start:
            self._stop(key, run, forget=True)
            return
        if INCONCLUSIVE in _pause_reasons(status):
            return
        if self._needs_new(run, status):
            try:
                run = self._create(rollout, analysis, revision)
            except AnalysisSetupError as exc:
                self.problem[key] = str(exc)
                return
            self.problem.pop(key, None)
            self.current[key] = run["metadata"]["name"]
        if run is not None:
            self.runs.reconcile(key[0], run["metadata"]["name"])

    def apply(self, obj: Obj) -> tuple[Obj, str | None]:
        """Inside the Rollout's reconcile: its ``status.canary`` and, when the run failed, the abort message (the
        pause for an inconclusive run is added here)."""
        key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
        status = obj.setdefault("status", {})
        if not _analysis(obj):
            return {}, None
        if self.runs is None:
            return {"currentBackgroundAnalysisRunStatus": {"name": "", "status": "", "message": ANALYSIS_OFF}}, None
        if key in self.problem:
            message = f"analysis not started: {self.problem[key]}"
            return {"currentBackgroundAnalysisRunStatus": {"name": "", "status": "Error", "message": message}}, None
        run = self._current(key, status)
        if run is None:
            return {}, None
        run_status = run.get("status") or {}
        phase, message = run_status.get("phase") or "Pending", run_status.get("message", "")
        shown = {"name": run["metadata"]["name"], "status": phase, **({"message": message} if message else {})}
        in_flight = status.get("stableRS") != status.get("currentPodHash") and not status.get("abort")
        if in_flight and run["metadata"]["labels"].get(HASH_LABEL) == status.get("currentPodHash"):
            if phase == "Inconclusive" and INCONCLUSIVE not in _pause_reasons(status):
                start = run_status.get("completedAt") or run_status.get("startedAt")
                status["pauseConditions"] = [*(status.get("pauseConditions") or []), _pause(start)]
                status["controllerPause"] = True
            if phase in ("Failed", "Error"):
                status["abort"] = True
                return {"currentBackgroundAnalysisRunStatus": shown}, message or f"AnalysisRun {phase}"
        return {"currentBackgroundAnalysisRunStatus": shown}, None

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

    def _create(self, rollout: Obj, analysis: Obj, revision: int) -> Obj:
        """``newAnalysisRunFromRollout`` and ``CreateWithCollisionCounter``."""
        meta, status = rollout["metadata"], rollout["status"]
        templates = []
        for ref in analysis["templates"]:
            if ref.get("clusterScope"):
                raise AnalysisSetupError(f"ClusterAnalysisTemplate '{ref.get('templateName')}': not in the sandbox")
            try:
                templates.append(self.store.get(ANALYSISTEMPLATE, meta["namespace"], ref["templateName"]))
            except ApiError:
                raise AnalysisSetupError(f"AnalysisTemplate '{ref['templateName']}' not found") from None
        args = self._args(analysis.get("args") or [], templates, rollout)
        metrics: list[Obj] = []
        for template in templates:
            for metric in (template.get("spec") or {}).get("metrics") or []:
                if all(m["name"] != metric["name"] for m in metrics):
                    metrics.append(copy.deepcopy(metric))
        pod_hash = status["currentPodHash"]
        labels = {HASH_LABEL: pod_hash, "rollout-type": "Background"}
        labels.update((rollout["spec"].get("selector") or {}).get("matchLabels") or {})
        base = f"{meta['name']}-{pod_hash}-{revision}"
        spec = {"metrics": metrics, "args": args}
        name, collision = base, 0
        while True:
            body = {
                "metadata": {
                    "name": name,
                    "labels": labels,
                    "annotations": {REVISION: str(revision)},
                    "ownerReferences": [owner_reference(rollout)],
                },
                "spec": spec,
            }
            try:
                return self.store.create(ANALYSISRUN, meta["namespace"], body)
            except ApiError as exc:
                if exc.code != 409:
                    raise
            existing = self.store.get(ANALYSISRUN, meta["namespace"], name)
            same_owner = any(r.get("uid") == meta.get("uid") for r in existing["metadata"].get("ownerReferences") or [])
            if (existing.get("status") or {}).get("phase") not in COMPLETED and existing["spec"] == spec and same_owner:
                return existing
            collision += 1
            name = f"{base}.{collision}"

    @staticmethod
    def _args(given: list[Obj], templates: list[Obj], rollout: Obj) -> list[Obj]:
        """The templates' args with the Rollout's values (``MergeArgs``): each must end with a value."""
        status = rollout["status"]
        values: dict[str, str] = {}
        for arg in given:
            source = arg.get("valueFrom") or {}
            if "value" in arg:
                values[arg["name"]] = str(arg["value"])
            elif "podTemplateHashValue" in source:
                which = source["podTemplateHashValue"]
                values[arg["name"]] = str(status.get("currentPodHash" if which == "Latest" else "stableRS") or "")
            elif "fieldRef" in source:
                path = source["fieldRef"].get("fieldPath", "")
                node: object = rollout
                for part in path.split("."):
                    node = node.get(part) if isinstance(node, dict) else None
                if node is None:
                    raise AnalysisSetupError(f"arg {arg['name']}: fieldPath {path!r} not found on the Rollout")
                values[arg["name"]] = str(node)
        merged: list[Obj] = []
        for template in templates:
            for arg in (template.get("spec") or {}).get("args") or []:
                if any(m["name"] == arg["name"] for m in merged):
                    continue
                value = values.get(arg["name"], arg.get("value"))
                if value is None:
                    raise AnalysisSetupError(f"args.{arg['name']} was not resolved")
                merged.append({"name": arg["name"], "value": str(value)})
        return merged


def _pause(start: str | None) -> Obj:
    return {"reason": INCONCLUSIVE, "startTime": start or ""}
