"""The artifact store: an artifact is built once, published here, and every environment preloads those bytes.

Identity: the artifact id (a hash of the build's inputs) finds a build; the manifest digest (``sha256:<hex>``
over every file's name, size and sha256, see :func:`manifest_digest`) identifies the bytes and keys every
cache, verify result, record, report and ``requires``. :func:`fetch_into_cache` preloads an artifact only
when the store holds exactly the bytes whose digest was evaluated, and refuses a rebuilt or tampered one
naming both digests.

Stores: :class:`LocalStore` (a directory: the local environment, the sandbox) and :class:`HubStore` (a private
Hub repo of the organization, each artifact pinned to its upload commit).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from pipeline.cache import CacheEntry, Expected, Plan, preload_plan
from pipeline.config import ArtifactStoreSettings, HubArtifactStore, LocalArtifactStore
from pipeline.errors import TerminalError
from pipeline.quantize.recipe import MANIFEST
from pipeline.store.base import (
    ArtifactStore,
    DigestMismatch,
    Reader,
    StoredArtifact,
    check_artifact_id,
    check_digest,
    manifest_digest,
    parse_manifest,
    served_digest,
)
from pipeline.store.hub import HubStore
from pipeline.store.local import LocalStore

__all__ = [
    "ArtifactStore",
    "DigestMismatch",
    "HubStore",
    "LocalStore",
    "Reader",
    "StoredArtifact",
    "fetch_into_cache",
    "manifest_digest",
    "store_from_settings",
]

STORE_RECORD = "store.json"  # written beside artifact.json in the cache entry: digest and pinned uri


def store_from_settings(settings: ArtifactStoreSettings) -> ArtifactStore:
    """The store promotion.yaml's ``artifacts:`` section describes."""
    if isinstance(settings, LocalArtifactStore):
        return LocalStore(Path(settings.path))
    assert isinstance(settings, HubArtifactStore)
    return HubStore(settings.repo, token_env=settings.token_env)


def _mismatch(artifact_id: str, expected: str, actual: str, store: ArtifactStore, how: str) -> DigestMismatch:
    return DigestMismatch(
        artifact_id,
        expected,
        actual,
        what=(
            f"{store.describe} {how} artifact {artifact_id} with manifest digest {actual}, "
            f"but the bytes evaluated had {expected}: refusing to preload bytes that were not evaluated"
        ),
        hint="promote the artifact again from the first environment so these bytes are evaluated, "
        "or restore the published bytes",
    )


def fetch_into_cache(
    store: ArtifactStore,
    artifact_id: str,
    expected_digest: str,
    cache_root: Path,
    *,
    verify: bool = False,
    progress: Callable[[str, float], None] | None = None,
) -> CacheEntry:
    """Preload ``artifact_id`` from ``store`` into ``cache_root/<artifact id>/``, only if its bytes are the ones
    whose manifest digest ``expected_digest`` was recorded when they were evaluated.

    Uses the cache's verified, resumable copy: every file is hashed against the manifest as it arrives, a warm
    entry is a skip, and a broken-off copy resumes. The cache entry gets ``store.json`` (digest and pinned uri).

    Raises:
        DigestMismatch: the store holds other bytes under this id (rebuilt), or serves bytes that differ from
            its manifest (tampered); both digests are named.
        TerminalError: the artifact is not in the store, or the cache lacks space.
        TransientError: the store could not be reached (a re-run resumes).
    """
    check_artifact_id(artifact_id)
    check_digest(expected_digest)
    stored = store.lookup(artifact_id)
    if stored is None:
        raise TerminalError(
            f"artifact {artifact_id} is not in {store.describe}",
            hint="publish it first (the promotion publishes what it builds); check the store's credentials",
        )
    listed = manifest_digest(stored.files)
    for actual in (stored.manifest_digest, listed):
        if actual != expected_digest:
            raise _mismatch(artifact_id, expected_digest, actual, store, "holds")
    source = store.reader(stored)
    manifest = b"".join(source(MANIFEST, 0))
    described = manifest_digest(parse_manifest(manifest, stored.uri).files)
    if described != expected_digest:
        raise _mismatch(artifact_id, expected_digest, described, store, "has a manifest for")
    touched = False  # whether the copy read any of the store's files (a space refusal comes before that)

    def read(name: str, offset: int) -> Iterator[bytes]:
        nonlocal touched
        touched = True
        yield from source(name, offset)

    plan = Plan(
        entry_id=artifact_id,
        files=[Expected(f.name, f.size, sha256=f.sha256) for f in stored.files],
        read=read,
        describe=stored.uri,
        extra={MANIFEST: manifest, STORE_RECORD: (stored.model_dump_json(indent=2) + "\n").encode()},
    )
    try:
        return preload_plan(plan, cache_root, verify=verify, progress=progress)
    except TerminalError:
        if not touched:
            raise  # the cache's own trouble (space), already explained
        actual = served_digest(stored.files, source)  # a file differed from the manifest: what is served?
        if actual == expected_digest:
            raise
        raise _mismatch(artifact_id, expected_digest, actual, store, "serves") from None
