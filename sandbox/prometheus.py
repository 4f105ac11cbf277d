"""A real Prometheus for the sandbox, scraping the pods PodMonitor objects select, as prometheus-operator sets it up.

:class:`Prometheus` runs the Debian ``prometheus`` binary (2.42) on 127.0.0.1 in its own process group, with its
config, TSDB and log under a work directory. :meth:`Prometheus.sync` turns the PodMonitors of the store into scrape
jobs the way the operator does: one job per ``podMetricsEndpoints[]`` entry, named ``podMonitor/<ns>/<name>/<i>``,
with that endpoint's interval, path and scheme; its targets are the Ready pods of the PodMonitor's namespace (or
``spec.namespaceSelector``) matching ``spec.selector``, at the host port of the endpoint's port, labelled
``namespace``, ``pod``, ``container``, ``endpoint`` and ``job`` (``<ns>/<name>``), plus every ``podTargetLabels``
entry copied from the pod with its name sanitized (``rollouts-pod-template-hash`` -> ``rollouts_pod_template_hash``).
Targets go to ``file_sd_configs`` files (written atomically, picked up by Prometheus itself); the config is reloaded
(``POST /-/reload``) only when the jobs change. Not modelled: relabelings, metricRelabelings, TLS and auth.

One difference from a cluster: the operator's pod discovery also scrapes running pods that are not Ready; here
only Ready pods are targets, so a pod that stops being Ready drops out.

Prometheus applies target changes on its own schedule (discovery and scrape managers batch updates every 5 s), so a
new pod's first sample lands some 5-10 s after :meth:`sync` sees it, as in a cluster.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from pipeline import processes
from pipeline.errors import TerminalError, TransientError

from .pods import POD_IP, container_port, host_port, is_ready
from .store import BY_KIND, Obj, Store

log = logging.getLogger(__name__)

POD = BY_KIND["Pod"]
POD_MONITOR = BY_KIND["PodMonitor"]
GLOBAL_INTERVAL = "2s"  # jobs set their own; this is for anything that does not
_DURATION = re.compile(r"^((\d+)h)?((\d+)m(?!s))?((\d+)s)?((\d+)ms)?$")
_INSTALL = (
    "install it with `make prometheus`, or `apt-get install prometheus` (Debian/Ubuntu), or set $PROMETHEUS to the "
    "binary"
)


def seconds(duration: str) -> float | None:
    """A Prometheus duration as the PodMonitor CRD allows it (``1s``, ``1m30s``, ``500ms``); None when invalid."""
    m = _DURATION.match(duration.strip())
    if not duration.strip() or not m:
        return None
    hours, minutes, secs, millis = (int(m.group(i) or 0) for i in (2, 4, 6, 8))
    return hours * 3600 + minutes * 60 + secs + millis / 1000


def label_name(name: str) -> str:
    """A pod label's name as a Prometheus label name (Kubernetes SD's sanitizing: anything but [a-zA-Z0-9_] -> _)."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def find_binary(binary: str | None = None) -> str:
    """The prometheus binary: ``binary``, else $PROMETHEUS, else the one on PATH, else /usr/bin/prometheus."""
    candidate = binary or os.environ.get("PROMETHEUS") or shutil.which("prometheus") or "/usr/bin/prometheus"
    if not (Path(candidate).is_file() and os.access(candidate, os.X_OK)):
        raise TerminalError(f"the sandbox needs Prometheus, and {candidate} is not an executable", hint=_INSTALL)
    return candidate


