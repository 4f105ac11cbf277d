"""The fake API server's object store: what etcd plus the API machinery do, for the kinds the pipeline touches.

It keeps resourceVersion (one counter for the whole store, 409 on a stale one), metadata.generation (bumped when
anything but metadata and status changes), the status subresource (writes to the object ignore status, writes to
/status ignore everything else), label and field selectors, JSON merge patch and JSON patch, and a history of
watch events. Controllers in tests (the Argo simulators) write through :meth:`Store.update`, atomically.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import jsonpatch

Obj = dict[str, Any]


@dataclass(frozen=True)
class Resource:
    """One kind the server serves."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    status: bool = False  # has a status subresource

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


RESOURCES = [
    Resource("", "v1", "pods", "Pod", status=True),
    Resource("", "v1", "nodes", "Node", namespaced=False, status=True),
    Resource("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", status=True),
    Resource("", "v1", "events", "Event"),
    Resource("batch", "v1", "jobs", "Job", status=True),
    Resource("coordination.k8s.io", "v1", "leases", "Lease"),
    Resource("argoproj.io", "v1alpha1", "rollouts", "Rollout", status=True),
    Resource("argoproj.io", "v1alpha1", "applications", "Application"),
    Resource("argoproj.io", "v1alpha1", "analysisruns", "AnalysisRun"),
    Resource("", "v1", "serviceaccounts", "ServiceAccount"),
    Resource("", "v1", "services", "Service", status=True),
    Resource("", "v1", "secrets", "Secret"),
    Resource("", "v1", "configmaps", "ConfigMap"),
    Resource("", "v1", "namespaces", "Namespace", namespaced=False, status=True),
    Resource("apps", "v1", "replicasets", "ReplicaSet", status=True),
    Resource("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget", status=True),
    Resource("argoproj.io", "v1alpha1", "analysistemplates", "AnalysisTemplate"),
    Resource("monitoring.coreos.com", "v1", "podmonitors", "PodMonitor"),
    Resource("monitoring.coreos.com", "v1", "servicemonitors", "ServiceMonitor"),
    Resource("keda.sh", "v1alpha1", "scaledobjects", "ScaledObject", status=True),
    Resource("gateway.networking.k8s.io", "v1", "httproutes", "HTTPRoute", status=True),
    Resource("rbac.authorization.k8s.io", "v1", "roles", "Role"),
    Resource("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding"),
    Resource("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", namespaced=False),
    Resource("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", namespaced=False),
]
BY_PATH = {(r.group, r.version, r.plural): r for r in RESOURCES}
BY_KIND = {r.kind: r for r in RESOURCES}


class ApiError(Exception):
    """An error answer of the API server, rendered as a Kubernetes Status object."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details: Obj | None = None  # Status.details (name, group, kind), as a 403 or 404 carries them

    def status(self) -> Obj:
        status = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details is not None:
            status["details"] = self.details
        return status


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _lookup(obj: Obj, dotted: str) -> Any:
    node: Any = obj
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


_REQUIREMENT = re.compile(r"^\s*(!?)([\w./-]+)\s*(?:(==|=|!=|\s+in\s+|\s+notin\s+)\s*(.*?))?\s*$")


def _split_selector(text: str) -> list[str]:
    """Split on commas outside parentheses (`a in (x,y),b=c`)."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return [p for p in parts if p.strip()]


def matches_labels(labels: dict[str, str], selector: str | None) -> bool:
    """Kubernetes label selector semantics: =, ==, !=, in, notin, exists, !exists."""
    for requirement in _split_selector(selector or ""):
        m = _REQUIREMENT.match(requirement)
        if not m:
            raise ApiError(400, "BadRequest", f"unable to parse requirement: {requirement!r}")
        negate, key, op, value = m.group(1), m.group(2), (m.group(3) or "").strip(), (m.group(4) or "").strip()
        if not op:
            if (key in labels) == bool(negate):
                return False
        elif op in ("=", "=="):
            if labels.get(key) != value:
                return False
        elif op == "!=":
            if labels.get(key) == value:
                return False
        else:
            values = {v.strip() for v in value.strip("()").split(",")}
            if (labels.get(key) in values) != (op == "in"):
                return False
    return True


