"""The artifact store: one artifact, the same bytes everywhere.

Both stores run the same tests: the local directory store, and the Hub store spoken to by huggingface_hub's
own upload (create_repo, preupload, LFS batch and PUT, ndjson commit) and download against the fake Hub.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from huggingface_hub import CommitOperationAdd, HfApi, constants

from pipeline.cache import MARKER
from pipeline.config import HubArtifactStore, LocalArtifactStore, parse_config
from pipeline.errors import ConfigError, TerminalError
from pipeline.quantize import Artifact, ArtifactFile, Recipe
from pipeline.source import ModelSource
from pipeline.store import (
    ArtifactStore,
    DigestMismatch,
    HubStore,
    LocalStore,
    StoredArtifact,
    fetch_into_cache,
    manifest_digest,
    store_from_settings,
)
from tests.hubserver import FakeHub
from tests.hubserver import fake_hub as fake_hub

ART_ID = "awq-w4a16-g128-0123456789abcdef"
REPO = "example-org/modelctl-artifacts"
TOKEN = "hf_storeTokenForTests123456"
WEIGHTS = bytes(range(256)) * 64


def build(root: Path, weights: bytes = WEIGHTS, artifact_id: str = ART_ID) -> Path:
    """A finished artifact on disk (a weights file, a config, a nested tokenizer file) with its artifact.json."""
    directory = root / artifact_id
    contents = {
        "model.safetensors": weights,
        "config.json": b'{"model_type": "llama"}\n',
        "tokenizer/tokenizer.json": b'{"version": "1.0"}\n',
    }
    for name, content in contents.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(content)
    artifact = Artifact(
        id=artifact_id,
        path=str(directory),
        format="compressed-tensors",
        backend="llmcompressor",
        source=ModelSource(kind="local", repo="local/tiny", sha="0" * 40, files=[]),
        recipe=Recipe(method="awq"),
        calibration_sha256="0" * 64,
        tool_versions={"llmcompressor": "test"},
        files=[ArtifactFile(name=n, size=len(c), sha256=hashlib.sha256(c).hexdigest()) for n, c in contents.items()],
    )
    (directory / "artifact.json").write_text(artifact.manifest_json())
    return directory


def flipped(data: bytes) -> bytes:
    changed = bytearray(data)
    changed[len(changed) // 2] ^= 0x01
    return bytes(changed)


def digest_with_weights(artifact: Path, weights: bytes) -> str:
    """The manifest digest the artifact would have with other weights."""
    files = json.loads((artifact / "artifact.json").read_text())["files"]
    return manifest_digest(
        ArtifactFile(name=f["name"], size=len(weights), sha256=hashlib.sha256(weights).hexdigest())
        if f["name"] == "model.safetensors"
        else ArtifactFile(**f)
        for f in files
    )


@dataclass
class Case:
    """A store under test, and the fake Hub behind it when it is the Hub store."""

    store: ArtifactStore
    hub: FakeHub | None = None

    def tamper(self, stored: StoredArtifact, name: str, content: bytes) -> None:
        """Change one published file in place, behind the store's back."""
        if isinstance(self.store, LocalStore):
            (self.store.root / "artifacts" / stored.artifact_id / name).write_bytes(content)
        else:
            assert self.hub is not None
            self.hub.repos[REPO].served[f"artifacts/{stored.artifact_id}/{name}"] = content

    def drop_index(self, artifact_id: str) -> None:
        """Undo the index entry only, as a publish that died between copying the files and indexing them."""
        if isinstance(self.store, LocalStore):
            (self.store.root / "index" / f"{artifact_id}.json").unlink()
        else:
            HfApi(endpoint=self.store.endpoint, token=TOKEN).delete_file(f"index/{artifact_id}.json", REPO)

    def wipe(self) -> None:
        """Empty the store, as if it were recreated (the next publish of an id starts afresh)."""
        if isinstance(self.store, LocalStore):
            shutil.rmtree(self.store.root)
        else:
            assert self.hub is not None
            del self.hub.repos[REPO]


