"""What the Argo CD simulator does with a Helm source: render the chart of a commit, diff, dry-run, and read health.

Rendering is Argo CD's repo-server step: the commit's ``spec.source.path`` (the chart) is written to a temporary
directory and rendered by Helm's own renderer (helm-python-sdk, as tests/test_chart.py does) with the source's
``valueFiles`` (relative to the chart path) merged in order, release ``helm.releaseName`` and the destination
namespace. A failure becomes :class:`RenderError` carrying the message Argo CD puts in its ``ComparisonError``
condition. Diffing follows client-side apply: a three-way merge of the live object, the last applied manifest
and the new one, so fields others add (a Service's clusterIP, ``spec.paused``) are not drift, and
``ignoreDifferences`` paths keep their live values. Health is the worst of the resources' own checks.
"""

from __future__ import annotations

import copy
import posixpath
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import git
import helm_python as helm
import yaml

from pipeline.rollout import argocd_health, observe_rollout

from .store import BY_KIND, Obj

HEALTH_ORDER = ("Healthy", "Suspended", "Progressing", "Missing", "Degraded", "Unknown")
TRACKING = "argocd.argoproj.io/tracking-id"
KUBE_VERSION = "1.33"
CACHED = "<path to cached source>"
NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
NAME_RULE = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start "
    "and end with an alphanumeric character"
)
LABEL_RULE = (
    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start "
    "and end with an alphanumeric character"
)

Key = tuple[str, str, str]  # kind, namespace, name


class RenderError(Exception):
    """The target state could not be generated; ``str()`` is the ComparisonError message Argo CD shows."""


@dataclass(frozen=True)
class HelmSource:
    """The parts of an Application's spec that say what to render and where."""

    repo_url: str
    revision: str
    path: str
    release: str
    value_files: tuple[str, ...]
    namespace: str

    @classmethod
    def of(cls, spec: Obj) -> HelmSource:
        source, helm_spec = spec.get("source") or {}, (spec.get("source") or {}).get("helm") or {}
        path = str(source.get("path") or ".").strip("/") or "."
        return cls(
            repo_url=str(source.get("repoURL", "")),
            revision=str(source.get("targetRevision") or "HEAD"),
            path=path,
            release=str(helm_spec.get("releaseName") or posixpath.basename(path)),
            value_files=tuple(str(f) for f in helm_spec.get("valueFiles") or []),
            namespace=str((spec.get("destination") or {}).get("namespace") or "default"),
        )

    def command(self) -> str:
        """The `helm template` line Argo CD names in its error (api versions elided, as it does)."""
        values = " ".join(f"--values {CACHED}/{self.repo_file(f)}" for f in self.value_files)
        return (
            f"`helm template . --name-template {self.release} --namespace {self.namespace} --kube-version "
            f"{KUBE_VERSION} {values} <api versions removed> --include-crds`"
        )

    def repo_file(self, value_file: str) -> str:
        return posixpath.normpath(posixpath.join(self.path, value_file))


