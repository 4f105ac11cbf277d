"""The Rollouts simulator's ReplicaSets in pods mode: Pod objects per pod-template hash, and the Services' selectors.

Like the real controller's ReplicaSets, :class:`ReplicaSets` creates a Rollout's pods from its template (name
``<rollout>-<hash>-<5 random>``, the template's labels plus ``rollouts-pod-template-hash``, its annotations and
spec, owned by the Rollout) and deletes the surplus, not-ready pods first, then the newest. The kubelet runs what
is in the store and stops what is deleted from it; readiness is the pods' Ready condition (:func:`pods.is_ready`).
It also keeps ``apps/v1`` ReplicaSet objects ``<rollout>-<hash>`` with their counts, so ``kubectl get rs`` style
reads work, and points the canary and stable Services at their hashes as ``ensureSVCTargets`` does.
"""

from __future__ import annotations

import contextlib
import copy
import random
from dataclasses import dataclass

from .pods import HASH_LABEL, is_ready
from .store import BY_KIND, ApiError, Obj, Store

POD = BY_KIND["Pod"]
REPLICASET = BY_KIND["ReplicaSet"]
SERVICE = BY_KIND["Service"]
OWNED = (BY_KIND["Pod"], BY_KIND["ReplicaSet"], BY_KIND["AnalysisRun"])
MANAGED_BY = "argo-rollouts.argoproj.io/managed-by-rollouts"
TERMINAL = ("Failed", "Succeeded")
SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # what Kubernetes' generateName draws from


@dataclass(frozen=True)
class Counts:
    """What the pods of a Rollout are, per pod-template hash: how many exist, how many are Ready."""

    replicas: dict[str, int]
    ready: dict[str, int]


def owner_reference(rollout: Obj) -> Obj:
    meta = rollout["metadata"]
    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Rollout",
        "name": meta["name"],
        "uid": meta.get("uid", ""),
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _owned(obj: Obj, rollout: Obj) -> bool:
    uid = rollout["metadata"].get("uid")
    return any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences") or [])


