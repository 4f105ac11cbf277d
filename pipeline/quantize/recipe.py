"""Recipe, Artifact and the artifact id: what to build, what was built, and its identity.

Artifact id = hash of (source repo, source sha, recipe, backend and its version, calibration data hash), with a
readable prefix: ``awq-w4a16-g128-<16 hex>`` (``unquantized-<16 hex>`` for method ``none``). The same inputs
always give the same id, so an id that already exists on disk is a finished build and re-running it is a skip.

Method ``none`` is the unquantized recipe: the source's safetensors weights as they are (or cast to ``dtype``),
written by the ``safetensors`` backend with no calibration, for engines that cannot serve 4-bit weights.
"""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.config import Calibration, Quantization
from pipeline.errors import TerminalError
from pipeline.source import ModelSource, SourcePolicy

Method = Literal["awq", "gptq", "none"]
Backend = Literal["llmcompressor", "autoawq", "safetensors"]
Dtype = Literal["bfloat16", "float16", "float32"]
DEFAULT_CALIBRATION = Path(__file__).with_name("calibration.jsonl")
BACKEND_DISTRIBUTIONS = {"llmcompressor": "llmcompressor", "autoawq": "autoawq", "safetensors": "safetensors"}
DTYPE_LABELS = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
QUANTIZING_FIELDS = ("bits", "group_size", "symmetric", "ignore", "calibration")
MANIFEST = "artifact.json"


class Recipe(BaseModel):
    """How to quantize: method, bits, group size, symmetry, layers left alone, and calibration.

    Method ``none`` quantizes nothing: only ``dtype`` applies (None keeps the source's dtype).
    """

    model_config = ConfigDict(frozen=True)

    method: Method
    bits: Literal[4] = 4
    group_size: Literal[32, 64, 128] = 128
    symmetric: bool = True
    ignore: tuple[str, ...] = ("lm_head",)
    calibration: Calibration = Calibration()
    dtype: Dtype | None = None

    @model_validator(mode="after")
    def _fields_fit_the_method(self) -> Recipe:
        if self.method != "none" and self.dtype is not None:
            raise ValueError(f"dtype applies to method 'none' only ({self.method} keeps the source's dtype)")
        if self.method == "none":
            given = [k for k in QUANTIZING_FIELDS if getattr(self, k) != Recipe.model_fields[k].get_default()]
            if given:
                raise ValueError(f"method 'none' quantizes nothing: {', '.join(given)} cannot be set for it")
        return self

    @classmethod
    def from_config(cls, settings: Quantization, method: Method | None = None) -> Recipe:
        """The recipe promotion.yaml describes, with the method optionally overridden (`--method`).

        With method ``none`` only the dtype is taken: the quantization settings do not apply to it.
        """
        chosen = method or settings.method
        if chosen == "none":
            return cls(method="none", dtype=settings.dtype)
        return cls(
            method=chosen,
            bits=settings.bits,
            group_size=settings.group_size,
            symmetric=settings.symmetric,
            ignore=tuple(settings.ignore),
            calibration=settings.calibration,
        )

    @property
    def name(self) -> str:
        """A short readable name: ``awq-w4a16-g128`` (``-asym`` when asymmetric); ``unquantized[-bf16]``."""
        if self.method == "none":
            return "unquantized" + (f"-{DTYPE_LABELS[self.dtype]}" if self.dtype else "")
        return f"{self.method}-w{self.bits}a16-g{self.group_size}" + ("" if self.symmetric else "-asym")

    def identity(self) -> dict[str, object]:
        """What of the recipe names the artifact: for method none only the dtype (the rest does not apply);
        a recipe without a dtype hashes as it did before the field existed, so existing ids stay the same."""
        if self.method == "none":
            return {"method": "none", "dtype": self.dtype}
        dumped = self.model_dump(mode="json")
        if dumped.get("dtype") is None:
            dumped.pop("dtype", None)
        return dumped


def unquantized(recipe: Recipe) -> Recipe:
    """The recipe as built: method none keeps only its dtype (a CLI may have copied calibration settings in)."""
    return Recipe(method="none", dtype=recipe.dtype) if recipe.method == "none" else recipe


def effective_backend(recipe: Recipe, backend: Backend) -> Backend:
    """The backend that builds ``recipe``: method none is written by ``safetensors`` (no quantizer runs), whichever
    quantizer the settings name by default; every other method by ``backend``."""
    if recipe.method == "none" and backend == "llmcompressor":
        return "safetensors"
    return backend


class ArtifactFile(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    size: int
    sha256: str


class Artifact(BaseModel):
    """A finished, immutable quantized model on disk, described by its ``artifact.json``."""

    id: str
    path: str
    format: Literal["compressed-tensors", "awq-gemm", "unquantized"]
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


def calibration_for(recipe: Recipe) -> tuple[list[str], str]:
    """The recipe's calibration texts and their hash; none (and an empty hash) for method none.

    Raises:
        TerminalError: the calibration file or dataset is missing, empty or has no text.
    """
    if recipe.method == "none":
        return [], ""
    texts = load_calibration(recipe.calibration)
    return texts, calibration_sha256(texts)


def artifact_id(source: ModelSource, recipe: Recipe, backend: Backend, calibration_hash: str) -> str:
    """The artifact's identity: a readable recipe prefix and 16 hex digits of the hash of every input."""
    recipe = unquantized(recipe)
    backend = effective_backend(recipe, backend)
    identity = {
        "source": {"repo": source.repo, "sha": source.sha},
        "recipe": recipe.identity(),
        "backend": backend,
        "backend_version": tool_version(BACKEND_DISTRIBUTIONS[backend]),
        "calibration_sha256": calibration_hash,
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return f"{recipe.name}-{digest}"
