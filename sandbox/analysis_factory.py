"""AnalysisRuns made from a Rollout's AnalysisTemplates, as argo-rollouts' ``newAnalysisRunFromRollout`` makes them.

The templates come from the Rollout's namespace; the args are the templates' with the Rollout's values merged in
(``MergeArgs``): ``value``, ``valueFrom.podTemplateHashValue`` Latest (currentPodHash) / Stable (stableRS), or
``valueFrom.fieldRef`` on the Rollout; an arg left without a value is an :class:`AnalysisSetupError`.
"""

from __future__ import annotations

import copy

from .analysis import ANALYSISRUN, COMPLETED
from .pods import HASH_LABEL
from .replicasets import owner_reference
from .store import BY_KIND, ApiError, Obj, Store

ANALYSISTEMPLATE = BY_KIND["AnalysisTemplate"]
REVISION = "rollout.argoproj.io/revision"
ROLLOUT_TYPE = "rollout-type"
STEP_INDEX = "step-index"


class AnalysisSetupError(Exception):
    """The run cannot be made (a template missing, an argument unresolved): shown in the Rollout's status."""


def create_run(store: Store, rollout: Obj, analysis: Obj, revision: int, step: int | None = None) -> Obj:
    """``newAnalysisRunFromRollout`` and ``CreateWithCollisionCounter``: the Rollout's AnalysisRun (a background one,
    or the one of canary step ``step``) from its templates, named ``<rollout>-<hash>-<revision>[-<step>]`` (``.N``
    added on a collision with a run that cannot be reused)."""
    meta, status = rollout["metadata"], rollout["status"]
    templates = []
    for ref in analysis["templates"]:
        if ref.get("clusterScope"):
            raise AnalysisSetupError(f"ClusterAnalysisTemplate '{ref.get('templateName')}': not in the sandbox")
        try:
            templates.append(store.get(ANALYSISTEMPLATE, meta["namespace"], ref["templateName"]))
        except ApiError:
            raise AnalysisSetupError(f"AnalysisTemplate '{ref['templateName']}' not found") from None
    args = merge_args(analysis.get("args") or [], templates, rollout)
    metrics: list[Obj] = []
    for template in templates:
        for metric in (template.get("spec") or {}).get("metrics") or []:
            if all(m["name"] != metric["name"] for m in metrics):
                metrics.append(copy.deepcopy(metric))
    pod_hash = status["currentPodHash"]
    labels = {HASH_LABEL: pod_hash, ROLLOUT_TYPE: "Background" if step is None else "Step"}
    if step is not None:
        labels[STEP_INDEX] = str(step)
    labels.update((rollout["spec"].get("selector") or {}).get("matchLabels") or {})
    base = f"{meta['name']}-{pod_hash}-{revision}" + ("" if step is None else f"-{step}")
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
            return store.create(ANALYSISRUN, meta["namespace"], body)
        except ApiError as exc:
            if exc.code != 409:
                raise
        existing = store.get(ANALYSISRUN, meta["namespace"], name)
        same_owner = any(r.get("uid") == meta.get("uid") for r in existing["metadata"].get("ownerReferences") or [])
        if (existing.get("status") or {}).get("phase") not in COMPLETED and existing["spec"] == spec and same_owner:
            return existing
        collision += 1
        name = f"{base}.{collision}"


def merge_args(given: list[Obj], templates: list[Obj], rollout: Obj) -> list[Obj]:
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
