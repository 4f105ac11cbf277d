"""Free GPUs in the node pool: allocatable minus requests of running pods, per node, plus what an autoscaled pool
can still add.

An autoscaled GPU pool (cluster autoscaler, GKE/EKS/AKS node pools, Karpenter) is often at zero nodes until a pod
asks for a GPU, so counting only Ready nodes refuses a canary that would have been placed. With
``gpu_pool.max_nodes`` and ``gpu_pool.gpus_per_node`` set, the preflight also counts the nodes the pool can add,
and every answer says which of the two counts it used.
"""

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
class PoolGrowth:
    """How far an autoscaled pool can grow: every node it has now counts toward ``max_nodes``, Ready or not."""

    max_nodes: int
    nodes_now: int
    gpus_per_node: int

    @property
    def can_add(self) -> int:
        return max(0, self.max_nodes - self.nodes_now)


@dataclass(frozen=True)
class GpuCapacity:
    """Free GPUs of a node pool: allocatable minus the requests of non-terminated pods, per Ready node; with
    ``growth``, also the empty nodes the pool can still add."""

    resource: str
    selector: str
    nodes: tuple[NodeGpus, ...]
    growth: PoolGrowth | None = None

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
        """How many replicas fit: a replica's GPUs must all be on one node (a new node counts as empty)."""
        if per_replica <= 0:
            return 10**6
        now = sum(n.free // per_replica for n in self.nodes)
        if self.growth is None:
            return now
        return now + self.growth.can_add * (self.growth.gpus_per_node // per_replica)

    @property
    def basis(self) -> str:
        """Which count the answer used, in words."""
        if self.growth is None:
            return "counted the Ready nodes only (gpu_pool.max_nodes is not set: the pool is taken as fixed)"
        g = self.growth
        return (
            f"counted the Ready nodes plus the {g.can_add} node(s) x {g.gpus_per_node} GPU(s) the autoscaled pool "
            f"can add ({g.nodes_now} of at most {g.max_nodes} nodes now)"
        )


def pool_capacity(pool: GpuPool, nodes: list[dict[str, Any]], pods: list[dict[str, Any]], selector: str) -> GpuCapacity:
    """The pool's capacity from the nodes matching its selector and the non-terminated pods. Pure.

    Only schedulable, Ready nodes offer GPUs; every node of the pool (cordoned, NotReady, still joining) counts
    toward ``max_nodes``, as the autoscaler counts it.
    """
    usable = {
        n["metadata"]["name"]: int(parse_quantity(n["status"].get("allocatable", {}).get(pool.resource, "0")))
        for n in nodes
        if not (n.get("spec") or {}).get("unschedulable")
        and any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"].get("conditions", []))
    }
    requested = dict.fromkeys(usable, 0)
    for pod in pods:
        if pod["spec"].get("nodeName") in requested:
            requested[pod["spec"]["nodeName"]] += _pod_request(pod["spec"], pool.resource)
    found = tuple(NodeGpus(name, usable[name], requested[name]) for name in sorted(usable))
    growth = None
    if pool.max_nodes is not None and pool.gpus_per_node is not None:
        growth = PoolGrowth(max_nodes=pool.max_nodes, nodes_now=len(nodes), gpus_per_node=pool.gpus_per_node)
    return GpuCapacity(pool.resource, selector or "(all nodes)", found, growth)


class Capacity(KubeClient):
    """Free GPUs of a node pool, and the refusal with the numbers."""

    # GPU capacity ----------------------------------------------------------------------------------------------
    def gpu_capacity(self, pool: GpuPool) -> GpuCapacity:
        """Allocatable minus requested ``pool.resource`` on the schedulable, Ready nodes matching the selector,
        and (``pool.max_nodes`` set) the nodes the pool can still add.

        Requests count for every pod not yet Succeeded or Failed (Pending pods bound to a node hold GPUs too).
        """
        selector = ",".join(f"{k}={v}" for k, v in sorted(pool.node_selector.items()))
        nodes = self.read("list GPU nodes", self.core.list_node, label_selector=selector or None)["items"]
        terminal = "status.phase!=Succeeded,status.phase!=Failed"
        pods = self.read("list pods", self.core.list_pod_for_all_namespaces, field_selector=terminal)["items"]
        return pool_capacity(pool, nodes, pods, selector)

    def require_gpus(self, pool: GpuPool, replicas: int = 1) -> GpuCapacity:
        """Refuse (before any commit) when the pool cannot place ``replicas`` canary replicas, even grown to its
        maximum when it is autoscaled.

        Raises:
            TerminalError: too few GPUs, with the numbers per node, which count was used and, for an autoscaled
                pool, its node count and maximum.
        """
        cap = self.gpu_capacity(pool)
        return check_fits(cap, pool, replicas)


def check_fits(cap: GpuCapacity, pool: GpuPool, replicas: int) -> GpuCapacity:
    """``cap`` when ``replicas`` replicas of ``pool.gpus_per_replica`` GPUs fit in it. Pure.

    Raises:
        TerminalError: they do not fit; the message names the numbers and the count used.
    """
    fits = cap.replicas_fit(pool.gpus_per_replica)
    if fits >= replicas:
        return cap
    per_node = ", ".join(f"{n.name}: {n.free}/{n.allocatable} free" for n in cap.nodes) or "no Ready nodes"
    what = (
        f"not enough free {pool.resource} in the node pool {cap.selector}: the canary needs {replicas} replica(s) x "
        f"{pool.gpus_per_replica} on one node each, but {cap.free} of {cap.allocatable} are free on the Ready "
        f"nodes ({cap.requested} requested by pods; {per_node})"
    )
    growth = cap.growth
    if growth is None:
        what += f"; {cap.basis}"
        hint = (
            "free GPUs (scale down other workloads) or add nodes; for an autoscaled pool set gpu_pool.max_nodes "
            "and gpu_pool.gpus_per_node so the nodes it can add are counted"
        )
    elif growth.can_add == 0:
        what += (
            f"; the autoscaled pool is at its maximum: {growth.nodes_now} node(s) of max_nodes {growth.max_nodes}, "
            "so it cannot add any"
        )
        hint = "free GPUs (scale down other workloads), or raise the node pool's maximum and gpu_pool.max_nodes"
    else:
        what += (
            f"; even grown by the {growth.can_add} node(s) it can add ({growth.nodes_now} of max_nodes "
            f"{growth.max_nodes}, {growth.gpus_per_node} GPU(s) each) it fits {fits} replica(s)"
        )
        hint = "free GPUs, raise the node pool's maximum and gpu_pool.max_nodes, or lower gpus_per_replica"
    raise TerminalError(what, hint=hint)


def _pod_request(spec: dict[str, Any], resource: str) -> int:
    """A pod's effective request: max(sum over containers, largest init container); limits stand in for requests."""

    def one(container: dict[str, Any]) -> int:
        res = container.get("resources") or {}
        value = (res.get("requests") or {}).get(resource) or (res.get("limits") or {}).get(resource)
        return int(parse_quantity(value)) if value else 0

    init = max((one(c) for c in spec.get("initContainers") or []), default=0)
    return max(sum(one(c) for c in spec.get("containers") or []), init)
