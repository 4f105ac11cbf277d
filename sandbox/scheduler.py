"""The sandbox's scheduler: which simulated node a pod may run on (readiness, nodeSelector, taints, GPUs).

It filters as kube-scheduler's default plugins do for these fields and explains a refusal in kube-scheduler's
words ("0/2 nodes are available: 2 Insufficient nvidia.com/gpu."), so the pipeline's diagnosis reads as on a real
cluster. Extended resources (a name with a ``/``, e.g. ``nvidia.com/gpu``) are counted against each node's
allocatable; CPU and memory are not (every pod here shares the one machine).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from .store import Obj, now_rfc3339

FINISHED = ("Succeeded", "Failed")


def _quantity(value: Any) -> int:
    """An extended resource quantity (whole numbers only, as Kubernetes requires for them)."""
    try:
        return int(str(value))
    except ValueError:
        return 0


def requests(pod: Obj) -> dict[str, int]:
    """The pod's extended-resource requests: each container's requests (else limits), summed over containers and
    init containers."""
    spec = pod.get("spec") or {}
    total: Counter[str] = Counter()
    for container in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
        resources = container.get("resources") or {}
        asked = {**(resources.get("limits") or {}), **(resources.get("requests") or {})}
        for name, value in asked.items():
            if "/" in name:
                total[name] += _quantity(value)
    return dict(total)


def tolerates(tolerations: list[Obj], taint: Obj) -> bool:
    """Some toleration matches the taint (key, operator Equal/Exists, value, effect)."""
    for toleration in tolerations:
        key, operator = toleration.get("key") or "", toleration.get("operator") or "Equal"
        if key and key != taint.get("key"):
            continue
        if not key and operator != "Exists":
            continue
        if operator == "Equal" and (toleration.get("value") or "") != (taint.get("value") or ""):
            continue
        if toleration.get("effect") and toleration["effect"] != taint.get("effect"):
            continue
        return True
    return False


def _ready(node: Obj) -> bool:
    conditions = (node.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _misfit(pod: Obj, node: Obj, used: dict[str, int]) -> list[str]:
    """Why ``pod`` cannot go on ``node`` (kube-scheduler's reason texts); [] when it fits."""
    spec, labels = pod.get("spec") or {}, (node.get("metadata") or {}).get("labels") or {}
    if not _ready(node):
        return ["node(s) were not ready"]
    if (node.get("spec") or {}).get("unschedulable"):
        return ["node(s) were unschedulable"]
    selector = spec.get("nodeSelector") or {}
    if any(labels.get(k) != v for k, v in selector.items()):
        return ["node(s) didn't match Pod's node affinity/selector"]
    for taint in (node.get("spec") or {}).get("taints") or []:
        if taint.get("effect") in ("NoSchedule", "NoExecute") and not tolerates(spec.get("tolerations") or [], taint):
            return [f"node(s) had untolerated taint {{{taint.get('key')}: {taint.get('value') or ''}}}"]
    allocatable = (node.get("status") or {}).get("allocatable") or {}
    return [
        f"Insufficient {name}"
        for name, amount in sorted(requests(pod).items())
        if amount > 0 and used.get(name, 0) + amount > _quantity(allocatable.get(name, 0))
    ]


def schedule(pod: Obj, nodes: list[Obj], pods: list[Obj]) -> tuple[str | None, str]:
    """The node for ``pod`` (first that fits, by name) and "", or None and kube-scheduler's message.

    ``pods``: every pod in the cluster; those bound to a node and not finished hold their requests there.
    """
    used: dict[str, Counter[str]] = {}
    for other in pods:
        node_name = (other.get("spec") or {}).get("nodeName")
        if node_name and (other.get("status") or {}).get("phase") not in FINISHED:
            used.setdefault(node_name, Counter()).update(requests(other))
    reasons: Counter[str] = Counter()
    for node in sorted(nodes, key=lambda n: n["metadata"]["name"]):
        name = node["metadata"]["name"]
        misfit = _misfit(pod, node, dict(used.get(name, Counter())))
        if not misfit:
            return name, ""
        reasons.update(misfit)
    detail = ", ".join(f"{count} {reason}" for reason, count in sorted(reasons.items()))
    return None, f"0/{len(nodes)} nodes are available: {detail or 'no nodes in the cluster'}."


def bind(node: str) -> Callable[[Obj], None]:
    """The change that binds a pod to ``node`` (PodScheduled True)."""

    def change(pod: Obj) -> None:
        pod["spec"]["nodeName"] = node
        status = pod.setdefault("status", {})
        status["phase"] = "Pending"
        status["conditions"] = [{"type": "PodScheduled", "status": "True", "lastTransitionTime": now_rfc3339()}]

    return change


def unschedulable(message: str) -> Callable[[Obj], None]:
    """The change that keeps a pod Pending with PodScheduled False, reason Unschedulable (first time kept)."""

    def change(pod: Obj) -> None:
        status = pod.setdefault("status", {})
        old: Obj = next((c for c in status.get("conditions") or [] if c.get("type") == "PodScheduled"), {})
        since = old.get("lastTransitionTime") if old.get("status") == "False" else now_rfc3339()
        status["phase"] = "Pending"
        status["conditions"] = [
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": message,
                "lastTransitionTime": since,
            }
        ]

    return change
