"""A simulator of the Argo CD application controller (v3.5 semantics, as ../shared/ARGO.md describes them).

On the refresh annotation (``argocd.argoproj.io/refresh``) it reads the head of a branch of a real git repository,
renders the environment's values file into the Rollout's ``spec.template`` (a pluggable render function; the
default puts the values' content hash and the artifact id into the pod template), and records sync, health,
operationState and reconciledAt as Argo CD does. Without the annotation nothing is re-read (the real controller
would wait for its 2-3 minute poll). Health follows the Rollout: Progressing until its generation is observed,
then its phase, with Paused reported as Suspended.

Knobs: ``never_sync`` (refreshes see the new commit, auto-sync never applies it), ``slow_ticks`` (a sync
operation stays Running for that many ticks before it applies), ``sync_gate`` (it stays Running until a
test's condition holds) and ``poll_s`` (refresh by itself every that many seconds of the clock, as the real
controller's poll; None: only on the annotation).

Two modes: :meth:`ArgoCDSimulator.add_application` (a stand-in render into one existing Rollout) and
:meth:`ArgoCDSimulator.add_application_manifest` (a real Application manifest: the chart of the commit rendered
by Helm, every object applied to the destination namespace with annotation tracking, prune and self-heal; a
chart that does not render is a ComparisonError, an object the API server refuses fails the sync, and in both
cases nothing is applied). See sandbox/helmapp.py.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import git
import yaml

from pipeline.rollout import argocd_health, observe_rollout

from .argosync import HelmApplication
from .rollouts import Clock, rfc3339, utcnow
from .store import BY_KIND, ApiError, Obj, Store

APPLICATION = BY_KIND["Application"]
ROLLOUT = BY_KIND["Rollout"]
REFRESH = "argocd.argoproj.io/refresh"
VALUES_HASH = "modelctl.io/values-hash"
ARTIFACT_ID = "modelctl.io/artifact-id"
ARTIFACT_KEYS = ("artifactId", "artifact_id", "artifact-id")

Render = Callable[[str, Obj], Obj]


def find_artifact_id(values: Any) -> str | None:
    """The first artifact-id key anywhere in the values (the chart is not fixed yet)."""
    if isinstance(values, dict):
        for key, value in values.items():
            if key in ARTIFACT_KEYS and isinstance(value, str):
                return value
            found = find_artifact_id(value)
            if found:
                return found
    elif isinstance(values, list):
        for value in values:
            found = find_artifact_id(value)
            if found:
                return found
    return None


def default_render(values_text: str, base_template: Obj) -> Obj:
    """A stand-in for the Helm chart: the values' hash (and artifact id) land in the pod template."""
    template = copy.deepcopy(base_template)
    annotations = template.setdefault("metadata", {}).setdefault("annotations", {})
    annotations[VALUES_HASH] = hashlib.sha256(values_text.encode()).hexdigest()[:16]
    artifact = find_artifact_id(yaml.safe_load(values_text))
    if artifact:
        annotations[ARTIFACT_ID] = artifact
        for container in template.get("spec", {}).get("containers", [])[:1]:
            args = [a for a in container.get("args", []) if not a.startswith("--artifact-id=")]
            container["args"] = [*args, f"--artifact-id={artifact}"]
    return template


@dataclass
class _App:
    name: str
    namespace: str
    values_file: str
    rollout: tuple[str, str]
    base_template: Obj
    pending: tuple[str, Obj] | None = None  # a running sync operation: (revision, rendered template)
    ticks_left: int = 0
    last_refresh: datetime | None = None


