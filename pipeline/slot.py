"""One promotion per environment on this machine: a lease file that a killed process cannot hold forever.

``<root>/leases/<env>.json`` names the holder (the promotion id), host, pid (with the process's start time, so a
reused pid is not mistaken for the holder) and an expiry. A new promotion takes the slot when it is free, when
its holder's process is gone (same host), or when the lease expired (a holder on another host, or a hung one).
The holder renews the lease while it works. Reading, deciding and writing happen under a short ``flock``, so two
starters never both win. The clock is replaceable: tests move time instead of waiting.

On a cluster the Kubernetes Lease (pipeline.kube.lease) plays this part across machines.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from pipeline.errors import LeaseHeld, TerminalError

Clock = Callable[[], float]
DEFAULT_TTL_S = 600.0


def default_root() -> Path:
    """Where this machine's promotion leases live: ``$MODELCTL_CACHE/leases`` (beside the GitOps clones)."""
    return Path(os.environ.get("MODELCTL_CACHE") or Path.home() / ".cache" / "modelctl") / "leases"


def process_start(pid: int) -> str:
    """The start time of process ``pid`` (clock ticks since boot, from /proc), "" when it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    fields = stat.rsplit(")", 1)[-1].split()
    return "" if fields[0] in ("Z", "X") else fields[19]


@dataclass(frozen=True)
class Lease:
    """Who holds an environment's slot, where, and until when (epoch seconds)."""

    env: str
    holder: str
    host: str
    pid: int
    started: str
    since: float
    expires: float

    def describe(self) -> str:
        return f"{self.holder} (pid {self.pid} on {self.host})"

    def since_text(self) -> str:
        return datetime.fromtimestamp(self.since, UTC).isoformat(timespec="seconds")


class Slot:
    """The promotion slot of one environment, kept in a lease file under ``root``."""

    def __init__(self, env: str, root: Path | None = None, *, ttl_s: float = DEFAULT_TTL_S, clock: Clock = time.time):
        self.env = env
        self.root = root or default_root()
        self.ttl_s = ttl_s
        self.clock = clock
        self.path = self.root / f"{env}.json"

    @contextmanager
    def _guard(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f"{self.env}.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # held for a read and a write: milliseconds
            yield

    def current(self) -> Lease | None:
        """The lease as written (live or not), or None."""
        try:
            return Lease(**json.loads(self.path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def stale(self, lease: Lease) -> str:
        """Why ``lease`` no longer holds the slot ("" while it does): expired, or its process is gone."""
        if lease.expires <= self.clock():
            return "its lease expired"
        if lease.host == socket.gethostname() and process_start(lease.pid) != lease.started:
            return f"its process {lease.pid} is gone"
        return ""

    def _write(self, lease: Lease) -> None:
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(asdict(lease)))
        os.replace(tmp, self.path)

    def acquire(self, holder: str) -> Lease:
        """Take the slot for ``holder``, taking over a dead or expired holder's lease.

        Raises:
            LeaseHeld: a live holder has it (named, with since when and how to free it).
        """
        pid = os.getpid()
        with self._guard():
            now, held = self.clock(), self.current()
            if held is not None and not self.stale(held):  # also our own process: one promotion at a time
                raise LeaseHeld(
                    f"another promotion of {self.env} is running: {held.describe()}, since {held.since_text()}",
                    holder=held.describe(),
                    since=held.since_text(),
                    hint=f"wait for it to finish; if it is not running any more, free the slot with "
                    f"`modelctl lease release --env {self.env}`",
                )
            lease = Lease(self.env, holder, socket.gethostname(), pid, process_start(pid), now, now + self.ttl_s)
            self._write(lease)
            return lease

    def renew(self, lease: Lease) -> Lease:
        """Push the expiry of our own lease out by the ttl.

        Raises:
            TerminalError: the lease was taken over meanwhile (we were presumed dead).
        """
        with self._guard():
            held = self.current()
            if held is None or (held.holder, held.pid, held.host) != (lease.holder, lease.pid, lease.host):
                raise TerminalError(
                    f"the promotion slot of {self.env} was taken over by "
                    f"{held.describe() if held else 'nobody'} while {lease.holder} held it",
                    hint="this promotion was presumed dead (its lease expired); run it again once the other ends",
                )
            renewed = Lease(**{**asdict(held), "expires": self.clock() + self.ttl_s})
            self._write(renewed)
            return renewed

    def release(self, lease: Lease | None = None) -> Lease | None:
        """Free the slot: only ``lease``'s own hold when given, else whoever holds it. Returns what was freed."""
        with self._guard():
            held = self.current()
            if held is None:
                return None
            if lease is not None and (held.holder, held.pid, held.host) != (lease.holder, lease.pid, lease.host):
                return None
            self.path.unlink(missing_ok=True)
            return held


@contextmanager
def environment_slot(
    env: str,
    holder: str,
    root: Path | None = None,
    *,
    ttl_s: float = DEFAULT_TTL_S,
    clock: Clock = time.time,
    renew_every_s: float | None = None,
) -> Iterator[Lease]:
    """Hold ``env``'s promotion slot for the block, renewing it in the background; always release it.

    Raises:
        LeaseHeld: another live promotion holds it.
    """
    slot = Slot(env, root, ttl_s=ttl_s, clock=clock)
    lease = slot.acquire(holder)
    stop = threading.Event()

    def heartbeat() -> None:
        nonlocal lease
        while not stop.wait(renew_every_s or ttl_s / 3):
            try:
                lease = slot.renew(lease)
            except TerminalError:
                return

    beat = threading.Thread(target=heartbeat, name=f"lease-{env}", daemon=True)
    beat.start()
    try:
        yield lease
    finally:
        stop.set()
        beat.join()
        slot.release(lease)
