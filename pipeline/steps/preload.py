"""preload: an artifact onto the cache volume, every file verified; refused when its bytes are not the ones that
were published (and evaluated), with both digests named. From the artifact store when one is configured."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pipeline.cache import CacheEntry, preload
from pipeline.config import ArtifactStoreSettings
from pipeline.errors import TerminalError
from pipeline.progress import Progress
from pipeline.quantize import read_artifact
from pipeline.steps.base import StepRequest
from pipeline.steps.publish import manifest_digest
from pipeline.store import fetch_into_cache, store_from_settings


class PreloadRequest(StepRequest):
    step: Literal["preload"] = "preload"
    artifact_dir: str = ""
    cache_root: str
    expected_digest: str | None = None
    verify: bool = False
    store: ArtifactStoreSettings | None = None
    artifact_id: str | None = None


def run(request: PreloadRequest, progress: Progress | None = None) -> tuple[CacheEntry, bool]:
    """Raises: TerminalError (the bytes differ from the expected digest; a file is damaged; not in the store)."""
    if request.store is not None and request.artifact_id and request.expected_digest:
        store = store_from_settings(request.store)
        entry = fetch_into_cache(
            store,
            request.artifact_id,
            request.expected_digest,
            Path(request.cache_root),
            verify=request.verify,
            progress=progress,
        )
        return entry, entry.skipped
    if request.expected_digest is not None:
        found = manifest_digest(read_artifact(Path(request.artifact_dir)))
        if found != request.expected_digest:
            raise TerminalError(
                f"{request.artifact_dir} holds bytes {found}, not the published {request.expected_digest}",
                hint="the artifact was rebuilt or changed after it was published; publish and evaluate it again",
            )
    entry = preload(Path(request.artifact_dir), Path(request.cache_root), verify=request.verify, progress=progress)
    return entry, entry.skipped
