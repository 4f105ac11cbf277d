"""FakeCluster: the fake API server, a configured official client, and the simulators, stepped together."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import git
from kubernetes import client

from .apiserver import FakeApiServer
from .argocd import ArgoCDSimulator
from .rollouts import RolloutsSimulator
from .store import BY_KIND, Obj
from .workloads import JobsSimulator

ROLLOUT = BY_KIND["Rollout"]
VALUES_FILE = "envs/staging/values.yaml"


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


class FakeCluster:
    """What tests get: ``api_client`` for the official client, the simulators, and ``tick()``."""

    def __init__(self) -> None:
        self.server = FakeApiServer().start()
        self.store = self.server.store
        self.clock = FakeClock()
        self.rollouts = RolloutsSimulator(self.store, clock=self.clock)
        self.jobs = JobsSimulator(self.server)
        self.argocd: ArgoCDSimulator | None = None
        config = client.Configuration()
        config.host = self.server.url
        config.retries = False  # the pipeline's own retries are under test, not urllib3's
        self.api_client = client.ApiClient(config)
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()

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
        self.server.stop()


def commit_values(repo: git.Repo, text: str, message: str, path: str = VALUES_FILE) -> str:
    """Write a values file and commit it; returns the commit sha."""
    file = Path(repo.working_tree_dir or ".") / path
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(text)
    repo.index.add([path])
    return repo.index.commit(message).hexsha
