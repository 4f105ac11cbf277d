"""A small fake of the Hugging Face Hub API, enough for huggingface_hub's model_info and hf_hub_download.

Test-only. It serves repos defined in memory, answers the error codes huggingface_hub maps to its exceptions
(RepoNotFound, RevisionNotFound, GatedRepo), can demand a token, and records every request it saw.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pytest


@dataclass
class FakeRepo:
    sha: str
    files: dict[str, bytes]
    branches: dict[str, str] = field(default_factory=lambda: {"main": ""})
    gated: bool | str = False
    license: str | None = "apache-2.0"
    lfs: tuple[str, ...] = (".safetensors", ".bin")
    served: dict[str, bytes] = field(default_factory=dict)  # what downloads get instead, to fake corruption

    def revision_sha(self, revision: str) -> str | None:
        if revision == self.sha or revision in self.branches.values():
            return revision
        if revision in self.branches:
            return self.branches[revision] or self.sha
        return None


@dataclass
class FakeHub:
    repos: dict[str, FakeRepo] = field(default_factory=dict)
    require_token: str | None = None
    fail_with: int | None = None
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)


def _git_blob(content: bytes) -> str:
    return hashlib.sha1(f"blob {len(content)}\0".encode() + content).hexdigest()


def _sibling(name: str, content: bytes, repo: FakeRepo) -> dict[str, Any]:
    entry: dict[str, Any] = {"rfilename": name, "size": len(content), "blobId": _git_blob(content)}
    if name.endswith(repo.lfs):
        entry["lfs"] = {"size": len(content), "sha256": hashlib.sha256(content).hexdigest(), "pointerSize": 134}
    return entry


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            return None

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _error(self, status: int, code: str, message: str) -> None:
            self._send(
                status, json.dumps({"error": message}).encode(), {"X-Error-Code": code, "X-Error-Message": message}
            )

        def _route(self) -> None:
            path = unquote(urlparse(self.path).path)
            hub.requests.append((self.command, path, self.headers.get("Authorization")))
            if hub.fail_with:
                self._send(hub.fail_with, b"upstream trouble")
                return
            if hub.require_token and self.headers.get("Authorization") != f"Bearer {hub.require_token}":
                self._error(401, "RepoNotFound", "Invalid credentials")
                return
            if path.startswith("/api/models/"):
                parts = path.removeprefix("/api/models/").split("/")
                repo_id, action, revision = "/".join(parts[:2]), (parts[2:3] or [""])[0], "/".join(parts[3:])
                if action == "tree":
                    self._tree(repo_id, revision or "main")
                else:
                    self._model_info(repo_id, revision or "main")
            elif "/resolve/" in path:
                repo_id, _, tail = path.lstrip("/").partition("/resolve/")
                revision, _, filename = tail.partition("/")
                self._file(repo_id, revision, filename)
            else:
                self._send(404, b"not found")

        def _repo(self, repo_id: str, revision: str) -> tuple[FakeRepo, str] | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
                return None
            sha = repo.revision_sha(revision)
            if sha is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                return None
            return repo, sha

        def _model_info(self, repo_id: str, revision: str) -> None:
            found = self._repo(repo_id, revision)
            if found is None:
                return
            repo, sha = found
            body = {
                "id": repo_id,
                "modelId": repo_id,
                "sha": sha,
                "private": False,
                "gated": repo.gated,
                "disabled": False,
                "tags": [],
                "cardData": {"license": repo.license} if repo.license else {},
                "siblings": [_sibling(n, c, repo) for n, c in sorted(repo.files.items())],
            }
            self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"})

        def _tree(self, repo_id: str, revision: str) -> None:
            found = self._repo(repo_id, revision)
            if found is None:
                return
            repo, _ = found
            entries = []
            for name, content in sorted(repo.files.items()):
                sibling = _sibling(name, content, repo)
                entry = {"type": "file", "path": name, "size": len(content), "oid": sibling["blobId"]}
                if "lfs" in sibling:
                    entry["lfs"] = {"oid": sibling["lfs"]["sha256"], "size": len(content), "pointerSize": 134}
                entries.append(entry)
            self._send(200, json.dumps(entries).encode(), {"Content-Type": "application/json"})

        def _file(self, repo_id: str, revision: str, filename: str) -> None:
            found = self._repo(repo_id, revision)
            if found is None:
                return
            repo, sha = found
            if repo.gated and not self.headers.get("Authorization"):
                self._error(401, "GatedRepo", "Access to this model is restricted")
                return
            content = repo.files.get(filename)
            if content is None:
                self._error(404, "EntryNotFound", f"{filename} not found")
                return
            lfs = filename.endswith(repo.lfs)
            etag = hashlib.sha256(content).hexdigest() if lfs else _git_blob(content)
            headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"'}
            body = repo.served.get(filename, content)
            ranged = self.headers.get("Range", "")
            if ranged.startswith("bytes=") and ranged.endswith("-"):
                start = int(ranged[6:-1])
                headers["Content-Range"] = f"bytes {start}-{len(body) - 1}/{len(body)}"
                self._send(206, body[start:], headers)
                return
            self._send(200, body, headers)

        do_GET = _route
        do_HEAD = _route

    return Handler


@contextmanager
def serve_hub(hub: FakeHub) -> Iterator[str]:
    """Run the fake Hub on 127.0.0.1 and yield its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    """An empty fake Hub at HF_ENDPOINT, with the offline switch lifted for this test only."""
    from huggingface_hub import constants

    fake = FakeHub()
    with serve_hub(fake) as url:
        monkeypatch.setenv("HF_ENDPOINT", url)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        yield fake
