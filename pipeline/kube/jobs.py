"""Batch Jobs: create or reuse, wait, and read the pods' logs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.errors import Conflict, PipelineError, TerminalError
from pipeline.kube.client import KubeClient
from pipeline.secrets import redact


@dataclass(frozen=True)
class JobResult:
    name: str
    namespace: str
    succeeded: bool
    created: bool


class Jobs(KubeClient):
    """Batch Jobs: create (or reuse), wait with bounded backoff, fetch pod logs on failure."""

    # Jobs ------------------------------------------------------------------------------------------------------
    def run_job(self, namespace: str, manifest: dict[str, Any], timeout_s: float) -> JobResult:
        """Create a batch Job (one of the same name is reused: re-runs converge) and wait until it finishes.

        Raises:
            TerminalError: the Job failed (with the tail of its pods' logs) or did not finish within ``timeout_s``.
        """
        name, created = manifest["metadata"]["name"], True
        try:
            self.call(f"create Job {namespace}/{name}", self.batch.create_namespaced_job, namespace, manifest)
        except Conflict:  # AlreadyExists: the Job of an earlier run, reused
            created = False
        deadline, n = self.clock() + timeout_s, 0
        while True:
            job = self.read(f"read Job {namespace}/{name}", self.batch.read_namespaced_job_status, name, namespace)
            status = job.get("status") or {}
            done = {c["type"]: c for c in status.get("conditions") or [] if c.get("status") == "True"}
            if "Complete" in done:
                return JobResult(name, namespace, True, created)
            if "Failed" in done:
                logs = "\n".join(f"--- pod {pod} ---\n{text}" for pod, text in self.job_logs(namespace, name).items())
                raise TerminalError(
                    f"Job {namespace}/{name} failed: {done['Failed'].get('reason', 'Failed')}: "
                    f"{done['Failed'].get('message', '')}\n{redact(logs) or '(no pod logs)'}",
                    hint=f"read the logs above (`kubectl logs -n {namespace} job/{name}`), fix the cause, delete "
                    "the Job, run again",
                )
            if self.clock() >= deadline:
                raise TerminalError(
                    f"Job {namespace}/{name} did not finish within {timeout_s:g}s ({status.get('active', 0)} active)",
                    hint=f"look at `kubectl describe job {name} -n {namespace}` (Pending pods: GPUs, image pulls)",
                )
            self.sleep(min(self.backoff.delay(n), max(0.0, deadline - self.clock())))
            n += 1

    def job_logs(self, namespace: str, name: str, tail_lines: int = 50) -> dict[str, str]:
        """The last lines of each pod of a Job (best effort: an unreadable log says why)."""
        selector = f"job-name={name}"
        pods = self.read("list Job pods", self.core.list_namespaced_pod, namespace, label_selector=selector)["items"]
        logs: dict[str, str] = {}
        for pod in (p["metadata"]["name"] for p in pods):
            try:
                logs[pod] = str(
                    self.call("read pod log", self.core.read_namespaced_pod_log, pod, namespace, tail_lines=tail_lines)
                )
            except PipelineError as exc:
                logs[pod] = f"(logs unavailable: {exc.what})"
        return logs
