"""The sandbox: a SIMULATED Kubernetes control plane with real workloads, traffic and metrics around it.

Simulated: the API server (sandbox/apiserver.py, spoken to over HTTP by the official client, with RBAC) and the
controllers of Argo CD and Argo Rollouts. Real: the chart (rendered by Helm for each commit of the GitOps repo), the
pods (local processes: vLLM from the serving runtime, the pipeline's own step entrypoint for Jobs), their probes,
the Services (a TCP proxy each on 127.0.0.1), Prometheus (scraping every Ready pod with PodMonitor labels), and the
users (a steady stream of requests to the users' Service).

``Sandbox(...).start()`` brings it all up and writes a kubeconfig and a promotion config for it; ``close()`` stops
every process it started. ``python -m sandbox run`` (what ``modelctl sandbox up`` starts) keeps one running.
"""

from __future__ import annotations

import copy
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.gitops import init_repo
from pipeline.resources import resource_dir

from . import rbac
from .apiserver import FakeApiServer
from .argocd import ArgoCDSimulator
from .cluster import PIPELINE, write_kubeconfig
from .jobs import JobController
from .kubelet import Kubelet, Runtime
from .prometheus import Prometheus
from .rollouts import RolloutsSimulator
from .services import ServiceProxies
from .store import BY_KIND, Obj
from .traffic import UserTraffic

log = logging.getLogger("sandbox")

LABEL = (
    "SIMULATED cluster (sandbox): the API server and the Argo CD / Argo Rollouts controllers are simulated; "
    "the chart, pods (vLLM, pipeline Jobs), Services and Prometheus are real"
)
ROOT = Path(__file__).resolve().parent.parent
GPU_LABEL = "modelctl.io/sandbox-gpu"
NODE = "sandbox-gpu-1"
RELEASE = "llm-inference"
SERVED_NAME = "llm"
# Every pod of the sandbox is offline, as the chart's are (weights come from the cache volume, never a hub).
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1",
           "DO_NOT_TRACK": "1"}  # fmt: skip


@dataclass(frozen=True)
class SandboxEnv:
    """One environment of the sandbox: a namespace with the chart's release, synced by one Argo CD Application."""

    name: str = "staging"
    namespace: str = "llm-staging"
    values_file: str = "envs/sandbox/values.yaml"

    @property
    def application(self) -> str:
        return f"{RELEASE}-{self.name}"


@dataclass
class SandboxSettings:
    """What ``modelctl sandbox up`` can choose."""

    workdir: Path
    gitops: Path | None = None  # the bare GitOps repo Argo CD watches (created from the template when missing)
    envs: tuple[SandboxEnv, ...] = (SandboxEnv(),)
    traffic_rps: float = 1.0  # the users: requests per second to each environment's users' Service (0: none)
    gpus: int = 4  # nvidia.com/gpu of the one simulated GPU node
    tick_s: float = 0.2
    runtime: Runtime = field(default_factory=lambda: Runtime(env=dict(OFFLINE)))


