"""Keep secrets out of everything a person or a log can see.

Tokens reach the pipeline only through the environment (or Kubernetes Secrets). Anything that turns a value
into text for a human (error messages, logs, records, commit messages, remotes shown to users) passes it
through :func:`redact` first.
"""

from __future__ import annotations

import os
import re

# userinfo in a URL: scheme://user:password@host or scheme://token@host
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")
# well-known token shapes: Hugging Face, GitHub, GitLab, generic bearer headers
_TOKEN_SHAPES = re.compile(
    r"\b(hf_[A-Za-z0-9]{8,}|gh[pousr]_[A-Za-z0-9]{8,}|github_pat_[A-Za-z0-9_]{8,}|glpat-[A-Za-z0-9_-]{8,})"
)
_BEARER = re.compile(r"(?i)(authorization:\s*bearer\s+)\S+")

REDACTED = "***"

# Environment variables whose values are secrets wherever they appear.
SECRET_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "GITOPS_TOKEN", "GIT_TOKEN", "GITHUB_TOKEN")


def has_credentials(url: str) -> bool:
    """True when ``url`` carries user information (a token or password) before the host."""
    return bool(_URL_USERINFO.search(url))


def redact(text: str, extra: tuple[str, ...] = ()) -> str:
    """Return ``text`` with URL credentials, token-shaped strings and known secret values replaced.

    ``extra`` names further secret values to hide (for example a token read from a custom variable).
    """
    out = _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", text)
    out = _TOKEN_SHAPES.sub(REDACTED, out)
    out = _BEARER.sub(lambda m: f"{m.group(1)}{REDACTED}", out)
    values = [os.environ.get(name, "") for name in SECRET_ENV_VARS] + list(extra)
    for value in values:
        if len(value) >= 6:  # shorter strings would redact ordinary words
            out = out.replace(value, REDACTED)
    return out
