"""Quantization on the small model: each backend x method builds a loadable artifact, once."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline import tinymodel
from pipeline.errors import TerminalError
from pipeline.quantize import Artifact, Calibration, Recipe, quantize, read_artifact
from pipeline.quantize.backend_autoawq import dequantize_to_dense
from pipeline.quantize.recipe import DEFAULT_CALIBRATION
from pipeline.source import resolve

Build = Callable[[str, str], Artifact]


def assert_manifest_complete(artifact: Artifact) -> None:
    path = Path(artifact.path)
    on_disk = {p.name for p in path.iterdir() if p.name != "artifact.json"}
    assert {f.name for f in artifact.files} == on_disk
    for f in artifact.files:
        data = (path / f.name).read_bytes()
        assert len(data) == f.size and hashlib.sha256(data).hexdigest() == f.sha256
    manifest = json.loads((path / "artifact.json").read_text())
    assert manifest["source"]["sha"] == artifact.source.sha
    assert manifest["recipe"]["method"] == artifact.recipe.method
    assert set(manifest["tool_versions"]) >= {"torch", "transformers", "llmcompressor", "autoawq"}
    assert manifest["timings"]["quantize_s"] > 0
    assert not list(path.parent.glob(".building-*")), "no half-built directory is left behind"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_llmcompressor_artifact_loads_and_answers(quantized: Build, method: str) -> None:
    artifact = quantized("llmcompressor", method)
    assert artifact.id.startswith(f"{method}-w4a16-g128-") and artifact.format == "compressed-tensors"
    assert_manifest_complete(artifact)
    config = json.loads((Path(artifact.path) / "config.json").read_text())["quantization_config"]
    weights = config["config_groups"]["group_0"]["weights"]
    assert (config["quant_method"], weights["num_bits"], weights["group_size"]) == ("compressed-tensors", 4, 128)
    assert config["ignore"] == ["lm_head"]
    scores = tinymodel.score(artifact.path)  # transformers loads it and generates from it
    assert scores["generation"] >= 0.9 and scores["multiple_choice"] >= 0.9, scores


@pytest.mark.slow
def test_autoawq_artifact_verified_by_dequantizing_its_tensors(quantized: Build, tmp_path: Path) -> None:
    artifact = quantized("autoawq", "awq")
    assert artifact.format == "awq-gemm" and artifact.recipe.symmetric is False
    assert_manifest_complete(artifact)
    config = json.loads((Path(artifact.path) / "config.json").read_text())["quantization_config"]
    assert (config["quant_method"], config["version"], config["bits"], config["group_size"]) == ("awq", "gemm", 4, 128)
    dense = dequantize_to_dense(Path(artifact.path), tmp_path / "dense")
    scores = tinymodel.score(dense)
    assert scores["generation"] >= 0.9 and scores["multiple_choice"] >= 0.9, scores


def test_second_quantize_is_a_skip(quantized: Build, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = quantized("llmcompressor", "gptq")
    from pipeline.quantize import backend_llmcompressor

    def must_not_run(*_: object) -> str:
        raise AssertionError("an existing artifact must not be rebuilt")

    monkeypatch.setattr(backend_llmcompressor, "quantize", must_not_run)
    again = quantize(resolve(str(tiny_model)), first.recipe, Path(first.path).parent, "llmcompressor")
    assert again.skipped is True and again.id == first.id
    assert again.files == first.files


def test_identity_changes_with_every_input(quantized: Build) -> None:
    base = quantized("llmcompressor", "gptq")
    from pipeline.quantize.recipe import artifact_id

    ids = {
        artifact_id(base.source, base.recipe, "llmcompressor", base.calibration_sha256),
        artifact_id(
            base.source, base.recipe.model_copy(update={"group_size": 64}), "llmcompressor", base.calibration_sha256
        ),
        artifact_id(base.source, base.recipe, "llmcompressor", "0" * 64),
        artifact_id(
            base.source.model_copy(update={"sha": "f" * 40}), base.recipe, "llmcompressor", base.calibration_sha256
        ),
    }
    assert len(ids) == 4 and base.id in ids


def test_refusals_write_nothing(tiny_model: Path, tmp_path: Path) -> None:
    source = resolve(str(tiny_model))
    out = tmp_path / "artifacts"
    with pytest.raises(TerminalError, match="autoawq only does AWQ"):
        quantize(source, Recipe(method="gptq"), out, "autoawq")
    with pytest.raises(TerminalError, match="asymmetric"):
        quantize(source, Recipe(method="awq", symmetric=True), out, "autoawq")
    missing = Recipe(method="gptq", calibration=Calibration(dataset=str(tmp_path / "none.jsonl")))
    with pytest.raises(TerminalError, match="could not be loaded"):
        quantize(source, missing, out, "llmcompressor")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(TerminalError, match=r"bad\.jsonl:2: not a JSON line"):
        quantize(source, Recipe(method="gptq", calibration=Calibration(dataset=str(bad))), out, "llmcompressor")
    assert not out.exists() or not any(out.iterdir())


def test_group_size_must_divide_the_model(tmp_path: Path) -> None:
    from pipeline.quantize.step import check_shapes

    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 200, "intermediate_size": 512}))
    with pytest.raises(TerminalError, match="hidden_size 200 is not a multiple of group size 128"):
        check_shapes(tmp_path, Recipe(method="awq"))


def test_read_artifact_refuses_a_plain_directory(tmp_path: Path) -> None:
    with pytest.raises(TerminalError, match="is not a finished artifact"):
        read_artifact(tmp_path)


def test_shipped_calibration_data_is_the_small_models_text() -> None:
    rows = [json.loads(line)["text"] for line in DEFAULT_CALIBRATION.read_text().splitlines()]
    expected = [(c + a).replace("</s>", "") for c, a in tinymodel.training_texts(tinymodel.facts())]
    assert rows == expected
