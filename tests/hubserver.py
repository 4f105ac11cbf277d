"""A small fake of the Hugging Face Hub API, enough for huggingface_hub's model_info and hf_hub_download, and
for its create_repo and create_commit (preupload, the LFS batch API with basic transfers, the ndjson commit).

Test-only. It serves repos defined in memory, answers the error codes huggingface_hub maps to its exceptions
(RepoNotFound, RevisionNotFound, GatedRepo), can demand a token, and records every request it saw. Every
commit is kept, so a file read at an older commit sha gets that commit's content. Xet uploads are not
spoken: tests that upload switch huggingface_hub to LFS (``HF_HUB_DISABLE_XET``).
"""

from __future__ import annotations

import base64
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
    private: bool = False
    history: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit sha -> files at that commit

    def revision_sha(self, revision: str) -> str | None:
        if revision == self.sha or revision in self.branches.values() or revision in self.history:
            return revision
        if revision in self.branches:
            return self.branches[revision] or self.sha
        return None

    def files_at(self, sha: str) -> dict[str, bytes]:
        return self.history.get(sha, self.files)


@dataclass
class FakeHub:
    repos: dict[str, FakeRepo] = field(default_factory=dict)
    require_token: str | None = None
    fail_with: int | None = None
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    lfs_objects: dict[str, bytes] = field(default_factory=dict)  # uploaded LFS content by sha256
    lock: threading.Lock = field(default_factory=threading.Lock)


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
            presigned = path.startswith("/lfs-upload/")  # the Hub hands out signed storage URLs: no token there
            if (
                hub.require_token
                and not presigned
                and self.headers.get("Authorization") != f"Bearer {hub.require_token}"
            ):
                self._error(401, "RepoNotFound", "Invalid credentials")
                return
            if self.command in ("POST", "PUT"):
                self._write(path, self._body())
            elif path.startswith("/api/models/"):
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

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                self.rfile.readline()
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _json(self, body: Any, status: int = 200) -> None:
            self._send(status, json.dumps(body).encode(), {"Content-Type": "application/json"})

        def _write(self, path: str, body: bytes) -> None:
            """create_repo, preupload, the LFS batch API and its basic PUT, and the ndjson commit."""
            base = f"http://{self.headers['Host']}"
            if path == "/api/repos/create":
                request = json.loads(body)
                repo_id = f"{request['organization']}/{request['name']}" if request.get("organization") else ""
                with hub.lock:
                    if repo_id in hub.repos:  # the Hub answers 409 with the repo's url
                        message = "You already created this model repo"
                        headers = {"Content-Type": "application/json", "X-Error-Message": message}
                        body = {"error": message, "url": f"{base}/{repo_id}"}
                        self._send(409, json.dumps(body).encode(), headers)
                        return
                    sha = hashlib.sha1(f"init {repo_id}".encode()).hexdigest()
                    private = request.get("visibility") == "private" or bool(request.get("private"))
                    hub.repos[repo_id] = FakeRepo(sha=sha, files={}, private=private, history={sha: {}})
                self._json({"url": f"{base}/{repo_id}"})
            elif path.startswith("/lfs-upload/"):
                oid = path.removeprefix("/lfs-upload/")
                if hashlib.sha256(body).hexdigest() != oid:
                    self._error(400, "BadRequest", "content does not match its oid")
                    return
                with hub.lock:
                    hub.lfs_objects[oid] = body
                self._send(200)
            elif path.endswith(".git/info/lfs/objects/batch"):
                objects = []
                for obj in json.loads(body)["objects"]:
                    entry = {"oid": obj["oid"], "size": obj["size"]}
                    if obj["oid"] not in hub.lfs_objects:
                        entry["actions"] = {"upload": {"href": f"{base}/lfs-upload/{obj['oid']}"}}
                    objects.append(entry)
                self._json({"transfer": "basic", "objects": objects})
            elif path.startswith("/api/models/") and "/preupload/" in path:
                repo_id, _, revision = path.removeprefix("/api/models/").partition("/preupload/")
                found = self._repo(repo_id, revision)
                if found is not None:
                    self._preupload(found[0], found[0].files_at(found[1]), json.loads(body))
            elif path.startswith("/api/models/") and "/commit/" in path:
                repo_id, _, revision = path.removeprefix("/api/models/").partition("/commit/")
                found = self._repo(repo_id, revision)
                if found is not None:
                    self._commit(repo_id, found[0], found[1], body, base)
            else:
                self._send(404, b"not found")

        def _preupload(self, repo: FakeRepo, files: dict[str, bytes], request: dict[str, Any]) -> None:
            answer = []
            for f in request["files"]:
                lfs = f["path"].endswith(repo.lfs)
                present = files.get(f["path"])
                oid = None
                if present is not None:
                    oid = hashlib.sha256(present).hexdigest() if lfs else _git_blob(present)
                answer.append(
                    {"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid}
                )
            self._json({"files": answer})

        def _commit(self, repo_id: str, repo: FakeRepo, parent: str, body: bytes, base: str) -> None:
            with hub.lock:
                files = dict(repo.files_at(parent))
                for line in body.splitlines():
                    item = json.loads(line)
                    value = item["value"]
                    if item["key"] == "file":
                        files[value["path"]] = base64.b64decode(value["content"])
                    elif item["key"] == "lfsFile":
                        if value["oid"] not in hub.lfs_objects:
                            self._error(422, "BadRequest", f"LFS object {value['oid']} was never uploaded")
                            return
                        files[value["path"]] = hub.lfs_objects[value["oid"]]
                    elif item["key"] == "deletedFile":
                        files.pop(value["path"], None)
                sha = hashlib.sha1(parent.encode() + body).hexdigest()
                repo.history[sha] = files
                repo.files, repo.sha = files, sha
                repo.branches["main"] = sha
            self._json({"commitUrl": f"{base}/{repo_id}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None})

        def _repo(self, repo_id: str, revision: str) -> tuple[FakeRepo, str] | None:
            repo = hub.repos.get(repo_id)
            if repo is None or (repo.private and not self.headers.get("Authorization")):
                self._error(404 if repo is None else 401, "RepoNotFound", f"Repository {repo_id} not found")
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
                "siblings": [_sibling(n, c, repo) for n, c in sorted(repo.files_at(sha).items())],
            }
            self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"})

        def _tree(self, repo_id: str, revision: str) -> None:
            found = self._repo(repo_id, revision)
            if found is None:
                return
            repo, sha = found
            entries = []
            for name, content in sorted(repo.files_at(sha).items()):
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
            content = repo.files_at(sha).get(filename)
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
        do_POST = _route
        do_PUT = _route

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
