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


def test_unquantized_artifact_is_the_source_model_built_like_any_other(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.promotion import serving_format
    from pipeline.quantize import backend_safetensors

    source = resolve(str(tiny_model))
    artifact = quantize(source, Recipe(method="none"), tmp_path, "llmcompressor")  # the config's default backend
    assert artifact.id.startswith("unquantized-") and artifact.format == "unquantized"
    assert artifact.backend == "safetensors" and artifact.recipe.name == "unquantized"
    assert_manifest_complete(artifact)
    path = Path(artifact.path)
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    assert (path / "model.safetensors").read_bytes() == (tiny_model / "model.safetensors").read_bytes()
    assert not (path / tinymodel.MARKER).exists(), "only model, config and tokenizer files are taken"
    built = json.loads((tiny_model / tinymodel.MARKER).read_text())["scores"]  # the source's, measured at build
    assert tinymodel.score(path) == built  # transformers loads it, and it answers as the source does
    assert serving_format(artifact) == "none"  # the chart then passes no --quantization flag

    def must_not_run(*_: object) -> str:
        raise AssertionError("an existing artifact must not be rebuilt")

    monkeypatch.setattr(backend_safetensors, "write", must_not_run)
    again = quantize(source, Recipe(method="none"), tmp_path, "llmcompressor")
    assert again.skipped and again.id == artifact.id and again.files == artifact.files


def test_unquantized_cast_to_bfloat16_is_another_artifact_that_still_answers(tiny_model: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    source = resolve(str(tiny_model))
    kept = quantize(source, Recipe(method="none"), tmp_path, "llmcompressor")
    cast = quantize(source, Recipe(method="none", dtype="bfloat16"), tmp_path, "llmcompressor")
    assert cast.id.startswith("unquantized-bf16-") and cast.id != kept.id
    assert_manifest_complete(cast)
    assert json.loads((Path(cast.path) / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(Path(cast.path) / "model.safetensors"), framework="pt") as weights:
        assert {str(weights.get_tensor(name).dtype) for name in weights.keys()} == {"torch.bfloat16"}  # noqa: SIM118
    scores = tinymodel.score(cast.path)
    assert scores["multiple_choice"] >= 0.9 and scores["generation"] >= 0.9, scores


def test_unquantized_recipe_takes_only_its_dtype_from_the_config() -> None:
    from pydantic import ValidationError

    from pipeline.config import Quantization

    # --method none over a config written for AWQ: the quantization settings do not apply and are dropped.
    recipe = Recipe.from_config(Quantization(method="awq", group_size=64, symmetric=False), "none")
    assert recipe == Recipe(method="none")
    assert Recipe.from_config(Quantization(method="none", dtype="float16")).name == "unquantized-fp16"
    with pytest.raises(ValidationError, match="method 'none' quantizes nothing, so group_size does not apply"):
        Quantization(method="none", group_size=64)
    with pytest.raises(ValidationError, match="dtype applies to method 'none' only"):
        Quantization(method="gptq", dtype="bfloat16")
    with pytest.raises(ValidationError, match="backend 'autoawq' only does method 'awq'"):
        Quantization(method="none", backend="autoawq")
    with pytest.raises(ValidationError, match="dtype applies to method 'none' only"):
        Recipe(method="awq", dtype="float16")


def test_unquantized_refusals_write_nothing(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "artifacts"
    source = resolve(str(tiny_model))
    with pytest.raises(TerminalError, match="autoawq only does AWQ"):
        quantize(source, Recipe(method="none"), out, "autoawq")
    with pytest.raises(TerminalError, match="backend safetensors writes unquantized artifacts only"):
        quantize(source, Recipe(method="gptq"), out, "safetensors")
    quantized_source = tmp_path / "quantized-source"
    quantized_source.mkdir()
    for item in tiny_model.iterdir():
        (quantized_source / item.name).write_bytes(item.read_bytes())
    config = json.loads((tiny_model / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (quantized_source / "config.json").write_text(json.dumps(config))
    with pytest.raises(TerminalError, match=r"already quantized \(awq\)"):
        quantize(resolve(str(quantized_source)), Recipe(method="none"), out, "llmcompressor")
    assert not out.exists() or not [p for p in out.iterdir() if not p.name.startswith(".")]


def test_existing_quantized_artifact_ids_do_not_change_with_the_dtype_field(tiny_model: Path) -> None:
    """Adding the unquantized recipe must not rename every AWQ/GPTQ artifact already built (a cache miss each)."""
    from pipeline.quantize.recipe import artifact_id, tool_version

    source, recipe = resolve(str(tiny_model)), Recipe(method="gptq", group_size=64)
    before = {  # the identity as it was hashed before the dtype field existed
        "source": {"repo": source.repo, "sha": source.sha},
        "recipe": {k: v for k, v in recipe.model_dump(mode="json").items() if k != "dtype"},
        "backend": "llmcompressor",
        "backend_version": tool_version("llmcompressor"),
        "calibration_sha256": "0" * 64,
    }
    digest = hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:16]
    assert artifact_id(source, recipe, "llmcompressor", "0" * 64) == f"gptq-w4a16-g64-{digest}"


def test_modelctl_quantize_method_none(tiny_model: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from pipeline.cli import app

    result = CliRunner().invoke(
        app, ["quantize", str(tiny_model), "--method", "none", "--out", str(tmp_path), "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["id"].startswith("unquantized-") and data["format"] == "unquantized"
