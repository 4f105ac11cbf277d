"""The Hub artifact store: a private model repo of the organization, each artifact pinned to its upload commit.

Layout in the repo::

    artifacts/<artifact id>/...        the files and artifact.json, uploaded in one commit
    index/<artifact id>.json           the StoredArtifact, its uri naming that commit (a second commit)
    reports/<digest hex>/<kind>.json

Readers always read the artifact at the commit its upload created (``hf://org/name@<commit>/artifacts/<id>``),
never at a branch, so a later push to the repo cannot change what an environment preloads. Uploads go through
huggingface_hub's ``create_commit`` (Xet or LFS, as the client and Hub agree); files are read back with ranged
GETs on the Hub's resolve URLs, so the cache can resume them. The token is read from the environment variable
named in the configuration at each call; it never appears in a message.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from huggingface_hub import CommitOperationAdd, HfApi, constants, errors, hf_hub_download, hf_hub_url
from huggingface_hub.utils import build_hf_headers
from pydantic import BaseModel, ValidationError

from pipeline.errors import PipelineError, TerminalError, TransientError
from pipeline.quantize.recipe import MANIFEST
from pipeline.secrets import redact
from pipeline.store.base import (
    BLOCK,
    Reader,
    StoredArtifact,
    check_artifact_id,
    check_digest,
    check_report_kind,
    file_mismatch,
    read_publishable,
    refuse_rebuilt,
    report_json,
)

URI = re.compile(r"^hf://(?P<repo>[^@]+)@(?P<commit>[0-9a-f]{40})/(?P<path>.+)$")
DEFAULT_ENDPOINT = "https://huggingface.co"


class HubStore:
    """An artifact store in a private Hub model repo (see the module docstring for its layout)."""

    def __init__(self, repo: str, *, token_env: str = "HF_TOKEN", endpoint: str | None = None) -> None:
        self.repo = repo
        self.token_env = token_env
        self._endpoint = endpoint

    @property
    def describe(self) -> str:
        return f"the Hub artifact store {self.repo}"

    @property
    def endpoint(self) -> str:
        return self._endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT

    def _token(self) -> str | None:
        return os.environ.get(self.token_env) or None

    def _api(self) -> HfApi:
        return HfApi(endpoint=self.endpoint, token=self._token() or False)

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Turn huggingface_hub's and the network's errors into ours, with no token in the text."""
        try:
            yield
        except PipelineError:
            raise
        except (errors.HfHubHTTPError, httpx.HTTPError, OSError, RuntimeError, ValueError) as exc:
            token = self._token()
            cause = f" ({exc.__cause__})" if exc.__cause__ else ""  # an upload error says why only in its cause
            text = redact(f"{exc}{cause}", (token,) if token else ())[:300]
            status = getattr(getattr(exc, "response", None), "status_code", None)
            where = f"{action} in {self.describe}"
            if status in (401, 403) or isinstance(exc, errors.RepositoryNotFoundError):
                raise TerminalError(
                    f"{where} was refused (HTTP {status}): {text}",
                    hint=f"put a token with write access to {self.repo} in ${self.token_env}",
                ) from None
            if status is not None and status < 500 and status not in (408, 409, 412, 429):
                raise TerminalError(f"{where} failed (HTTP {status}): {text}") from None
            raise TransientError(f"{where} failed: {text}", hint="retry; nothing published is changed") from None

    def _read_json(self, path: str, revision: str = "main") -> dict[str, Any] | None:
        """A JSON file of the repo at ``revision`` (downloaded with huggingface_hub), or None when absent.

        Raises:
            TerminalError: the Hub is switched off here, or refused the token.
            TransientError: the Hub could not be reached.
        """
        if constants.is_offline_mode():
            raise TerminalError(
                f"cannot read {self.describe}: the Hub is switched off here (HF_HUB_OFFLINE is set)",
                hint="unset HF_HUB_OFFLINE where the pipeline runs, or use `artifacts: {store: local, ...}`",
            )
        with tempfile.TemporaryDirectory(prefix="modelctl-hubstore-") as tmp, self._errors(f"reading {path}"):
            try:
                local = hf_hub_download(
                    self.repo,
                    path,
                    revision=revision,
                    token=self._token() or False,
                    endpoint=self.endpoint,
                    cache_dir=tmp,
                )
            except (errors.RemoteEntryNotFoundError, errors.RepositoryNotFoundError):
                return None  # not published yet (or the repo does not exist yet: the first publish creates it)
            try:
                data = json.loads(Path(local).read_text())
            except ValueError:
                raise TerminalError(f"{path} in {self.describe} is not JSON", hint="publish it again") from None
        return data if isinstance(data, dict) else None

    def lookup(self, artifact_id: str) -> StoredArtifact | None:
        """The published artifact with this id (its uri pinned to the upload commit), or None.

        Raises:
            TerminalError: the Hub refused the token, or the index entry is damaged.
            TransientError: the Hub could not be reached.
        """
        path = f"index/{check_artifact_id(artifact_id)}.json"
        data = self._read_json(path)
        if data is None:
            return None
        try:
            return StoredArtifact.model_validate(data)
        except ValidationError:
            raise TerminalError(f"{path} in {self.describe} is damaged", hint="publish the artifact again") from None

    def has(self, artifact_id: str) -> bool:
        return self.lookup(artifact_id) is not None

    def publish(self, artifact_dir: Path) -> StoredArtifact:
        """Upload the artifact in one commit, then index it pinned to that commit; the same bytes again are a skip.

        Raises:
            DigestMismatch: other bytes are already published under this id (both digests named).
            TerminalError: not a finished artifact, a file differs from its artifact.json, or the token is refused.
            TransientError: the Hub could not be reached (a re-run converges: unchanged files are not re-sent).
        """
        artifact, digest = read_publishable(artifact_dir)
        existing = self.lookup(artifact.id)
        if existing is not None:
            refuse_rebuilt(existing, digest, self.describe)
            return existing.model_copy(update={"skipped": True})
        for f in artifact.files:  # never upload bytes that differ from the manifest they are published under
            problem = file_mismatch(artifact_dir / f.name, f)
            if problem is not None:
                raise TerminalError(
                    f"{artifact_dir / f.name} does not match its {MANIFEST} ({problem}); nothing was published",
                    hint="rebuild the artifact (`modelctl quantize`) and publish it again",
                )
        prefix = f"artifacts/{artifact.id}"
        names = [f.name for f in artifact.files] + [MANIFEST]
        api = self._api()
        with self._errors(f"publishing {artifact.id}"):
            api.create_repo(self.repo, private=True, exist_ok=True)
            upload = api.create_commit(
                self.repo,
                [CommitOperationAdd(f"{prefix}/{name}", str(artifact_dir / name)) for name in names],
                commit_message=f"Publish {artifact.id}",
                commit_description=f"Manifest digest: {digest}",
            )
            stored = StoredArtifact(
                artifact_id=artifact.id,
                manifest_digest=digest,
                uri=f"hf://{self.repo}@{upload.oid}/{prefix}",
                files=artifact.files,
            )
            index = (stored.model_dump_json(indent=2) + "\n").encode()
            api.create_commit(
                self.repo,
                [CommitOperationAdd(f"index/{artifact.id}.json", index)],
                commit_message=f"Index {artifact.id} at {upload.oid[:12]}",
            )
        return stored

    def reader(self, stored: StoredArtifact) -> Reader:
        match = URI.match(stored.uri)
        if match is None or match["repo"] != self.repo:
            raise TerminalError(f"{stored.uri} is not a pinned location in {self.describe}", hint="publish it again")
        commit, prefix = match["commit"], match["path"]

        def read(name: str, offset: int) -> Iterator[bytes]:
            url = hf_hub_url(self.repo, f"{prefix}/{name}", revision=commit, endpoint=self.endpoint)
            headers = build_hf_headers(token=self._token() or False)
            if offset:
                headers["Range"] = f"bytes={offset}-"
            with (
                self._errors(f"reading {stored.artifact_id}/{name}"),
                httpx.stream("GET", url, headers=headers, follow_redirects=True, timeout=60) as response,
            ):
                if response.status_code >= 400:
                    response.read()
                    response.raise_for_status()
                if offset and response.status_code != 206:
                    raise TransientError(f"the Hub ignored the range request for {name}; retry to start over")
                yield from response.iter_bytes(BLOCK)

        return read

    def put_report(self, manifest_digest: str, kind: str, data: BaseModel | Mapping[str, Any]) -> None:
        path = f"reports/{check_digest(manifest_digest).removeprefix('sha256:')}/{check_report_kind(kind)}.json"
        with self._errors(f"writing the {kind} report"):
            self._api().create_commit(
                self.repo,
                [CommitOperationAdd(path, report_json(data))],
                commit_message=f"{kind} report for {manifest_digest[:19]}",
            )

    def get_report(self, manifest_digest: str, kind: str) -> dict[str, Any] | None:
        path = f"reports/{check_digest(manifest_digest).removeprefix('sha256:')}/{check_report_kind(kind)}.json"
        return self._read_json(path)
