"""publish: put a built artifact where every environment preloads it from, identified by its manifest digest.

The manifest digest is the sha256 over every file's (name, sha256) listed in ``artifact.json``: it identifies the
bytes (the artifact id only identifies the build inputs). Until the shared artifact store lands, the artifact's
own directory is its location (``file://``) and the digest is computed here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from pipeline.quantize import Artifact, read_artifact
from pipeline.steps.base import StepRequest


class StoredArtifact(BaseModel):
    """Where the published bytes are, and their identity."""

    artifact_id: str
    manifest_digest: str
    uri: str


def manifest_digest(artifact: Artifact) -> str:
    """``sha256:<hex>`` over the sorted (name, sha256) of every file of the artifact."""
    listing = sorted((f.name, f.sha256) for f in artifact.files)
    return "sha256:" + hashlib.sha256(json.dumps(listing).encode()).hexdigest()


class PublishRequest(StepRequest):
    step: Literal["publish"] = "publish"
    artifact_dir: str


def run(request: PublishRequest) -> tuple[StoredArtifact, bool]:
    """Raises: TerminalError (not a finished artifact)."""
    artifact = read_artifact(Path(request.artifact_dir))
    stored = StoredArtifact(
        artifact_id=artifact.id, manifest_digest=manifest_digest(artifact), uri=Path(request.artifact_dir).as_uri()
    )
    return stored, False
