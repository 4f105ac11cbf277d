"""Argo CD: request a refresh, wait until the exact commit is synced, live and healthy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubernetes import watch
from kubernetes.client.exceptions import ApiException

from pipeline.config import ArgoCDApp
from pipeline.errors import TerminalError
from pipeline.kube.client import ARGO, REFRESH, KubeClient, classify, parse_time


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
    operation_sync_revision: str | None = None  # operationState.operation.sync.revision: what the sync was asked for
    operation_message: str | None = None
    conditions: tuple[tuple[str, str], ...] = ()  # status.conditions[]: (type, message)

    @classmethod
    def of(cls, obj: dict[str, Any]) -> AppState:
        status = obj.get("status") or {}
        sync, health, op = status.get("sync") or {}, status.get("health") or {}, status.get("operationState") or {}
        revisions = sync.get("revisions") or []
        asked = ((op.get("operation") or {}).get("sync") or {}).get("revision")
        conditions = status.get("conditions")
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
            operation_sync_revision=asked,
            operation_message=op.get("message"),
            conditions=tuple(
                (str(c.get("type", "")), str(c.get("message", "")))
                for c in (conditions if isinstance(conditions, list) else [])
                if isinstance(c, dict)
            ),
        )

    def _applied(self, sha: str) -> str | None:
        if self.sync_status != "Synced" or self.sync_revision != sha:
            return f"sync is {self.sync_status} at {(self.sync_revision or 'no revision')[:12]}"
        own = sha in (self.operation_revision, self.operation_sync_revision)
        if own and (self.operation_phase != "Succeeded" or self.operation_revision != sha):
            return f"the sync operation is {self.operation_phase} at {(self.operation_revision or 'none')[:12]}"
        if not own and (self.operation_phase in ("Running", "Terminating") or self.refresh_pending):
            return f"the sync operation is {self.operation_phase} at {(self.operation_revision or 'none')[:12]}"
        # Synced at sha with no operation of its own: sha renders what already runs (a revert back to the live
        # manifests, a change outside the chart), and Argo CD's auto-sync skips an application that is Synced.
        return None

    def _fresh(self) -> bool:
        """Health was assessed after the sync finished (reconciledAt >= operationState.finishedAt)."""
        return bool(self.reconciled_at and self.finished_at) and parse_time(self.reconciled_at or "") >= parse_time(
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

    def sync_failed(self, sha: str) -> str | None:
        """Why Argo CD will not make commit ``sha`` live however long one waits, or None.

        - the sync operation of ``sha`` ended ``Failed`` or ``Error`` (with ``syncPolicy.retry`` Argo CD keeps the
          phase ``Running`` between attempts, so this is after the last one);
        - Argo CD cannot render the manifests (a ``ComparisonError`` condition such as a Helm template failure,
          read once it has re-read Git after the refresh asked for), unless the message says the repository could
          not be reached, which may pass;
        - a ``SyncError`` condition naming ``sha`` (a failed automated sync attempt to it).
        """
        if self.operation_phase in SYNC_FAILED and sha in (self.operation_revision, self.operation_sync_revision):
            return f"the sync of {sha[:12]} ended {self.operation_phase}: {self.operation_message or 'no message'}"
        if self._applied(sha) is None:
            return None
        for kind, message in self.conditions:
            if kind == "ComparisonError" and not self.refresh_pending and not _unreachable(message):
                return f"Argo CD cannot render the manifests (ComparisonError): {message or 'no message'}"
            if kind == "SyncError" and sha in message:
                return f"Argo CD failed to sync {sha[:12]} (SyncError): {message}"
        return None

    def describe(self) -> str:
        return (
            f"sync {self.sync_status} at {(self.sync_revision or '-')[:12]}, operation {self.operation_phase}, "
            f"health {self.health}{f' ({self.health_message})' if self.health_message else ''}"
        )


SYNC_FAILED = ("Failed", "Error")
# ComparisonError messages of a repository Argo CD could not reach (it retries): not the commit's fault.
UNREACHABLE = ("failed to list refs", "authentication required", "dial tcp", "i/o timeout", "connection refused")


def _unreachable(message: str) -> bool:
    lowered = message.lower()
    return any(text in lowered for text in UNREACHABLE)


class ArgoCD(KubeClient):
    """Argo CD: refresh an Application and wait until a commit is live (ARGO.md's rules)."""

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

        Fails fast when Argo CD reports that this commit cannot be synced (:meth:`AppState.sync_failed`): a failed
        sync operation of ``sha``, manifests it cannot render (a Helm template failure), a failed sync attempt.

        Raises:
            TerminalError: the sync of ``sha`` failed (Argo CD's message named), or not live within ``timeout_s``;
                the message says what was last seen.
        """
        deadline = self.clock() + timeout_s
        name = f"{app.namespace}/{app.application}"
        while True:
            obj = self.application(app)
            state = AppState.of(obj)
            if state.missing_for(sha, accept_suspended) is None:
                return state
            failed = state.sync_failed(sha)
            if failed:
                raise TerminalError(
                    f"Argo CD application {name} cannot make commit {sha[:12]} live: {failed}",
                    hint="fix the values in Git (`modelctl plan` validates them against the chart's schema); the "
                    "pipeline reverts the failed commit so Argo CD goes back to the last good one",
                )
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
                    if seen.sync_failed(sha):
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
