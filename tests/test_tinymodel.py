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
