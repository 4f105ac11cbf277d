"""The quantize step: a pinned ModelSource + a Recipe -> an immutable Artifact on disk.

The build happens in a temporary directory beside the final one and is renamed into place only when complete,
with its ``artifact.json`` (source, recipe, tool versions, per-file sha256 and size, timings). If the id already
exists the step is a skip that reads one JSON file: no model is loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from pipeline.errors import TerminalError
from pipeline.progress import Progress
from pipeline.quantize import backend_autoawq, backend_safetensors
from pipeline.quantize.recipe import (
    MANIFEST,
    Artifact,
    ArtifactFile,
    Backend,
    Recipe,
    artifact_id,
    calibration_for,
    effective_backend,
    tool_version,
    unquantized,
)
from pipeline.source import ModelSource, SourcePolicy, fetch, file_sha256


def read_artifact(path: Path) -> Artifact:
    """Load the Artifact described by ``<path>/artifact.json``.

    Raises:
        TerminalError: there is no readable artifact.json (not an artifact, or an unfinished one).
    """
    try:
        data = json.loads((path / MANIFEST).read_text())
        return Artifact.model_validate({**data, "path": str(path)})
    except (OSError, ValueError) as exc:
        raise TerminalError(
            f"{path} is not a finished artifact ({MANIFEST} missing or unreadable: {type(exc).__name__})",
            hint="pass a directory written by `modelctl quantize`",
        ) from None


def check_shapes(model_dir: Path, recipe: Recipe) -> None:
    """Refuse a model whose linear layers the group size does not divide, before any work.

    Raises:
        TerminalError: a hidden or intermediate size is not a multiple of the group size.
    """
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        raise TerminalError(f"{model_dir} has no readable config.json", hint="point at a transformers model") from None
    for key in ("hidden_size", "intermediate_size"):
        size = config.get(key)
        if isinstance(size, int) and size % recipe.group_size:
            raise TerminalError(
                f"{key} {size} is not a multiple of group size {recipe.group_size}",
                hint="pick a group size that divides it (32, 64 or 128)",
            )


def quantize(
    source: ModelSource,
    recipe: Recipe,
    out_root: Path,
    backend: Backend = "llmcompressor",
    *,
    policy: SourcePolicy | None = None,
    progress: Progress | None = None,
) -> Artifact:
    """Build (or find) the artifact for ``source`` quantized with ``recipe`` under ``out_root/<artifact id>``.

    Method none (unquantized) is written by the ``safetensors`` backend whatever quantizer ``backend`` names by
    default; the artifact has the same manifest, id and digest machinery as a quantized one.

    Raises:
        TerminalError: the recipe, backend or model cannot work together, or calibration data is missing.
    """
    recipe = unquantized(recipe)
    backend = effective_backend(recipe, backend)
    if backend == "autoawq":
        backend_autoawq.check(recipe)
    if backend == "safetensors" and recipe.method != "none":
        raise TerminalError(
            f"backend safetensors writes unquantized artifacts only (method none), not {recipe.method}",
            hint="use backend llmcompressor (or autoawq for awq)",
        )
    texts, calibration_hash = calibration_for(recipe)
    ident = artifact_id(source, recipe, backend, calibration_hash)
    final = out_root / ident
    if (final / MANIFEST).is_file():
        existing = read_artifact(final)
        return existing.model_copy(update={"skipped": True})

    model_dir = fetch(source, policy)
    if recipe.method == "none":
        backend_safetensors.check(model_dir)
    else:
        check_shapes(model_dir, recipe)
    out_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".building-{ident}-", dir=out_root))
    started = time.perf_counter()
    try:
        if backend == "safetensors":
            fmt = backend_safetensors.write(model_dir, tmp, recipe, progress)
        elif backend == "llmcompressor":
            from pipeline.quantize import backend_llmcompressor

            fmt = backend_llmcompressor.quantize(model_dir, tmp, recipe, texts, progress)
        else:
            fmt = backend_autoawq.quantize(model_dir, tmp, recipe, texts, progress)
        quantize_seconds = time.perf_counter() - started
        if progress:
            progress("hashing the artifact", 0.95)
        files = [
            ArtifactFile(name=str(p.relative_to(tmp)), size=p.stat().st_size, sha256=file_sha256(p))
            for p in sorted(tmp.rglob("*"))
            if p.is_file()
        ]
        artifact = Artifact(
            id=ident,
            path=str(final),
            format=fmt,
            backend=backend,
            source=source,
            recipe=recipe,
            policy=policy or SourcePolicy(),
            calibration_sha256=calibration_hash,
            tool_versions={
                name: tool_version(name)
                for name in (
                    "modelctl",
                    "torch",
                    "transformers",
                    "safetensors",
                    "llmcompressor",
                    "compressed-tensors",
                    "autoawq",
                )
            },
            files=files,
            timings={"quantize_s": round(quantize_seconds, 3), "total_s": round(time.perf_counter() - started, 3)},
        )
        (tmp / MANIFEST).write_text(artifact.manifest_json())
        try:
            os.rename(tmp, final)
        except OSError:
            if (final / MANIFEST).is_file():  # another builder finished the same id first: same bytes
                return read_artifact(final).model_copy(update={"skipped": True})
            raise
        if progress:
            progress("done", 1.0)
        return artifact
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
