"""An https-style remote guarded by a token: promotions land, and the token shows up nowhere a person can see.

The remote is a real ``git http-backend`` behind a small HTTP server on 127.0.0.1 that demands the token as
Basic auth, the way GitHub and GitLab take a token.
"""

from __future__ import annotations

import base64
import logging
import os
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pipeline.errors import TerminalError
from pipeline.gitops import GitOps, Promotion, init_repo

TOKEN = "tok-7f3a9c2e1b5d44e0"  # not token-shaped: it must be hidden because it is the token, not by its looks
TOKEN_ENV = "MODELCTL_TEST_GITOPS_TOKEN"
SECRETS = (TOKEN, base64.b64encode(f"x-access-token:{TOKEN}".encode()).decode())


class GitHttpBackend(BaseHTTPRequestHandler):
    """Smart HTTP git, as a CGI: every request must carry the token."""

    root: Path

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding") == "chunked":
            data = b""
            while (size := int(self.rfile.readline().strip(), 16)) > 0:
                data += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
            return data
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _serve(self) -> None:
        body = self._body()
        if self.headers.get("Authorization") != f"Basic {SECRETS[1]}":
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="gitops"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        path, _, query = self.path.partition("?")
        env = {
            "PATH": os.environ["PATH"], "GIT_PROJECT_ROOT": str(self.root), "GIT_HTTP_EXPORT_ALL": "1",
            "PATH_INFO": path, "QUERY_STRING": query, "REQUEST_METHOD": self.command, "REMOTE_USER": "pipeline",
            "REMOTE_ADDR": "127.0.0.1", "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)), "GIT_PROTOCOL": self.headers.get("Git-Protocol", ""),
            "HTTP_CONTENT_ENCODING": self.headers.get("Content-Encoding", ""),
        }  # fmt: skip
        answer = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True, check=True).stdout
        sep = b"\r\n\r\n" if b"\r\n\r\n" in answer else b"\n\n"
        head, _, payload = answer.partition(sep)
        status, headers = 200, []
        for line in head.decode().splitlines():
            key, _, value = line.partition(": ")
            if key.lower() == "status":
                status = int(value.split()[0])
            else:
                headers.append((key, value))
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = _serve
    do_POST = _serve


@pytest.fixture
def token_remote(tmp_path: Path) -> Iterator[str]:
    root = tmp_path / "served"
    root.mkdir()
    init_repo(root / "gitops.git")
    handler = type("Handler", (GitHttpBackend,), {"root": root})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/gitops.git"
    server.shutdown()
    server.server_close()


def visible(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text


def test_token_from_the_environment_works_and_never_shows(
    token_remote: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    caplog.set_level(logging.DEBUG)
    repo = GitOps.open(token_remote, tmp_path / "work", token_env=TOKEN_ENV)
    p = Promotion(env="prod", model="org/name", revision="d" * 40, artifact="art-token", eval=f"pass {TOKEN}")
    result = repo.promote(p, "envs/prod/values.yaml")
    assert result.pushed
    reverted = repo.revert(p.id, reason=f"token in a reason: {TOKEN}")
    assert reverted.pushed

    served = tmp_path / "served" / "gitops.git"
    messages = subprocess.run(["git", "-C", str(served), "log", "--format=%B", "main"], capture_output=True, text=True)
    assert "promote(prod): org/name@dddddddddddd" in messages.stdout
    visible(messages.stdout)  # commit messages
    shown = subprocess.run(["git", "-C", str(repo.workdir), "remote", "-v"], capture_output=True, text=True).stdout
    assert token_remote in shown
    visible(shown)  # `git remote -v`
    visible(repo.remote)
    visible((repo.workdir / ".git" / "config").read_text())
    visible(caplog.text)  # logs, gitpython's included
    for record in (repo.workdir / "records" / "prod").iterdir():
        visible(record.read_text())
    assert repo.current("prod") is not None and repo.current("prod").action == "revert"  # type: ignore[union-attr]


def test_a_wrong_or_missing_token_is_terminal_and_the_message_names_the_variable(
    token_remote: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TOKEN_ENV, TOKEN + "-wrong")
    with pytest.raises(TerminalError) as caught:
        GitOps.open(token_remote, tmp_path / "w1", token_env=TOKEN_ENV)
    assert "refused the credentials" in str(caught.value) and TOKEN_ENV in str(caught.value)
    visible(str(caught.value))
    assert TOKEN + "-wrong" not in str(caught.value)

    monkeypatch.delenv(TOKEN_ENV)
    with pytest.raises(TerminalError, match="refused the credentials"):
        GitOps.open(token_remote, tmp_path / "w2", token_env=TOKEN_ENV)
