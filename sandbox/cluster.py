"""FakeCluster: the fake API server, a configured official client, and the simulators, stepped together.

The cluster holds the RBAC objects of gitops/rbac/ and ``api_client`` authenticates as the pipeline's
ServiceAccount (a token in a kubeconfig, as a real cluster's), so every call the pipeline makes is authorized as
in production: a missing grant is a 403. ``admin_client`` (and the simulators, which write to the store) act as
the cluster admin, for test setup.
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import git
import yaml
from kubernetes import client, config

from . import rbac
from .apiserver import FakeApiServer
from .argocd import ArgoCDSimulator
from .rollouts import RolloutsSimulator
from .store import BY_KIND, Obj
from .workloads import JobsSimulator

ROLLOUT = BY_KIND["Rollout"]
VALUES_FILE = "envs/staging/values.yaml"
PIPELINE = rbac.service_account("modelctl", "modelctl")  # the pipeline's ServiceAccount in gitops/rbac


class FakeClock:
    """A clock the simulators read: starts at the real time, moves only when a test advances it."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def rollout_manifest(
    name: str, steps: list[Obj], *, replicas: int = 2, deadline_s: int = 600, image: str = "vllm"
) -> Obj:
    """A canary Rollout like the chart's: one vLLM container, the given steps, canary and stable Services."""
    labels = {"app": name}
    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Rollout",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": replicas,
            "progressDeadlineSeconds": deadline_s,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "vllm", "image": image, "args": ["--port=8000"]}]},
            },
            "strategy": {
                "canary": {"canaryService": f"{name}-canary", "stableService": f"{name}-stable", "steps": steps}
            },
        },
    }


def write_kubeconfig(path: Path, server: str, token: str) -> Path:
    """An ordinary kubeconfig: the server's URL and a bearer token (written readable by the owner only)."""
    user = {"name": "sandbox", "user": {"token": token}}
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "sandbox",
        "clusters": [{"name": "sandbox", "cluster": {"server": server}}],
        "users": [user],
        "contexts": [{"name": "sandbox", "context": {"cluster": "sandbox", "user": "sandbox"}}],
    }
    path.touch(mode=0o600)
    path.write_text(yaml.safe_dump(config))
    return path


class FakeCluster:
    """What tests get: ``api_client`` for the official client, the simulators, and ``tick()``."""

    def __init__(self, rbac_objects: list[Obj] | None = None, identity: rbac.Identity = PIPELINE) -> None:
        """``rbac_objects``: the RBAC the cluster holds (default: gitops/rbac/*.yaml); ``identity``: api_client's."""
        self.server = FakeApiServer().start()
        self.store = self.server.store
        self.clock = FakeClock()
        self.rollouts = RolloutsSimulator(self.store, clock=self.clock)
        self.jobs = JobsSimulator(self.server)
        self.argocd: ArgoCDSimulator | None = None
        rbac.load(self.store, rbac.manifests() if rbac_objects is None else rbac_objects)
        self.identity = identity
        # only the pipeline under gitops/rbac adds to the session-wide record that test_rbac and conftest check
        self.server.session_record = rbac_objects is None and identity == PIPELINE
        self._dir = tempfile.TemporaryDirectory(prefix="fake-cluster-")
        self.kubeconfig = self.write_kubeconfig(Path(self._dir.name) / "kubeconfig", identity)
        self.api_client = self._client(self.kubeconfig)
        self.admin_client = self._client(self.write_kubeconfig(Path(self._dir.name) / "admin", rbac.ADMIN))
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()

    def write_kubeconfig(self, path: Path, identity: rbac.Identity | None = None) -> Path:
        """A kubeconfig for the fake API server with a bearer token of ``identity`` (default: the pipeline's)."""
        return write_kubeconfig(path, self.server.url, self.server.token(identity or self.identity))

    @staticmethod
    def _client(kubeconfig: Path) -> client.ApiClient:
        configuration = client.Configuration()
        config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
        configuration.retries = False  # the pipeline's own retries are under test, not urllib3's
        return client.ApiClient(configuration)

    def change_rbac(self, kind: str, namespace: str, name: str, change: Callable[[Obj], None] | None = None) -> None:
        """Edit (or, without ``change``, delete) an RBAC object; this cluster's requests then stay out of the
        session-wide record of uses that test_rbac compares with gitops/rbac."""
        self.server.session_record = False
        if change is None:
            self.store.delete(BY_KIND[kind], namespace, name)
        else:
            self.store.update(BY_KIND[kind], namespace, name, change)

    def with_argocd(self, repo_path: str, branch: str = "main", **kwargs: Any) -> ArgoCDSimulator:
        self.argocd = ArgoCDSimulator(self.store, repo_path, branch, clock=self.clock, **kwargs)
        return self.argocd

    def create_rollout(self, namespace: str, manifest: Obj) -> Obj:
        return self.store.create(ROLLOUT, namespace, manifest, keep_status=False)

    def rollout(self, namespace: str, name: str) -> Obj:
        return self.store.get(ROLLOUT, namespace, name)

    def get(self, kind: str, namespace: str, name: str) -> Obj:
        """An object straight from the store (no HTTP, no faults)."""
        return self.store.get(BY_KIND[kind], namespace, name)

    def update(self, kind: str, namespace: str, name: str, change: Callable[[Obj], None]) -> Obj:
        """Change an object as a controller would (spec and status alike)."""
        return self.store.update(BY_KIND[kind], namespace, name, change)

    def tick(self, times: int = 1) -> None:
        """One reconcile of every controller: Argo CD, Argo Rollouts, Jobs, then Argo CD's health assessment."""
        with self._lock:
            for _ in range(times):
                if self.argocd is not None:
                    self.argocd.tick()
                self.rollouts.tick()
                self.jobs.tick()
                if self.argocd is not None:
                    self.argocd.tick()

    @contextmanager
    def running(self, interval_s: float = 0.01) -> Iterator[FakeCluster]:
        """Tick in a background thread while the block runs (for code that waits on the cluster)."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                try:
                    self.tick()
                except Exception as exc:  # surfaced when the block ends
                    self.errors.append(exc)
                    return
                stop.wait(interval_s)

        thread = threading.Thread(target=loop, name="fake-cluster-controllers", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join(timeout=10)
        if self.errors:
            raise self.errors[0]

    def close(self) -> None:
        self.api_client.close()
        self.admin_client.close()
        self.server.stop()
        self._dir.cleanup()


def commit_values(repo: git.Repo, text: str, message: str, path: str = VALUES_FILE) -> str:
    """Write a values file and commit it; returns the commit sha."""
    file = Path(repo.working_tree_dir or ".") / path
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(text)
    repo.index.add([path])
    return repo.index.commit(message).hexsha
