"""One error hierarchy for the whole pipeline.

A :class:`TerminalError` means "retrying will not help": bad input, a failed gate, a refused promotion.
A :class:`TransientError` means "the world may be different in a moment": network trouble, a 409 conflict,
a 5xx answer, a timeout. Flows retry the second kind with backoff and a bound, never the first.

Every message says what went wrong, why, and what to do about it, and never carries a secret.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base of every error the pipeline raises on purpose.

    Args:
        what: one sentence naming what failed.
        hint: what the user should do about it (optional, appended as "Fix: ...").
    """

    retryable: bool = False

    def __init__(self, what: str, *, hint: str | None = None) -> None:
        self.what = what
        self.hint = hint
        super().__init__(self.__str__())

    def __str__(self) -> str:
        if self.hint:
            return f"{self.what}\nFix: {self.hint}"
        return self.what


class TerminalError(PipelineError):
    """Bad input or a failed gate: never retried."""

    retryable = False


class TransientError(PipelineError):
    """Network trouble, conflicts, 5xx, timeouts: retried with backoff and a bound."""

    retryable = True


class Decided(TerminalError):
    """The promotion ended by its own decision: a gate refused the candidate, or its canary was reverted. The
    finished record's summary says what decided, so a command shows that instead of its log's tail."""


class NotFound(TerminalError):
    """404: the object (or the kind: a missing CRD) is not there. Callers that expect absence catch this only."""


class Forbidden(TerminalError):
    """401/403: the identity the pipeline runs as may not do this; an RBAC grant (or a credential) is missing.

    ``verb``, ``resource`` (``plural[/subresource]``), ``group``, ``namespace`` ("" at the cluster scope) and
    ``user`` come from the API server's answer when it names them.
    """

    def __init__(
        self,
        what: str,
        *,
        hint: str | None = None,
        verb: str = "",
        resource: str = "",
        group: str = "",
        namespace: str = "",
        user: str = "",
    ) -> None:
        self.verb, self.resource, self.group, self.namespace, self.user = verb, resource, group, namespace, user
        super().__init__(what, hint=hint)


class LeaseHeld(TerminalError):
    """Another promotion holds the environment's slot: ``holder`` (who, on which host and pid) since ``since``."""

    def __init__(self, what: str, *, holder: str, since: str, hint: str | None = None) -> None:
        self.holder, self.since = holder, since
        super().__init__(what, hint=hint)


class Conflict(TransientError):
    """409: the object changed (or already exists) under us; the operation re-reads and tries again."""


class ConfigError(TerminalError):
    """A configuration file is unreadable or invalid.

    ``problems`` holds one line per finding, each naming the file, the key and what is expected.
    """

    def __init__(self, path: str, problems: list[str], *, hint: str | None = None) -> None:
        self.path = path
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        count = len(self.problems)
        noun = "problem" if count == 1 else "problems"
        super().__init__(f"{path}: {count} configuration {noun}:\n{lines}", hint=hint)


def first_problem(exc: Exception) -> str:
    """``key.path: message`` of the first finding of a pydantic ValidationError (for one-line error messages)."""
    errors = getattr(exc, "errors", None)
    if not callable(errors) or not errors():
        return str(exc)
    first = errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "(top level)"
    return f"{key}: {first['msg']}"
