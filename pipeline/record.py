"""PromotionRecord: what a promotion decided and why, as JSON (stored in Git) and markdown (for people).

The record is written beside the environment's values in the GitOps repo (``records/<env>/<id>.json``), so the
history of promotions and the next eval baseline come from Git. Types built elsewhere (ModelSource, Artifact,
EvalReport, LoadReport, RolloutOutcome) are kept as plain JSON objects here until they exist.

Example:
    >>> record = PromotionRecord(id=new_promotion_id(), env="prod", decision="promoted")
    >>> PromotionRecord.from_json(record.to_json()) == record
    True
"""

from __future__ import annotations

import json
import secrets
import time
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.errors import TerminalError, first_problem
from pipeline.gates import GateResult
from pipeline.secrets import redact

Decision = Literal["pending", "promoted", "rejected", "reverted", "skipped", "failed"]

# Crockford's base32: no I, L, O, U; sorts the same as the numbers it encodes.
_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
PROMOTION_ID_PATTERN = r"^[0-9a-hjkmnp-tv-z]{16}$"


def new_promotion_id(now_ms: int | None = None) -> str:
    """A short (16 characters), unique, time-sortable id: 10 characters of milliseconds, 6 random.

    Ids made later sort later (to the millisecond), so records listed by name come out in time order.
    """
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    stamp = "".join(_ALPHABET[(ms >> (5 * i)) & 31] for i in reversed(range(10)))
    rand = secrets.randbits(30)
    tail = "".join(_ALPHABET[(rand >> (5 * i)) & 31] for i in reversed(range(6)))
    return stamp + tail


def promotion_id_time(promotion_id: str) -> datetime:
    """When the promotion id was made (UTC, to the millisecond)."""
    ms = 0
    for char in promotion_id[:10]:
        ms = ms * 32 + _ALPHABET.index(char)
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


class PromotionRecord(BaseModel):
    """One promotion of one model revision to one environment: the evidence, the decision, the timings."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=PROMOTION_ID_PATTERN)
    env: str
    decision: Decision = "pending"
    reason: str = ""
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    model: dict[str, Any] | None = Field(None, description="ModelSource: repo, sha, files, license")
    artifact: dict[str, Any] | None = Field(None, description="Artifact: id, format, recipe, manifest")
    eval_report: dict[str, Any] | None = None
    eval_gate: GateResult | None = None
    load_report: dict[str, Any] | None = None
    load_gate: GateResult | None = None
    rollout: dict[str, Any] | None = Field(None, description="RolloutOutcome: steps and the final state")
    commit: str | None = None
    reverts: str | None = Field(None, description="the promotion id this record reverts, for a revert")
    flow_run: str | None = None
    timings: dict[str, float] = Field(default_factory=dict, description="seconds per step")

    def to_json(self) -> str:
        """The record as indented JSON, secrets scrubbed (it is committed to Git and read by people)."""
        return redact(self.model_dump_json(indent=2)) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "record") -> PromotionRecord:
        """Parse a stored record.

        Raises:
            TerminalError: the text is not a valid record (``where`` names it in the message).
        """
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise TerminalError(
                f"{where} is not a valid PromotionRecord: {first_problem(exc)}",
                hint="records are written by modelctl; restore the file from Git history",
            ) from None

    def markdown(self) -> str:
        """A markdown summary for people: what, where, the decision and why, the gates, the timings."""
        model = self.model or {}
        artifact = self.artifact or {}
        lines = [
            f"## Promotion {self.id} to {self.env}: {self.decision}",
            "",
            "| | |",
            "| --- | --- |",
            f"| model | {model.get('repo', '-')}@{str(model.get('sha', '-'))[:12]} |",
            f"| artifact | {artifact.get('id', '-')} ({artifact.get('format', '-')}) |",
            f"| commit | {self.commit or '-'} |",
            f"| created | {self.created_at.isoformat(timespec='seconds')} |",
        ]
        if self.reverts:
            lines.append(f"| reverts | {self.reverts} |")
        if self.flow_run:
            lines.append(f"| flow run | {self.flow_run} |")
        if self.reason:
            lines += ["", f"**Why:** {self.reason}"]
        for gate in (self.eval_gate, self.load_gate):
            if gate is not None:
                lines += ["", gate.markdown().rstrip()]
        if self.timings:
            lines += ["", "| step | seconds |", "| --- | --- |"]
            lines += [f"| {step} | {seconds:.1f} |" for step, seconds in self.timings.items()]
        return redact("\n".join(lines)) + "\n"

    def summary(self) -> dict[str, Any]:
        """The few fields a history table shows."""
        return json.loads(self.model_dump_json(include={"id", "env", "decision", "reason", "commit", "created_at"}))
