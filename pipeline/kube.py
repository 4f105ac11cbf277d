"""All Kubernetes API access, through the official client: Argo CD sync, the Rollout, Leases, GPUs, Jobs.

Every call goes through one retry loop: 5xx, 429, timeouts and connection errors are retried with exponential
backoff up to a bound, then raised as :class:`TransientError`; a 409 conflict is re-read and retried by the
operation that made it; anything else is a :class:`TerminalError`. Messages are passed through
:func:`pipeline.secrets.redact` and say what to do. The Argo rules followed here are in ../shared/ARGO.md.

Example:
    >>> kube = Kube.connect()  # doctest: +SKIP
    >>> kube.request_refresh(env.argocd); kube.wait_synced(env.argocd, sha, timeout_s=300)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import urllib3
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException
from kubernetes.utils import parse_quantity

from pipeline.config import ArgoCDApp, GpuPool, RolloutRef
from pipeline.errors import PipelineError, TerminalError, TransientError
from pipeline.rollout import ObservedRollout, observe_rollout
from pipeline.secrets import redact

T = TypeVar("T")
ARGO = ("argoproj.io", "v1alpha1")
REFRESH = "argocd.argoproj.io/refresh"
Patch = tuple[str, dict[str, Any]]  # ("object" | "status", JSON merge patch)


class ConflictError(TransientError):
    """409: the object changed (or exists) under us; the operation re-reads and tries again."""


@dataclass(frozen=True)
class Backoff:
    """How API calls are retried: ``attempts`` tries, sleeping first_s, 2*first_s, ... up to max_s."""

    attempts: int = 5
    first_s: float = 0.2
    max_s: float = 5.0
    request_timeout_s: float = 10.0

    def delay(self, attempt: int) -> float:
        return float(min(self.max_s, self.first_s * 2**attempt))


def _api_message(exc: ApiException) -> str:
    try:
        return str(json.loads(exc.body or "{}").get("message") or exc.reason or "")
    except (ValueError, AttributeError):
        return str(exc.reason or "")


def classify(exc: BaseException, what: str) -> PipelineError:
    """Map a client exception to the pipeline's errors, with a redacted message that says what to do."""
    if isinstance(exc, ApiException):
        code, detail = exc.status or 0, redact(_api_message(exc))
        text = f"{what}: the Kubernetes API answered {code} ({detail})"
        if code == 409:
            return ConflictError(text, hint="another writer changed it; re-read and try again")
        if code in (408, 429) or code >= 500:
            return TransientError(text, hint="the API server is busy or failing; try again shortly")
        if code in (401, 403):
            return TerminalError(text, hint="grant the pipeline's service account access to this resource (RBAC)")
        if code == 404:
            return TerminalError(text, hint="check the name and namespace in promotion.yaml, and that it exists")
        return TerminalError(text, hint="the request was refused; fix the object or the configuration")
    if isinstance(exc, urllib3.exceptions.HTTPError | OSError | TimeoutError):
        return TransientError(
            f"{what}: cannot reach the Kubernetes API ({type(exc).__name__}: {redact(str(exc))[:200]})",
            hint="check the connection to the cluster (kubeconfig context, VPN, API server health)",
        )
    return TerminalError(f"{what}: {type(exc).__name__}: {redact(str(exc))}")


