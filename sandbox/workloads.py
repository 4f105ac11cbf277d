"""Simulated workloads: a Job controller with kubelet (pods that succeed or fail, with logs), and GPU nodes.

Jobs run on :meth:`JobsSimulator.tick`: each new Job gets one pod, which ends Succeeded or Failed as the test
planned (``plan``), with its log kept by the API server for ``GET .../pods/{name}/log``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from .apiserver import FakeApiServer
from .store import BY_KIND, Obj, now_rfc3339

JOB, POD, NODE = BY_KIND["Job"], BY_KIND["Pod"], BY_KIND["Node"]


@dataclass(frozen=True)
class JobPlan:
    """How a Job's pod ends: its exit code and what it writes to its log."""

    exit_code: int = 0
    log: str = "done\n"
    reason: str = "Error"


class JobsSimulator:
    """The Job controller and kubelet, in one: one pod per Job, finished on the next tick."""

    def __init__(self, server: FakeApiServer) -> None:
        self.server = server
        self.store = server.store
        self.plans: dict[str, JobPlan] = {}  # by job name prefix
        self.pending: set[str] = set()  # job name prefixes whose pods never get scheduled

    def plan(self, prefix: str, plan: JobPlan) -> None:
        self.plans[prefix] = plan

    def _plan_for(self, name: str) -> JobPlan:
        best = max((p for p in self.plans if name.startswith(p)), key=len, default=None)
        return self.plans[best] if best is not None else JobPlan()

    def tick(self) -> None:
        jobs, _ = self.store.list(JOB, None)
        for job in jobs:
            conditions = (job.get("status") or {}).get("conditions") or []
            if any(c["type"] in ("Complete", "Failed") and c["status"] == "True" for c in conditions):
                continue
            name, ns = job["metadata"]["name"], job["metadata"]["namespace"]
            if any(name.startswith(p) for p in self.pending):
                self.store.update(JOB, ns, name, lambda obj: obj.setdefault("status", {}).update(active=1))
                continue
            self._run(job, self._plan_for(name))

    def _run(self, job: Obj, plan: JobPlan) -> None:
        name, ns = job["metadata"]["name"], job["metadata"]["namespace"]
        template = job["spec"]["template"]
        pod_name = f"{name}-{uuid.uuid4().hex[:5]}"
        labels = {**(template.get("metadata") or {}).get("labels", {}), "job-name": name}
        owner = {"apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": job["metadata"]["uid"]}
        container = template["spec"]["containers"][0]["name"]
        phase = "Succeeded" if plan.exit_code == 0 else "Failed"
        terminated = {"exitCode": plan.exit_code, "reason": "Completed" if plan.exit_code == 0 else plan.reason}
        pod = {
            "metadata": {"name": pod_name, "labels": labels, "ownerReferences": [owner]},
            "spec": template["spec"],
            "status": {
                "phase": phase,
                "containerStatuses": [
                    {
                        "name": container,
                        "image": template["spec"]["containers"][0].get("image", ""),
                        "imageID": "",
                        "ready": False,
                        "restartCount": 0,
                        "state": {"terminated": terminated},
                    }
                ],
            },
        }
        self.store.create(POD, ns, pod)
        self.server.set_pod_log(ns, pod_name, plan.log)
        now = now_rfc3339()
        if plan.exit_code == 0:
            condition = {"type": "Complete", "status": "True", "lastTransitionTime": now}
            counts = {"succeeded": 1}
        else:
            condition = {
                "type": "Failed",
                "status": "True",
                "reason": "BackoffLimitExceeded",
                "message": "Job has reached the specified backoff limit",
                "lastTransitionTime": now,
            }
            counts = {"failed": 1}

        def finish(obj: Obj) -> None:
            obj["status"] = {"startTime": now, "completionTime": now, "conditions": [condition], **counts}

        self.store.update(JOB, ns, name, finish)


def add_gpu_node(
    server: FakeApiServer, name: str, labels: dict[str, str], gpus: int, *, unschedulable: bool = False
) -> Obj:
    """A Ready node with ``gpus`` allocatable nvidia.com/gpu."""
    node = {
        "metadata": {"name": name, "labels": labels},
        "spec": {"unschedulable": unschedulable},
        "status": {
            "allocatable": {"cpu": "16", "memory": "64Gi", "nvidia.com/gpu": str(gpus)},
            "capacity": {"cpu": "16", "memory": "64Gi", "nvidia.com/gpu": str(gpus)},
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }
    return server.store.create(NODE, "", node)


def add_gpu_pod(server: FakeApiServer, namespace: str, name: str, node: str, gpus: int, phase: str = "Running") -> Obj:
    """A pod on ``node`` requesting ``gpus`` nvidia.com/gpu (as limits, which Kubernetes copies to requests)."""
    resources = {"limits": {"nvidia.com/gpu": str(gpus)}}
    pod = {
        "metadata": {"name": name},
        "spec": {"nodeName": node, "containers": [{"name": "main", "image": "vllm", "resources": resources}]},
        "status": {"phase": phase},
    }
    return server.store.create(POD, namespace, pod)
