"""Credentials and failures at the door to the remote: tokens travel as a header, errors come back scrubbed."""

from __future__ import annotations

import base64
import os

from git import GitCommandError

from pipeline.errors import PipelineError, TerminalError, TransientError
from pipeline.secrets import redact


def secrets_of(token_env: str) -> tuple[str, ...]:
    token = os.environ.get(token_env, "")
    if not token:
        return ()
    return token, base64.b64encode(f"x-access-token:{token}".encode()).decode()


def auth_env(url: str, token_env: str) -> dict[str, str]:
    """Environment for git children: never prompt; an https token goes in a header, never a URL or config file."""
    env = {"GIT_TERMINAL_PROMPT": "0"}
    found = secrets_of(token_env)
    if found and url.startswith(("https://", "http://")):
        env |= {"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "http.extraHeader"}
        env["GIT_CONFIG_VALUE_0"] = f"Authorization: Basic {found[1]}"
    return env


# What a remote says when it will never take this push: retrying cannot help, so these are terminal.
_READ_ONLY = (
    "unpacker error",
    "unpack failed",
    "insufficient permission",
    "unable to create temporary",
    "read-only file system",
    "protected branch",
    "write access",
    "not allowed to push",
    " 401",
)


def classify(exc: GitCommandError, what: str, url: str, token_env: str) -> PipelineError:
    """A git failure as a terminal (credentials, a read-only remote, missing repo) or transient (network, races)
    error, scrubbed. A permission problem is never transient."""
    raw = " ".join(str(exc.stderr or "").split()).removeprefix("stderr: ").strip("' ")
    detail = redact(raw.replace("fatal: ", "").replace("error: ", ""), extra=secrets_of(token_env))
    lower = detail.lower()
    if any(s in lower for s in ("authentication failed", "could not read username", "permission denied", " 403")):
        return TerminalError(
            f"{what}: the remote refused the credentials ({detail})",
            hint=f"set ${token_env} to a token with write access (https) or check the ssh key (ssh)",
        )
    if any(s in lower for s in _READ_ONLY):
        return TerminalError(
            f"{what}: the remote refused to take the push, it is read-only for modelctl ({detail})",
            hint="give modelctl write access to gitops.url: the file permissions of a local repo, the token's "
            f"scope in ${token_env}, or the branch protection rules; retrying will not help",
        )
    if any(s in lower for s in ("does not appear to be a git repository", "not found", "no such", "does not exist")):
        return TerminalError(
            f"{what}: {detail}", hint="check gitops.url, or create the repo with `modelctl gitops init PATH`"
        )
    return TransientError(f"{what}: {detail or type(exc).__name__}", hint="check the remote and try again")