class ArgoCDSimulator:
    """Syncs Applications from ``repo_path`` (a working or bare repository) on refresh, health from Rollouts."""

    def __init__(
        self,
        store: Store,
        repo_path: str,
        branch: str = "main",
        render: Render = default_render,
        clock: Clock = utcnow,
        poll_s: float | None = None,
        bind_claims: bool = True,
    ) -> None:
        """``poll_s``: refresh every that many seconds of ``clock`` (None: only on the refresh annotation);
        ``bind_claims``: claims the chart creates are Bound at once (the sandbox's volumes are host folders;
        False leaves them Pending, as with no provisioner)."""
        self.store = store
        self.repo_path = repo_path
        self.branch = branch
        self.render = render
        self.clock = clock
        self.poll_s = poll_s
        self.bind_claims = bind_claims
        self.never_sync: set[str] = set()
        self.slow_ticks: dict[str, int] = {}
        self.sync_gate: dict[str, Callable[[], bool]] = {}  # a running sync applies only once its gate is True
        self.refreshes = 0
        self._apps: dict[str, _App] = {}
        self._helm: dict[str, HelmApplication] = {}

    def add_application_manifest(self, app: Obj) -> Obj:
        """Create a real Application (its ``spec.source`` a Helm chart in this simulator's repository, whatever
        its repoURL says) and sync it at once: the branch head's chart rendered with its value files, every object
        applied to the destination. A chart that does not render leaves a ComparisonError and applies nothing.

        Raises:
            ValueError: an ignoreDifferences path this simulator cannot read.
        """
        helm_app = HelmApplication(self.store, self.repo_path, app, self.clock)
        helm_app.bind_claims = self.bind_claims
        manifest = {"metadata": copy.deepcopy(app["metadata"]), "spec": copy.deepcopy(app["spec"])}
        manifest["metadata"].pop("finalizers", None)  # nothing deletes Applications here
        self.store.create(APPLICATION, helm_app.namespace, manifest)
        self._helm[helm_app.name] = helm_app
        helm_app.compare()
        helm_app.reconcile(may_sync=True, slow_ticks=0)
        if helm_app.pending is not None:
            helm_app.sync(*helm_app.pending)
            helm_app.reconcile(may_sync=False, slow_ticks=0)
        return self.store.get(APPLICATION, helm_app.namespace, helm_app.name)

    def add_application(
        self, name: str, values_file: str, rollout_namespace: str, rollout_name: str, namespace: str = "argocd"
    ) -> Obj:
        """Create the Application and apply the branch head to its (existing, not yet reconciled) Rollout."""
        rollout = self.store.get(ROLLOUT, rollout_namespace, rollout_name)
        app = _App(name, namespace, values_file, (rollout_namespace, rollout_name), rollout["spec"]["template"])
        self._apps[name] = app
        spec = {
            "project": "default",
            "source": {"repoURL": f"file://{self.repo_path}", "path": ".", "targetRevision": self.branch},
            "destination": {"server": "https://kubernetes.default.svc", "namespace": rollout_namespace},
            "syncPolicy": {"automated": {"prune": True, "selfHeal": True}},
        }
        self.store.create(APPLICATION, namespace, {"metadata": {"name": name}, "spec": spec})
        revision, template = self._read(app)
        self._apply(app, revision, template)
        return self.store.get(APPLICATION, namespace, name)

    def _read(self, app: _App) -> tuple[str, Obj]:
        with git.Repo(self.repo_path) as repo:
            commit = repo.commit(self.branch)
            values = (commit.tree / app.values_file).data_stream.read().decode()
            return commit.hexsha, self.render(values, app.base_template)

    def _apply(self, app: _App, revision: str, template: Obj) -> None:
        """The sync operation: put the rendered template on the Rollout, record the operation as Succeeded."""

        def put(rollout: Obj) -> None:
            rollout["spec"]["template"] = template

        self.store.update(ROLLOUT, *app.rollout, put)
        finished = rfc3339(self.clock())
        source = {"repoURL": f"file://{self.repo_path}", "path": ".", "targetRevision": self.branch}

        def record(obj: Obj) -> None:
            status = obj.setdefault("status", {})
            started = (status.get("operationState") or {}).get("startedAt") if app.pending else None
            status["operationState"] = {
                "operation": {"sync": {"revision": revision}, "initiatedBy": {"automated": True}},
                "phase": "Succeeded",
                "message": "successfully synced (all tasks run)",
                "startedAt": started or finished,
                "finishedAt": finished,
                "syncResult": {"revision": revision, "source": source},
            }
            destination = {"server": "https://kubernetes.default.svc", "namespace": app.rollout[0]}
            compared = {"source": source, "destination": destination}
            status["sync"] = {"status": "Synced", "revision": revision, "comparedTo": compared}
            history = status.setdefault("history", [])
            history.append({"id": len(history), "revision": revision, "deployedAt": finished, "source": source})

        self.store.update(APPLICATION, app.namespace, app.name, record)
        app.pending = None

    def _due(self, obj: Obj, last: datetime | None) -> bool:
        """Refresh now: the annotation asks for it, or the poll interval has passed."""
        if (obj["metadata"].get("annotations") or {}).get(REFRESH):
            return True
        return self.poll_s is not None and (last is None or (self.clock() - last).total_seconds() >= self.poll_s)

    def tick(self) -> None:
        """Reconcile every Application once: refresh if asked, advance a running sync, then assess health."""
        for helm_app in list(self._helm.values()):
            self._tick_helm(helm_app)
        for app in list(self._apps.values()):
            try:
                obj = self.store.get(APPLICATION, app.namespace, app.name)
            except ApiError:
                continue
            if self._due(obj, app.last_refresh):
                self._refresh(app, obj)
            if app.pending is not None:
                if not self.sync_gate.get(app.name, lambda: True)():
                    pass
                elif app.ticks_left <= 0:
                    self._apply(app, *app.pending)
                else:
                    app.ticks_left -= 1
            self._assess(app)

    def _tick_helm(self, app: HelmApplication) -> None:
        try:
            obj = self.store.get(APPLICATION, app.namespace, app.name)
        except ApiError:
            return
        if self._due(obj, app.last_refresh):
            self.refreshes += 1
            app.compare()
        if app.pending is not None and app.due() and self.sync_gate.get(app.name, lambda: True)():
            if app.ticks_left <= 0:
                app.sync(*app.pending)
            else:
                app.ticks_left -= 1
        app.reconcile(may_sync=app.name not in self.never_sync, slow_ticks=self.slow_ticks.get(app.name, 0))

    def _refresh(self, app: _App, obj: Obj) -> None:
        self.refreshes += 1
        app.last_refresh = self.clock()
        revision, template = self._read(app)
        live = self.store.get(ROLLOUT, *app.rollout)["spec"]["template"]
        applied = ((obj.get("status") or {}).get("sync") or {}).get("revision")
        in_sync = revision == applied and live == template
        now = rfc3339(self.clock())

        def mark(obj: Obj) -> None:
            obj["metadata"]["annotations"].pop(REFRESH, None)
            status = obj.setdefault("status", {})
            status["sync"] = {**status.get("sync", {}), "status": "Synced" if in_sync else "OutOfSync"}
            status["sync"]["revision"] = revision
            if not in_sync and app.name not in self.never_sync:
                status["operationState"] = {
                    "operation": {"sync": {"revision": revision}, "initiatedBy": {"automated": True}},
                    "phase": "Running",
                    "message": "one or more tasks are running",
                    "startedAt": now,
                }

        self.store.update(APPLICATION, app.namespace, app.name, mark)
        if not in_sync and app.name not in self.never_sync:
            app.pending = (revision, template)
            app.ticks_left = self.slow_ticks.get(app.name, 0)

    def _assess(self, app: _App) -> None:
        """Health of the Rollout inside the Application, and reconciledAt (health read before it may be stale)."""
        try:
            rollout = self.store.get(ROLLOUT, *app.rollout)
        except ApiError:
            health = {"status": "Missing", "message": "the Rollout does not exist"}
        else:
            status_, message = argocd_health(observe_rollout(rollout))  # health.lua's reading (conformance-tested)
            health = {"status": status_, **({"message": message} if message else {})}
        now = rfc3339(self.clock())

        def assess(obj: Obj) -> None:
            status = obj.setdefault("status", {})
            status["health"] = health
            status["reconciledAt"] = now

        self.store.update(APPLICATION, app.namespace, app.name, assess)
