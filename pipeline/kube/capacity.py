"""Free GPUs in the node pool: allocatable minus requests of running pods, per node."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubernetes.utils import parse_quantity

from pipeline.config import GpuPool
from pipeline.errors import TerminalError
from pipeline.kube.client import KubeClient


@dataclass(frozen=True)
class NodeGpus:
    name: str
    allocatable: int
    requested: int

    @property
    def free(self) -> int:
        return max(0, self.allocatable - self.requested)


@dataclass(frozen=True)
class GpuCapacity:
    """Free GPUs of a node pool: allocatable minus the requests of non-terminated pods, per node."""

    resource: str
    selector: str
    nodes: tuple[NodeGpus, ...]

    @property
    def allocatable(self) -> int:
        return sum(n.allocatable for n in self.nodes)

    @property
    def requested(self) -> int:
        return sum(n.requested for n in self.nodes)

    @property
    def free(self) -> int:
        return sum(n.free for n in self.nodes)

    def replicas_fit(self, per_replica: int) -> int:
        """How many replicas fit: a replica's GPUs must all be on one node."""
        return sum(n.free // per_replica for n in self.nodes) if per_replica > 0 else 10**6


class Capacity(KubeClient):
    """Free GPUs of a node pool, and the refusal with the numbers."""

    # GPU capacity ----------------------------------------------------------------------------------------------
    def gpu_capacity(self, pool: GpuPool) -> GpuCapacity:
        """Allocatable minus requested ``pool.resource`` on the schedulable, Ready nodes matching the selector.

        Requests count for every pod not yet Succeeded or Failed (Pending pods bound to a node hold GPUs too).
        """
        selector = ",".join(f"{k}={v}" for k, v in sorted(pool.node_selector.items()))
        nodes = self.read("list GPU nodes", self.core.list_node, label_selector=selector or None)["items"]
        usable = {
            n["metadata"]["name"]: int(parse_quantity(n["status"].get("allocatable", {}).get(pool.resource, "0")))
            for n in nodes
            if not (n.get("spec") or {}).get("unschedulable")
            and any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"].get("conditions", []))
        }
        terminal = "status.phase!=Succeeded,status.phase!=Failed"
        pods = self.read("list pods", self.core.list_pod_for_all_namespaces, field_selector=terminal)["items"]
        requested = dict.fromkeys(usable, 0)
        for pod in pods:
            if pod["spec"].get("nodeName") in requested:
                requested[pod["spec"]["nodeName"]] += _pod_request(pod["spec"], pool.resource)
        found = tuple(NodeGpus(name, usable[name], requested[name]) for name in sorted(usable))
        return GpuCapacity(pool.resource, selector or "(all nodes)", found)

    def require_gpus(self, pool: GpuPool, replicas: int = 1) -> GpuCapacity:
        """Refuse (before any commit) when the pool cannot place ``replicas`` canary replicas.

        Raises:
            TerminalError: too few free GPUs, with the numbers per node.
        """
        cap = self.gpu_capacity(pool)
        if cap.replicas_fit(pool.gpus_per_replica) < replicas:
            per_node = ", ".join(f"{n.name}: {n.free}/{n.allocatable} free" for n in cap.nodes) or "no Ready nodes"
            raise TerminalError(
                f"not enough free {pool.resource} in the node pool {cap.selector}: the canary needs {replicas} "
                f"replica(s) x {pool.gpus_per_replica} on one node each, but {cap.free} of {cap.allocatable} are "
                f"free ({cap.requested} requested by pods; {per_node})",
                hint="free GPUs (scale down other workloads), add nodes to the pool, or lower gpus_per_replica",
            )
        return cap


def _pod_request(spec: dict[str, Any], resource: str) -> int:
    """A pod's effective request: max(sum over containers, largest init container); limits stand in for requests."""

    def one(container: dict[str, Any]) -> int:
        res = container.get("resources") or {}
        value = (res.get("requests") or {}).get(resource) or (res.get("limits") or {}).get(resource)
        return int(parse_quantity(value)) if value else 0

    init = max((one(c) for c in spec.get("initContainers") or []), default=0)
    return max(sum(one(c) for c in spec.get("containers") or []), init)