@dataclass(frozen=True)
class AppState:
    """What an Argo CD Application says about the commit it runs, read from its status."""

    sync_status: str | None
    sync_revision: str | None
    operation_phase: str | None
    operation_revision: str | None
    health: str | None
    health_message: str | None
    reconciled_at: str | None
    finished_at: str | None
    refresh_pending: bool = False

    @classmethod
    def of(cls, obj: dict[str, Any]) -> AppState:
        status = obj.get("status") or {}
        sync, health, op = status.get("sync") or {}, status.get("health") or {}, status.get("operationState") or {}
        revisions = sync.get("revisions") or []
        return cls(
            sync_status=sync.get("status"),
            sync_revision=sync.get("revision") or (revisions[0] if revisions else None),
            operation_phase=op.get("phase"),
            operation_revision=(op.get("syncResult") or {}).get("revision"),
            health=health.get("status"),
            health_message=health.get("message"),
            reconciled_at=status.get("reconciledAt"),
            finished_at=op.get("finishedAt"),
            refresh_pending=REFRESH in ((obj.get("metadata") or {}).get("annotations") or {}),
        )

    def _applied(self, sha: str) -> str | None:
        if self.sync_status != "Synced" or self.sync_revision != sha:
            return f"sync is {self.sync_status} at {(self.sync_revision or 'no revision')[:12]}"
        if self.operation_phase != "Succeeded" or self.operation_revision != sha:
            return f"the sync operation is {self.operation_phase} at {(self.operation_revision or 'none')[:12]}"
        return None

    def _fresh(self) -> bool:
        """Health was assessed after the sync finished (reconciledAt >= operationState.finishedAt)."""
        return bool(self.reconciled_at and self.finished_at) and _time(self.reconciled_at or "") >= _time(
            self.finished_at or ""
        )

    def missing_for(self, sha: str, accept_suspended: bool = True) -> str | None:
        """Why commit ``sha`` is not live yet by the ARGO.md rules, or None when it is."""
        applied = self._applied(sha)
        if applied:
            return applied
        if self.health not in (("Healthy", "Suspended") if accept_suspended else ("Healthy",)):
            return f"health is {self.health}" + (f" ({self.health_message})" if self.health_message else "")
        return None if self._fresh() else "health was last assessed before the sync finished"

    def degraded_at(self, sha: str) -> bool:
        """Commit ``sha`` is applied and freshly assessed Degraded: waiting longer will not help."""
        return self._applied(sha) is None and self.health == "Degraded" and self._fresh()

    def describe(self) -> str:
        return (
            f"sync {self.sync_status} at {(self.sync_revision or '-')[:12]}, operation {self.operation_phase}, "
            f"health {self.health}{f' ({self.health_message})' if self.health_message else ''}"
        )


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@dataclass(frozen=True)
class LeaseHold:
    """A held promotion lease: who holds it, since when, and the version to renew against."""

    name: str
    namespace: str
    holder: str
    acquired_at: datetime
    duration_s: int
    resource_version: str


@dataclass(frozen=True)
class NodeGpus:
    name: str
    allocatable: int
    requested: int

    @property
    def free(self) -> int:
        return max(0, self.allocatable - self.requested)


