"""One promotion per environment: a coordination.k8s.io Lease."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from pipeline.errors import NotFound, PipelineError, TerminalError, TransientError
from pipeline.kube.client import KubeClient, parse_time


@dataclass(frozen=True)
class LeaseHold:
    """A held promotion lease: who holds it, since when, and the version to renew against."""

    name: str
    namespace: str
    holder: str
    acquired_at: datetime
    duration_s: int
    resource_version: str


class Leases(KubeClient):
    """One promotion per environment: a coordination.k8s.io Lease, renewed while held."""

    # Wall-clock time of the Lease stamps (renewTime, expiry); a test replaces it to expire a Lease at once.
    now: Callable[[], datetime] = staticmethod(lambda: datetime.now(UTC))

    def lease_holder(self, env: str, namespace: str) -> str | None:
        """Who holds ``env``'s live promotion Lease, and since when; None when it is free or expired."""
        name = f"modelctl-promotion-{env}"
        try:
            lease = self.read(
                f"read the promotion Lease of {env!r}", self.coordination.read_namespaced_lease, name, namespace
            )
        except NotFound:  # never held (a 403 is raised: it says which grant is missing, never "free")
            return None
        spec = lease.get("spec") or {}
        holder, renewed = spec.get("holderIdentity"), spec.get("renewTime") or spec.get("acquireTime")
        if not holder or not renewed:
            return None
        expires = parse_time(renewed) + timedelta(seconds=spec.get("leaseDurationSeconds") or 0)
        return f"{holder} since {spec.get('acquireTime')}" if expires > self.now() else None

    def acquire_lease(self, env: str, namespace: str, holder: str, duration_s: int = 60) -> LeaseHold:
        """Take the promotion lease of ``env``: create it, renew our own, or take over an expired one.

        Raises:
            TerminalError: someone else holds a live lease (the message names them and since when).
        """
        name, what = f"modelctl-promotion-{env}", f"take the promotion Lease of {env!r}"

        def attempt() -> LeaseHold:
            now = self.now()
            stamp = now.isoformat(timespec="microseconds")
            try:
                lease = self.read(what, self.coordination.read_namespaced_lease, name, namespace)
            except NotFound:  # nobody has held it yet (only a 404 means that; a 403 is raised as it is)
                spec = {"holderIdentity": holder, "leaseDurationSeconds": duration_s, "acquireTime": stamp}
                body = {"metadata": {"name": name}, "spec": {**spec, "renewTime": stamp, "leaseTransitions": 0}}
                created = self.read(what, self.coordination.create_namespaced_lease, namespace, body)
                return LeaseHold(name, namespace, holder, now, duration_s, created["metadata"]["resourceVersion"])
            spec = lease.setdefault("spec", {})
            other, acquired = spec.get("holderIdentity"), spec.get("acquireTime")
            renewed = spec.get("renewTime") or acquired
            expires = parse_time(renewed) + timedelta(seconds=spec.get("leaseDurationSeconds") or 0) if renewed else now
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
            since = parse_time(spec["acquireTime"])
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
            lease["spec"]["renewTime"] = self.now().isoformat(timespec="microseconds")
            renewed = self.read(what, self.coordination.replace_namespaced_lease, hold.name, hold.namespace, lease)
            return replace(hold, resource_version=renewed["metadata"]["resourceVersion"])

        return self._retry_conflicts(what, attempt)

    def release_lease(self, hold: LeaseHold) -> bool:
        """Delete the lease if we still hold it (only that version of it); False when it is not ours any more."""
        what = f"release Lease {hold.namespace}/{hold.name}"
        try:
            lease = self.read(what, self.coordination.read_namespaced_lease, hold.name, hold.namespace)
        except NotFound:  # already gone
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
