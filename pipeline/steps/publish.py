"""publish: put a built artifact into the artifact store every environment preloads from (pipeline.store).

The manifest digest (:func:`pipeline.store.manifest_digest`, over every file's name, size and sha256) identifies
the bytes; the artifact id only identifies the build's inputs. With no ``artifacts:`` store configured, the
artifact's own directory is its location (``file://``) and the digest is computed from its artifact.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pipeline.config import ArtifactStoreSettings
from pipeline.quantize import Artifact, read_artifact
from pipeline.steps.base import StepRequest
from pipeline.store import StoredArtifact, store_from_settings
from pipeline.store import manifest_digest as digest_of_files


def manifest_digest(artifact: Artifact) -> str:
    """The manifest digest of an artifact (``sha256:<hex>``), as the store computes it."""
    return digest_of_files(artifact.files)


class PublishRequest(StepRequest):
    step: Literal["publish"] = "publish"
    artifact_dir: str
    store: ArtifactStoreSettings | None = None


def run(request: PublishRequest) -> tuple[StoredArtifact, bool]:
    """Raises: TerminalError (not a finished artifact; DigestMismatch: other bytes published under this id)."""
    if request.store is not None:
        stored = store_from_settings(request.store).publish(Path(request.artifact_dir))
        return stored, stored.skipped
    artifact = read_artifact(Path(request.artifact_dir))
    here = StoredArtifact(
        artifact_id=artifact.id,
        manifest_digest=manifest_digest(artifact),
        uri=Path(request.artifact_dir).as_uri(),
        files=artifact.files,
    )
    return here, False
