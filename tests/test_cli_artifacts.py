"""`modelctl quantize` and `modelctl preload` as a user runs them."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.quantize import Artifact

runner = CliRunner()


def test_quantize_existing_artifact_is_a_skip_and_preload_is_verified(
    quantized: Callable[[str, str], Artifact], tiny_model: Path, tmp_path: Path
) -> None:
    built = quantized("llmcompressor", "gptq")
    out = str(Path(built.path).parent)
    args = ["quantize", str(tiny_model), "--method", "gptq", "--samples", "16", "--max-seq-len", "64", "--out", out]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["id"] == built.id and data["skipped"] is True

    human = runner.invoke(app, args)
    assert human.exit_code == 0 and "already built (skipped)" in human.output

    cache = tmp_path / "cache"
    first = runner.invoke(app, ["preload", built.path, "--cache-root", str(cache), "--json"])
    assert first.exit_code == 0, first.output
    entry = json.loads(first.stdout)
    assert entry["skipped"] is False and entry["artifact_id"] == built.id
    again = runner.invoke(app, ["preload", built.path, "--cache-root", str(cache)])
    assert again.exit_code == 0 and "already in" in again.output


def test_bad_reference_exits_2_with_the_reason(tmp_path: Path) -> None:
    result = runner.invoke(app, ["quantize", "not a model", "--out", str(tmp_path / "a")])
    assert result.exit_code == 2
    assert "is not a model reference" in result.output
    assert not (tmp_path / "a").exists()


def test_preload_of_a_non_artifact_exits_2(tmp_path: Path) -> None:
    result = runner.invoke(app, ["preload", str(tmp_path), "--cache-root", str(tmp_path / "cache"), "--json"])
    assert result.exit_code == 2
    assert json.loads(result.stdout)["error"] == "terminal"
