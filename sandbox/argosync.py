"""One Argo CD Application with a Helm source, as the simulated application controller reconciles it.

Each reconcile compares the last rendered target (sandbox/helmapp.py) with the live objects it tracks
(annotation ``argocd.argoproj.io/tracking-id``), writes ``status.sync``, ``status.resources``, ``status.health``
and ``reconciledAt``, and starts an automated sync operation when Argo CD would: the target's revision differs
from the last synced one, or (``selfHeal``) live objects drifted from it. A sync dry-runs every object first and
applies only when all would be accepted; ``prune`` deletes tracked objects the target no longer has. A failed
attempt is retried after ``syncPolicy.retry``'s backoff (clock time; the operation stays Running, and a newer
commit waits for it, as in Argo CD); once the retries are spent it ends Failed and that revision is not synced
again until Git moves.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from datetime import datetime, timedelta

from .helmapp import (
    TRACKING,
    HelmSource,
    Key,
    RenderError,
    desired,
    drifted,
    ignored_paths,
    key_of,
    parse_path,
    refusal,
    render,
    resource_health,
    tracking_id,
    worst,
)
from .rollouts import duration_seconds, rfc3339
from .store import BY_KIND, ApiError, Obj, Store

APPLICATION = BY_KIND["Application"]
NAMESPACE = BY_KIND["Namespace"]
# Argo CD applies kinds in this order within a wave (gitops-engine's kind order, the kinds the chart renders)
ORDER = ["Namespace", "ServiceAccount", "ConfigMap", "PersistentVolumeClaim", "Service", "PodDisruptionBudget"]


def _order(obj: Obj) -> tuple[int, str]:
    kind = str(obj.get("kind"))
    return (ORDER.index(kind) if kind in ORDER else len(ORDER)), key_of(obj)[2]


def _ref(obj: Obj) -> Obj:
    kind, namespace, name = key_of(obj)
    group, _, version = str(obj.get("apiVersion", "")).rpartition("/")
    return {"group": group, "version": version, "kind": kind, "namespace": namespace, "name": name}


class HelmApplication:
    """The controller's state for one Application: last render, last applied manifests, a running operation."""

    def __init__(self, store: Store, repo_path: str, manifest: Obj, clock: Callable[[], datetime]) -> None:
        self.store, self.repo_path, self.clock = store, repo_path, clock
        self.name = str(manifest["metadata"]["name"])
        self.namespace = str(manifest["metadata"].get("namespace") or "argocd")
        self.spec: Obj = copy.deepcopy(manifest["spec"])
        self.source = HelmSource.of(self.spec)
        for entry in self.spec.get("ignoreDifferences") or []:  # an unsupported path fails here, not later
            for path in [*(entry.get("jsonPointers") or []), *(entry.get("jqPathExpressions") or [])]:
                parse_path(path)
        policy = self.spec.get("syncPolicy") or {}
        automated = policy.get("automated")
        self.automated = automated is not None
        self.prune = bool((automated or {}).get("prune"))
        self.self_heal = bool((automated or {}).get("selfHeal"))
        self.options = set(policy.get("syncOptions") or [])
        self.bind_claims = True
        self.target: list[Obj] | None = None
        self.revision: str | None = None
        self.error: str | None = None  # the ComparisonError of the last refresh
        self.synced: str | None = None  # the revision of the last successful sync
        self.failed: str | None = None  # a revision whose sync failed for good: not synced again automatically
        retry = policy.get("retry") or {}
        backoff = retry.get("backoff") or {}
        self.retry_limit = int(retry.get("limit", 0)) if retry else 0  # negative: without end
        self.backoff = (
            duration_seconds(backoff.get("duration", "5s")),
            float(backoff.get("factor", 2)),
            duration_seconds(backoff.get("maxDuration", "3m")),
        )
        self.retries = 0
        self.retry_at: datetime | None = None
        self.applied: dict[Key, Obj] = {}  # last applied manifests (kubectl's last-applied-configuration)
        self.kinds: set[str] = set()
        self.pending: tuple[str, list[Obj]] | None = None
        self.ticks_left = 0
        self.last_refresh: datetime | None = None

    # comparing ----------------------------------------------------------------------------------------------------
    def compare(self) -> None:
        """A refresh: render the branch head again (a failure is a ComparisonError; the old target is dropped)."""
        self.last_refresh = self.clock()
        try:
            self.revision, objects = render(self.repo_path, self.source)
        except RenderError as exc:
            self.error, self.target = str(exc), None
        else:
            self.error = None
            self.target = [self._tracked(obj) for obj in objects]
            self.kinds |= {str(obj["kind"]) for obj in objects}

        def mark(obj: Obj) -> None:
            (obj["metadata"].get("annotations") or {}).pop("argocd.argoproj.io/refresh", None)
            status = obj.setdefault("status", {})
            others = [c for c in status.get("conditions") or [] if c.get("type") != "ComparisonError"]
            if self.error:
                others.append({"type": "ComparisonError", "message": self.error, "lastTransitionTime": self._now()})
            if others:
                status["conditions"] = others
            else:
                status.pop("conditions", None)

        self.store.update(APPLICATION, self.namespace, self.name, mark)

    def _tracked(self, obj: Obj) -> Obj:
        tracked = copy.deepcopy(obj)
        annotations = tracked.setdefault("metadata", {}).get("annotations") or {}
        tracked["metadata"]["annotations"] = {**annotations, TRACKING: tracking_id(self.name, obj)}
        return tracked

    def _now(self) -> str:
        return rfc3339(self.clock())

    def _listed(self) -> dict[Key, Obj]:
        """Every live object of the kinds this Application ever rendered."""
        found: dict[Key, Obj] = {}
        for kind in sorted(self.kinds & set(BY_KIND)):
            found |= {key_of(item): item for item in self.store.list(BY_KIND[kind], None)[0]}
        return found

    def tracked(self, listed: dict[Key, Obj] | None = None) -> dict[Key, Obj]:
        """Live objects carrying this Application's tracking id (of the kinds it ever rendered)."""
        items = self._listed() if listed is None else listed
        mine = {key: item for key, item in items.items() if self._tracks(item)}
        return mine

    def _tracks(self, item: Obj) -> bool:
        return (item["metadata"].get("annotations") or {}).get(TRACKING) == tracking_id(self.name, item)

    def live(self) -> tuple[dict[Key, Obj | None], dict[Key, Obj]]:
        """The target's objects as they are live (None: missing), and tracked live objects not in the target."""
        listed = self._listed()
        found: dict[Key, Obj | None] = {key_of(obj): listed.get(key_of(obj)) for obj in self.target or []}
        extra = {key: obj for key, obj in self.tracked(listed).items() if key not in found}
        return found, extra

    # the sync operation -------------------------------------------------------------------------------------------
    def sync(self, revision: str, objects: list[Obj]) -> None:
        """Dry-run every object, then apply them all (or none), prune, and record the operation."""
        started = self._started()
        create_ns = "CreateNamespace=true" in self.options
        namespaces = {item["metadata"]["name"] for item in self.store.list(NAMESPACE, None)[0]}
        planned = namespaces | ({self.source.namespace} if create_ns else set())
        failures = []
        for obj in objects:
            reason = refusal(obj, self._get(obj), planned)
            if reason:
                failures.append((obj, reason))
        if failures:
            messages = [reason for _, reason in failures]
            label = "reasons" if len(messages) > 1 else "reason"
            refused = [{**_ref(o), "status": "SyncFailed", "message": m, "syncPhase": "Sync"} for o, m in failures]
            message = f"one or more objects failed to apply (dry run), {label}: {','.join(messages)}"
            self._failed(revision, message, started, refused)
            return
        if create_ns and self.source.namespace not in namespaces:
            self.store.create(NAMESPACE, "", {"metadata": {"name": self.source.namespace}})
        results: list[Obj] = []
        keys = {key_of(obj) for obj in objects}
        try:
            for obj in sorted(objects, key=_order):
                results.append(self._apply(obj))
            for key, obj in (self.tracked() if self.prune else {}).items():
                if key not in keys:
                    self.store.delete(BY_KIND[key[0]], key[1], key[2])
                    self.applied.pop(key, None)
                    results.append({**_ref(obj), "status": "Pruned", "message": "pruned", "syncPhase": "Sync"})
        except ApiError as exc:  # changed under the sync (a race the dry run cannot see): what was applied stays
            self._failed(revision, f"one or more objects failed to apply, reason: {exc.message}", started, results)
            return
        self.synced, self.failed = revision, None
        self._record(revision, "Succeeded", "successfully synced (all tasks run)", started, results)
        self.pending, self.retries, self.retry_at = None, 0, None

    def _failed(self, revision: str, message: str, started: str, results: list[Obj]) -> None:
        """A failed attempt: retried after the backoff while ``syncPolicy.retry.limit`` allows (the operation
        stays Running, as Argo CD keeps it), else the operation ends Failed."""
        if self.retry_limit < 0 or self.retries < self.retry_limit:
            duration, factor, longest = self.backoff
            self.retry_at = self.clock() + timedelta(seconds=min(duration * factor**self.retries, longest))
            self.retries += 1
            at = f"{self.retry_at:%I:%M%p}".lstrip("0")
            message = f"{message}. Retrying attempt #{self.retries} at {at}."
            self._record(revision, "Running", message, started, results)
            return
        if self.retries:
            message = f"{message} (retried {self.retries} times)."
        self._record(revision, "Failed", message, started, results)
        self.failed, self.pending, self.retry_at = revision, None, None

    def due(self) -> bool:
        """A running operation may (re)try now: its retry backoff, if any, has passed."""
        return self.pending is not None and (self.retry_at is None or self.clock() >= self.retry_at)

    def _get(self, obj: Obj) -> Obj | None:
        kind, namespace, name = key_of(obj)
        try:
            return self.store.get(BY_KIND[kind], namespace, name) if kind in BY_KIND else None
        except ApiError:
            return None

    def _apply(self, obj: Obj) -> Obj:
        """kubectl apply of one object: create it, or set what the manifest manages and keep the rest (status)."""
        kind, namespace, name = key_of(obj)
        resource, live = BY_KIND[kind], self._get(obj)
        respect = ignored_paths(self.spec, obj) if "RespectIgnoreDifferences=true" in self.options else []
        self.applied[key_of(obj)] = obj
        if live is None:
            self.store.create(resource, namespace, obj, keep_status=False)
            if kind == "PersistentVolumeClaim" and self.bind_claims:  # the sandbox's volumes are host folders
                self.store.update(resource, namespace, name, lambda o: o.update(status={"phase": "Bound"}))
            return {**_ref(obj), "status": "Synced", "message": f"{kind.lower()}/{name} created", "syncPhase": "Sync"}
        want = desired(live, self.applied.get(key_of(obj)), obj, respect)

        def put(current: Obj) -> None:
            for field in [k for k in current if k not in ("apiVersion", "kind", "metadata", "status")]:
                if field not in want:
                    del current[field]
            for field, value in want.items():
                if field != "metadata":
                    current[field] = value
            for part in ("labels", "annotations"):
                if want["metadata"].get(part):
                    current["metadata"][part] = want["metadata"][part]
                else:
                    current["metadata"].pop(part, None)

        before = live["metadata"]["resourceVersion"]
        after = self.store.update(resource, namespace, name, put)["metadata"]["resourceVersion"]
        verb = "configured" if after != before else "unchanged"
        return {**_ref(obj), "status": "Synced", "message": f"{kind.lower()}/{name} {verb}", "syncPhase": "Sync"}

    def _started(self) -> str:
        obj = self.store.get(APPLICATION, self.namespace, self.name)
        state = (obj.get("status") or {}).get("operationState") or {}
        return str(state.get("startedAt")) if state.get("phase") == "Running" else self._now()

    def _source(self) -> Obj:
        return copy.deepcopy(self.spec.get("source") or {})

    def _record(self, revision: str, phase: str, message: str, started: str, results: list[Obj]) -> None:
        finished = self._now()

        def record(obj: Obj) -> None:
            status = obj.setdefault("status", {})
            status["operationState"] = {
                "operation": {"sync": {"revision": revision}, "initiatedBy": {"automated": True}},
                "phase": phase,
                "message": message,
                "startedAt": started,
                "finishedAt": finished,
                "syncResult": {"revision": revision, "source": self._source(), "resources": results},
            }
            if self.retries:
                status["operationState"]["retryCount"] = self.retries
            if phase == "Succeeded":
                history = status.setdefault("history", [])
                history.append(
                    {
                        "id": max((h.get("id", 0) for h in history), default=-1) + 1,
                        "revision": revision,
                        "deployStartedAt": started,
                        "deployedAt": finished,
                        "source": self._source(),
                        "initiatedBy": {"automated": True},
                    }
                )
                del history[:-10]  # revisionHistoryLimit

        self.store.update(APPLICATION, self.namespace, self.name, record)

    # one reconcile ------------------------------------------------------------------------------------------------
    def reconcile(self, may_sync: bool, slow_ticks: int) -> None:
        """Sync status, resources and health from the live objects; start an automated sync when due."""
        found, extra = self.live()
        out_of_sync: set[Key] = set()
        for obj in self.target or []:
            paths = ignored_paths(self.spec, obj)
            if drifted(found[key_of(obj)], self.applied.get(key_of(obj)), obj, paths):
                out_of_sync.add(key_of(obj))
        out_of_sync |= set(extra)
        start = (
            self.target is not None
            and self.revision is not None
            and bool(out_of_sync)
            and (self.prune or bool(out_of_sync - set(extra)))  # Argo CD skips a sync that could only prune
            and self.automated
            and may_sync
            and self.pending is None
            and self.revision != self.failed
            and (self.revision != self.synced or self.self_heal)
        )
        if start and self.revision is not None and self.target is not None:
            self.pending, self.ticks_left = (self.revision, copy.deepcopy(self.target)), slow_ticks
            self.retries, self.retry_at = 0, None
        resources, healths = [], []
        for key, live in [*found.items(), *extra.items()]:
            shown = _ref(live) if live is not None else _ref(next(o for o in self.target or [] if key_of(o) == key))
            entry: Obj = {**shown, "status": "OutOfSync" if key in out_of_sync else "Synced"}
            if self.error:  # no target to compare with (Argo CD: every resource Unknown)
                entry["status"] = "Unknown"
            elif key in extra:
                entry["requiresPruning"] = True
            health = resource_health(live) if live is not None else ("Missing", "")
            if health is not None:
                entry["health"] = {"status": health[0], **({"message": health[1]} if health[1] else {})}
                healths.append(health)
            resources.append(entry)
        status_ = worst([h for h, _ in healths])
        message = next((m for h, m in healths if h == status_ and m), "")
        now = self._now()

        def publish(obj: Obj) -> None:
            status = obj.setdefault("status", {})
            compared = {"source": self._source(), "destination": copy.deepcopy(self.spec.get("destination") or {})}
            if self.error:
                status["sync"] = {"status": "Unknown", "comparedTo": compared}
            elif self.revision is not None:
                code = "OutOfSync" if out_of_sync else "Synced"
                status["sync"] = {"status": code, "revision": self.revision, "comparedTo": compared}
            if start:
                status["operationState"] = {
                    "operation": {"sync": {"revision": self.revision}, "initiatedBy": {"automated": True}},
                    "phase": "Running",
                    "message": "one or more tasks are running",
                    "startedAt": now,
                }
            status["resources"] = resources
            status["health"] = {"status": status_, **({"message": message} if message else {})}
            status["reconciledAt"] = now

        self.store.update(APPLICATION, self.namespace, self.name, publish)