def matches_fields(obj: Obj, selector: str | None) -> bool:
    """Field selectors on any dotted path (the real server allows a few per kind: name, namespace, phase...)."""
    for requirement in _split_selector(selector or ""):
        m = re.match(r"^\s*([\w.]+)\s*(==|=|!=)\s*(.*?)\s*$", requirement)
        if not m:
            raise ApiError(400, "BadRequest", f"invalid field selector: {requirement!r}")
        actual = _lookup(obj, m.group(1))
        actual = "" if actual is None else str(actual)
        if (actual == m.group(3)) != (m.group(2) != "!="):
            return False
    return True


def _spec_part(resource: Resource, obj: Obj) -> Obj:
    """What metadata.generation tracks: everything but metadata (and status where it is a subresource)."""
    skip = {"metadata", "apiVersion", "kind"} | ({"status"} if resource.status else set())
    return {k: v for k, v in obj.items() if k not in skip}


@dataclass(frozen=True)
class WatchEvent:
    rv: int
    type: str  # ADDED, MODIFIED, DELETED
    resource: Resource
    namespace: str
    object: Obj


Key = tuple[str, str, str]  # plural, namespace, name


class Store:
    """Objects by (plural, namespace, name), with the semantics of the real API server."""

    def __init__(self) -> None:
        self._objects: dict[Key, Obj] = {}
        self._rv = 100
        self.history: list[WatchEvent] = []
        self.changed = threading.Condition()

    # reads ---------------------------------------------------------------------------------------------------
    def get(self, resource: Resource, namespace: str, name: str) -> Obj:
        with self.changed:
            obj = self._objects.get((resource.plural, namespace, name))
            if obj is None:
                raise ApiError(404, "NotFound", f'{resource.plural}.{resource.group or "core"} "{name}" not found')
            return copy.deepcopy(obj)

    def list(
        self, resource: Resource, namespace: str | None, labels: str | None = None, fields: str | None = None
    ) -> tuple[list[Obj], str]:
        with self.changed:
            items = [
                copy.deepcopy(obj)
                for (plural, ns, _), obj in sorted(self._objects.items())
                if plural == resource.plural
                and (namespace is None or ns == namespace)
                and matches_labels(obj["metadata"].get("labels") or {}, labels)
                and matches_fields(obj, fields)
            ]
            return items, str(self._rv)

    @property
    def resource_version(self) -> int:
        with self.changed:
            return self._rv

    def events_after(self, rv: int) -> Iterator[WatchEvent]:
        """Watch events newer than ``rv`` (call with ``changed`` held)."""
        for event in self.history:
            if event.rv > rv:
                yield event

    # writes --------------------------------------------------------------------------------------------------
    def _commit(self, resource: Resource, key: Key, obj: Obj, event: str) -> Obj:
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        if event == "DELETED":
            self._objects.pop(key, None)
        else:
            self._objects[key] = obj
        self.history.append(WatchEvent(self._rv, event, resource, key[1], copy.deepcopy(obj)))
        self.changed.notify_all()
        return copy.deepcopy(obj)

    def create(self, resource: Resource, namespace: str, obj: Obj, *, keep_status: bool = True) -> Obj:
        """Store a new object (201). ``keep_status=False`` drops status, as the server does on create."""
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        name = meta.get("name")
        if not name and meta.get("generateName"):
            name = meta["generateName"] + uuid.uuid4().hex[:5]
            meta["name"] = name
        if not name:
            raise ApiError(422, "Invalid", f"{resource.kind}: metadata.name: Required value")
        ns = namespace if resource.namespaced else ""
        with self.changed:
            key = (resource.plural, ns, name)
            if key in self._objects:
                raise ApiError(409, "AlreadyExists", f'{resource.plural} "{name}" already exists')
            obj["apiVersion"], obj["kind"] = resource.api_version, resource.kind
            if resource.namespaced:
                meta["namespace"] = ns
            meta.update(uid=str(uuid.uuid4()), creationTimestamp=now_rfc3339(), generation=1)
            if resource.status and not keep_status:
                obj.pop("status", None)
            return self._commit(resource, key, obj, "ADDED")

    def _write(self, resource: Resource, key: Key, old: Obj, new: Obj, subresource: str | None) -> Obj:
        """Apply status-subresource isolation, the resourceVersion check and the generation bump."""
        sent_rv = (new.get("metadata") or {}).get("resourceVersion")
        if sent_rv and sent_rv != old["metadata"]["resourceVersion"]:
            raise ApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {resource.plural}.{resource.group or "core"} "{key[2]}": '
                "the object has been modified; please apply your changes to the latest version and try again",
            )
        if subresource == "status":
            result = copy.deepcopy(old)
            if "status" in new:
                result["status"] = new["status"]
            else:
                result.pop("status", None)
        else:
            result = copy.deepcopy(new)
            result.setdefault("metadata", {})
            for fixed in ("uid", "creationTimestamp", "generation", "namespace", "name"):
                if fixed in old["metadata"]:
                    result["metadata"][fixed] = old["metadata"][fixed]
            result["apiVersion"], result["kind"] = old["apiVersion"], old["kind"]
            if resource.status:
                if "status" in old:
                    result["status"] = old["status"]
                else:
                    result.pop("status", None)
        result["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
        if _spec_part(resource, result) != _spec_part(resource, old):
            result["metadata"]["generation"] = int(old["metadata"].get("generation", 1)) + 1
        if result == old:
            return copy.deepcopy(old)  # no-op writes do not bump resourceVersion (as the real server)
        return self._commit(resource, key, result, "MODIFIED")

    def _key(self, resource: Resource, namespace: str, name: str) -> Key:
        return (resource.plural, namespace if resource.namespaced else "", name)

    def replace(self, resource: Resource, namespace: str, name: str, obj: Obj, subresource: str | None = None) -> Obj:
        """PUT: the whole object (or its status); a stale metadata.resourceVersion is a 409."""
        with self.changed:
            key = self._key(resource, namespace, name)
            old = self.get(resource, namespace, name)
            return self._write(resource, key, old, obj, subresource)

    def patch(
        self, resource: Resource, namespace: str, name: str, body: Any, content_type: str, subresource: str | None
    ) -> Obj:
        """PATCH with a JSON merge patch (RFC 7386) or a JSON patch (RFC 6902)."""
        with self.changed:
            key = self._key(resource, namespace, name)
            old = self.get(resource, namespace, name)
            if "json-patch" in content_type:
                try:
                    new = jsonpatch.apply_patch(old, body)
                except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                    raise ApiError(422, "Invalid", f"the JSON patch could not be applied: {exc}") from None
                new["metadata"].pop("resourceVersion", None)
            elif "merge-patch" in content_type or "strategic-merge-patch" in content_type:
                if not isinstance(body, dict):
                    raise ApiError(400, "BadRequest", "a merge patch must be a JSON object")
                sent_rv = (body.get("metadata") or {}).get("resourceVersion")
                new = merge_patch(old, body)
                new["metadata"]["resourceVersion"] = sent_rv
            else:
                raise ApiError(415, "UnsupportedMediaType", f"the patch type {content_type!r} is not supported")
            return self._write(resource, key, old, new, subresource)

    def delete(self, resource: Resource, namespace: str, name: str) -> Obj:
        with self.changed:
            key = self._key(resource, namespace, name)
            old = self.get(resource, namespace, name)
            return self._commit(resource, key, old, "DELETED")

    def update(self, resource: Resource, namespace: str, name: str, change: Callable[[Obj], None]) -> Obj:
        """Controller write: ``change`` edits a copy in place (spec and status alike); atomic under the lock."""
        with self.changed:
            key = self._key(resource, namespace, name)
            old = self.get(resource, namespace, name)
            new = copy.deepcopy(old)
            change(new)
            new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
            if _spec_part(resource, new) != _spec_part(resource, old):
                new["metadata"]["generation"] = int(old["metadata"].get("generation", 1)) + 1
            if new == old:
                return old
            return self._commit(resource, key, new, "MODIFIED")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: null deletes a key, objects merge recursively, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()
