"""The error hierarchy and the secret scrubber every message passes through."""

from __future__ import annotations

import pytest

from pipeline.errors import ConfigError, PipelineError, TerminalError, TransientError
from pipeline.secrets import has_credentials, redact


def test_terminal_and_transient_share_one_base_and_differ_in_retry() -> None:
    assert issubclass(TerminalError, PipelineError) and issubclass(TransientError, PipelineError)
    assert TerminalError("x").retryable is False
    assert TransientError("x").retryable is True
    assert issubclass(ConfigError, TerminalError)


def test_message_says_what_and_how_to_fix() -> None:
    error = TerminalError("the eval gate failed: acc dropped 0.12", hint="investigate the candidate")
    assert str(error) == "the eval gate failed: acc dropped 0.12\nFix: investigate the candidate"
    with pytest.raises(PipelineError, match="acc dropped"):
        raise error


def test_config_error_lists_every_problem() -> None:
    error = ConfigError("p.yaml", ["p.yaml:3: a: bad", "p.yaml:4: b: worse"])
    assert "2 configuration problems" in str(error)
    assert "  - p.yaml:4: b: worse" in str(error)


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("clone https://oauth2:glpat-abcdefgh1234@gitlab.example.com/x.git failed", "glpat-abcdefgh1234"),
        ("push to https://x-access-token:s3cretvalue@github.com/o/r.git", "s3cretvalue"),
        ("token hf_AbCdEfGhIjKlMnOp rejected", "hf_AbCdEfGhIjKlMnOp"),
        ("Authorization: Bearer abc.def.ghi", "abc.def.ghi"),
    ],
)
def test_redact_hides_credentials(text: str, secret: str) -> None:
    assert secret not in redact(text)
    assert "***" in redact(text)


def test_redact_hides_values_of_secret_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GITOPS_TOKEN", "plain-looking-token-value")
    assert redact("auth failed with plain-looking-token-value") == "auth failed with ***"
    assert redact("nothing secret here") == "nothing secret here"


def test_has_credentials() -> None:
    assert has_credentials("https://user:pw@host/repo.git")
    assert not has_credentials("https://host/repo.git")
    assert not has_credentials("git@github.com:org/repo.git")  # ssh user, no secret
