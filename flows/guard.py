"""One promotion per environment in the flows: the environment's lease file (pipeline.slot).

Prefect's global concurrency limit was dropped here: a slot it hands out is not given back when its holder is
killed (``kill -9``), so one crash locked the environment for good. The lease names its holder, host and pid, is
renewed while held and taken over once the holder is gone or the lease expired; ``modelctl lease release --env E``
frees it by hand. On a cluster the Kubernetes Lease (pipeline.canary.guarded) guards the same thing across machines.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from pipeline.errors import LeaseHeld
from pipeline.slot import environment_slot as lease_slot


def _flow_run() -> str:
    try:
        from prefect.runtime import flow_run

        return str(flow_run.id or "")
    except Exception:  # outside a flow run, or Prefect's runtime not importable: no name to add
        return ""


@contextmanager
def environment_slot(env: str, wait_s: float = 5.0, holder: str = "") -> Iterator[None]:
    """Hold the environment's promotion slot for the block, waiting up to ``wait_s`` for a finishing holder.

    Raises:
        LeaseHeld: another live promotion of ``env`` holds the slot (named, since when, and how to free it).
    """
    name = holder or (f"flow run {_flow_run()}" if _flow_run() else "modelctl promote")
    deadline = time.monotonic() + wait_s
    with ExitStack() as held:
        while True:
            try:
                held.enter_context(lease_slot(env, name, renew_every_s=60.0))
                break
            except LeaseHeld:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.2)  # a poll while another promotion finishes, not a timing
        yield