def merge_value_files(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Helm's merge of ``-f`` files (later wins, maps merge); nulls are kept, so Helm's coalescing with the
    chart's values.yaml removes those keys (pipeline.gitops.helm_merge is that coalescing step)."""
    merged = dict(base)
    for key, value in override.items():
        old = merged.get(key)
        merged[key] = merge_value_files(old, value) if isinstance(old, dict) and isinstance(value, dict) else value
    return merged


def render(repo_path: str, source: HelmSource) -> tuple[str, list[Obj]]:
    """The commit ``source.revision`` resolves to, and every object the chart renders there.

    Raises:
        RenderError: the revision, chart or a value file is missing, or Helm refuses (schema, template, YAML).
    """
    prefix = "failed to generate manifest for source 1 of 1: rpc error: code = Unknown desc = "
    try:
        repo = git.Repo(repo_path)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        raise RenderError(f"Failed to load target state: {prefix}repository not found: {source.repo_url}") from None
    with repo:
        try:
            commit = repo.commit(source.revision)
        except (git.BadName, ValueError):
            message = f"unable to resolve '{source.revision}' to a commit SHA"
            raise RenderError(f"Failed to load target state: {prefix}{message}") from None
        try:
            objects = _render_commit(commit, source)
        except RenderError as exc:
            raise RenderError(f"Failed to load target state: {prefix}{exc}") from None
        return commit.hexsha, objects


def _render_commit(commit: git.Commit, source: HelmSource) -> list[Obj]:
    try:
        chart_tree = commit.tree if source.path == "." else commit.tree / source.path
    except KeyError:
        chart_tree = None
    if not isinstance(chart_tree, git.Tree):
        raise RenderError(f"Manifest generation error (cached): {source.path}: app path does not exist")
    failed = f"{source.command()} failed exit status 1: Error: "
    values: dict[str, Any] = {}
    for value_file in source.value_files:
        where = source.repo_file(value_file)
        if where.startswith("../"):
            raise RenderError(f"{failed}values file {value_file} is outside the repository")
        try:
            text = (commit.tree / where).data_stream.read().decode()
        except KeyError:
            raise RenderError(f"{failed}open {CACHED}/{where}: no such file or directory") from None
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise RenderError(f"{failed}failed to parse {CACHED}/{where}: {' '.join(str(exc).split())}") from None
        if not isinstance(loaded, dict):
            raise RenderError(f"{failed}failed to parse {CACHED}/{where}: the values are not a YAML mapping")
        values = merge_value_files(values, loaded)
    with tempfile.TemporaryDirectory(prefix="sandbox-argocd-") as tmp:
        root = Path(tmp) / "chart"
        for item in chart_tree.traverse():
            if isinstance(item, git.Blob):
                target = root / Path(item.path).relative_to(chart_tree.path or ".")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(item.data_stream.read())
        try:
            with helm.Chart.load(str(root)) as chart:
                manifests = chart.render(values=values, name=source.release, namespace=source.namespace)
        except helm.HelmError as exc:
            raise RenderError(failed + str(exc).strip()) from None
    objects: list[Obj] = []
    for template, text in sorted(manifests.items()):
        if template.endswith("NOTES.txt"):
            continue
        try:
            docs = [d for d in yaml.safe_load_all(text) if d]
        except yaml.YAMLError as exc:
            raise RenderError(f"{failed}YAML parse error on {template}: {' '.join(str(exc).split())}") from None
        for doc in docs:
            if not isinstance(doc, dict) or not doc.get("kind") or not doc.get("apiVersion"):
                raise RenderError(f"{failed}error validating data on {template}: apiVersion or kind not set")
            resource = BY_KIND.get(doc["kind"])
            if resource is None or resource.namespaced:
                doc.setdefault("metadata", {}).setdefault("namespace", source.namespace)
            objects.append(doc)
    return objects


def key_of(obj: Obj) -> Key:
    meta = obj.get("metadata") or {}
    return str(obj.get("kind")), str(meta.get("namespace") or ""), str(meta.get("name") or "")


def tracking_id(app: str, obj: Obj) -> str:
    """Argo CD's annotation tracking: ``<app>:<group>/<kind>:<namespace>/<name>``."""
    kind, namespace, name = key_of(obj)
    group = str(obj.get("apiVersion", "")).rpartition("/")[0]
    return f"{app}:{group}/{kind}:{namespace}/{name}"


# diffing --------------------------------------------------------------------------------------------------------
def parse_path(expression: str) -> list[str]:
    """A JSON pointer (``/spec/replicas``) or a simple jq path (``.spec.rules[].backendRefs[].weight``)."""
    if expression.startswith("/"):
        return [p.replace("~1", "/").replace("~0", "~") for p in expression.split("/")[1:]]
    if not re.fullmatch(r"(\.[A-Za-z0-9_-]+(\[\])?)+", expression):
        raise ValueError(f"unsupported jqPathExpression {expression!r} (only .a.b[].c paths)")
    parts: list[str] = []
    for part in expression.split(".")[1:]:
        parts += [part[:-2], "[]"] if part.endswith("[]") else [part]
    return parts


def ignored_paths(spec: Obj, obj: Obj) -> list[list[str]]:
    """The ``ignoreDifferences`` paths of the Application that apply to ``obj``."""
    kind, namespace, name = key_of(obj)
    group = str(obj.get("apiVersion", "")).rpartition("/")[0]
    paths: list[list[str]] = []
    for entry in spec.get("ignoreDifferences") or []:
        if entry.get("kind") != kind or (entry.get("group") or "") != group:
            continue
        if entry.get("name") not in (None, name) or entry.get("namespace") not in (None, namespace):
            continue
        paths += [parse_path(p) for p in [*(entry.get("jsonPointers") or []), *(entry.get("jqPathExpressions") or [])]]
    return paths


def keep_live(target: Any, live: Any, path: list[str]) -> None:
    """Put the live value at ``path`` into ``target`` (or drop it there when live has none)."""
    head, rest = path[0], path[1:]
    if head == "[]":
        if isinstance(target, list) and isinstance(live, list) and rest:
            for t, lv in zip(target, live, strict=False):
                keep_live(t, lv, rest)
        return
    if not isinstance(target, dict):
        return
    live = live if isinstance(live, dict) else {}
    if not rest:
        if head in live:
            target[head] = copy.deepcopy(live[head])
        else:
            target.pop(head, None)
    elif head in target and head in live:
        keep_live(target[head], live[head], rest)


def three_way(live: Any, last: Any, target: Obj) -> Obj:
    """Client-side apply: ``target`` set over ``live``; keys the last applied manifest had and ``target`` lost
    are removed; keys only others wrote are kept. Lists are replaced whole."""
    result = copy.deepcopy(live) if isinstance(live, dict) else {}
    last = last if isinstance(last, dict) else {}
    for key in last:
        if key not in target:
            result.pop(key, None)
    for key, value in target.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = three_way(result[key], last.get(key), value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def changes(live: Any, last: Any, target: Obj) -> bool:
    """Whether :func:`three_way` would change ``live`` (the same rules, nothing copied)."""
    live = live if isinstance(live, dict) else {}
    last = last if isinstance(last, dict) else {}
    if any(key not in target and key in live for key in last):
        return True
    for key, value in target.items():
        if isinstance(value, dict) and isinstance(live.get(key), dict):
            if changes(live[key], last.get(key), value):
                return True
        elif key not in live or live[key] != value:
            return True
    return False


def body(obj: Obj) -> Obj:
    """What an apply manages: every top-level field but apiVersion, kind, metadata and status, plus the labels
    and annotations."""
    meta = obj.get("metadata") or {}
    managed = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata", "status")}
    return {**managed, "metadata": {k: meta[k] for k in ("labels", "annotations") if k in meta}}


def wanted(live: Obj, target: Obj, paths: list[list[str]]) -> Obj:
    """What an apply of ``target`` sets, the ignored paths holding their live values."""
    want = copy.deepcopy(body(target)) if paths else body(target)
    for path in paths:
        keep_live(want, live, path)
    return want


def desired(live: Obj, last: Obj | None, target: Obj, paths: list[list[str]]) -> Obj:
    """The live object's managed part as an apply of ``target`` would leave it (ignored paths keep live values)."""
    return three_way(body(live), body(last) if last else None, wanted(live, target, paths))


def drifted(live: Obj | None, last: Obj | None, target: Obj, paths: list[list[str]]) -> bool:
    """The live object differs from what Git says (missing, or an apply of ``target`` would change it)."""
    if live is None:
        return True
    return changes(body(live), body(last) if last else None, wanted(live, target, paths))


# the API server's dry run ---------------------------------------------------------------------------------------
def refusal(obj: Obj, live: Obj | None, namespaces: set[str] | None) -> str | None:
    """Why the API server would refuse to apply ``obj`` (None: it would accept it). ``namespaces``: the ones
    that exist (None: not checked)."""
    kind, namespace, name = key_of(obj)
    resource = BY_KIND.get(kind)
    if resource is None or resource.api_version != obj.get("apiVersion"):
        return (
            f"The Kubernetes API could not find {obj.get('apiVersion')}/{kind} for requested resource "
            f'{namespace}/{name}. Make sure the "{kind}" CRD is installed on the destination cluster.'
        )
    what = f'{kind}.{resource.group} "{name}"' if resource.group else f'{kind} "{name}"'
    if len(name) > 253 or not NAME.match(name):
        return f'{what} is invalid: metadata.name: Invalid value: "{name}": {NAME_RULE}'
    for value in ((obj.get("metadata") or {}).get("labels") or {}).values():
        if not isinstance(value, str) or len(value) > 63 or not LABEL_VALUE.match(value):
            return f'{what} is invalid: metadata.labels: Invalid value: "{value}": {LABEL_RULE}'
    if resource.namespaced and namespaces is not None and namespace not in namespaces:
        return f'namespaces "{namespace}" not found'
    if kind == "PersistentVolumeClaim" and live is not None:
        old, new = dict(live.get("spec") or {}), dict(obj.get("spec") or {})
        old.pop("volumeName", None)
        for spec in (old, new):
            spec.pop("resources", None)
            spec.pop("volumeMode", None)
        if old != new:
            return (
                f"{what} is invalid: spec: Forbidden: spec is immutable after creation except resources.requests "
                "and volumeAttributesClassName for bound claims"
            )
    return None


# health ---------------------------------------------------------------------------------------------------------
def resource_health(obj: Obj) -> tuple[str, str] | None:
    """Argo CD's health check of one live object (None: the kind has none and does not count)."""
    if (obj.get("metadata") or {}).get("deletionTimestamp"):
        return "Progressing", "Pending deletion"
    kind, status = obj.get("kind"), obj.get("status") or {}
    if kind == "Rollout":
        return argocd_health(observe_rollout(obj))
    if kind == "PersistentVolumeClaim":
        phase = status.get("phase") or "Pending"
        return {"Bound": ("Healthy", ""), "Pending": ("Progressing", "")}.get(phase, ("Degraded", f"claim {phase}"))
    if kind == "Service":
        if (obj.get("spec") or {}).get("type") == "LoadBalancer" and not (status.get("loadBalancer") or {}).get(
            "ingress"
        ):
            return "Progressing", ""
        return "Healthy", ""
    if kind == "PodDisruptionBudget":  # health.lua; the sandbox has no disruption controller writing status
        for condition in status.get("conditions") or []:
            if condition.get("status") == "False" and condition.get("reason") != "InsufficientPods":
                return "Degraded", f"PodDisruptionBudget has {condition.get('reason')}"
        return "Healthy", ""
    if kind == "ScaledObject":  # health.lua
        conditions = {c.get("type"): c for c in status.get("conditions") or []}
        ready, fallback = conditions.get("Ready") or {}, conditions.get("Fallback") or {}
        if ready.get("status") == "False" or fallback.get("status") == "True":
            return "Degraded", str((fallback if fallback.get("status") == "True" else ready).get("message", ""))
        if ready.get("status") == "True":
            paused = (conditions.get("Paused") or {}).get("status") == "True"
            return ("Suspended" if paused else "Healthy"), str(ready.get("message", ""))
        return "Progressing", "Creating HorizontalPodAutoscaler Object"
    if kind == "HTTPRoute":
        for parent in status.get("parents") or []:
            for condition in parent.get("conditions") or []:
                if condition.get("status") == "False":
                    return "Degraded", str(condition.get("message", condition.get("reason", "")))
        return "Healthy", ""
    return None


def worst(statuses: list[str]) -> str:
    """The application's health: the worst of its resources' (Healthy with none)."""
    return max(statuses, key=HEALTH_ORDER.index, default="Healthy")
