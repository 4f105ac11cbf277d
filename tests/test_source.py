"""Resolving a model reference: pinned to a sha, and refused before any download when unsafe."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from pipeline.errors import TerminalError, TransientError
from pipeline.source import SourcePolicy, fetch, resolve
from tests.hubserver import FakeHub, FakeRepo
from tests.hubserver import fake_hub as fake_hub

SHA = "a" * 40
OLD_SHA = "b" * 40
CONFIG = json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 256}).encode()


def repo(**files: bytes) -> FakeRepo:
    return FakeRepo(sha=SHA, files={name.replace("__", "."): content for name, content in files.items()})


@pytest.fixture
def hub(fake_hub: FakeHub) -> FakeHub:
    """The fake Hub, holding org/good at two revisions."""
    fake_hub.repos["org/good"] = repo(config__json=CONFIG, model__safetensors=b"weights" * 100)
    fake_hub.repos["org/good"].branches = {"main": SHA, "v1": OLD_SHA}
    return fake_hub


def test_local_directory_is_pinned_by_content(tiny_model: Path, tmp_path: Path) -> None:
    source = resolve(str(tiny_model))
    assert source.kind == "local" and len(source.sha) == 40
    assert {f.name for f in source.files} >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert all(f.sha256 and len(f.sha256) == 64 for f in source.files)
    copy = tmp_path / "tiny-llama-1"
    shutil.copytree(tiny_model, copy)
    assert resolve(str(copy)).sha == source.sha  # same bytes, same identity, wherever they are
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    assert resolve(str(copy)).sha != source.sha


def test_an_empty_or_truncated_safetensors_file_is_refused_by_name(tiny_model: Path, tmp_path: Path) -> None:
    copy = tmp_path / "tiny"
    shutil.copytree(tiny_model, copy)
    weights = copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])  # cut short: the header is whole, the last tensor is not
    with pytest.raises(TerminalError) as truncated:
        resolve(str(copy))
    assert f"{weights} is truncated: its tensors need {len(data)} bytes" in truncated.value.what
    weights.write_bytes(b"")
    with pytest.raises(TerminalError, match=rf"{weights} is empty or truncated \(0 bytes\)"):
        resolve(str(copy))
    weights.write_bytes(data[:20])
    with pytest.raises(TerminalError, match="is truncated: its header needs"):
        resolve(str(copy))
    weights.write_bytes(data)
    assert resolve(str(copy)).sha == resolve(str(tiny_model)).sha, "the whole file passes"


def test_local_refusals(tmp_path: Path) -> None:
    model = tmp_path / "pickled"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"auto_map": {"AutoModel": "modeling.Custom"}}))
    (model / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(TerminalError, match="only has pickle weights"):
        resolve(str(model))
    with pytest.raises(TerminalError, match="needs trust_remote_code"):
        resolve(str(model), SourcePolicy(allow_pickle=True))
    assert resolve(str(model), SourcePolicy(allow_pickle=True, trust_remote_code=True)).kind == "local"
    (model / "pytorch_model.bin").unlink()
    with pytest.raises(TerminalError, match="has no weight files"):
        resolve(str(model))
    with pytest.raises(TerminalError, match="does not exist"):
        resolve(str(tmp_path / "missing"))


@pytest.mark.parametrize("ref", ["not a repo", "org/name/extra", "org/..name", "-org/name", "org/na--me", "org/"])
def test_malformed_repo_ids_are_refused_without_any_request(ref: str, hub: FakeHub) -> None:
    with pytest.raises(TerminalError, match="is not a model reference"):
        resolve(ref)
    assert hub.requests == []


def test_hub_branch_and_tag_are_pinned_to_the_commit_sha(hub: FakeHub) -> None:
    source = resolve("org/good")
    assert source.kind == "hub" and source.sha == SHA and source.revision is None
    assert source.ref == f"org/good@{SHA[:12]}"
    weights = next(f for f in source.files if f.name == "model.safetensors")
    assert weights.size == 700 and weights.sha256 is not None and len(weights.sha256) == 64
    assert source.license == "apache-2.0"
    assert resolve("org/good@v1").sha == OLD_SHA


def test_hub_missing_repo_and_revision(hub: FakeHub) -> None:
    with pytest.raises(TerminalError, match="model repo org/absent does not exist"):
        resolve("org/absent")
    with pytest.raises(TerminalError, match="revision 'nope' does not exist in org/good"):
        resolve("org/good@nope")


def test_hub_gated_repo_needs_a_token(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    hub.repos["org/gated"] = repo(config__json=CONFIG, model__safetensors=b"w")
    hub.repos["org/gated"].gated = "manual"
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(TerminalError, match="is gated") as info:
        resolve("org/gated")
    assert "HF_TOKEN" in str(info.value)
    assert not any("/resolve/" in path for _, path, _ in hub.requests), "refused before any download"


def test_hub_pickle_only_and_remote_code_are_refused(hub: FakeHub) -> None:
    hub.repos["org/pickled"] = repo(config__json=CONFIG, pytorch_model__bin=b"pickle")
    with pytest.raises(TerminalError, match="only has pickle weights"):
        resolve("org/pickled")
    custom = json.dumps({"auto_map": {"AutoModelForCausalLM": "modeling_x.X"}}).encode()
    hub.repos["org/custom"] = repo(config__json=custom, model__safetensors=b"w")
    with pytest.raises(TerminalError, match="needs trust_remote_code"):
        resolve("org/custom")
    assert resolve("org/custom", SourcePolicy(trust_remote_code=True)).sha == SHA
    assert not any(path.endswith(".bin") or path.endswith(".safetensors") for _, path, _ in hub.requests)


def test_hub_server_errors_are_transient(hub: FakeHub) -> None:
    hub.fail_with = 503
    with pytest.raises(TransientError, match="could not reach the Hub"):
        resolve("org/good")


def test_offline_switch_gives_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(TerminalError, match="the Hub is switched off here"):
        resolve("org/good")


def test_token_is_sent_but_never_shown(
    hub: FakeHub, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    token = "hf_" + "SuperSecretToken123456"
    caplog.set_level(logging.DEBUG)
    hub.require_token = token
    monkeypatch.setenv("HF_TOKEN", token)
    source = resolve("org/good")
    assert ("GET", "/api/models/org/good", f"Bearer {token}") in hub.requests
    path = fetch(source)
    assert (path / "model.safetensors").read_bytes() == b"weights" * 100
    assert token not in source.model_dump_json()
    monkeypatch.setenv("HF_TOKEN", "hf_" + "WrongTokenValue987654")
    with pytest.raises(TerminalError) as info:
        resolve("org/good")
    assert token not in str(info.value) and "WrongTokenValue987654" not in str(info.value)
    assert token not in caplog.text
