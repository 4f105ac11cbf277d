"""What every step shares: a typed request, a typed result, and the boundary between them and a process.

A request carries everything its step needs (no step reads configuration or globals); a result says how the
step ended (succeeded, skipped because its output already existed, or failed), when, how long it took, and the
typed output. In this process a failure is an exception (TerminalError / TransientError); across a process
boundary (a Kubernetes Job) it travels as a failed result and becomes the same exception again on the other side.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from pipeline.errors import PipelineError, TerminalError, TransientError

T = TypeVar("T")
Status = Literal["succeeded", "skipped", "failed"]


class StepRequest(BaseModel):
    """Base of every request: frozen, and unknown fields are errors (a field dropped or misspelt must show)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class StepFailure(BaseModel):
    """A failure as it crosses a process boundary: its kind decides whether a retry may help."""

    kind: Literal["terminal", "transient"]
    what: str
    hint: str | None = None

    @classmethod
    def of(cls, exc: PipelineError) -> StepFailure:
        return cls(kind="transient" if isinstance(exc, TransientError) else "terminal", what=exc.what, hint=exc.hint)

    def error(self) -> PipelineError:
        kind = TransientError if self.kind == "transient" else TerminalError
        return kind(self.what, hint=self.hint)


class StepResult(BaseModel, Generic[T]):
    """How a step ended, with its typed output (None only when it failed)."""

    step: str
    status: Status
    started_at: datetime
    seconds: float = Field(ge=0)
    output: T | None = None
    failure: StepFailure | None = None

    def value(self) -> T:
        """The output.

        Raises:
            TerminalError / TransientError: the step failed (the error it failed with).
        """
        if self.failure is not None or self.output is None:
            raise (self.failure.error() if self.failure else TerminalError(f"step {self.step} returned no output"))
        return self.output


Clock = Callable[[], float]


def timed(step: str, work: Callable[[], tuple[T, bool]], clock: Clock = time.perf_counter) -> StepResult[T]:
    """Run ``work`` (returning its output and whether it was a skip) and wrap it in a result; errors propagate."""
    started_at, t0 = datetime.now(UTC), clock()
    output, skipped = work()
    seconds = round(max(0.0, clock() - t0), 3)
    return StepResult[Any](
        step=step, status="skipped" if skipped else "succeeded", started_at=started_at, seconds=seconds, output=output
    )


def failed(step: str, exc: PipelineError, started_at: datetime, seconds: float) -> StepResult[Any]:
    """The result a process prints when its step failed."""
    return StepResult[Any](
        step=step, status="failed", started_at=started_at, seconds=round(seconds, 3), failure=StepFailure.of(exc)
    )