@pytest.fixture(params=["local", "hub"])
def case(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Case:
    if request.param == "local":
        return Case(LocalStore(tmp_path / "store"))
    return hub_case(request.getfixturevalue("fake_hub"), monkeypatch)


def hub_case(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> Case:
    """The Hub store on the fake Hub, which demands the token the store reads from $HF_TOKEN."""
    hub.require_token = TOKEN
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the fake speaks LFS, not Xet
    return Case(HubStore(REPO, token_env="HF_TOKEN"), hub)


@pytest.fixture
def store(case: Case) -> ArtifactStore:
    return case.store


def test_publish_lookup_fetch_round_trip(store: ArtifactStore, tmp_path: Path) -> None:
    artifact = build(tmp_path / "built")
    assert not store.has(ART_ID) and store.lookup(ART_ID) is None
    stored = store.publish(artifact)
    expected = digest_with_weights(artifact, WEIGHTS)
    assert stored.artifact_id == ART_ID and stored.manifest_digest == expected and not stored.skipped
    assert store.has(ART_ID) and store.lookup(ART_ID) == stored
    again = store.publish(artifact)
    assert again.skipped and again.manifest_digest == expected

    root = tmp_path / "cache"
    entry = fetch_into_cache(store, ART_ID, expected, root)
    assert not entry.skipped and (root / ART_ID / MARKER).is_file()
    for f in stored.files:
        assert (root / ART_ID / f.name).read_bytes() == (artifact / f.name).read_bytes()
    record = json.loads((root / ART_ID / "store.json").read_text())
    assert record["manifest_digest"] == expected and record["uri"] == stored.uri
    assert fetch_into_cache(store, ART_ID, expected, root).skipped


def test_a_publish_that_died_before_indexing_converges_on_rerun(case: Case, tmp_path: Path) -> None:
    artifact = build(tmp_path / "built")
    first = case.store.publish(artifact)
    case.drop_index(ART_ID)
    again = case.store.publish(artifact)
    assert not again.skipped and again.manifest_digest == first.manifest_digest
    if case.hub is not None:
        puts = [path for method, path, _ in case.hub.requests if method == "PUT"]
        assert len(puts) == 1, "the weights were uploaded once; the re-run found them there"
    entry = fetch_into_cache(case.store, ART_ID, first.manifest_digest, tmp_path / "cache")
    assert (Path(entry.path) / "model.safetensors").read_bytes() == WEIGHTS


def test_hub_store_is_private_pinned_and_uploads_weights_through_lfs(
    fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = hub_case(fake_hub, monkeypatch).store
    assert isinstance(store, HubStore)
    artifact = build(tmp_path / "built")
    stored = store.publish(artifact)
    commit = stored.uri.removeprefix(f"hf://{REPO}@").split("/")[0]
    repo = fake_hub.repos[REPO]
    assert repo.private and len(commit) == 40 and commit in repo.history
    assert hashlib.sha256(WEIGHTS).hexdigest() in fake_hub.lfs_objects, "weights went through LFS, not inline"
    # A later push to the repo's main branch cannot change what environments preload: reads use the commit.
    HfApi(endpoint=store.endpoint, token=TOKEN).create_commit(
        REPO,
        [CommitOperationAdd(f"artifacts/{ART_ID}/model.safetensors", flipped(WEIGHTS))],
        commit_message="someone overwrites the weights",
    )
    fetch_into_cache(store, ART_ID, stored.manifest_digest, tmp_path / "cache")
    assert (tmp_path / "cache" / ART_ID / "model.safetensors").read_bytes() == WEIGHTS


def test_tampered_copy_is_refused_naming_both_digests(case: Case, tmp_path: Path) -> None:
    store = case.store
    artifact = build(tmp_path / "built")
    stored = store.publish(artifact)
    case.tamper(stored, "model.safetensors", flipped(WEIGHTS))
    root = tmp_path / "cache"
    with pytest.raises(DigestMismatch) as refused:
        fetch_into_cache(store, ART_ID, stored.manifest_digest, root)
    actual = digest_with_weights(artifact, flipped(WEIGHTS))
    assert refused.value.expected == stored.manifest_digest and refused.value.actual == actual
    assert stored.manifest_digest in str(refused.value) and actual in str(refused.value)
    assert not (root / ART_ID / MARKER).exists(), "nothing was marked complete in the cache"


def test_a_rewritten_manifest_in_the_store_is_refused(case: Case, tmp_path: Path) -> None:
    artifact = build(tmp_path / "built")
    stored = case.store.publish(artifact)
    forged = build(tmp_path / "forged", weights=flipped(WEIGHTS))  # its artifact.json lists other weights
    case.tamper(stored, "artifact.json", (forged / "artifact.json").read_bytes())
    with pytest.raises(DigestMismatch) as refused:
        fetch_into_cache(case.store, ART_ID, stored.manifest_digest, tmp_path / "cache")
    forged_digest = digest_with_weights(artifact, flipped(WEIGHTS))
    assert stored.manifest_digest in str(refused.value) and forged_digest in str(refused.value)


def test_rebuilt_artifact_with_the_same_id_is_refused_at_publish(store: ArtifactStore, tmp_path: Path) -> None:
    first = store.publish(build(tmp_path / "first"))
    rebuilt = build(tmp_path / "rebuilt", weights=flipped(WEIGHTS))
    with pytest.raises(DigestMismatch) as refused:
        store.publish(rebuilt)
    new = digest_with_weights(rebuilt, flipped(WEIGHTS))
    assert first.manifest_digest in str(refused.value) and new in str(refused.value)
    assert store.lookup(ART_ID) == first, "the published artifact is unchanged"


def test_rebuilt_artifact_in_the_store_is_refused_at_fetch(case: Case, tmp_path: Path) -> None:
    store = case.store
    evaluated = store.publish(build(tmp_path / "first")).manifest_digest
    case.wipe()  # the store was recreated and the id rebuilt with other bytes
    rebuilt = store.publish(build(tmp_path / "rebuilt", weights=flipped(WEIGHTS))).manifest_digest
    with pytest.raises(DigestMismatch) as refused:
        fetch_into_cache(store, ART_ID, evaluated, tmp_path / "cache")
    assert evaluated in str(refused.value) and rebuilt in str(refused.value)
    assert fetch_into_cache(store, ART_ID, rebuilt, tmp_path / "cache").files == 3, "its own digest fetches"


def test_a_source_that_differs_from_its_manifest_is_not_published(store: ArtifactStore, tmp_path: Path) -> None:
    artifact = build(tmp_path / "built")
    (artifact / "model.safetensors").write_bytes(flipped(WEIGHTS))
    with pytest.raises(TerminalError, match=r"model\.safetensors does not match its artifact\.json"):
        store.publish(artifact)
    assert not store.has(ART_ID)


def test_a_file_lost_from_the_local_store_is_named_not_taken_for_tampering(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    stored = store.publish(build(tmp_path / "built"))
    (store.root / "artifacts" / ART_ID / "config.json").unlink()
    with pytest.raises(TerminalError, match=f"has lost {ART_ID}/config.json") as refused:
        fetch_into_cache(store, ART_ID, stored.manifest_digest, tmp_path / "cache")
    assert not isinstance(refused.value, DigestMismatch)


def test_fetch_of_an_unpublished_artifact_says_so(store: ArtifactStore, tmp_path: Path) -> None:
    with pytest.raises(TerminalError, match=f"artifact {ART_ID} is not in"):
        fetch_into_cache(store, ART_ID, "sha256:" + "0" * 64, tmp_path / "cache")


def test_reports_are_kept_by_manifest_digest(store: ArtifactStore, tmp_path: Path) -> None:
    digest = store.publish(build(tmp_path / "built")).manifest_digest
    other = "sha256:" + "1" * 64
    assert store.get_report(digest, "eval") is None
    store.put_report(digest, "eval", {"passed": True, "rows": [{"metric": "acc", "value": 0.5}]})
    store.put_report(digest, "load", {"passed": False})
    assert store.get_report(digest, "eval") == {"passed": True, "rows": [{"metric": "acc", "value": 0.5}]}
    assert store.get_report(digest, "load") == {"passed": False}
    assert store.get_report(other, "eval") is None, "another artifact's bytes have no report"
    store.put_report(digest, "load", {"passed": True})
    assert store.get_report(digest, "load") == {"passed": True}, "a later report replaces the earlier one"
    with pytest.raises(TerminalError, match="not a report kind"):
        store.put_report(digest, "../eval", {})
    with pytest.raises(TerminalError, match="not a manifest digest"):
        store.get_report("abc", "eval")


def test_hub_token_never_appears_in_errors(fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    fake_hub.require_token = TOKEN
    wrong = "hf_wrongTokenNeverShown98765"
    monkeypatch.setenv("MODELCTL_STORE_TOKEN", wrong)
    store = HubStore(REPO, token_env="MODELCTL_STORE_TOKEN")
    with pytest.raises(TerminalError) as refused:
        store.publish(build(tmp_path / "built"))
    assert wrong not in str(refused.value) and "$MODELCTL_STORE_TOKEN" in str(refused.value)
    with pytest.raises(TerminalError) as missing:
        fetch_into_cache(store, ART_ID, "sha256:" + "0" * 64, tmp_path / "cache")
    assert wrong not in str(missing.value)
    monkeypatch.setenv("MODELCTL_STORE_TOKEN", TOKEN)
    stored = store.publish(build(tmp_path / "built"))
    assert TOKEN not in stored.model_dump_json() and TOKEN not in json.dumps(fake_hub.repos[REPO].history, default=str)


def test_hub_store_refuses_plainly_when_the_hub_is_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(TerminalError, match="HF_HUB_OFFLINE"):
        HubStore(REPO).lookup(ART_ID)


def test_config_artifacts_section(tmp_path: Path) -> None:
    base = "gitops: {url: ./gitops.git}\nenvironments: {local: {values_file: v.yaml, cache: {root: c}}}\n"
    local = parse_config(base + "artifacts: {store: local, path: ../shared-store}\n", base_dir=tmp_path / "conf")
    assert isinstance(local.artifacts, LocalArtifactStore)
    assert local.artifacts.path == str((tmp_path / "shared-store").resolve()), "relative to the file"
    assert isinstance(store_from_settings(local.artifacts), LocalStore)
    hub = parse_config(base + f"artifacts: {{store: hub, repo: {REPO}, token_env: MY_TOKEN}}\n")
    assert isinstance(hub.artifacts, HubArtifactStore)
    made = store_from_settings(hub.artifacts)
    assert isinstance(made, HubStore) and made.repo == REPO and made.token_env == "MY_TOKEN"
    assert parse_config(base).artifacts is None
    for bad, reason in [
        ("artifacts: {store: local, path: x, bucket: y}", "artifacts.local.bucket: is not a known key"),
        ("artifacts: {store: s3, path: x}", "artifacts: "),
        ("artifacts: {store: hub, repo: not-a-repo}", "artifacts.hub.repo"),
        ("artifacts: {store: local}", "artifacts.local.path: is required"),
    ]:
        with pytest.raises(ConfigError) as refused:
            parse_config(base + bad + "\n")
        assert reason in str(refused.value)
