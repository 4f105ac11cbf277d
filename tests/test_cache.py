"""Preloading an artifact onto the cache volume: verified, repaired, resumed, locked, refused when full."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pipeline import cache
from pipeline.cache import MARKER, preload, preload_hub
from pipeline.errors import TerminalError
from pipeline.quantize import Artifact
from pipeline.source import ModelSource, resolve
from tests.hubserver import FakeHub, FakeRepo
from tests.hubserver import fake_hub as fake_hub

Build = Callable[[str, str], Artifact]


@pytest.fixture
def artifact(quantized: Build, tmp_path: Path) -> Path:
    """A private copy of a real quantized artifact (tests may damage it)."""
    source = Path(quantized("llmcompressor", "gptq").path)
    copy = tmp_path / "artifacts" / source.name
    shutil.copytree(source, copy)
    return copy


def weights(root: Path, artifact: Path) -> Path:
    return root / artifact.name / "model.safetensors"


def test_cold_preload_copies_and_verifies_then_warm_is_a_skip(artifact: Path, tmp_path: Path) -> None:
    root = tmp_path / "cache"
    entry = preload(artifact, root)
    assert not entry.skipped and "model.safetensors" in entry.copied
    assert weights(root, artifact).read_bytes() == (artifact / "model.safetensors").read_bytes()
    assert (root / artifact.name / MARKER).is_file() and (root / artifact.name / "artifact.json").is_file()
    warm = preload(artifact, root)
    assert warm.skipped and warm.copied == [] and warm.verified_at == entry.verified_at


def test_flipped_byte_is_found_by_verify_and_repaired(artifact: Path, tmp_path: Path) -> None:
    root = tmp_path / "cache"
    preload(artifact, root)
    target = weights(root, artifact)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    assert preload(artifact, root).skipped, "a same-size flip is invisible to the fast warm check"
    entry = preload(artifact, root, verify=True)
    assert entry.repaired == ["model.safetensors"]
    assert target.read_bytes() == (artifact / "model.safetensors").read_bytes()


def test_truncated_file_is_refetched_without_verify(artifact: Path, tmp_path: Path) -> None:
    root = tmp_path / "cache"
    preload(artifact, root)
    with open(weights(root, artifact), "r+b") as handle:
        handle.truncate(1000)
    entry = preload(artifact, root)
    assert not entry.skipped and entry.repaired == ["model.safetensors"]
    assert weights(root, artifact).read_bytes() == (artifact / "model.safetensors").read_bytes()


def test_partial_copy_is_resumed(artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "cache"
    source = (artifact / "model.safetensors").read_bytes()
    target_dir = root / artifact.name
    target_dir.mkdir(parents=True)
    (target_dir / "model.safetensors.partial").write_bytes(source[: len(source) // 3])
    offsets: dict[str, int] = {}
    real_reader = cache._local_reader

    def spying_reader(directory: Path) -> cache.Reader:
        read = real_reader(directory)

        def spy(name: str, offset: int) -> Iterator[bytes]:
            offsets[name] = offset
            return read(name, offset)

        return spy

    monkeypatch.setattr(cache, "_local_reader", spying_reader)
    entry = preload(artifact, root)
    assert not entry.skipped
    assert offsets["model.safetensors"] == len(source) // 3, "the partial prefix was kept, not fetched again"
    assert offsets["config.json"] == 0
    assert weights(root, artifact).read_bytes() == source
    assert not (target_dir / "model.safetensors.partial").exists()


def test_damaged_source_artifact_is_refused_and_not_marked(artifact: Path, tmp_path: Path) -> None:
    root = tmp_path / "cache"
    data = bytearray((artifact / "model.safetensors").read_bytes())
    data[100] ^= 0xFF
    (artifact / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(TerminalError, match="does not match its manifest"):
        preload(artifact, root)
    assert not (root / artifact.name / MARKER).exists()
    assert not weights(root, artifact).exists()


def test_two_preloaders_at_once_do_not_corrupt(artifact: Path, tmp_path: Path) -> None:
    root = tmp_path / "cache"
    results: list[object] = []

    def run() -> None:
        try:
            results.append(preload(artifact, root))
        except Exception as exc:  # collected and asserted below
            results.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(not isinstance(r, Exception) for r in results), results
    assert sum(1 for r in results if not r.skipped) == 1  # type: ignore[attr-defined]
    assert weights(root, artifact).read_bytes() == (artifact / "model.safetensors").read_bytes()


def test_not_enough_space_is_refused_before_writing(
    artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "cache"
    monkeypatch.setattr(cache.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))  # type: ignore[attr-defined]
    with pytest.raises(TerminalError, match=r"has 0\.00 GiB free but .* needs") as info:
        preload(artifact, root)
    assert "enlarge the PVC" in str(info.value)
    assert not (root / artifact.name).exists()


def test_not_an_artifact(tmp_path: Path) -> None:
    with pytest.raises(TerminalError, match="is not a finished artifact"):
        preload(tmp_path, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


WEIGHTS = bytes(range(256)) * 4096  # 1 MiB


def hub_model(fake_hub: FakeHub, **served: bytes) -> ModelSource:
    fake_hub.repos["org/quantized-awq"] = FakeRepo(
        sha="c" * 40,
        files={"config.json": b'{"hidden_size": 256}', "model.safetensors": WEIGHTS, "README.md": b"# card"},
        served=served,
    )
    return resolve("org/quantized-awq")


def test_hub_repo_preload_verifies_lfs_and_git_blobs(fake_hub: FakeHub, tmp_path: Path) -> None:
    source = hub_model(fake_hub)
    entry = preload_hub(source, tmp_path / "cache")
    target = Path(entry.path)
    assert target.name == "hub--org--quantized-awq--cccccccccccc"
    assert (target / "model.safetensors").read_bytes() == WEIGHTS
    assert sorted(entry.copied) == ["config.json", "model.safetensors"]  # README is not a model file
    assert preload_hub(source, tmp_path / "cache").skipped


def test_hub_download_is_resumed_with_a_range_request(fake_hub: FakeHub, tmp_path: Path) -> None:
    source = hub_model(fake_hub)
    target = tmp_path / "cache" / "hub--org--quantized-awq--cccccccccccc"
    target.mkdir(parents=True)
    (target / "model.safetensors.partial").write_bytes(WEIGHTS[:300_000])
    preload_hub(source, tmp_path / "cache")
    assert (target / "model.safetensors").read_bytes() == WEIGHTS
    weight_requests = [r for r in fake_hub.requests if r[1].endswith("model.safetensors")]
    assert len(weight_requests) == 1


def test_corrupted_hub_download_is_refused(fake_hub: FakeHub, tmp_path: Path) -> None:
    broken = bytearray(WEIGHTS)
    broken[1000] ^= 0xFF
    source = hub_model(fake_hub, **{"model.safetensors": bytes(broken)})
    with pytest.raises(TerminalError, match=r"model\.safetensors from org/quantized-awq@c{12} does not match"):
        preload_hub(source, tmp_path / "cache")
    target = tmp_path / "cache" / "hub--org--quantized-awq--cccccccccccc"
    assert not (target / MARKER).exists() and not (target / "model.safetensors").exists()
    fake_hub.repos["org/quantized-awq"].served = {"config.json": b'{"hidden_size": 257}'}
    with pytest.raises(TerminalError, match="git blob"):  # a non-LFS file is checked by its git blob id
        preload_hub(source, tmp_path / "other-cache")
