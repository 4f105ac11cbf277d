"""PromotionRecord: what a promotion decided and why, as JSON (stored in Git) and markdown (for people).

The record is written beside the environment's values in the GitOps repo (``records/<env>/<id>.json``), so the
history of promotions and the next eval baseline come from Git. Every part is typed: the pinned ModelSource, a
summary of the Artifact (with the manifest digest of its bytes), the EvalReport and LoadReport with their
GateResults, and the RolloutOutcome of the canary (defined here, so a record never needs the Kubernetes door).

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

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline.errors import TerminalError, first_problem
from pipeline.evaluate.report import EvalReport
from pipeline.gates import GateResult, Verdict
from pipeline.loadtest.capacity import CapacityReport
from pipeline.loadtest.capacity_plan import CapacityPlan
from pipeline.loadtest.report import LoadReport
from pipeline.quantize.recipe import Artifact, Recipe
from pipeline.secrets import redact
from pipeline.source import ModelSource
from pipeline.verify import VerifyResult

Decision = Literal["pending", "waiting", "promoted", "rejected", "reverted", "skipped", "failed"]

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


class StepEvent(BaseModel):
    """One thing the canary driver did, with why: what the record's canary table (the timeline) shows.

    ``weight`` is the canary weight in force at that step; a check event also keeps the figures its verdict came
    from (row name -> value; a row compared with a baseline adds ``"<name> baseline"``, e.g. stable's TTFT p95)
    and the verdict. Records written before these fields existed read them as None.
    """

    at: str
    action: Literal["synced", "check", "promote", "abort", "done", "revert"]
    reason: str
    seconds: float
    weight: int | None = Field(None, description="the canary weight (%) in force at this step")
    figures: dict[str, float | None] | None = Field(None, description="a check's figures: row name -> value")
    verdict: Verdict | None = Field(None, description="a check's verdict: pass, fail or inconclusive")


class RevertResult(BaseModel):
    """How a revert went, with the time of each stage measured from the failure."""

    promotion_id: str
    revert_commit: str
    aborted: bool = Field(False, description="whether an update was in flight, so the Rollout was aborted first")
    pushed: bool
    timings: dict[str, float] = Field(default_factory=dict)


class RolloutOutcome(BaseModel):
    """Where a promotion ended after the commit: done, or reverted (and why)."""

    final: Literal["done", "reverted"]
    reason: str
    steps: list[StepEvent] = Field(default_factory=list)
    revert: RevertResult | None = None


class ArtifactSummary(BaseModel):
    """What a record keeps of the artifact: its identity (id), its bytes (manifest digest) and how it was built."""

    id: str
    format: str = ""
    backend: str | None = None
    recipe: Recipe | None = None
    calibration_sha256: str | None = None
    manifest_digest: str | None = Field(None, description="sha256 over every file's sha256: the bytes evaluated")
    uri: str | None = Field(None, description="where the artifact store keeps the bytes")

    @classmethod
    def of(cls, artifact: Artifact, manifest_digest: str | None = None, uri: str | None = None) -> ArtifactSummary:
        return cls(
            id=artifact.id,
            format=artifact.format,
            backend=artifact.backend,
            recipe=artifact.recipe,
            calibration_sha256=artifact.calibration_sha256,
            manifest_digest=manifest_digest,
            uri=uri,
        )


class GuardedChange(BaseModel):
    """A change to an environment's values that the pipeline did not make, as `modelctl guard` found it."""

    commit: str = Field(description="the commit the guard picked up")
    author: str = Field(description="its author, as Git names them")
    subject: str = ""
    vetted: bool = Field(description="false: nothing could be checked (unpinned, or not in the store): unvetted")
    fast_path: bool = Field(False, description="back to an artifact that ran here and passed: canary checks only")


class PromotionRecord(BaseModel):
    """One promotion of one model revision to one environment: the evidence, the decision, the timings."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=PROMOTION_ID_PATTERN)
    env: str
    decision: Decision = "pending"
    reason: str = ""
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    model: ModelSource | None = Field(None, description="the pinned source: repo, sha, files, license")
    artifact: ArtifactSummary | None = None
    verify: VerifyResult | None = Field(None, description="the artifact loaded and answered in the serving engine")
    served_by: str | None = Field(None, description="the engine and release that served the gates: vllm 0.32.0")
    serving_fallback: str | None = Field(None, description="why the gates were not served by vLLM here, if not")
    eval_report: EvalReport | None = None
    eval_gate: GateResult | None = None
    load_report: LoadReport | None = None
    load_gate: GateResult | None = None
    capacity_report: CapacityReport | None = Field(None, description="candidate and incumbent goodput sweeps")
    capacity_gate: GateResult | None = None
    capacity_plan: CapacityPlan | None = Field(None, description="replicas, GPUs and cost at the peak rate")
    rollout: RolloutOutcome | None = None
    commit: str | None = None
    branch: str | None = Field(None, description="the pull-request branch, when the GitOps repo takes them")
    reverts: str | None = Field(None, description="the promotion id this record reverts, for a revert")
    flow_run: str | None = None
    timings: dict[str, float] = Field(default_factory=dict, description="seconds per step")
    guarded: GuardedChange | None = Field(None, description="set when the guard vetted a person's change")

    @field_validator("model", mode="before")
    @classmethod
    def _short_model(cls, value: Any) -> Any:
        """A record written from a commit alone names only repo and sha: the rest of the source is unknown."""
        if isinstance(value, dict) and "kind" not in value:
            return {"kind": "local" if str(value.get("repo", "")).startswith("/") else "hub", "files": [], **value}
        return value

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
        artifact = self.artifact or ArtifactSummary(id="-")
        lines = [
            f"## Promotion {self.id} to {self.env}: {self.decision}",
            "",
            "| | |",
            "| --- | --- |",
            f"| model | {self.model.ref if self.model else '-'} |",
            f"| artifact | {artifact.id} ({artifact.format or '-'}) |",
            f"| bytes | {artifact.manifest_digest or '-'} |",
            f"| commit | {self.commit or '-'} |",
            f"| created | {self.created_at.isoformat(timespec='seconds')} |",
        ]
        if self.reverts:
            lines.append(f"| reverts | {self.reverts} |")
        if self.flow_run:
            lines.append(f"| flow run | {self.flow_run} |")
        if self.reason:
            lines += ["", f"**Why:** {self.reason}"]
        if self.served_by:
            why = f": {self.serving_fallback}" if self.serving_fallback else ""
            lines += ["", f"**Served by:** {self.served_by}{why}"]
        for gate in (self.eval_gate, self.load_gate, self.capacity_gate):
            if gate is not None:
                lines += ["", gate.markdown().rstrip()]
        if self.capacity_plan is not None:
            lines += ["", self.capacity_plan.markdown().rstrip()]
        if self.rollout is not None:
            lines += ["", f"**Canary:** {self.rollout.final}: {self.rollout.reason}"]
        if self.timings:
            lines += ["", "| step | seconds |", "| --- | --- |"]
            lines += [f"| {step} | {seconds:.1f} |" for step, seconds in self.timings.items()]
        return redact("\n".join(lines)) + "\n"

    def summary(self) -> dict[str, Any]:
        """The few fields a history table shows."""
        return json.loads(self.model_dump_json(include={"id", "env", "decision", "reason", "commit", "created_at"}))
