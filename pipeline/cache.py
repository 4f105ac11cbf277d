"""Preload an artifact into the cache root (the PVC the inference pods mount): verified, resumable, atomic.

Layout: ``<root>/<artifact id>/`` holds the files; ``<root>/<artifact id>/.complete`` is written last and
records the manifest it was verified against. Each file is copied and hashed in one pass through a
``.partial`` file that a later run resumes; a file whose hash does not match the manifest is fetched again.
A warm preload reads no file content, so it takes milliseconds whatever the artifact's size, yet cannot hold
other bytes silently: the marker records each file's (size, mtime_ns, inode) at verification (the mtime pinned
into the past, so a write even within the same clock tick changes it), every warm use compares them, and a file
that changed is hashed again (and fetched again when its bytes differ). ``verify=True`` re-hashes everything.
Space is reserved per preload (pipeline/volume.py); on a failure other than a broken-off download, the
``.partial`` files are removed, and a full volume (ENOSPC) is a TerminalError naming the volume and the bytes.
Two preloaders of the same artifact (two pods on one RWX volume)
serialize on a lock file: the second waits, then finds the work done.

Sources: a local artifact directory (checked against its ``artifact.json``), or a Hub repo at a pinned sha
(checked against the Hub's sha256 for LFS files and git blob ids for the rest), streamed with HTTP ranges.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fnmatch import fnmatch
from pathlib import Path

from pydantic import BaseModel

from pipeline.errors import TerminalError, TransientError
from pipeline.progress import Progress
from pipeline.quantize.step import read_artifact
from pipeline.secrets import redact
from pipeline.source import MODEL_FILE_PATTERNS, ModelSource, SourceFile, SourcePolicy
from pipeline.volume import free_bytes, human, reserve

MARKER = ".complete"
PARTIAL = ".partial"
BLOCK = 8 << 20  # 8 MiB: large enough to stream at disk speed, small enough to report progress
SPACE_MARGIN = 64 << 20

Reader = Callable[[str, int], Iterator[bytes]]  # (file name, offset) -> the file's bytes from there on


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


@dataclass(frozen=True)
class Expected:
    """One file the entry must hold, and what proves it intact."""

    name: str
    size: int
    sha256: str | None = None
    git_sha1: str | None = None


@dataclass
class Plan:
    """What to preload: an id, the files with their checks, how to read them, and extra files to write."""

    entry_id: str
    files: list[Expected]
    read: Reader
    describe: str
    extra: dict[str, bytes] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(f.size for f in self.files)

    def digest(self) -> str:
        listing = [(f.name, f.size, f.sha256, f.git_sha1) for f in sorted(self.files, key=lambda f: f.name)]
        return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


class _Hashes:
    """sha256 and, when the Hub only knows a git blob id, git's sha1 of "blob <size>\\0" + content: one pass."""

    def __init__(self, expected: Expected) -> None:
        self.sha256 = hashlib.sha256()
        self.sha1 = hashlib.sha1(f"blob {expected.size}\0".encode(), usedforsecurity=False)
        self.expected = expected

    def update(self, block: bytes) -> None:
        self.sha256.update(block)
        if self.expected.git_sha1:
            self.sha1.update(block)

    def mismatch(self) -> str | None:
        """None when the content is the expected one, else what differs."""
        if self.expected.sha256 and self.sha256.hexdigest() != self.expected.sha256:
            return f"sha256 {self.sha256.hexdigest()[:12]}, expected {self.expected.sha256[:12]}"
        if self.expected.git_sha1 and self.sha1.hexdigest() != self.expected.git_sha1:
            return f"git blob {self.sha1.hexdigest()[:12]}, expected {self.expected.git_sha1[:12]}"
        return None


@contextmanager
def _lock(root: Path, entry_id: str) -> Iterator[None]:
    locks = root / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{entry_id}.lock", "w") as handle:
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