class ReplicaSets:
    """Pods and ReplicaSet objects of Rollouts in ``store`` (call inside or outside a store update: the lock is
    re-entrant)."""

    def __init__(self, store: Store, rng: random.Random | None = None) -> None:
        self.store = store
        self.rng = rng or random.Random()

    def pods(self, rollout: Obj, pod_hash: str | None = None) -> list[Obj]:
        """The Rollout's pods (of one hash, or all), oldest first."""
        selector = f"{HASH_LABEL}={pod_hash}" if pod_hash else HASH_LABEL
        items, _ = self.store.list(POD, rollout["metadata"]["namespace"], labels=selector)
        owned = [pod for pod in items if _owned(pod, rollout)]
        return sorted(owned, key=lambda p: (p["metadata"].get("creationTimestamp", ""), p["metadata"]["name"]))

    def collect_garbage(self, live: set[str]) -> int:
        """Delete the Pods, ReplicaSets and AnalysisRuns whose owning Rollout (by uid) is gone, as Kubernetes'
        garbage collector does (the kubelet then stops the pods' processes); returns how many went."""
        gone = 0
        for resource in OWNED:
            for obj in self.store.list(resource, None)[0]:
                refs = [r for r in obj["metadata"].get("ownerReferences") or [] if r.get("kind") == "Rollout"]
                if refs and not any(r.get("uid") in live for r in refs):
                    with contextlib.suppress(ApiError):
                        self.store.delete(resource, obj["metadata"]["namespace"], obj["metadata"]["name"])
                        gone += 1
        return gone

    def sync(self, rollout: Obj, desired: dict[str, int], surge: str | None = None) -> Counts:
        """Make the pods match ``desired`` (hash -> count; hashes absent lose all their pods). With ``surge`` (the
        canary's hash), the other hashes are scaled down only once every pod of ``surge`` is Ready, so that capacity
        never drops while new pods start; scaling up is immediate."""
        by_hash: dict[str, list[Obj]] = {}
        ended: list[Obj] = []  # Failed/Succeeded pods: not counted (replaced), kept for their logs while wanted
        for pod in self.pods(rollout):
            pod_hash = pod["metadata"]["labels"][HASH_LABEL]
            if (pod.get("status") or {}).get("phase") in TERMINAL:
                ended.append(pod)
            else:
                by_hash.setdefault(pod_hash, []).append(pod)
        order = sorted(desired, key=lambda h: h != surge)  # the surge hash first: its readiness gates the others
        surge_ready = True
        for pod_hash in order:
            want = desired[pod_hash]
            have = by_hash.get(pod_hash, [])
            if pod_hash != surge and not surge_ready:
                want = max(want, len(have))
            by_hash[pod_hash] = self._scale(rollout, pod_hash, have, want)
            if pod_hash == surge:
                surge_ready = sum(is_ready(p) for p in by_hash[pod_hash]) >= desired[pod_hash]
        for pod_hash in [h for h in by_hash if h not in desired]:
            by_hash[pod_hash] = self._scale(rollout, pod_hash, by_hash[pod_hash], 0)
        for pod in ended:
            if not desired.get(pod["metadata"]["labels"][HASH_LABEL]):
                with contextlib.suppress(ApiError):
                    self.store.delete(POD, pod["metadata"]["namespace"], pod["metadata"]["name"])
        counts = Counts(
            replicas={h: len(pods) for h, pods in by_hash.items()},
            ready={h: sum(is_ready(p) for p in pods) for h, pods in by_hash.items()},
        )
        self._record(rollout, desired, counts)
        return counts

    def _scale(self, rollout: Obj, pod_hash: str, have: list[Obj], want: int) -> list[Obj]:
        namespace = rollout["metadata"]["namespace"]
        if len(have) > want:  # not-ready ones first, then the newest
            newest_first = sorted(
                have, key=lambda p: (p["metadata"].get("creationTimestamp", ""), p["metadata"]["name"]), reverse=True
            )
            doomed = sorted(newest_first, key=is_ready)[: len(have) - want]
            for pod in doomed:
                with contextlib.suppress(ApiError):  # already gone
                    self.store.delete(POD, namespace, pod["metadata"]["name"])
            names = {p["metadata"]["name"] for p in doomed}
            return [p for p in have if p["metadata"]["name"] not in names]
        created = [self.store.create(POD, namespace, self._pod(rollout, pod_hash)) for _ in range(want - len(have))]
        return have + created

    def _template(self, rollout: Obj, pod_hash: str) -> Obj:
        """The pod template of ``pod_hash``: its ReplicaSet's (the stable one's after the spec moved on), else the
        Rollout's current one (a hash seen for the first time is always the current template's)."""
        name = f"{rollout['metadata']['name']}-{pod_hash}"
        try:
            return copy.deepcopy(self.store.get(REPLICASET, rollout["metadata"]["namespace"], name)["spec"]["template"])
        except (ApiError, KeyError):
            return copy.deepcopy(rollout["spec"].get("template") or {})

    def _pod(self, rollout: Obj, pod_hash: str) -> Obj:
        template = self._template(rollout, pod_hash)
        meta = template.get("metadata") or {}
        suffix = "".join(self.rng.choice(SUFFIX_ALPHABET) for _ in range(5))
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"{rollout['metadata']['name']}-{pod_hash}-{suffix}",
                "labels": {**(meta.get("labels") or {}), HASH_LABEL: pod_hash},
                "annotations": dict(meta.get("annotations") or {}),
                "ownerReferences": [owner_reference(rollout)],
            },
            "spec": template.get("spec") or {},
            "status": {"phase": "Pending"},
        }

    def _record(self, rollout: Obj, desired: dict[str, int], counts: Counts) -> None:
        """ReplicaSet objects with spec.replicas and the observed counts (old ones stay, scaled to 0)."""
        namespace, name = rollout["metadata"]["namespace"], rollout["metadata"]["name"]
        for pod_hash in set(desired) | set(counts.replicas):
            rs_name = f"{name}-{pod_hash}"
            status = {
                "replicas": counts.replicas.get(pod_hash, 0),
                "readyReplicas": counts.ready.get(pod_hash, 0),
                "availableReplicas": counts.ready.get(pod_hash, 0),
            }

            def put(obj: Obj, status: Obj = status, pod_hash: str = pod_hash) -> None:
                obj["spec"]["replicas"] = desired.get(pod_hash, 0)
                obj["status"] = status

            try:
                self.store.update(REPLICASET, namespace, rs_name, put)
            except ApiError:
                template = copy.deepcopy(rollout["spec"].get("template") or {})
                labels = {**((template.get("metadata") or {}).get("labels") or {}), HASH_LABEL: pod_hash}
                template.setdefault("metadata", {})["labels"] = labels
                selector = {**((rollout["spec"].get("selector") or {}).get("matchLabels") or {}), HASH_LABEL: pod_hash}
                rs = {
                    "metadata": {"name": rs_name, "labels": labels, "ownerReferences": [owner_reference(rollout)]},
                    "spec": {
                        "replicas": desired.get(pod_hash, 0),
                        "selector": {"matchLabels": selector},
                        "template": template,
                    },
                    "status": status,
                }
                self.store.create(REPLICASET, namespace, rs)


def point_services(store: Store, rollout: Obj, canary_hash: str | None, stable_hash: str | None) -> None:
    """Set the canary and stable Services' ``rollouts-pod-template-hash`` selector (and the managed-by annotation);
    other Services, such as the users' one that selects every pod, are left alone. A missing Service is skipped."""
    canary = (rollout["spec"].get("strategy") or {}).get("canary") or {}
    namespace, name = rollout["metadata"]["namespace"], rollout["metadata"]["name"]
    for service, pod_hash in ((canary.get("stableService"), stable_hash), (canary.get("canaryService"), canary_hash)):
        if not service or not pod_hash:
            continue

        def pin(obj: Obj, pod_hash: str = pod_hash) -> None:
            obj.setdefault("spec", {}).setdefault("selector", {})[HASH_LABEL] = pod_hash
            obj["metadata"].setdefault("annotations", {})[MANAGED_BY] = name

        try:
            store.update(SERVICE, namespace, service, pin)
        except ApiError as exc:
            if exc.code != 404:
                raise
