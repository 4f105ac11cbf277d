"""The sandbox's Job controller: batch/v1 Jobs become pods from their template, retried up to ``backoffLimit``.

Each :meth:`JobController.tick` looks at every unfinished Job: with no pod running it creates one
(``<job>-<5 chars>``, labels ``job-name`` and ``controller-uid``, an ownerReference to the Job); it counts the
pods that ended (``succeeded``, ``failed``), and sets ``Complete`` once one succeeded (``completions`` 1, as the
pipeline's Jobs have) or ``Failed`` with reason BackoffLimitExceeded once more than ``backoffLimit`` failed.
Deleting a Job with propagation deletes its pods (the API server does it by the ``job-name`` label).
"""

from __future__ import annotations

import secrets

from .store import BY_KIND, ApiError, Obj, Store, now_rfc3339

JOB, POD = BY_KIND["Job"], BY_KIND["Pod"]
DEFAULT_BACKOFF_LIMIT = 6
_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # Kubernetes' generateName alphabet (no vowels, no look-alikes)


def finished(job: Obj) -> bool:
    """The Job has a Complete or Failed condition."""
    conditions = (job.get("status") or {}).get("conditions") or []
    return any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True" for c in conditions)


def pod_for(job: Obj) -> Obj:
    """A new pod of ``job``, from its template."""
    meta, template = job["metadata"], job["spec"]["template"]
    suffix = "".join(secrets.choice(_ALPHABET) for _ in range(5))
    labels = {
        **((template.get("metadata") or {}).get("labels") or {}),
        "job-name": meta["name"],
        "controller-uid": meta["uid"],
        "batch.kubernetes.io/job-name": meta["name"],
        "batch.kubernetes.io/controller-uid": meta["uid"],
    }
    owner = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }
    annotations = (template.get("metadata") or {}).get("annotations") or {}
    return {
        "metadata": {
            "name": f"{meta['name']}-{suffix}"[:63],
            "labels": labels,
            "annotations": dict(annotations),
            "ownerReferences": [owner],
        },
        "spec": template.get("spec") or {},
    }


class JobController:
    """Runs batch Jobs by creating their pods (the kubelet runs those); see the module doc."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def tick(self) -> None:
        """One reconcile of every Job."""
        jobs, _ = self.store.list(JOB, None)
        for job in jobs:
            if not finished(job):
                try:
                    self._reconcile(job)
                except ApiError:
                    continue  # deleted meanwhile

    def _reconcile(self, job: Obj) -> None:
        meta, spec = job["metadata"], job.get("spec") or {}
        ns, name = meta["namespace"], meta["name"]
        pods, _ = self.store.list(POD, ns, f"controller-uid={meta['uid']}")
        phases = [(p.get("status") or {}).get("phase") for p in pods]
        succeeded, failed = phases.count("Succeeded"), phases.count("Failed")
        active = len(pods) - succeeded - failed
        limit = int(spec.get("backoffLimit", DEFAULT_BACKOFF_LIMIT))
        condition: Obj | None = None
        now = now_rfc3339()
        if succeeded >= int(spec.get("completions") or 1):
            condition = {"type": "Complete", "status": "True", "lastProbeTime": now, "lastTransitionTime": now}
        elif failed > limit:
            condition = {
                "type": "Failed",
                "status": "True",
                "reason": "BackoffLimitExceeded",
                "message": "Job has reached the specified backoff limit",
                "lastProbeTime": now,
                "lastTransitionTime": now,
            }
        elif active == 0 and not spec.get("suspend"):
            self.store.create(POD, ns, pod_for(job))
            active = 1

        def update(obj: Obj) -> None:
            status = obj.setdefault("status", {})
            status.setdefault("startTime", now)
            status["active"] = active
            status["succeeded"], status["failed"] = succeeded, failed
            for key in ("succeeded", "failed", "active"):
                if not status[key]:
                    status.pop(key)
            if condition is not None:
                status["conditions"] = [*(status.get("conditions") or []), condition]
                if condition["type"] == "Complete":
                    status["completionTime"] = now

        self.store.update(JOB, ns, name, update)