def _stat(path: Path) -> list[int] | None:
    """What a warm use compares with the verification: size, mtime_ns, inode (None when the file is gone)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _unchanged(target: Path, marker: dict[str, object] | None, f: Expected) -> bool:
    """True when the file is as it was verified: same size (the manifest's), mtime and inode."""
    recorded = (marker or {}).get("stat")
    now = _stat(target / f.name)
    return isinstance(recorded, dict) and now is not None and now[0] == f.size and recorded.get(f.name) == now


def _pin(path: Path, when_ns: int) -> list[int]:
    """Set a verified file's mtime to ``when_ns`` (before now): any later write moves it. Returns its stat."""
    os.utime(path, ns=(path.stat().st_atime_ns, when_ns))
    return _stat(path) or []


def is_warm(plan: Plan, root: Path) -> bool:
    """True when the cache holds the plan's entry complete: marker for the same manifest, no file changed since."""
    target = root / plan.entry_id
    marker = _read_marker(target)
    if not marker or marker.get("manifest_sha256") != plan.digest():
        return False
    return all(_unchanged(target, marker, f) for f in plan.files)


def _file_matches(path: Path, expected: Expected) -> bool:
    if path.stat().st_size != expected.size:
        return False
    hashes = _Hashes(expected)
    with open(path, "rb") as handle:
        while block := handle.read(BLOCK):
            hashes.update(block)
    return hashes.mismatch() is None


def _fetch(plan: Plan, expected: Expected, dest: Path, on_bytes: Callable[[int], None]) -> str | None:
    """Fetch one file into ``dest`` through ``dest.partial`` (resuming it); returns a mismatch or None."""
    partial = dest.with_name(dest.name + PARTIAL)
    hashes, done = _Hashes(expected), 0
    if partial.exists() and partial.stat().st_size <= expected.size:
        with open(partial, "rb") as handle:  # re-hash what an earlier run already fetched
            while block := handle.read(BLOCK):
                hashes.update(block)
                done += len(block)
    else:
        partial.unlink(missing_ok=True)
    on_bytes(done)
    with open(partial, "ab") as writer:
        for block in plan.read(expected.name, done):
            writer.write(block)
            hashes.update(block)
            on_bytes(len(block))
        writer.flush()
        os.fsync(writer.fileno())
    problem = hashes.mismatch()
    if problem is None:
        os.replace(partial, dest)
    else:
        partial.unlink()
    return problem


def _run(plan: Plan, root: Path, verify: bool, progress: Progress | None) -> CacheEntry:
    target = root / plan.entry_id
    if not verify and is_warm(plan, root):
        return _entry(plan, target, skipped=True)
    root.mkdir(parents=True, exist_ok=True)
    with _lock(root, plan.entry_id):
        if not verify and is_warm(plan, root):  # another preloader finished while we waited
            return _entry(plan, target, skipped=True)
        files = [(f.name, f.size) for f in plan.files]
        with reserve(root, plan.entry_id, target, files, SPACE_MARGIN) as needed:
            try:
                marker = _read_marker(target)
                same = marker is not None and marker.get("manifest_sha256") == plan.digest()
                return _fill(plan, target, verify, progress, marker if same else None)
            except TransientError:
                raise  # a broken-off download: its .partial files let the next run resume
            except BaseException as exc:
                for f in plan.files:
                    (target / (f.name + PARTIAL)).unlink(missing_ok=True)
                if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise TerminalError(
                        f"the cache volume at {root} ran out of space while preloading {plan.entry_id}: it needed "
                        f"{human(needed)} more and has {human(free_bytes(root))} free now",
                        hint="free space on the cache volume (remove unused artifacts) or enlarge the PVC; "
                        "the partial files were removed",
                    ) from None
                raise


def _fill(
    plan: Plan, target: Path, verify: bool, progress: Progress | None, marker: dict[str, object] | None
) -> CacheEntry:
    """Copy and verify every file not already verified and unchanged (all of them with ``verify``); mark it."""
    started = time.perf_counter()
    (target / MARKER).unlink(missing_ok=True)  # incomplete from here until it is marked again
    target.mkdir(parents=True, exist_ok=True)
    copied, repaired, moved = [], [], 0

    def on_bytes(count: int) -> None:
        nonlocal moved
        moved += count
        if progress:
            progress(f"preloading {plan.entry_id}", min(1.0, moved / max(plan.total, 1)))

    for f in plan.files:
        dest = target / f.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            if (not verify and _unchanged(target, marker, f)) or _file_matches(dest, f):
                on_bytes(f.size)
                continue
            repaired.append(f.name)
            dest.unlink()
        problem = _fetch(plan, f, dest, on_bytes)
        if problem is not None:
            raise TerminalError(
                f"{f.name} from {plan.describe} does not match its manifest ({problem}): the source is damaged",
                hint="rebuild or re-upload it; nothing was marked complete in the cache",
            )
        if f.name not in repaired:
            copied.append(f.name)
    for name, content in plan.extra.items():
        (target / name).write_bytes(content)
    verified_at = datetime.now(UTC).isoformat(timespec="seconds")
    pinned = (time.time_ns() // 10**9 - 2) * 10**9  # whole seconds, safely before any later write
    new_marker = {
        "artifact_id": plan.entry_id,
        "manifest_sha256": plan.digest(),
        "verified_at": verified_at,
        "seconds": round(time.perf_counter() - started, 3),
        "stat": {f.name: _pin(target / f.name, pinned) for f in plan.files},
    }
    (target / f"{MARKER}.tmp").write_text(json.dumps(new_marker, indent=2) + "\n")
    os.replace(target / f"{MARKER}.tmp", target / MARKER)
    return _entry(plan, target, copied=copied, repaired=repaired, verified_at=verified_at)


def _entry(
    plan: Plan,
    target: Path,
    *,
    skipped: bool = False,
    copied: list[str] | None = None,
    repaired: list[str] | None = None,
    verified_at: str | None = None,
) -> CacheEntry:
    if verified_at is None:
        verified_at = str((_read_marker(target) or {}).get("verified_at", ""))
    return CacheEntry(
        artifact_id=plan.entry_id,
        path=str(target),
        verified_at=verified_at,
        bytes=plan.total,
        files=len(plan.files),
        skipped=skipped,
        copied=copied or [],
        repaired=repaired or [],
    )


def _local_reader(directory: Path) -> Reader:
    def read(name: str, offset: int) -> Iterator[bytes]:
        with open(directory / name, "rb") as handle:
            handle.seek(offset)
            while block := handle.read(BLOCK):
                yield block

    return read


def artifact_plan(artifact_dir: Path) -> Plan:
    """The preload plan of a local artifact: its files, checked against its artifact.json.

    Raises:
        TerminalError: the directory holds no finished artifact.
    """
    artifact = read_artifact(artifact_dir)
    return Plan(
        entry_id=artifact.id,
        files=[Expected(f.name, f.size, sha256=f.sha256) for f in artifact.files],
        read=_local_reader(artifact_dir),
        describe=str(artifact_dir),
        extra={"artifact.json": (artifact_dir / "artifact.json").read_bytes()},
    )


def preload(
    artifact_dir: Path, cache_root: Path, *, verify: bool = False, progress: Progress | None = None
) -> CacheEntry:
    """Put the artifact at ``artifact_dir`` into ``cache_root/<artifact id>/`` and verify every file.

    ``verify=True`` re-hashes a warm entry too (finds a flipped byte that kept the size) and repairs it.

    Raises:
        TerminalError: not an artifact, a source file differs from its manifest, or the cache lacks space.
    """
    return _run(artifact_plan(artifact_dir), cache_root, verify, progress)


def preload_plan(plan: Plan, cache_root: Path, *, verify: bool = False, progress: Progress | None = None) -> CacheEntry:
    """Preload whatever ``plan`` describes (an artifact store's files, for one) the same verified, resumable way.

    Raises:
        TerminalError: a file read through the plan differs from its expected hash, or the cache lacks space.
    """
    return _run(plan, cache_root, verify, progress)


def hub_entry_id(source: ModelSource) -> str:
    """The cache id of a Hub repo taken as it is: ``hub--org--name--<sha12>``."""
    return f"hub--{source.repo.replace('/', '--')}--{source.sha[:12]}"


def _hub_reader(source: ModelSource, policy: SourcePolicy) -> Reader:
    import httpx
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    endpoint = os.environ.get("HF_ENDPOINT") or None
    headers = build_hf_headers(token=os.environ.get(policy.token_env) or False)

    def read(name: str, offset: int) -> Iterator[bytes]:
        url = hf_hub_url(source.repo, name, revision=source.sha, endpoint=endpoint)
        ranged = {**headers, "Range": f"bytes={offset}-"} if offset else headers
        try:
            with httpx.stream("GET", url, headers=ranged, follow_redirects=True, timeout=60) as response:
                if response.status_code >= 400:
                    kind = (
                        TransientError if response.status_code >= 500 or response.status_code == 429 else TerminalError
                    )
                    raise kind(f"the Hub answered {response.status_code} for {source.ref} {name}")
                if offset and response.status_code != 206:
                    raise TransientError(f"the Hub ignored the range request for {name}; retry to start it over")
                yield from response.iter_bytes(BLOCK)
        except httpx.HTTPError as exc:
            raise TransientError(f"download of {source.ref} {name} broke off: {redact(str(exc))[:200]}") from None

    return read


def preload_hub(
    source: ModelSource,
    cache_root: Path,
    *,
    policy: SourcePolicy | None = None,
    verify: bool = False,
    progress: Progress | None = None,
) -> CacheEntry:
    """Put a Hub repo, at its pinned sha, into ``cache_root/hub--org--name--<sha12>/``, verifying every file.

    Raises:
        TerminalError: the source is not a Hub repo, a file has no size, or a file does not match.
        TransientError: the download broke off (a re-run resumes it).
    """
    if source.kind != "hub":
        raise TerminalError(f"{source.ref} is not a Hub repo", hint="preload local artifacts by their directory")

    def wanted(f: SourceFile) -> bool:
        return any(fnmatch(f.name, pattern) for pattern in MODEL_FILE_PATTERNS)

    files = []
    for f in filter(wanted, source.files):
        if f.size is None:
            raise TerminalError(f"the Hub gave no size for {source.ref} {f.name}", hint="retry, or report it")
        files.append(Expected(f.name, f.size, sha256=f.sha256, git_sha1=f.git_sha1))
    plan = Plan(
        entry_id=hub_entry_id(source),
        files=files,
        read=_hub_reader(source, policy or SourcePolicy()),
        describe=source.ref,
        extra={"source.json": (source.model_dump_json(indent=2) + "\n").encode()},
    )
    return _run(plan, cache_root, verify, progress)
