"""What every artifact store shares: the stored artifact, the manifest digest, the protocol, and the checks.

Identity: the artifact id (a hash of the build's inputs, :func:`pipeline.quantize.recipe.artifact_id`) finds a
build; the manifest digest identifies its bytes. The digest is ``sha256:<hex>`` of the compact JSON list of
``[name, size, sha256]`` of every file the artifact's ``artifact.json`` lists, sorted by name. It keys every
cache, verify result, record, report and ``requires``: an environment serves only bytes whose digest was
evaluated.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from pipeline.errors import TerminalError
from pipeline.quantize.recipe import MANIFEST, Artifact, ArtifactFile
from pipeline.quantize.step import read_artifact

Reader = Callable[[str, int], Iterator[bytes]]  # (file name, offset) -> the file's bytes from there on
DIGEST_PREFIX = "sha256:"
DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
ARTIFACT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
REPORT_KIND = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
BLOCK = 8 << 20


class StoredArtifact(BaseModel):
    """An artifact as a store holds it: its id, the digest of its bytes, where it is, and its files."""

    model_config = ConfigDict(frozen=True)

    artifact_id: str = Field(pattern=ARTIFACT_ID.pattern)
    manifest_digest: str = Field(pattern=DIGEST.pattern)
    uri: str = Field(description="file:///... for a local store, hf://org/name@<commit>/artifacts/<id> for the Hub")
    files: list[ArtifactFile]
    skipped: bool = Field(False, exclude=True, description="true when publish found the same bytes already there")


class DigestMismatch(TerminalError):
    """The bytes found are not the bytes expected: a rebuilt or tampered artifact. Both digests are named."""

    def __init__(self, artifact_id: str, expected: str, actual: str, *, what: str, hint: str) -> None:
        self.artifact_id, self.expected, self.actual = artifact_id, expected, actual
        super().__init__(what, hint=hint)


class ArtifactStore(Protocol):
    """Where an artifact is published once and every environment fetches the same bytes from."""

    @property
    def describe(self) -> str:
        """The store in words, for messages (never with a secret)."""
        ...

    def publish(self, artifact_dir: Path) -> StoredArtifact:
        """Put the artifact at ``artifact_dir`` into the store; the same bytes again are a skip.

        Raises:
            DigestMismatch: different bytes are already published under the same artifact id.
            TerminalError: not a finished artifact, or its files differ from its artifact.json.
        """
        ...

    def has(self, artifact_id: str) -> bool:
        """True when an artifact with this id is published."""
        ...

    def lookup(self, artifact_id: str) -> StoredArtifact | None:
        """The published artifact with this id, or None."""
        ...

    def reader(self, stored: StoredArtifact) -> Reader:
        """Read a published artifact's files (and its artifact.json) by name, from an offset."""
        ...

    def put_report(self, manifest_digest: str, kind: str, data: BaseModel | Mapping[str, Any]) -> None:
        """Keep a report (``eval``, ``load``...) about the bytes with this digest; a later put replaces it."""
        ...

    def get_report(self, manifest_digest: str, kind: str) -> dict[str, Any] | None:
        """The report of this kind about the bytes with this digest, or None."""
        ...


def manifest_digest(files: Iterable[ArtifactFile]) -> str:
    """``sha256:<hex>`` over every file's (name, size, sha256), sorted by name: the identity of the bytes."""
    listing = sorted([f.name, f.size, f.sha256] for f in files)
    return DIGEST_PREFIX + hashlib.sha256(json.dumps(listing, separators=(",", ":")).encode()).hexdigest()


def check_artifact_id(artifact_id: str) -> str:
    """Raises: TerminalError: the id is not one a store can hold (it becomes a path)."""
    if not ARTIFACT_ID.match(artifact_id):
        raise TerminalError(
            f"{artifact_id!r} is not an artifact id", hint="pass an id as `modelctl quantize` prints it"
        )
    return artifact_id


def check_digest(digest: str) -> str:
    """Raises: TerminalError: not a ``sha256:<64 hex>`` manifest digest."""
    if not DIGEST.match(digest):
        raise TerminalError(f"{digest!r} is not a manifest digest", hint="expected sha256: and 64 hex digits")
    return digest


def check_report_kind(kind: str) -> str:
    """Raises: TerminalError: the kind is not a short lower-case name (it becomes a file name)."""
    if not REPORT_KIND.match(kind):
        raise TerminalError(f"{kind!r} is not a report kind", hint="use a short lower-case name: eval, load")
    return kind


def report_json(data: BaseModel | Mapping[str, Any]) -> bytes:
    """A report as the JSON bytes a store keeps."""
    plain = data.model_dump(mode="json") if isinstance(data, BaseModel) else dict(data)
    return (json.dumps(plain, indent=2, sort_keys=True) + "\n").encode()


def read_publishable(artifact_dir: Path) -> tuple[Artifact, str]:
    """The artifact at ``artifact_dir`` and its manifest digest, its file names checked to stay inside it.

    Raises:
        TerminalError: not a finished artifact, or a file name that would escape its directory.
    """
    artifact = read_artifact(artifact_dir)
    check_artifact_id(artifact.id)
    for f in artifact.files:
        parts = PurePosixPath(f.name).parts
        if f.name.startswith("/") or ".." in parts or f.name == MANIFEST or not parts:
            raise TerminalError(f"{artifact_dir}/{MANIFEST} lists a file named {f.name!r}", hint="rebuild it")
    return artifact, manifest_digest(artifact.files)


def refuse_rebuilt(existing: StoredArtifact, digest: str, where: str) -> None:
    """Refuse to publish other bytes under an id the store already holds.

    Raises:
        DigestMismatch: naming the stored digest and the new one.
    """
    if existing.manifest_digest != digest:
        raise DigestMismatch(
            existing.artifact_id,
            existing.manifest_digest,
            digest,
            what=(
                f"{where} already holds artifact {existing.artifact_id} with manifest digest "
                f"{existing.manifest_digest}; the artifact being published has {digest}: same inputs, other bytes"
            ),
            hint="a published artifact never changes; find why the build is not reproducible "
            "(tool versions, nondeterministic kernels) and keep serving the published bytes",
        )


def file_mismatch(path: Path, expected: ArtifactFile) -> str | None:
    """None when the file at ``path`` has the expected size and sha256, else what differs."""
    try:
        size = path.stat().st_size
    except OSError:
        return "missing"
    if size != expected.size:
        return f"{size} bytes, expected {expected.size}"
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(BLOCK):
            digest.update(block)
    if digest.hexdigest() != expected.sha256:
        return f"sha256 {digest.hexdigest()[:12]}, expected {expected.sha256[:12]}"
    return None


def served_digest(files: Iterable[ArtifactFile], read: Reader) -> str:
    """The manifest digest of the bytes a store actually serves for ``files`` (each read in full and hashed)."""
    actual = []
    for f in files:
        digest, size = hashlib.sha256(), 0
        for block in read(f.name, 0):
            digest.update(block)
            size += len(block)
        actual.append(ArtifactFile(name=f.name, size=size, sha256=digest.hexdigest()))
    return manifest_digest(actual)


def parse_manifest(content: bytes, where: str) -> Artifact:
    """The Artifact an artifact.json read from a store describes.

    Raises:
        TerminalError: the content is not an artifact.json.
    """
    try:
        return Artifact.model_validate({**json.loads(content), "path": where})
    except ValueError:
        raise TerminalError(f"{where}/{MANIFEST} is not an artifact manifest", hint="publish it again") from None
