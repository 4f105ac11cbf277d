"""Preload an artifact into the cache root (the PVC the inference pods mount): verified, resumable, atomic.

Layout: ``<root>/<artifact id>/`` holds the files; ``<root>/<artifact id>/.complete`` is written last and
records the manifest it was verified against. Each file is copied and hashed in one pass through a
``.partial`` file that a later run resumes; a file whose hash does not match the manifest is fetched again.
A warm preload (marker present, manifest matching, sizes right) reads no file content, so it takes
milliseconds whatever the artifact's size. Two preloaders of the same artifact (two pods on one RWX volume)
serialize on a lock file: the second waits, then finds the work done.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel

from pipeline.errors import TerminalError
from pipeline.quantize.recipe import Artifact, ArtifactFile
from pipeline.quantize.step import read_artifact

MARKER = ".complete"
PARTIAL = ".partial"
BLOCK = 8 << 20  # 8 MiB: large enough to stream at disk speed, small enough to report progress
SPACE_MARGIN = 64 << 20

Progress = Callable[[str, float], None]


class CacheEntry(BaseModel):
    """An artifact present and verified in the cache."""

    artifact_id: str
    path: str
    verified_at: str
    bytes: int
    files: int
    skipped: bool = False
    copied: list[str] = []
    repaired: list[str] = []


def _manifest_digest(files: list[ArtifactFile]) -> str:
    listing = json.dumps([f.model_dump() for f in sorted(files, key=lambda f: f.name)], sort_keys=True)
    return hashlib.sha256(listing.encode()).hexdigest()


@contextmanager
def _lock(root: Path, artifact_id: str) -> Iterator[None]:
    locks = root / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{artifact_id}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_marker(target: Path) -> dict[str, object] | None:
    try:
        data = json.loads((target / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_warm(artifact: Artifact, root: Path) -> bool:
    """True when the cache holds this artifact complete: marker for the same manifest, every size right."""
    target = root / artifact.id
    marker = _read_marker(target)
    if not marker or marker.get("manifest_sha256") != _manifest_digest(artifact.files):
        return False
    for f in artifact.files:
        try:
            if (target / f.name).stat().st_size != f.size:
                return False
        except OSError:
            return False
    return True


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _copy_hashing(src: Path, dest: Path, on_bytes: Callable[[int], None]) -> str:
    """Copy ``src`` to ``dest`` through ``dest.partial``, resuming a partial copy; returns the sha256."""
    partial = dest.with_name(dest.name + PARTIAL)
    digest = hashlib.sha256()
    done = 0
    if partial.exists():
        with open(partial, "rb") as handle:  # re-hash what an earlier run already copied
            while block := handle.read(BLOCK):
                digest.update(block)
                done += len(block)
        if done > src.stat().st_size:
            partial.unlink()
            digest, done = hashlib.sha256(), 0
    on_bytes(done)
    with open(src, "rb") as reader, open(partial, "ab") as writer:
        reader.seek(done)
        while block := reader.read(BLOCK):
            writer.write(block)
            digest.update(block)
            on_bytes(len(block))
        writer.flush()
        os.fsync(writer.fileno())
    os.replace(partial, dest)
    return digest.hexdigest()


def preload(
    artifact_dir: Path, cache_root: Path, *, verify: bool = False, progress: Progress | None = None
) -> CacheEntry:
    """Put the artifact at ``artifact_dir`` into ``cache_root/<artifact id>/`` and verify every file.

    ``verify=True`` re-hashes a warm entry too (finds a flipped byte that kept the size) and repairs it.

    Raises:
        TerminalError: not an artifact, a source file differs from its manifest, or the cache lacks space.
    """
    artifact = read_artifact(artifact_dir)
    started = time.perf_counter()
    total = sum(f.size for f in artifact.files)
    target = cache_root / artifact.id
    if not verify and is_warm(artifact, cache_root):
        return _entry(artifact, target, total, skipped=True)
    cache_root.mkdir(parents=True, exist_ok=True)
    with _lock(cache_root, artifact.id):
        if not verify and is_warm(artifact, cache_root):  # another preloader finished while we waited
            return _entry(artifact, target, total, skipped=True)
        _check_space(artifact, cache_root, target)
        (target / MARKER).unlink(missing_ok=True)  # from here on the entry is incomplete until re-marked
        target.mkdir(parents=True, exist_ok=True)
        copied, repaired, moved = [], [], 0

        def on_bytes(count: int) -> None:
            nonlocal moved
            moved += count
            if progress:
                progress(f"preloading {artifact.id}", min(1.0, moved / max(total, 1)))

        for f in artifact.files:
            dest = target / f.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.exists():
                if dest.stat().st_size == f.size and _hash_file(dest) == f.sha256:
                    on_bytes(f.size)
                    continue
                repaired.append(f.name)
                dest.unlink()
            digest = _copy_hashing(artifact_dir / f.name, dest, on_bytes)
            if digest != f.sha256:
                dest.unlink()
                raise TerminalError(
                    f"{artifact_dir / f.name} does not match its manifest (sha256 {digest[:12]}, "
                    f"expected {f.sha256[:12]}): the artifact itself is damaged",
                    hint="rebuild it with `modelctl quantize` (delete the artifact directory first)",
                )
            if f.name not in repaired:
                copied.append(f.name)
        shutil.copy2(artifact_dir / "artifact.json", target / "artifact.json")
        verified_at = datetime.now(UTC).isoformat(timespec="seconds")
        marker = {
            "artifact_id": artifact.id,
            "manifest_sha256": _manifest_digest(artifact.files),
            "verified_at": verified_at,
            "seconds": round(time.perf_counter() - started, 3),
        }
        tmp_marker = target / f"{MARKER}.tmp"
        tmp_marker.write_text(json.dumps(marker, indent=2) + "\n")
        os.replace(tmp_marker, target / MARKER)
    return _entry(artifact, target, total, copied=copied, repaired=repaired, verified_at=verified_at)


def _check_space(artifact: Artifact, root: Path, target: Path) -> None:
    """Refuse before writing when the files still to copy will not fit.

    Raises:
        TerminalError: not enough free space, with the numbers.
    """
    needed = 0
    for f in artifact.files:
        dest = target / f.name
        have = dest.stat().st_size if dest.exists() else 0
        partial = dest.with_name(dest.name + PARTIAL)
        have += partial.stat().st_size if partial.exists() else 0
        needed += max(0, f.size - have)
    free = shutil.disk_usage(root).free
    if needed + SPACE_MARGIN > free:
        gib = 1 << 30
        raise TerminalError(
            f"the cache at {root} has {free / gib:.2f} GiB free but {artifact.id} needs {needed / gib:.2f} GiB "
            f"more (plus {SPACE_MARGIN >> 20} MiB headroom)",
            hint="free space on the cache volume (remove unused artifacts) or enlarge the PVC",
        )


def _entry(
    artifact: Artifact,
    target: Path,
    total: int,
    *,
    skipped: bool = False,
    copied: list[str] | None = None,
    repaired: list[str] | None = None,
    verified_at: str | None = None,
) -> CacheEntry:
    if verified_at is None:
        marker = _read_marker(target) or {}
        verified_at = str(marker.get("verified_at", ""))
    return CacheEntry(
        artifact_id=artifact.id,
        path=str(target),
        verified_at=verified_at,
        bytes=total,
        files=len(artifact.files),
        skipped=skipped,
        copied=copied or [],
        repaired=repaired or [],
    )
