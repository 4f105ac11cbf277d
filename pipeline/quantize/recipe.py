"""Recipe, Artifact and the artifact id: what to build, what was built, and its identity.

Artifact id = hash of (source repo, source sha, recipe, backend and its version, calibration data hash), with a
readable prefix: ``awq-w4a16-g128-<16 hex>``. The same inputs always give the same id, so an id that already
exists on disk is a finished build and re-running it is a skip.
"""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.config import Calibration, Quantization
from pipeline.errors import TerminalError
from pipeline.source import ModelSource, SourcePolicy

Method = Literal["awq", "gptq"]
Backend = Literal["llmcompressor", "autoawq"]
DEFAULT_CALIBRATION = Path(__file__).with_name("calibration.jsonl")
BACKEND_DISTRIBUTIONS = {"llmcompressor": "llmcompressor", "autoawq": "autoawq"}
MANIFEST = "artifact.json"


class Recipe(BaseModel):
    """How to quantize: method, bits, group size, symmetry, layers left alone, and calibration."""

    model_config = ConfigDict(frozen=True)

    method: Method
    bits: Literal[4] = 4
    group_size: Literal[32, 64, 128] = 128
    symmetric: bool = True
    ignore: tuple[str, ...] = ("lm_head",)
    calibration: Calibration = Calibration()

    @classmethod
    def from_config(cls, settings: Quantization, method: Method | None = None) -> Recipe:
        """The recipe promotion.yaml describes, with the method optionally overridden (`--method`)."""
        return cls(
            method=method or settings.method,
            bits=settings.bits,
            group_size=settings.group_size,
            symmetric=settings.symmetric,
            ignore=tuple(settings.ignore),
            calibration=settings.calibration,
        )

    @property
    def name(self) -> str:
        """A short readable name: ``awq-w4a16-g128`` (``-asym`` when asymmetric)."""
        return f"{self.method}-w{self.bits}a16-g{self.group_size}" + ("" if self.symmetric else "-asym")


class ArtifactFile(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    size: int
    sha256: str


class Artifact(BaseModel):
    """A finished, immutable quantized model on disk, described by its ``artifact.json``."""

    id: str
    path: str
    format: Literal["compressed-tensors", "awq-gemm"]
    backend: Backend
    source: ModelSource
    recipe: Recipe
    policy: SourcePolicy = Field(SourcePolicy(), description="what the source was allowed to be when built")
    calibration_sha256: str
    tool_versions: dict[str, str]
    files: list[ArtifactFile]
    timings: dict[str, float] = Field(default_factory=dict)
    skipped: bool = Field(False, exclude=True, description="true when this call found it already built")

    def manifest_json(self) -> str:
        """The content of artifact.json: everything but where it is and whether this call built it."""
        return self.model_dump_json(indent=2, exclude={"path", "skipped"}) + "\n"


def tool_version(distribution: str) -> str:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "not-installed"


def load_calibration(calibration: Calibration) -> list[str]:
    """The calibration texts: the shipped default, a local JSONL/text file, or a Hub dataset's text column.

    Raises:
        TerminalError: the file or dataset is missing, empty or has no text.
    """
    name = calibration.dataset
    if name is None or Path(name).expanduser().is_file():
        path = DEFAULT_CALIBRATION if name is None else Path(name).expanduser()
        texts = _read_text_file(path)
    else:
        texts = _read_hub_dataset(name, calibration.samples)
    texts = [t for t in texts if t.strip()][: calibration.samples]
    if not texts:
        raise TerminalError(f"calibration data {name or DEFAULT_CALIBRATION} has no text", hint="give it some lines")
    return texts


def _read_text_file(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix != ".jsonl":
        return lines
    texts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise TerminalError(
                f"{path}:{number}: not a JSON line", hint='write one {"text": "..."} per line'
            ) from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise TerminalError(f"{path}:{number}: expected an object with a 'text' string")
        texts.append(row["text"])
    return texts


def _read_hub_dataset(name: str, samples: int) -> list[str]:
    try:
        from datasets import load_dataset

        rows = load_dataset(name, split=f"train[:{samples}]")
    except Exception as exc:  # datasets raises many types; all mean "not available"
        raise TerminalError(
            f"calibration dataset {name!r} could not be loaded: {type(exc).__name__}",
            hint="use a local .jsonl file, or make the dataset reachable (it is not in offline mode)",
        ) from None
    if "text" not in rows.column_names:
        raise TerminalError(f"calibration dataset {name!r} has no 'text' column (it has {rows.column_names})")
    return [str(t) for t in rows["text"]]


def calibration_sha256(texts: list[str]) -> str:
    return hashlib.sha256(json.dumps(texts).encode()).hexdigest()


def artifact_id(source: ModelSource, recipe: Recipe, backend: Backend, calibration_hash: str) -> str:
    """The artifact's identity: a readable recipe prefix and 16 hex digits of the hash of every input."""
    identity = {
        "source": {"repo": source.repo, "sha": source.sha},
        "recipe": recipe.model_dump(mode="json"),
        "backend": backend,
        "backend_version": tool_version(BACKEND_DISTRIBUTIONS[backend]),
        "calibration_sha256": calibration_hash,
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return f"{recipe.name}-{digest}"
