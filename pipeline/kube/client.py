"""The Kubernetes client and its one retry loop: transient errors retried with backoff, 409s re-read.

Errors by status: 404 :class:`NotFound` and 401/403 :class:`Forbidden` (terminal: a 403 names the verb, resource,
namespace and identity, and the grant that would allow it), 409 :class:`Conflict` (transient, re-read by the
operation), 408/429/5xx and connection trouble :class:`TransientError`, anything else :class:`TerminalError`.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Self, TypeVar

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from pipeline.errors import Conflict, Forbidden, NotFound, PipelineError, TerminalError, TransientError
from pipeline.secrets import redact

T = TypeVar("T")
ARGO = ("argoproj.io", "v1alpha1")
REFRESH = "argocd.argoproj.io/refresh"
Patch = tuple[str, dict[str, Any]]  # ("object" | "status", JSON merge patch)


def parse_time(text: str) -> datetime:
    """An RFC 3339 time as Kubernetes writes it (with a trailing Z)."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


ConflictError = Conflict  # the name this package used before pipeline.errors had it

# The API server's 403 text (apiserver responsewriters.forbiddenMessage), from which the verb, resource, group,
# namespace and user are read back to say exactly what to grant.
_FORBIDDEN = re.compile(
    r'User "(?P<user>[^"]*)" cannot (?P<verb>\S+) resource "(?P<resource>[^"]+)" in API group "(?P<group>[^"]*)"'
    r'(?: in the namespace "(?P<namespace>[^"]*)"| at the cluster scope)'
)


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
            return Conflict(text, hint="another writer changed it; re-read and try again")
        if code in (408, 429) or code >= 500:
            return TransientError(text, hint="the API server is busy or failing; try again shortly")
        if code == 403:
            return forbidden(what, detail)
        if code == 401:
            return Forbidden(
                f"{what}: the Kubernetes API answered 401 (Unauthorized): it did not accept the credentials",
                hint="the token or client certificate is missing, wrong or expired; check the kubeconfig context "
                "(or the pod's ServiceAccount token)",
            )
        if code == 404:
            return NotFound(text, hint="check the name and namespace in promotion.yaml, and that it exists")
        return TerminalError(text, hint="the request was refused; fix the object or the configuration")
    if isinstance(exc, urllib3.exceptions.HTTPError | OSError | TimeoutError):
        return TransientError(
            f"{what}: cannot reach the Kubernetes API ({type(exc).__name__}: {redact(str(exc))[:200]})",
            hint="check the connection to the cluster (kubeconfig context, VPN, API server health)",
        )
    return TerminalError(f"{what}: {type(exc).__name__}: {redact(str(exc))}")


def forbidden(what: str, detail: str) -> Forbidden:
    """A 403 that names who may not do which verb on which resource where, and the grant that would allow it."""
    m = _FORBIDDEN.search(detail)
    if m is None:
        return Forbidden(
            f"{what}: the Kubernetes API answered 403 ({detail})",
            hint="grant the pipeline's ServiceAccount this access in gitops/rbac/pipeline.yaml (RBAC)",
        )
    user, verb, resource, group = m["user"], m["verb"], m["resource"], m["group"]
    namespace = m["namespace"] or ""
    sa = user.split(":") if user.startswith("system:serviceaccount:") else None
    who = f"the ServiceAccount {sa[2]}/{sa[3]}" if sa and len(sa) == 4 else f'the user "{user}"'
    subject = f"ServiceAccount {sa[3]} (namespace {sa[2]})" if sa and len(sa) == 4 else f"User {user}"
    where = f"in the namespace {namespace}" if namespace else "at the cluster scope"
    rule = f'apiGroups: ["{group}"], resources: ["{resource}"], verbs: ["{verb}"]'
    binding = (
        f"a Role (or ClusterRole) bound in namespace {namespace} by a RoleBinding"
        if namespace
        else "a ClusterRole bound by a ClusterRoleBinding"
    )
    base, _, sub = resource.partition("/")
    can_i = f"kubectl auth can-i {verb} {base}{'.' + group if group else ''}"
    can_i += (f" --subresource={sub}" if sub else "") + (f" -n {namespace}" if namespace else "") + f" --as={user}"
    return Forbidden(
        f"{what}: forbidden: {who} may not {verb} {resource} (API group {group or 'core'}) {where}",
        hint=f"grant it {rule} through {binding} to {subject} (gitops/rbac/pipeline.yaml); check with `{can_i}`",
        verb=verb,
        resource=resource,
        group=group,
        namespace=namespace,
        user=user,
    )


class KubeClient:
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
    def connect(cls, context: str | None = None) -> Self:
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
            return cls(config.new_client_from_config(config_file=os.environ.get("KUBECONFIG"), context=context))
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
                if not error.retryable or isinstance(error, Conflict):
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
            except Conflict:
                if n + 1 == self.backoff.attempts:
                    raise
                self.sleep(self.backoff.delay(n))
        raise AssertionError("unreachable")