def user_prompts(count: int = 2000, seed: int = 7) -> list[str]:
    """What the sandbox's users ask: eight of the small model's questions (about 100 tokens: prefill is most of a
    request's first wait, so a slower model shows in TTFT), each prompt opening with its own number, as real users'
    prompts differ, so vLLM's prefix cache does not turn the prefill into a lookup."""
    import random

    from pipeline.tinymodel import eval_items

    items = [str(item["prompt"]) for item in eval_items()]
    rng = random.Random(seed)
    return [f"Request {n}: " + " ".join(rng.sample(items, 8)) for n in range(count)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Sandbox:
    """The simulated control plane, the real parts around it, and one loop thread that reconciles them."""

    def __init__(self, settings: SandboxSettings) -> None:
        self.settings = settings
        self.workdir = settings.workdir.resolve()
        self.gitops = (settings.gitops or self.workdir / "gitops.git").resolve()
        self.server = FakeApiServer()
        self.store = self.server.store
        self.kubelet: Kubelet | None = None
        self.prometheus: Prometheus | None = None
        self.proxies: ServiceProxies | None = None
        self.traffic: list[UserTraffic] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = False

    # lifecycle -------------------------------------------------------------------------------------------------
    def start(self) -> Sandbox:
        """Bring everything up; on any failure, stop what was started and raise."""
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def _start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        init_repo(self.gitops)
        self.server.start()
        self._started = True
        rbac.load(self.store, rbac.manifests())
        self._nodes()
        self.prometheus = Prometheus(self.workdir / "prometheus")
        self.prometheus.start()
        self.kubelet = Kubelet(self.server, self.workdir, self.settings.runtime)
        self.jobs = JobController(self.store)
        self.rollouts = RolloutsSimulator(self.store, pods=True, prometheus_url=self.prometheus.url)
        self.argocd = ArgoCDSimulator(self.store, str(self.gitops), "main")
        self.ports = {(env.namespace, f"{RELEASE}{suffix}"): free_port() for env in self.settings.envs
                      for suffix in ("", "-canary", "-stable")}  # fmt: skip
        self.proxies = ServiceProxies(self.store, self.ports)
        for env in self.settings.envs:
            self.argocd.add_application_manifest(self._application(env))
        self.kubeconfig = write_kubeconfig(self.workdir / "kubeconfig", self.server.url, self.server.token(PIPELINE))
        self.admin_kubeconfig = write_kubeconfig(
            self.workdir / "admin-kubeconfig", self.server.url, self.server.token(rbac.ADMIN)
        )
        self.config = self._write_config(self.workdir / "promotion.yaml")
        self.reconcile()
        self._thread = threading.Thread(target=self._loop, name="sandbox-controllers", daemon=True)
        self._thread.start()
        if self.settings.traffic_rps > 0:
            for env in self.settings.envs:
                url = self.service_url(env.namespace, RELEASE)
                users = UserTraffic(url, SERVED_NAME, self.settings.traffic_rps, user_prompts(), max_tokens=16)
                users.start()
                self.traffic.append(users)

    def close(self) -> None:
        """Stop the users, the loop, every pod's processes, the proxies, Prometheus and the API server."""
        for users in self.traffic:
            users.stop()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for part in (self.kubelet, self.proxies, self.prometheus):
            if part is not None:
                try:
                    part.close()
                except Exception as exc:  # keep closing the others
                    log.warning("closing %s failed: %s", type(part).__name__, exc)
        if self._started:
            self.server.stop()
            self._started = False

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # the controllers -------------------------------------------------------------------------------------------
    def reconcile(self) -> None:
        """One round of every controller: Argo CD, Rollouts, Jobs, kubelet, Argo CD's health, Services, scrape."""
        assert self.kubelet is not None and self.proxies is not None and self.prometheus is not None
        self.argocd.tick()
        self.rollouts.tick()
        self.jobs.tick()
        self.kubelet.tick()
        self.argocd.tick()
        self.proxies.tick()
        self.prometheus.sync(self.store)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.reconcile()
            except Exception as exc:  # a controller bug must be seen, not kill the cluster
                text = f"{type(exc).__name__}: {exc}"
                if not self.errors or self.errors[-1] != text:
                    log.exception("sandbox reconcile failed")
                    self.errors.append(text)
            self._stop.wait(self.settings.tick_s)

    # what the sandbox is made of ---------------------------------------------------------------------------------
    def _nodes(self) -> None:
        node = {
            "metadata": {
                "name": "sandbox-gpu-1",
                "labels": {GPU_LABEL: "true", "kubernetes.io/hostname": "sandbox-gpu-1"},
            },
            "spec": {"taints": [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]},
            "status": {
                "allocatable": {"cpu": "2", "memory": "24Gi", "nvidia.com/gpu": str(self.settings.gpus)},
                "capacity": {"cpu": "2", "memory": "24Gi", "nvidia.com/gpu": str(self.settings.gpus)},
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        }
        self.store.create(BY_KIND["Node"], "", node)

    def _application(self, env: SandboxEnv) -> Obj:
        """The repository's own Application manifest for staging, pointed at this sandbox's GitOps repo and env."""
        text = (resource_dir("gitops") / "argocd" / "application-staging.yaml").read_text(encoding="utf-8")
        app: Obj = copy.deepcopy(yaml.safe_load(text))
        app["metadata"]["name"] = env.application
        app["metadata"]["labels"]["modelctl.io/environment"] = env.name
        app["spec"]["source"]["repoURL"] = f"file://{self.gitops}"
        app["spec"]["source"]["helm"]["valueFiles"] = [f"../../{env.values_file}"]
        app["spec"]["destination"]["namespace"] = env.namespace
        return app

    def service_url(self, namespace: str, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[(namespace, name)]}"

    def _write_config(self, path: Path) -> Path:
        """A promotion config for the sandbox's environments (what `modelctl promote -c` reads)."""
        assert self.prometheus is not None
        template = yaml.safe_load((Path(__file__).parent / "promotion.yaml").read_text(encoding="utf-8"))
        template["gitops"]["url"] = str(self.gitops)
        template["artifacts"]["path"] = str(self.workdir / "artifact-store")
        environments: dict[str, Any] = {}
        base = template["environments"].pop("staging")
        for env in self.settings.envs:
            item = copy.deepcopy(base)
            item["values_file"] = env.values_file
            item["argocd"]["application"] = env.application
            item["rollout"]["namespace"] = env.namespace
            item["endpoint"] = f"{self.service_url(env.namespace, RELEASE + '-canary')}/v1"
            item["canary"]["prometheus_url"] = self.prometheus.url
            environments[env.name] = item
        template["environments"] = environments
        header = f"# Written by `modelctl sandbox up` for the sandbox in {self.workdir}.\n# {LABEL}.\n"
        path.write_text(header + yaml.safe_dump(template, sort_keys=False), encoding="utf-8")
        return path

    def state(self) -> dict[str, Any]:
        """What `modelctl sandbox up --json` prints and state.json holds."""
        assert self.prometheus is not None
        return {
            "simulated": True,
            "label": LABEL,
            "kubeconfig": str(self.kubeconfig),
            "admin_kubeconfig": str(self.admin_kubeconfig),
            "config": str(self.config),
            "gitops": str(self.gitops),
            "api_server": self.server.url,
            "prometheus_url": self.prometheus.url,
            "services": {f"{ns}/{name}": self.service_url(ns, name) for ns, name in self.ports},
            "environments": [env.name for env in self.settings.envs],
        }

    def wait(self, condition: Any, timeout_s: float, what: str, interval_s: float = 0.5) -> None:
        """Wait until ``condition()`` is true (tests and the demo), failing with ``what`` after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the sandbox did not reach: {what} within {timeout_s:g}s; errors: {self.errors}")
            time.sleep(interval_s)
