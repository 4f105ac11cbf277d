"""Manual approval: a promotion to an environment that requires it pauses before its commit until a person
answers (in the Prefect UI, or with `modelctl approve RUN`); no answer within the timeout rejects it.
"""

from __future__ import annotations

from uuid import UUID

from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run, resume_flow_run
from prefect.input import RunInput

from pipeline.errors import TerminalError


class Approval(RunInput):
    """What the approver answers."""

    approved: bool = True
    approver: str
    comment: str = ""


def wait_for_approval(env: str, timeout_s: float, what: str) -> Approval:
    """Pause the current flow run until someone approves or rejects ``what``.

    Raises:
        TerminalError: rejected, or nobody answered within ``timeout_s``.
    """
    try:
        answer = pause_flow_run(
            wait_for_input=Approval.with_initial_data(approver=""), timeout=int(timeout_s), poll_interval=2
        )
    except FlowPauseTimeout:
        raise TerminalError(
            f"nobody approved {what} for {env} within {timeout_s:g}s: rejected",
            hint="start the promotion again and approve it in time (`modelctl approve RUN`)",
        ) from None
    if not answer.approved:
        raise TerminalError(f"{answer.approver or 'the approver'} rejected {what} for {env}: {answer.comment or '-'}")
    return answer


def approve(run_id: str, approver: str, comment: str = "", approved: bool = True) -> None:
    """Answer a paused promotion (what `modelctl approve` calls).

    Raises:
        TerminalError: ``run_id`` is not a flow run id.
    """
    try:
        flow_run = UUID(run_id)
    except ValueError:
        raise TerminalError(
            f"{run_id!r} is not a flow run id", hint="copy it from the Prefect UI or the logs"
        ) from None
    resume_flow_run(flow_run, run_input={"approved": approved, "approver": approver, "comment": comment})