def _label_selector_matches(selector: Obj, labels: dict[str, str]) -> bool:
    """A Kubernetes LabelSelector (matchLabels and matchExpressions); an empty one selects every pod."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        present = key in labels
        if (
            (op == "In" and labels.get(key) not in values)
            or (op == "NotIn" and present and labels.get(key) in values)
            or (op == "Exists" and not present)
            or (op == "DoesNotExist" and present)
        ):
            return False
    return True


@dataclass(frozen=True)
class _Job:
    """One scrape job (what goes into prometheus.yml) and the file its targets are written to."""

    name: str
    interval: str
    timeout: str
    path: str
    scheme: str
    honor_labels: bool
    file: Path

    def config(self) -> Obj:
        return {
            "job_name": self.name,
            "scrape_interval": self.interval,
            "scrape_timeout": self.timeout,
            "metrics_path": self.path,
            "scheme": self.scheme,
            "honor_labels": self.honor_labels,
            "file_sd_configs": [{"files": [str(self.file)], "refresh_interval": "30s"}],
        }


def _targets(monitor: Obj, endpoint: Obj, pods: list[Obj]) -> list[Obj]:
    """The file_sd entries of one PodMonitor endpoint: one per Ready, selected, started pod."""
    meta, spec = monitor["metadata"], monitor.get("spec") or {}
    selector = spec.get("namespaceSelector") or {}
    namespaces = None if selector.get("any") else set(selector.get("matchNames") or [meta["namespace"]])
    port = endpoint.get("port") or endpoint.get("portNumber") or endpoint.get("targetPort")
    entries = []
    for pod in pods:
        pod_meta, labels = pod["metadata"], pod["metadata"].get("labels") or {}
        if namespaces is not None and pod_meta["namespace"] not in namespaces:
            continue
        if port is None or not is_ready(pod) or not _label_selector_matches(spec.get("selector") or {}, labels):
            continue
        address = host_port(pod, port)
        if address is None:
            continue
        number = container_port(pod, port)
        containers = (pod.get("spec") or {}).get("containers") or [{}]
        container = next(
            (c for c in containers if any(p.get("containerPort") == number for p in c.get("ports") or [])),
            containers[0],
        )
        target_labels = {
            "namespace": pod_meta["namespace"],
            "pod": pod_meta["name"],
            "container": str(container.get("name", "")),
            "job": f"{meta['namespace']}/{meta['name']}",
            "endpoint": str(port),
        }
        for name in spec.get("podTargetLabels") or []:
            if labels.get(name):
                target_labels[label_name(name)] = labels[name]
        entries.append({"targets": [f"{POD_IP}:{address}"], "labels": target_labels})
    return sorted(entries, key=lambda e: (e["labels"]["namespace"], e["labels"]["pod"]))


def _write_atomically(path: Path, text: str) -> bool:
    """Write ``text`` to ``path`` through a temporary file and a rename; False when it already held that text."""
    if path.exists() and path.read_text() == text:
        return False
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return True


class Prometheus:
    """The sandbox's Prometheus process: start, sync the scrape config from PodMonitors, query, close."""

    def __init__(self, workdir: Path, port: int = 0, binary: str | None = None, ready_timeout_s: float = 60.0) -> None:
        self.workdir = Path(workdir)
        self.binary = binary
        self.port = port
        self.ready_timeout_s = ready_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.config_file = self.workdir / "prometheus.yml"
        self.targets_dir = self.workdir / "targets"
        self.log_file = self.workdir / "prometheus.log"
        self._jobs: tuple[_Job, ...] = ()
        self.skipped: dict[str, str] = {}  # PodMonitor "<ns>/<name>" -> why it is not scraped

    @property
    def url(self) -> str:
        return f"http://{POD_IP}:{self.port}"

    # process ---------------------------------------------------------------------------------------------------
    def start(self) -> Prometheus:
        """Start Prometheus and wait until it answers /-/ready. Call from the thread that will call close()."""
        binary = find_binary(self.binary)
        if self.proc is not None:
            return self
        self.targets_dir.mkdir(parents=True, exist_ok=True)
        _write_atomically(self.config_file, self._config_text())
        if not self.port:
            with socket.socket() as sock:
                sock.bind((POD_IP, 0))
                self.port = int(sock.getsockname()[1])
        cmd = [
            binary,
            f"--config.file={self.config_file}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            "--storage.tsdb.retention.time=1d",
            f"--web.listen-address={POD_IP}:{self.port}",
            "--web.enable-lifecycle",
        ]
        with self.log_file.open("ab") as log_out:
            self.proc = processes.start(cmd, stdin=subprocess.DEVNULL, stdout=log_out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.close()
                raise TerminalError(
                    f"Prometheus exited with code {code} while starting\n{self._log_tail()}",
                    hint=f"read {self.log_file}; a port in use: choose another one",
                )
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise TransientError(
                    f"Prometheus was not ready within {self.ready_timeout_s:.0f} s\n{self._log_tail()}",
                    hint=f"read {self.log_file}; on a loaded machine allow a longer ready_timeout_s",
                )
            time.sleep(0.1)

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def close(self) -> None:
        """Stop Prometheus' whole process group (idempotent). The work directory keeps its log and data."""
        proc, self.proc = self.proc, None
        if proc is not None:
            processes.stop(proc, grace_s=10)

    def __enter__(self) -> Prometheus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # config ----------------------------------------------------------------------------------------------------
    def _config_text(self) -> str:
        config = {
            "global": {
                "scrape_interval": GLOBAL_INTERVAL,
                "scrape_timeout": GLOBAL_INTERVAL,
                "evaluation_interval": GLOBAL_INTERVAL,
                "external_labels": {"sandbox": "modelctl"},
            },
            "scrape_configs": [job.config() for job in self._jobs],
        }
        header = "# Generated by the modelctl sandbox from the store's PodMonitors (simulated cluster).\n"
        return header + yaml.safe_dump(config, sort_keys=False)

    def _job(self, monitor: Obj, index: int, endpoint: Obj) -> _Job | str:
        """The scrape job of one endpoint, or why it cannot be scraped."""
        meta = monitor["metadata"]
        name = f"podMonitor/{meta['namespace']}/{meta['name']}/{index}"
        interval = str(endpoint.get("interval") or "30s")
        interval_s = seconds(interval)
        if not interval_s:
            return f"podMetricsEndpoints[{index}].interval {interval!r} is not a duration such as 15s"
        timeout = str(endpoint.get("scrapeTimeout") or "")
        timeout_s = seconds(timeout) if timeout else min(interval_s, 10.0)
        if not timeout_s or timeout_s > interval_s:
            return f"podMetricsEndpoints[{index}].scrapeTimeout {timeout!r} is not a duration up to the interval"
        if not (endpoint.get("port") or endpoint.get("portNumber") or endpoint.get("targetPort")):
            return f"podMetricsEndpoints[{index}] names no port"
        file = self.targets_dir / (re.sub(r"[^A-Za-z0-9_.-]", "_", name) + ".json")
        return _Job(
            name,
            interval,
            timeout or f"{int(timeout_s * 1000)}ms",
            str(endpoint.get("path") or "/metrics"),
            str(endpoint.get("scheme") or "http"),
            bool(endpoint.get("honorLabels")),
            file,
        )

    def sync(self, store: Store) -> None:
        """Scrape what the store's PodMonitors describe now: rewrite changed target files, reload on job changes."""
        if self.proc is None:
            raise TerminalError("Prometheus.sync() before start()", hint="call start() first")
        monitors, _ = store.list(POD_MONITOR, None)
        pods, _ = store.list(POD, None)
        jobs, targets, skipped = [], {}, {}
        for monitor in monitors:
            for index, endpoint in enumerate((monitor.get("spec") or {}).get("podMetricsEndpoints") or []):
                job = self._job(monitor, index, endpoint)
                if isinstance(job, str):
                    skipped[f"{monitor['metadata']['namespace']}/{monitor['metadata']['name']}"] = job
                    continue
                jobs.append(job)
                targets[job.file] = _targets(monitor, endpoint, pods)
        for key, why in skipped.items():
            if self.skipped.get(key) != why:
                log.warning("sandbox Prometheus: PodMonitor %s is not scraped: %s", key, why)
        self.skipped = skipped
        for file, entries in targets.items():
            _write_atomically(file, json.dumps(entries, indent=1, sort_keys=True))
        if tuple(jobs) != self._jobs:
            self._jobs = tuple(jobs)
            _write_atomically(self.config_file, self._config_text())
            self._reload()
            for stale in set(self.targets_dir.glob("*.json")) - set(targets):
                stale.unlink()

    def _reload(self) -> None:
        try:
            response = httpx.post(f"{self.url}/-/reload", timeout=30)
        except httpx.HTTPError as exc:
            raise TransientError(f"Prometheus did not answer its reload: {exc}", hint="retry") from None
        if response.status_code != 200:
            raise TerminalError(
                f"Prometheus refused the generated config: {response.text.strip()}",
                hint=f"this is a bug in the sandbox's config generation; read {self.config_file}",
            )

    # queries ---------------------------------------------------------------------------------------------------
    def query(self, promql: str) -> list[Any]:
        """An instant query: the ``data.result`` list of the API's answer."""
        try:
            response = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=10)
            body = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise TransientError(f"Prometheus did not answer the query: {exc}", hint="retry") from None
        if body.get("status") != "success":
            raise TerminalError(f"Prometheus rejected the query {promql!r}: {body.get('error')}")
        result: list[Any] = body["data"]["result"]
        return result

    def value(self, promql: str) -> float | None:
        """The first sample's value; None when there is none or it is NaN (no data in the window)."""
        result = self.query(promql)
        if not result:
            return None
        value = float(result[0]["value"][1])
        return None if value != value else value

    def active_targets(self) -> list[Obj]:
        """The targets Prometheus scrapes now (``/api/v1/targets``, active only): labels, health, lastError."""
        response = httpx.get(f"{self.url}/api/v1/targets", params={"state": "active"}, timeout=10)
        targets: list[Obj] = response.json()["data"]["activeTargets"]
        return targets

    def query_config(self) -> str:
        """The configuration Prometheus runs now (``/api/v1/status/config``, YAML): shows a reload took effect."""
        response = httpx.get(f"{self.url}/api/v1/status/config", timeout=10)
        text: str = response.json()["data"]["yaml"]
        return text
