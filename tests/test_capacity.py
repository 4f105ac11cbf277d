"""The GPU preflight for fixed and autoscaled pools: what fits now, what the pool can still add, and the refusal
that names the numbers and which count it used."""

from __future__ import annotations

from typing import Any

import pytest
from cluster.fixtures import cluster_fixture  # noqa: F401  (the fixture)

from pipeline.config import GpuPool, load_config
from pipeline.errors import ConfigError, TerminalError
from pipeline.kube import Backoff, Kube
from pipeline.kube.capacity import check_fits, pool_capacity
from sandbox.cluster import FakeCluster
from sandbox.workloads import add_gpu_node, add_gpu_pod

L4 = {"cloud.google.com/gke-accelerator": "nvidia-l4"}


def node(name: str, gpus: int, *, ready: bool = True, cordoned: bool = False) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": L4},
        "spec": {"unschedulable": cordoned},
        "status": {
            "allocatable": {"nvidia.com/gpu": str(gpus)},
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def pod(on: str, gpus: int) -> dict[str, Any]:
    resources = {"limits": {"nvidia.com/gpu": str(gpus)}}
    return {"spec": {"nodeName": on, "containers": [{"name": "vllm", "resources": resources}]}}


def autoscaled(max_nodes: int, gpus_per_node: int = 1, per_replica: int = 1) -> GpuPool:
    return GpuPool(node_selector=L4, gpus_per_replica=per_replica, max_nodes=max_nodes, gpus_per_node=gpus_per_node)


def test_a_pool_at_zero_nodes_with_room_to_grow_passes_and_says_what_it_counted() -> None:
    cap = check_fits(pool_capacity(autoscaled(max_nodes=4), [], [], "pool=l4"), autoscaled(max_nodes=4), replicas=2)
    assert (cap.allocatable, cap.free) == (0, 0)  # no node yet: a Ready-only count would refuse
    assert cap.replicas_fit(1) == 4
    assert "plus the 4 node(s) x 1 GPU(s) the autoscaled pool can add (0 of at most 4 nodes now)" in cap.basis
    fixed = GpuPool(node_selector=L4)
    with pytest.raises(TerminalError) as caught:  # the same empty pool, not declared autoscaled: refused
        check_fits(pool_capacity(fixed, [], [], "pool=l4"), fixed, replicas=1)
    assert "no Ready nodes" in str(caught.value) and "counted the Ready nodes only" in str(caught.value)
    assert "gpu_pool.max_nodes" in caught.value.hint


def test_a_pool_at_its_maximum_is_refused_with_both_numbers() -> None:
    pool = autoscaled(max_nodes=2, gpus_per_node=1)
    nodes = [node("gpu-a", 1), node("gpu-b", 1)]
    cap = pool_capacity(pool, nodes, [pod("gpu-a", 1), pod("gpu-b", 1)], "pool=l4")
    with pytest.raises(TerminalError) as caught:
        check_fits(cap, pool, replicas=1)
    message = str(caught.value)
    assert "the autoscaled pool is at its maximum: 2 node(s) of max_nodes 2" in message
    assert "0 of 2 are free on the Ready nodes" in message and "gpu-a: 0/1 free, gpu-b: 0/1 free" in message
    assert "raise the node pool's maximum" in caught.value.hint
    assert check_fits(pool_capacity(pool, nodes, [pod("gpu-a", 1)], "pool=l4"), pool, replicas=1).free == 1


def test_growth_counts_whole_replicas_per_new_node_and_every_existing_node_toward_the_maximum() -> None:
    pool = autoscaled(max_nodes=4, gpus_per_node=4, per_replica=3)
    nodes = [node("gpu-a", 4), node("joining", 4, ready=False), node("drained", 4, cordoned=True)]
    cap = pool_capacity(pool, nodes, [pod("gpu-a", 2)], "pool=l4")
    assert [n.name for n in cap.nodes] == ["gpu-a"]  # only a Ready, schedulable node offers GPUs
    assert cap.growth is not None and cap.growth.can_add == 1  # 3 of 4 nodes exist, whatever their state
    assert cap.replicas_fit(3) == 1  # gpu-a has 2 free (no 3-GPU replica); one new 4-GPU node holds one
    check_fits(cap, pool, replicas=1)
    with pytest.raises(TerminalError) as caught:
        check_fits(cap, pool, replicas=2)
    assert "even grown by the 1 node(s) it can add (3 of max_nodes 4, 4 GPU(s) each) it fits 1 replica(s)" in str(
        caught.value
    )


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("max_nodes: 4", "max_nodes needs gpus_per_node"),
        ("max_nodes: 4\n      gpus_per_node: 1\n      gpus_per_replica: 2", "gpus_per_node 1 < gpus_per_replica 2"),
        ("max_nodes: 0\n      gpus_per_node: 1", "max_nodes"),
    ],
    ids=["no-gpus-per-node", "node-too-small", "zero-max"],
)
def test_autoscaled_pool_settings_are_checked(tmp_path: Any, extra: str, expected: str) -> None:
    text = (
        "version: 1\n"
        "gitops: {url: ./gitops.git}\n"
        "environments:\n"
        "  prod:\n"
        "    values_file: envs/prod/values.yaml\n"
        "    cache: {root: ./cache}\n"
        f"    gpu_pool:\n      {extra}\n"
    )
    path = tmp_path / "promotion.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected):
        load_config(path)
    good = text.replace(f"    gpu_pool:\n      {extra}\n", "    gpu_pool: {max_nodes: 3, gpus_per_node: 8}\n")
    path.write_text(good)
    pool = load_config(path).environment("prod").gpu_pool
    assert (pool.max_nodes, pool.gpus_per_node) == (3, 8)


def test_the_cluster_preflight_passes_an_empty_autoscaled_pool_and_refuses_a_full_one(cluster: FakeCluster) -> None:
    kube = Kube(cluster.api_client, Backoff(attempts=2, first_s=0.01, max_s=0.05, request_timeout_s=1))
    pool = GpuPool(node_selector={"pool": "gpu"}, max_nodes=1, gpus_per_node=2, gpus_per_replica=2)
    add_gpu_node(cluster.server, "cpu-a", {"pool": "cpu"}, gpus=8)  # another pool: neither capacity nor a node of ours
    assert "can add (0 of at most 1 nodes now)" in kube.require_gpus(pool, replicas=1).basis
    add_gpu_node(cluster.server, "gpu-a", {"pool": "gpu"}, gpus=2)
    add_gpu_pod(cluster.server, "serving", "stable-0", "gpu-a", gpus=2)
    with pytest.raises(TerminalError, match=r"at its maximum: 1 node\(s\) of max_nodes 1"):
        kube.require_gpus(pool, replicas=1)
