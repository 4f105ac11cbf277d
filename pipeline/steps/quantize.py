"""quantize: a pinned source + the full recipe + the source policy -> an Artifact (a skip when it exists)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pipeline.progress import Progress
from pipeline.quantize import Artifact, Backend, Recipe, artifact_id, quantize
from pipeline.quantize.recipe import MANIFEST, calibration_for
from pipeline.source import ModelSource, SourcePolicy
from pipeline.steps.base import StepRequest


class QuantizeRequest(StepRequest):
    step: Literal["quantize"] = "quantize"
    source: ModelSource
    recipe: Recipe
    backend: Backend
    out_root: str
    policy: SourcePolicy = SourcePolicy()

    def artifact_id(self) -> str:
        """The id the build will have (reads the calibration data, if any; loads no model)."""
        return artifact_id(self.source, self.recipe, self.backend, calibration_for(self.recipe)[1])

    def built(self) -> bool:
        """Whether the artifact is already on disk where this request builds it."""
        return (Path(self.out_root) / self.artifact_id() / MANIFEST).is_file()


def run(request: QuantizeRequest, progress: Progress | None = None) -> tuple[Artifact, bool]:
    """Raises: TerminalError (recipe, backend and model do not fit; no calibration data)."""
    artifact = quantize(
        request.source,
        request.recipe,
        Path(request.out_root),
        request.backend,
        policy=request.policy,
        progress=progress,
    )
    return artifact, artifact.skipped
