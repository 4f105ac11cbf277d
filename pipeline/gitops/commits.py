"""What a pipeline commit says: the Promotion it applies, its subject and trailers, and history read back from them.

Trailers, not files, are the index: ``git log`` over trailers answers history and current state in one process.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pipeline.errors import TerminalError
from pipeline.record import PROMOTION_ID_PATTERN, new_promotion_id
from pipeline.secrets import redact

CHART = "charts/llm-inference"
RECORDS = "records"
_SEP, _END = "\x1f", "\x1e"
LOG_FORMAT = _SEP.join(("%H", "%an <%ae>", "%ct", "%s", "%(trailers:only,unfold)")) + _END


def one_line(text: str) -> str:
    """``text`` on one line, secrets scrubbed: safe for a subject or a trailer."""
    return redact(" ".join(str(text).split()))


class Promotion(BaseModel):
    """What one promotion writes into an environment's values, and the evidence its commit message carries."""

    model_config = ConfigDict(frozen=True)

    id: str = Field(default_factory=new_promotion_id, pattern=PROMOTION_ID_PATTERN)
    env: str
    model: str = Field(description="source repo (org/name or a local path)")
    revision: str = Field(description="the source's pinned 40-hex commit sha")
    artifact: str
    format: str = ""
    quantization: str = "none"
    served_name: str | None = None
    replicas: int | None = None
    canary_steps: list[dict[str, Any]] | None = None
    scale: dict[str, Any] = Field(
        default_factory=dict, description="values keys sizing the environment (the capacity plan's replicas)"
    )
    eval: str = Field("", description="one line: the eval gate's verdict")
    latency: str = Field("", description="one line: the load gate's verdict")
    flow_run: str = ""

    @classmethod
    def from_ref(cls, ref: str, env: str, artifact: str, revision: str | None = None, **more: Any) -> Promotion:
        """A promotion of ``org/name@<40-hex sha>`` (or ``org/name`` with ``revision``) to ``env``.

        Raises:
            TerminalError: the revision is missing or not a pinned 40-hex commit sha.
        """
        model, _, at = ref.partition("@")
        pinned = revision or at
        if not re.fullmatch(r"[0-9a-f]{40}", pinned or ""):
            raise TerminalError(
                f"{ref}: the revision {pinned or '(none)'!r} is not a pinned 40-hex commit sha",
                hint="pass REF as org/name@<40-hex sha>, or --revision <sha>; values in Git never carry a branch name",
            )
        return cls(env=env, model=model, revision=pinned, artifact=artifact, **more)

    def changes(self) -> dict[str, Any]:
        """The values keys (dotted) this promotion sets."""
        keys: dict[str, Any] = {
            "model.repo": self.model,
            "model.revision": self.revision,
            "model.artifact": self.artifact,
            "model.format": self.format,
            "model.quantization": self.quantization,
        }
        if self.served_name is not None:
            keys["model.servedName"] = self.served_name
        if self.replicas is not None:
            keys["replicas"] = self.replicas
        if self.canary_steps is not None:
            keys["canary.steps"] = self.canary_steps
        keys.update(self.scale)
        return keys

    def subject(self) -> str:
        return one_line(f"promote({self.env}): {self.model}@{self.revision[:12]} {self.format or '-'} {self.artifact}")

    def trailers(self) -> dict[str, str]:
        return {
            "Promotion-Id": self.id, "Environment": self.env, "Action": "promote", "Model": self.model,
            "Revision": self.revision, "Artifact": self.artifact, "Format": self.format, "Eval": self.eval,
            "Latency": self.latency, "Flow-Run": self.flow_run,
        }  # fmt: skip


@dataclass(frozen=True)
class Plan:
    """The values change a promotion would commit, without committing it."""

    env: str
    values_file: str
    subject: str
    diff: str
    changed: dict[str, tuple[Any, Any]]

    @property
    def current(self) -> bool:
        """True when the environment already runs exactly this: promoting would be a skip."""
        return not self.changed


@dataclass(frozen=True)
class CommitResult:
    """What a promote or revert did: the commit, whether it was a skip, and where it was pushed."""

    env: str
    promotion_id: str
    commit: str
    subject: str
    skipped: bool = False
    pushed: bool = False
    branch: str = ""
    attempts: int = 0


@dataclass(frozen=True)
class HistoryEntry:
    """One pipeline commit, read from its trailers."""

    commit: str
    author: str
    timestamp: int
    subject: str
    promotion_id: str
    env: str
    action: str
    model: str = ""
    revision: str = ""
    artifact: str = ""
    format: str = ""
    eval: str = ""
    latency: str = ""
    flow_run: str = ""
    reverts: str = ""


_TRAILER_FIELDS = {
    "Promotion-Id": "promotion_id", "Environment": "env", "Action": "action", "Model": "model",
    "Revision": "revision", "Artifact": "artifact", "Format": "format", "Eval": "eval", "Latency": "latency",
    "Flow-Run": "flow_run", "Reverts": "reverts",
}  # fmt: skip


@dataclass
class Pending:
    """A local commit not yet on the remote, and how to redo it on a newer tip."""

    env: str
    promotion_id: str
    values_file: str
    keys: list[str]
    base: str
    commit: str
    subject: str
    redo: Callable[[], Pending | CommitResult] = field(repr=False)

    def result(self, *, pushed: bool, branch: str, attempts: int) -> CommitResult:
        return CommitResult(self.env, self.promotion_id, self.commit, self.subject, False, pushed, branch, attempts)


def parse_log(text: str) -> list[HistoryEntry]:
    """History entries from ``git log --format=LOG_FORMAT`` output; commits without pipeline trailers are skipped."""
    entries = []
    for chunk in text.split(_END):
        parts = chunk.strip("\n").split(_SEP)
        if len(parts) != 5:
            continue
        found: dict[str, str] = {}
        for line in parts[4].splitlines():
            key, _, value = line.partition(": ")
            if key in _TRAILER_FIELDS:
                found[_TRAILER_FIELDS[key]] = value
        if "promotion_id" in found and "env" in found:
            found.setdefault("action", "promote")
            entries.append(HistoryEntry(parts[0], parts[1], int(parts[2]), parts[3], **found))
    return entries


def live_promotions(entries: list[HistoryEntry]) -> list[HistoryEntry]:
    """The promotions not (yet) reverted, newest first, from an environment's history (newest first)."""
    reverted = {e.reverts for e in entries if e.action == "revert"}
    return [e for e in entries if e.action == "promote" and e.promotion_id not in reverted]


def rollback_targets(entries: list[HistoryEntry], to: str | None = None) -> list[HistoryEntry]:
    """The promotions to revert, newest first, to go back one promotion (``to`` None) or to promotion ``to``.

    Raises:
        TerminalError: nothing is live to roll back, or ``to`` is not a live promotion of this environment.
    """
    live = live_promotions(entries)
    if not live:
        raise TerminalError("there is no live promotion to roll back", hint="`modelctl history --env ENV` shows why")
    if to is None:
        return live[:1]
    ids = [e.promotion_id for e in live]
    if to not in ids:
        raise TerminalError(
            f"{to} is not a live promotion of this environment (live: {', '.join(ids[:5])})",
            hint="pick a promotion id from `modelctl history --env ENV` that has not been reverted",
        )
    return live[: ids.index(to)]
