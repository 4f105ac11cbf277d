"""Preloading an artifact onto the cache volume: verified, repaired, resumed, locked, refused when full."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pipeline import cache, volume
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
    entry = preload(artifact, root)  # the cheap per-file check on every warm use sees the write
    assert not entry.skipped and entry.repaired == ["model.safetensors"]
    assert target.read_bytes() == (artifact / "model.safetensors").read_bytes()
    target.write_bytes(bytes(data))
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
    monkeypatch.setattr(volume, "free_bytes", lambda _: 1000)
    with pytest.raises(TerminalError, match=r"has 1000 B free, but .* needs [0-9.]+ [KM]iB more") as info:
        preload(artifact, root)
    assert "enlarge the PVC" in str(info.value) and "0.00 GiB" not in str(info.value)
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


def local_plan(folder: Path, files: dict[str, bytes], entry_id: str = "entry-1", **kw: object) -> cache.Plan:
    """A preload plan over files written into ``folder`` (fast: no model needed)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    expected = [cache.Expected(n, len(d), sha256=hashlib.sha256(d).hexdigest()) for n, d in files.items()]
    read = kw.pop("read", None) or cache._local_reader(folder)
    return cache.Plan(entry_id=entry_id, files=expected, read=read, describe=str(folder))  # type: ignore[arg-type]


def test_a_flipped_byte_in_a_warm_entry_is_noticed_on_the_next_use_and_fetched_again(tmp_path: Path) -> None:
    plan = local_plan(tmp_path / "src", {"model.safetensors": WEIGHTS, "config.json": b"{}"})
    root = tmp_path / "cache"
    assert not cache.preload_plan(plan, root).skipped
    assert cache.preload_plan(plan, root).skipped, "an untouched entry is a warm skip"
    cached = root / "entry-1" / "model.safetensors"
    with open(cached, "r+b") as handle:  # one flipped byte, the size kept, right after verification
        handle.seek(len(WEIGHTS) // 2)
        handle.write(bytes([WEIGHTS[len(WEIGHTS) // 2] ^ 0x01]))

    entry = cache.preload_plan(plan, root)

    assert not entry.skipped and entry.repaired == ["model.safetensors"]
    assert cached.read_bytes() == WEIGHTS
    assert cache.preload_plan(plan, root).skipped
    os.utime(root / "entry-1" / "config.json")  # touched, bytes intact: hashed again, not fetched again
    touched = cache.preload_plan(plan, root)
    assert not touched.skipped and touched.repaired == [] and touched.copied == []
    assert cache.preload_plan(plan, root).skipped


def test_two_preloads_racing_for_space_cannot_both_pass_the_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cache, "SPACE_MARGIN", 0)
    monkeypatch.setattr(volume, "free_bytes", lambda _: int(len(WEIGHTS) * 1.5))  # room for one, not two
    root, started, go = tmp_path / "cache", threading.Event(), threading.Event()
    first_reader = cache._local_reader(tmp_path / "a")

    def slow_read(name: str, offset: int) -> Iterator[bytes]:
        started.set()
        go.wait(60)
        yield from first_reader(name, offset)

    first = local_plan(tmp_path / "a", {"w.bin": WEIGHTS}, "entry-a", read=slow_read)
    second = local_plan(tmp_path / "b", {"w.bin": WEIGHTS[::-1]}, "entry-b")
    results: list[object] = []
    runner = threading.Thread(target=lambda: results.append(cache.preload_plan(first, root)))
    runner.start()
    try:
        assert started.wait(60), "the first preload never started"
        with pytest.raises(TerminalError) as info:
            cache.preload_plan(second, root)
    finally:
        go.set()
        runner.join()
    assert "entry-a still writing 1 MiB" in info.value.what and "needs 1 MiB more" in info.value.what
    assert not (root / "entry-b").exists() or not any((root / "entry-b").iterdir())
    assert not isinstance(results[0], Exception) and (root / "entry-a" / "w.bin").read_bytes() == WEIGHTS
    assert not cache.preload_plan(second, root).skipped, "once the first finished, the second fits"


def test_a_full_volume_is_a_clear_terminal_error_and_leaves_no_partial_file(tmp_path: Path) -> None:
    def full(name: str, offset: int) -> Iterator[bytes]:
        yield WEIGHTS[:4096]
        raise OSError(errno.ENOSPC, "No space left on device")

    plan = local_plan(tmp_path / "src", {"model.safetensors": WEIGHTS}, read=full)
    root = tmp_path / "cache"
    with pytest.raises(TerminalError) as info:
        cache.preload_plan(plan, root)
    assert f"the cache volume at {root} ran out of space while preloading entry-1" in info.value.what
    assert "needed 1 MiB more" in info.value.what and "partial files were removed" in (info.value.hint or "")
    assert not list((root / "entry-1").glob("*.partial")) and not (root / "entry-1" / MARKER).exists()
    assert not list((root / ".reservations").glob("*.json")), "the reservation went with the preload"