@dataclass(frozen=True)
class GpuCapacity:
    """Free GPUs of a node pool: allocatable minus the requests of non-terminated pods, per node."""

    resource: str
    selector: str
    nodes: tuple[NodeGpus, ...]

    @property
    def allocatable(self) -> int:
        return sum(n.allocatable for n in self.nodes)

    @property
    def requested(self) -> int:
        return sum(n.requested for n in self.nodes)

    @property
    def free(self) -> int:
        return sum(n.free for n in self.nodes)

    def replicas_fit(self, per_replica: int) -> int:
        """How many replicas fit: a replica's GPUs must all be on one node."""
        return sum(n.free // per_replica for n in self.nodes) if per_replica > 0 else 10**6


@dataclass(frozen=True)
class JobResult:
    name: str
    namespace: str
    succeeded: bool
    created: bool


class Kube:
    """The one door to the Kubernetes API. ``sleep`` and ``clock`` are injectable so tests never wait long."""

    def __init__(
        self,
        api_client: client.ApiClient,
        backoff: Backoff | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.api_client = api_client
        self.backoff = backoff or Backoff()
        self.sleep, self.clock = sleep, clock
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.coordination = client.CoordinationV1Api(api_client)

    @classmethod
    def connect(cls, context: str | None = None) -> Kube:
        """In a pod, the service account; elsewhere the kubeconfig (``context`` or the current one).

        Raises:
            TerminalError: neither is available.
        """
        try:
            config.load_incluster_config()
            return cls(client.ApiClient())
        except config.ConfigException:
            pass
        try:
            return cls(config.new_client_from_config(context=context))
        except (config.ConfigException, OSError) as exc:
            raise TerminalError(
                f"no Kubernetes credentials: {redact(str(exc))}",
                hint="run inside the cluster, or point KUBECONFIG at a kubeconfig with the right context",
            ) from None

    # the retry loop ------------------------------------------------------------------------------------------
    def read(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
        """:meth:`call`, with the answer as plain JSON (camelCase keys), as the API sent it."""
        answer: dict[str, Any] = self.api_client.sanitize_for_serialization(self.call(what, fn, *args, **kwargs))
        return answer

    def call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """One API call, retried on transient failures with backoff and a bound. 409 is raised at once."""
        kwargs.setdefault("_request_timeout", self.backoff.request_timeout_s)
        error: PipelineError | None = None
        for attempt in range(self.backoff.attempts):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                error = classify(exc, what)
                if not error.retryable or isinstance(error, ConflictError):
                    raise error from None
                if attempt + 1 < self.backoff.attempts:
                    self.sleep(self.backoff.delay(attempt))
        assert error is not None
        raise TransientError(f"{error.what} (gave up after {self.backoff.attempts} attempts)", hint=error.hint)

    def _retry_conflicts(self, what: str, attempt: Callable[[], T]) -> T:
        """Run a read-modify-write ``attempt``; on 409 re-run it (it re-reads), up to the backoff bound."""
        for n in range(self.backoff.attempts):
            try:
                return attempt()
            except ConflictError:
                if n + 1 == self.backoff.attempts:
                    raise
                self.sleep(self.backoff.delay(n))
        raise AssertionError("unreachable")

    # Argo CD ---------------------------------------------------------------------------------------------------
    def application(self, app: ArgoCDApp) -> dict[str, Any]:
        what = f"read Argo CD application {app.namespace}/{app.application}"
        obj: dict[str, Any] = self.call(
            what, self.custom.get_namespaced_custom_object, *ARGO, app.namespace, "applications", app.application
        )
        return obj

    def request_refresh(self, app: ArgoCDApp, hard: bool = False) -> None:
        """Ask Argo CD to re-read Git now (it removes the annotation when done) instead of waiting for its poll."""
        body = {"metadata": {"annotations": {REFRESH: "hard" if hard else "normal"}}}
        what = f"request a refresh of Argo CD application {app.namespace}/{app.application}"
        self.call(
            what,
            self.custom.patch_namespaced_custom_object,
            *ARGO,
            app.namespace,
            "applications",
            app.application,
            body,
        )

    def wait_synced(self, app: ArgoCDApp, sha: str, timeout_s: float, accept_suspended: bool = True) -> AppState:
        """Wait (watching the Application) until commit ``sha`` is synced and healthy by the ARGO.md rules.

        Raises:
            TerminalError: not live within ``timeout_s``; the message says what was last seen.
        """
        deadline = self.clock() + timeout_s
        name = f"{app.namespace}/{app.application}"
        while True:
            obj = self.application(app)
            state = AppState.of(obj)
            if state.missing_for(sha, accept_suspended) is None:
                return state
            if state.degraded_at(sha):
                raise TerminalError(
                    f"Argo CD application {name} synced commit {sha[:12]} but it is Degraded: "
                    f"{state.health_message or 'no message'}",
                    hint="the new version does not come up; abort the Rollout and revert the commit",
                )
            remaining = deadline - self.clock()
            if remaining <= 0:
                raise TerminalError(
                    f"Argo CD application {name} did not make commit {sha[:12]} live within {timeout_s:g}s: "
                    f"{state.missing_for(sha, accept_suspended)}; last seen: {state.describe()}",
                    hint=f"look at `argocd app get {app.application}` (sync errors, a Degraded resource); "
                    "raise canary.sync_timeout_s if syncs are just slow",
                )
            stream = watch.Watch()
            try:
                for event in stream.stream(
                    self.custom.list_namespaced_custom_object,
                    *ARGO,
                    app.namespace,
                    "applications",
                    field_selector=f"metadata.name={app.application}",
                    resource_version=obj["metadata"]["resourceVersion"],
                    timeout_seconds=max(1, int(remaining)),
                    _request_timeout=remaining + 5,
                ):
                    seen = AppState.of(event["object"])
                    if seen.missing_for(sha, accept_suspended) is None or seen.degraded_at(sha):
                        break
                    if self.clock() > deadline:
                        break
            except Exception as exc:  # a dropped or failed watch, or 410 Gone: re-read and watch again
                error = classify(exc, f"watch {name}")
                if not error.retryable and not (isinstance(exc, ApiException) and exc.status == 410):
                    raise error from None
                self.sleep(self.backoff.first_s)
            finally:
                stream.stop()

    # Argo Rollouts ---------------------------------------------------------------------------------------------
    def rollout_object(self, ref: RolloutRef) -> dict[str, Any]:
        what = f"read Rollout {ref.namespace}/{ref.name}"
        obj: dict[str, Any] = self.call(
            what, self.custom.get_namespaced_custom_object, *ARGO, ref.namespace, "rollouts", ref.name
        )
        return obj

    def rollout(self, ref: RolloutRef) -> ObservedRollout:
        """The Rollout as rollout.py sees it (``.client_phase`` is the phase the Argo CLI shows)."""
        return observe_rollout(self.rollout_object(ref))

    def _patch(self, ref: RolloutRef, patches: list[Patch], verb: str) -> list[Patch]:
        for target, body in patches:
            fn = (
                self.custom.patch_namespaced_custom_object_status
                if target == "status"
                else self.custom.patch_namespaced_custom_object
            )
            self.call(
                f"{verb} Rollout {ref.namespace}/{ref.name}", fn, *ARGO, ref.namespace, "rollouts", ref.name, body
            )
        return patches

    def promote(self, ref: RolloutRef, full: bool = False) -> list[Patch]:
        """Promote one step (or fully) with the patches the Argo CLI sends; returns them. Re-reads on 409.

        Unlike the CLI, it sends nothing while an earlier promote is still being applied (controllerPause set, no
        pause condition left), so a repeated call never skips a step.
        """

        def attempt() -> list[Patch]:
            obj = self.rollout_object(ref)
            seen = observe_rollout(obj)
            patches: list[Patch] = []
            if full:
                if seen.spec_paused:
                    patches.append(("object", {"spec": {"paused": False}}))
                if seen.current_pod_hash != seen.stable_rs:
                    patches.append(("status", {"status": {"promoteFull": True}}))
            elif seen.spec_paused:
                patches.append(("object", {"spec": {"paused": False}}))
            elif seen.controller_pause and not seen.pause_reasons:
                return []  # an earlier promote is being applied: promoting again would skip a step
            else:
                status: dict[str, Any] = {"pauseConditions": None}
                if not seen.pause_reasons:
                    if seen.finished or seen.step_index is None or seen.step_index >= seen.step_count:
                        return []  # nothing left to promote
                    status["currentStepIndex"] = seen.step_index + 1
                if "InconclusiveAnalysisRun" in seen.pause_reasons:
                    status["controllerPause"] = False
                patches.append(("status", {"status": status}))
            return self._patch(ref, patches, "promote")

        return self._retry_conflicts(f"promote Rollout {ref.name}", attempt)

    def abort(self, ref: RolloutRef) -> list[Patch]:
        """Send traffic back to stable now: ``{"status":{"abort":true}}``. The template is left as it is."""
        return self._retry_conflicts(
            "abort", lambda: self._patch(ref, [("status", {"status": {"abort": True}})], "abort")
        )

    def retry(self, ref: RolloutRef) -> list[Patch]:
        """Retry an aborted update: ``{"status":{"abort":false}}``."""
        return self._retry_conflicts(
            "retry", lambda: self._patch(ref, [("status", {"status": {"abort": False}})], "retry")
        )

    def wait_rollout(
        self, ref: RolloutRef, until: Callable[[ObservedRollout], bool], timeout_s: float
    ) -> ObservedRollout:
        """Poll the Rollout with bounded backoff until ``until`` holds.

        Raises:
            TerminalError: it did not within ``timeout_s`` (with the phase and message last seen).
        """
        deadline, n = self.clock() + timeout_s, 0
        while True:
            seen = self.rollout(ref)
            if until(seen):
                return seen
            if self.clock() >= deadline:
                raise TerminalError(
                    f"Rollout {ref.namespace}/{ref.name} did not reach the expected state within {timeout_s:g}s; "
                    f"last seen {seen.client_phase} at {seen.step}: {seen.message or 'no message'}",
                    hint=f"look at `kubectl argo rollouts get rollout {ref.name} -n {ref.namespace}`",
                )
            self.sleep(min(self.backoff.delay(n), max(0.0, deadline - self.clock())))
            n += 1

    # one promotion per environment -----------------------------------------------------------------------------
    def acquire_lease(self, env: str, namespace: str, holder: str, duration_s: int = 60) -> LeaseHold:
        """Take the promotion lease of ``env``: create it, renew our own, or take over an expired one.

        Raises:
            TerminalError: someone else holds a live lease (the message names them and since when).
        """
        name, what = f"modelctl-promotion-{env}", f"take the promotion Lease of {env!r}"

        def attempt() -> LeaseHold:
            now = datetime.now(UTC)
            stamp = now.isoformat(timespec="microseconds")
            try:
                lease = self.read(what, self.coordination.read_namespaced_lease, name, namespace)
            except TerminalError:  # 404: nobody has held it yet
                spec = {"holderIdentity": holder, "leaseDurationSeconds": duration_s, "acquireTime": stamp}
                body = {"metadata": {"name": name}, "spec": {**spec, "renewTime": stamp, "leaseTransitions": 0}}
                created = self.read(what, self.coordination.create_namespaced_lease, namespace, body)
                return LeaseHold(name, namespace, holder, now, duration_s, created["metadata"]["resourceVersion"])
            spec = lease.setdefault("spec", {})
            other, acquired = spec.get("holderIdentity"), spec.get("acquireTime")
            renewed = spec.get("renewTime") or acquired
            expires = _time(renewed) + timedelta(seconds=spec.get("leaseDurationSeconds") or 0) if renewed else now
            if other and other != holder and expires > now:
                raise TerminalError(
                    f"environment {env!r} is already being promoted by {other} (since {acquired}; lease "
                    f"{namespace}/{name} expires at {expires.isoformat(timespec='seconds')} unless renewed)",
                    hint="wait for that promotion to finish; if it died, the lease expires by itself, or delete it: "
                    f"kubectl delete lease {name} -n {namespace}",
                )
            if other != holder:  # free or expired: take it over
                spec.update(acquireTime=stamp, leaseTransitions=int(spec.get("leaseTransitions") or 0) + 1)
            spec.update(holderIdentity=holder, renewTime=stamp, leaseDurationSeconds=duration_s)
            replaced = self.read(what, self.coordination.replace_namespaced_lease, name, namespace, lease)
            since = _time(spec["acquireTime"])
            return LeaseHold(name, namespace, holder, since, duration_s, replaced["metadata"]["resourceVersion"])

        return self._retry_conflicts(what, attempt)

    def renew_lease(self, hold: LeaseHold) -> LeaseHold:
        """Renew a held lease while the promotion runs (a 409 is re-read and retried).

        Raises:
            TerminalError: the lease now belongs to someone else (it expired): stop this promotion.
        """
        what = f"renew Lease {hold.namespace}/{hold.name}"

        def attempt() -> LeaseHold:
            lease = self.read(what, self.coordination.read_namespaced_lease, hold.name, hold.namespace)
            if lease["spec"].get("holderIdentity") != hold.holder:
                raise TerminalError(
                    f"lost the promotion lease {hold.namespace}/{hold.name} to {lease['spec'].get('holderIdentity')}",
                    hint="the lease expired before it was renewed; stop this promotion and check the other one",
                )
            lease["spec"]["renewTime"] = datetime.now(UTC).isoformat(timespec="microseconds")
            renewed = self.read(what, self.coordination.replace_namespaced_lease, hold.name, hold.namespace, lease)
            return replace(hold, resource_version=renewed["metadata"]["resourceVersion"])

        return self._retry_conflicts(what, attempt)

    def release_lease(self, hold: LeaseHold) -> bool:
        """Delete the lease if we still hold it (only that version of it); False when it is not ours any more."""
        what = f"release Lease {hold.namespace}/{hold.name}"
        try:
            lease = self.read(what, self.coordination.read_namespaced_lease, hold.name, hold.namespace)
        except TerminalError:
            return False
        if lease["spec"].get("holderIdentity") != hold.holder:
            return False
        body = {"preconditions": {"resourceVersion": lease["metadata"]["resourceVersion"]}}
        self.call(what, self.coordination.delete_namespaced_lease, hold.name, hold.namespace, body=body)
        return True

    @contextmanager
    def hold_lease(self, env: str, namespace: str, holder: str, duration_s: int = 60) -> Iterator[LeaseHold]:
        """Hold the promotion lease of ``env`` for the block, renewed every third of its duration, then release it.

        Raises:
            TerminalError: another promotion holds it (on entry), or it was lost while the block ran (on exit).
        """
        current = [self.acquire_lease(env, namespace, holder, duration_s)]
        stop, lost = threading.Event(), list[PipelineError]()

        def renew() -> None:
            while not stop.wait(duration_s / 3):
                try:
                    current[0] = self.renew_lease(current[0])
                except TerminalError as exc:
                    lost.append(exc)
                    return
                except TransientError:
                    continue  # the next beat tries again; the lease's own expiry is the bound

        beat = threading.Thread(target=renew, name=f"lease-{env}", daemon=True)
        beat.start()
        try:
            yield current[0]
        finally:
            stop.set()
            beat.join()
            if not lost:
                self.release_lease(current[0])
        if lost:
            raise lost[0]

    # GPU capacity ----------------------------------------------------------------------------------------------
    def gpu_capacity(self, pool: GpuPool) -> GpuCapacity:
        """Allocatable minus requested ``pool.resource`` on the schedulable, Ready nodes matching the selector.

        Requests count for every pod not yet Succeeded or Failed (Pending pods bound to a node hold GPUs too).
        """
        selector = ",".join(f"{k}={v}" for k, v in sorted(pool.node_selector.items()))
        nodes = self.read("list GPU nodes", self.core.list_node, label_selector=selector or None)["items"]
        usable = {
            n["metadata"]["name"]: int(parse_quantity(n["status"].get("allocatable", {}).get(pool.resource, "0")))
            for n in nodes
            if not (n.get("spec") or {}).get("unschedulable")
            and any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"].get("conditions", []))
        }
        terminal = "status.phase!=Succeeded,status.phase!=Failed"
        pods = self.read("list pods", self.core.list_pod_for_all_namespaces, field_selector=terminal)["items"]
        requested = dict.fromkeys(usable, 0)
        for pod in pods:
            if pod["spec"].get("nodeName") in requested:
                requested[pod["spec"]["nodeName"]] += _pod_request(pod["spec"], pool.resource)
        found = tuple(NodeGpus(name, usable[name], requested[name]) for name in sorted(usable))
        return GpuCapacity(pool.resource, selector or "(all nodes)", found)

    def require_gpus(self, pool: GpuPool, replicas: int = 1) -> GpuCapacity:
        """Refuse (before any commit) when the pool cannot place ``replicas`` canary replicas.

        Raises:
            TerminalError: too few free GPUs, with the numbers per node.
        """
        cap = self.gpu_capacity(pool)
        if cap.replicas_fit(pool.gpus_per_replica) < replicas:
            per_node = ", ".join(f"{n.name}: {n.free}/{n.allocatable} free" for n in cap.nodes) or "no Ready nodes"
            raise TerminalError(
                f"not enough free {pool.resource} in the node pool {cap.selector}: the canary needs {replicas} "
                f"replica(s) x {pool.gpus_per_replica} on one node each, but {cap.free} of {cap.allocatable} are "
                f"free ({cap.requested} requested by pods; {per_node})",
                hint="free GPUs (scale down other workloads), add nodes to the pool, or lower gpus_per_replica",
            )
        return cap

    # Jobs ------------------------------------------------------------------------------------------------------
    def run_job(self, namespace: str, manifest: dict[str, Any], timeout_s: float) -> JobResult:
        """Create a batch Job (one of the same name is reused: re-runs converge) and wait until it finishes.

        Raises:
            TerminalError: the Job failed (with the tail of its pods' logs) or did not finish within ``timeout_s``.
        """
        name, created = manifest["metadata"]["name"], True
        try:
            self.call(f"create Job {namespace}/{name}", self.batch.create_namespaced_job, namespace, manifest)
        except ConflictError:
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


def _pod_request(spec: dict[str, Any], resource: str) -> int:
    """A pod's effective request: max(sum over containers, largest init container); limits stand in for requests."""

    def one(container: dict[str, Any]) -> int:
        res = container.get("resources") or {}
        value = (res.get("requests") or {}).get(resource) or (res.get("limits") or {}).get(resource)
        return int(parse_quantity(value)) if value else 0

    init = max((one(c) for c in spec.get("initContainers") or []), default=0)
    return max(sum(one(c) for c in spec.get("containers") or []), init)
