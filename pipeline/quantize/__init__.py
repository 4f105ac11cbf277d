"""Quantize a pinned model into an immutable artifact: AWQ or GPTQ (llmcompressor or AutoAWQ), or unquantized."""

from pipeline.quantize.recipe import Artifact, ArtifactFile, Backend, Calibration, Method, Recipe, artifact_id
from pipeline.quantize.step import quantize, read_artifact

__all__ = [
    "Artifact",
    "ArtifactFile",
    "Backend",
    "Calibration",
    "Method",
    "Recipe",
    "artifact_id",
    "quantize",
    "read_artifact",
]
