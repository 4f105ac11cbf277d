"""One promotion per environment in Prefect: a global concurrency limit named after the environment.

The limit (one slot) is created when missing. A second promotion of the same environment waits briefly for the
slot and is then refused with a TerminalError; on a cluster the Kubernetes Lease (pipeline.canary.guarded)
guards the same thing for promotions started outside this Prefect server.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from prefect import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectNotFound

from pipeline.errors import TerminalError


def limit_name(env: str) -> str:
    return f"modelctl-promote-{env}"


def ensure_limit(env: str) -> str:
    """Create the environment's one-slot concurrency limit if it does not exist yet; returns its name."""
    name = limit_name(env)
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
    return name


@contextmanager
def environment_slot(env: str, wait_s: float = 5.0) -> Iterator[None]:
    """Hold the environment's promotion slot for the block.

    Raises:
        TerminalError: another promotion of ``env`` holds the slot.
    """
    name = ensure_limit(env)
    try:
        with concurrency(name, occupy=1, timeout_seconds=wait_s, strict=True):
            yield
    except TimeoutError:
        raise TerminalError(
            f"another promotion of {env} is running (Prefect concurrency limit {name} is taken)",
            hint=f"wait for it to finish, or look at the running flow runs: `prefect concurrency-limit inspect {name}`",
        ) from None
