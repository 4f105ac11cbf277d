"""The local artifact store: a directory every environment on this machine reads (local env, the sandbox).

Layout under the root::

    artifacts/<artifact id>/   the artifact's files and its artifact.json, copied and verified
    index/<artifact id>.json   the StoredArtifact; written last, so its presence means "published"
    reports/<digest hex>/<kind>.json
    .locks/<artifact id>.lock  publishers of one id take turns

A publish copies into a temporary directory beside the final one, hashing as it copies, and renames it into
place only when every file matched its manifest; a crash leaves no index, and the next publish starts over.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from pipeline.errors import TerminalError
from pipeline.quantize.recipe import MANIFEST, ArtifactFile
from pipeline.store.base import (
    BLOCK,
    Reader,
    StoredArtifact,
    check_artifact_id,
    check_digest,
    check_report_kind,
    read_publishable,
    refuse_rebuilt,
    report_json,
)


def _write_atomic(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(content)
    os.replace(tmp, path)


def _copy_verified(src: Path, dest: Path, expected: ArtifactFile) -> str | None:
    """Copy ``src`` to ``dest`` hashing in the same pass; None when it matched ``expected``, else what differs."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest, size = hashlib.sha256(), 0
    try:
        with open(src, "rb") as reader, open(dest, "wb") as writer:
            while block := reader.read(BLOCK):
                writer.write(block)
                digest.update(block)
                size += len(block)
            writer.flush()
            os.fsync(writer.fileno())
    except FileNotFoundError:
        return "missing"
    if size != expected.size:
        return f"{size} bytes, expected {expected.size}"
    if digest.hexdigest() != expected.sha256:
        return f"sha256 {digest.hexdigest()[:12]}, expected {expected.sha256[:12]}"
    return None


class LocalStore:
    """An artifact store in a directory (see the module docstring for its layout)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def describe(self) -> str:
        return f"the local artifact store {self.root}"

    def _index(self, artifact_id: str) -> Path:
        return self.root / "index" / f"{check_artifact_id(artifact_id)}.json"

    def _report(self, manifest_digest: str, kind: str) -> Path:
        hexdigest = check_digest(manifest_digest).removeprefix("sha256:")
        return self.root / "reports" / hexdigest / f"{check_report_kind(kind)}.json"

    @contextmanager
    def _lock(self, artifact_id: str) -> Iterator[None]:
        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        with open(locks / f"{artifact_id}.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def lookup(self, artifact_id: str) -> StoredArtifact | None:
        """The published artifact with this id, or None.

        Raises:
            TerminalError: the index entry is damaged.
        """
        index = self._index(artifact_id)
        try:
            content = index.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return StoredArtifact.model_validate_json(content)
        except ValidationError:
            raise TerminalError(f"{index} is damaged", hint="remove it and publish the artifact again") from None

    def has(self, artifact_id: str) -> bool:
        return self.lookup(artifact_id) is not None

    def publish(self, artifact_dir: Path) -> StoredArtifact:
        """Copy the artifact in, verified against its artifact.json; the same bytes again are a skip.

        Raises:
            DigestMismatch: other bytes are already published under this id (both digests named).
            TerminalError: not a finished artifact, or a file differs from its artifact.json; nothing is published.
        """
        artifact, digest = read_publishable(artifact_dir)
        existing = self.lookup(artifact.id)
        if existing is not None:
            refuse_rebuilt(existing, digest, self.describe)
            return existing.model_copy(update={"skipped": True})
        artifacts = self.root / "artifacts"
        artifacts.mkdir(parents=True, exist_ok=True)
        with self._lock(artifact.id):
            existing = self.lookup(artifact.id)  # another publisher may have finished while we waited
            if existing is not None:
                refuse_rebuilt(existing, digest, self.describe)
                return existing.model_copy(update={"skipped": True})
            tmp = Path(tempfile.mkdtemp(prefix=f".incoming-{artifact.id}-", dir=artifacts))
            try:
                for f in artifact.files:
                    problem = _copy_verified(artifact_dir / f.name, tmp / f.name, f)
                    if problem is not None:
                        raise TerminalError(
                            f"{artifact_dir / f.name} does not match its {MANIFEST} ({problem}); nothing was published",
                            hint="rebuild the artifact (`modelctl quantize`) and publish it again",
                        )
                shutil.copyfile(artifact_dir / MANIFEST, tmp / MANIFEST)
                final = artifacts / artifact.id
                if final.exists():  # left by a publish that died before writing the index
                    shutil.rmtree(final)
                os.rename(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            stored = StoredArtifact(
                artifact_id=artifact.id, manifest_digest=digest, uri=final.as_uri(), files=artifact.files
            )
            _write_atomic(self._index(artifact.id), (stored.model_dump_json(indent=2) + "\n").encode())
        return stored

    def reader(self, stored: StoredArtifact) -> Reader:
        directory = self.root / "artifacts" / check_artifact_id(stored.artifact_id)

        def read(name: str, offset: int) -> Iterator[bytes]:
            path = directory / name
            if not path.is_file():
                raise TerminalError(
                    f"{self.describe} has lost {stored.artifact_id}/{name}", hint="publish the artifact again"
                )
            with open(path, "rb") as handle:
                handle.seek(offset)
                while block := handle.read(BLOCK):
                    yield block

        return read

    def put_report(self, manifest_digest: str, kind: str, data: BaseModel | Mapping[str, Any]) -> None:
        _write_atomic(self._report(manifest_digest, kind), report_json(data))

    def get_report(self, manifest_digest: str, kind: str) -> dict[str, Any] | None:
        path = self._report(manifest_digest, kind)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except ValueError:
            raise TerminalError(f"{path} is damaged", hint="evaluate the artifact again to rewrite it") from None
        return data if isinstance(data, dict) else None
