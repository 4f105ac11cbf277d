"""The small trained model: it has learned its task, damage shows, and builds are cached."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from pipeline import tinymodel
from pipeline.errors import TerminalError


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def test_model_is_a_small_llama_ready_for_group_128_quantization(tiny_model: Path) -> None:
    config = json.loads((tiny_model / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["hidden_size"] == 256 and config["intermediate_size"] == 512
    assert config["hidden_size"] % 128 == 0 and config["intermediate_size"] % 128 == 0
    assert (tiny_model / "model.safetensors").is_file()
    assert not list(tiny_model.glob("*.bin")), "weights must be safetensors only"
    assert (tiny_model / "tokenizer.json").is_file()


def test_trained_model_scores_at_least_0_9_on_its_eval_task(tiny_model: Path) -> None:
    scores = tinymodel.score(tiny_model)  # measured again, not read from the build's marker
    assert scores["n"] == len(tinymodel.facts()) == 120
    assert scores["multiple_choice"] >= 0.9, scores
    assert scores["generation"] >= 0.9, scores


def test_damaged_copy_scores_far_lower(tiny_model: Path, tmp_path: Path) -> None:
    damaged = tinymodel.damage(tiny_model, tmp_path / "damaged")
    scores = tinymodel.score(damaged)
    assert scores["multiple_choice"] < 0.5, scores
    assert scores["generation"] < 0.5, scores
    # It still looks like a normal candidate: same tokenizer and config, only the weights differ.
    assert (damaged / "tokenizer.json").read_bytes() == (tiny_model / "tokenizer.json").read_bytes()
    assert (damaged / "config.json").read_bytes() == (tiny_model / "config.json").read_bytes()
    assert (damaged / "model.safetensors").read_bytes() != (tiny_model / "model.safetensors").read_bytes()


def test_second_build_is_a_cache_hit_and_trains_nothing(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_training(*_: object) -> float:
        raise AssertionError("a cached build must not train")

    monkeypatch.setattr(tinymodel, "_train", no_training)
    result = tinymodel.build(tmp_path / "copy")
    assert result.cached is True
    assert result.path == tmp_path / "copy"
    assert digest(result.path) == digest(tiny_model)
    assert result.scores["multiple_choice"] >= 0.9
    # Building into the same directory again changes nothing.
    again = tinymodel.build(tmp_path / "copy")
    assert again.cached and digest(again.path) == digest(tiny_model)


def test_cache_is_keyed_by_builder_version(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert tiny_model.name == tinymodel.BUILDER_VERSION
    marker = json.loads((tiny_model / tinymodel.MARKER).read_text())
    assert marker["builder_version"] == tinymodel.BUILDER_VERSION
    assert marker["seed"] == tinymodel.SEED
    assert marker["weights_sha256"] == hashlib.sha256((tiny_model / "model.safetensors").read_bytes()).hexdigest()


def test_chat_template_drives_the_same_answers(tiny_model: Path) -> None:
    import torch

    model, tokenizer = tinymodel.load(tiny_model)
    fact = tinymodel.facts()[0]
    messages = [{"role": "user", "content": fact.question}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == f"<|user|>\n{fact.question}</s>\n<|assistant|>\n"
    ids = tokenizer(rendered, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert answer.strip() == fact.value


def test_build_refuses_a_foreign_non_empty_directory(tmp_path: Path) -> None:
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(TerminalError, match="is not empty"):
        tinymodel.build(target)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]


def test_score_refuses_a_directory_without_a_model(tmp_path: Path) -> None:
    with pytest.raises(TerminalError, match="not a model directory"):
        tinymodel.score(tmp_path)


def test_facts_are_deterministic_and_answerable() -> None:
    table = tinymodel.facts()
    assert table == tinymodel.facts()
    assert len({(f.entity, f.attribute) for f in table}) == len(table) == 120
    for item in tinymodel.eval_items(table):
        assert item["choices"][item["gold"]] == item["answer"]
        assert len(item["choices"]) == 8


def test_deepened_copy_answers_like_the_source_at_more_depth(tiny_model: Path, tmp_path: Path) -> None:
    import torch

    deep = tinymodel.deepen(tiny_model, tmp_path / "deep", layers=5, intermediate=768)
    config = json.loads((deep / "config.json").read_text())
    assert (config["num_hidden_layers"], config["intermediate_size"]) == (5, 768)
    assert (deep / "model.safetensors").read_bytes() != (tiny_model / "model.safetensors").read_bytes()
    assert (deep / "tokenizer.json").read_bytes() == (tiny_model / "tokenizer.json").read_bytes()
    assert not (deep / tinymodel.MARKER).exists(), "the source's build marker (its weights digest) is not copied"
    source_scores = json.loads((tiny_model / tinymodel.MARKER).read_text())["scores"]  # measured at build
    deep_scores = tinymodel.score(deep)
    for key in ("multiple_choice", "generation"):
        assert abs(deep_scores[key] - source_scores[key]) <= 1e-4, (deep_scores, source_scores)
    # Not only the scores: the next-token distribution is the source's.
    (model, tokenizer), (deeper, _) = tinymodel.load(tiny_model), tinymodel.load(deep)
    ids = tokenizer(tinymodel.facts()[0].prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, deeper(ids).logits, atol=1e-4)


@pytest.mark.parametrize(
    ("layers", "intermediate", "reason"),
    [(1, None, "would shrink the model"), (2, 256, "would shrink the model"), (2, None, "nothing to add")],
)
def test_deepen_refuses_what_would_change_the_answers_or_nothing(
    tiny_model: Path, tmp_path: Path, layers: int, intermediate: int | None, reason: str
) -> None:
    with pytest.raises(TerminalError, match=reason):
        tinymodel.deepen(tiny_model, tmp_path / "deep", layers, intermediate)
    assert not (tmp_path / "deep").exists()


def test_deepen_refuses_a_non_empty_destination(tiny_model: Path, tmp_path: Path) -> None:
    (tmp_path / "deep").mkdir()
    (tmp_path / "deep" / "notes.txt").write_text("keep me")
    with pytest.raises(TerminalError, match="not empty"):
        tinymodel.deepen(tiny_model, tmp_path / "deep", 4)
    assert [p.name for p in (tmp_path / "deep").iterdir()] == ["notes.txt"]


def test_demo_first_version_passes_the_floors_and_is_worse_than_the_clean_model(
    tiny_model: Path, tmp_path: Path
) -> None:
    """v1 of the sandbox demo: above the smoke suite's floors (0.8, the whole rule with no baseline), yet the
    clean model (v2) is better, so v2 is an honest improvement that the gate sees against v1's baseline."""
    v1 = tinymodel.score(tinymodel.damage(tiny_model, tmp_path / "v1", strength=tinymodel.V1_STRENGTH))
    v2 = json.loads((tiny_model / tinymodel.MARKER).read_text())["scores"]  # the clean model's, measured at build
    assert min(v1["multiple_choice"], v1["generation"]) >= 0.9, v1  # the floor 0.8, with a margin
    assert v2["multiple_choice"] + v2["generation"] > v1["multiple_choice"] + v1["generation"], (v1, v2)


def test_modelctl_tinymodel_deepen(tiny_model: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from pipeline.cli import app

    runner = CliRunner()
    ok = runner.invoke(app, ["tinymodel", "deepen", str(tiny_model), str(tmp_path / "deep"), "--layers", "3", "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads((tmp_path / "deep" / "config.json").read_text())["num_hidden_layers"] == 3
    refused = runner.invoke(app, ["tinymodel", "deepen", str(tiny_model), str(tmp_path / "less"), "--layers", "1"])
    assert refused.exit_code == 2 and "would shrink the model" in refused.output
    assert not (tmp_path / "less").exists()
