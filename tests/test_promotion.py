"""The library-level promotion (pipeline.promotion), without Prefect: configuration read once, the same bytes
everywhere (`requires` on manifest digests), and pull-request mode that waits for the merge and resumes after it.

Real quantization of the small model (once per module: later runs find the artifact by its id), a real local
artifact store every environment preloads from, real commits to a real bare GitOps repo.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from pipeline import promotion
from pipeline.config import load_config
from pipeline.errors import TerminalError
from pipeline.gitops import GitOps, init_repo
from pipeline.quantize import read_artifact
from pipeline.quantize.recipe import MANIFEST

CONFIG = """\
version: 1
gitops: {{url: ./remote.git, mode: {mode}}}
artifacts: {{store: local, path: ./artifact-store}}
model:
  served_name: tiny-llama
  quantization:
    method: gptq
    calibration: {{samples: 16, max_seq_len: 64}}
environments:
  local:
    values_file: envs/local/values.yaml
    cache: {{root: {cache}}}
    gpu_pool: {{gpus_per_replica: 0}}
  prod:
    values_file: envs/prod/values.yaml
    cache: {{root: {cache}}}
    gpu_pool: {{gpus_per_replica: 0}}
    requires: [local]
"""


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def site(tmp_path: Path, shared_cache: Path) -> Path:
    init_repo(tmp_path / "remote.git")
    write(tmp_path, shared_cache)
    return tmp_path


def write(site: Path, cache: Path, mode: str = "push") -> Path:
    path = site / "promotion.yaml"
    path.write_text(CONFIG.format(mode=mode, cache=cache))
    return path


def values(site: Path, env: str) -> dict:
    shown = subprocess.run(
        ["git", "--git-dir", str(site / "remote.git"), "show", f"main:envs/{env}/values.yaml"],
        capture_output=True,
        text=True,
        check=True,
    )
    return yaml.safe_load(shown.stdout)


class Recording(promotion.Hooks):
    """Hooks that note the steps and when the slot is held, and may act at a step's start."""

    def __init__(self, at_start: dict[str, object] | None = None) -> None:
        self.events: list[str] = []
        self.at_start = at_start or {}

    def progress(self, step: str, status: str) -> None:
        self.events.append(f"{step}:{status}")
        action = self.at_start.get(step) if status == "started" else None
        if callable(action):
            action()

    @contextmanager
    def _slot(self, env: str) -> Iterator[None]:
        self.events.append(f"slot+{env}")
        try:
            yield
        finally:
            self.events.append(f"slot-{env}")

    def slot(self, env: str):  # type: ignore[no-untyped-def]
        return self._slot(env)


@pytest.mark.slow
def test_editing_promotion_yaml_mid_run_changes_nothing_in_that_run(tiny_model: Path, site: Path) -> None:
    path = site / "promotion.yaml"

    def edit() -> None:  # a person edits the file while the promotion runs
        text = path.read_text().replace("served_name: tiny-llama", "served_name: edited-mid-run")
        path.write_text(text.replace("envs/local/values.yaml", "envs/prod/values.yaml"))

    hooks = Recording(at_start={"quantize": edit})
    record = promotion.promote(load_config(path), "local", str(tiny_model), workdir=site / "work", hooks=hooks)
    assert "served_name: edited-mid-run" in path.read_text(), "the file was edited during the run"
    assert record.decision == "promoted"
    assert values(site, "local")["model"]["servedName"] == "tiny-llama", "the run kept the configuration it read"
    assert values(site, "prod")["model"].get("artifact") in (None, ""), "the edited values_file was not used"
    assert [e for e in hooks.events if e.endswith(":started")] == [
        "resolve:started", "quantize:started", "publish:started", "preload:started", "verify:started",
        "commit:started",
    ]  # fmt: skip
    stored = GitOps.open(str(site / "remote.git"), site / "look").record("local", record.id)
    assert stored.artifact is not None and stored.artifact.manifest_digest == record.artifact.manifest_digest  # type: ignore[union-attr]
    assert stored.model is not None and stored.model.sha == record.model.sha  # type: ignore[union-attr]


@pytest.mark.slow
def test_prod_takes_only_the_bytes_its_required_environment_runs(tiny_model: Path, site: Path) -> None:
    cfg = load_config(site / "promotion.yaml")
    with pytest.raises(TerminalError, match="prod requires local first"):
        promotion.promote(cfg, "prod", str(tiny_model), workdir=site / "work")
    local = promotion.promote(cfg, "local", str(tiny_model), workdir=site / "work")
    prod = promotion.promote(cfg, "prod", str(tiny_model), workdir=site / "work")
    assert prod.artifact.manifest_digest == local.artifact.manifest_digest  # type: ignore[union-attr]
    # The artifact is rebuilt with other bytes under the same id (or changed on the volume, manifest and all).
    artifact_dir = Path(
        read_artifact(Path(cfg.environments["prod"].cache.root) / ".artifacts" / local.artifact.id).path
    )  # type: ignore[union-attr]
    manifest = json.loads((artifact_dir / MANIFEST).read_text())
    original = (artifact_dir / MANIFEST).read_text()
    try:
        manifest["files"][0]["sha256"] = "0" * 64
        (artifact_dir / MANIFEST).write_text(json.dumps(manifest))
        with pytest.raises(TerminalError) as info:
            promotion.promote(cfg, "prod", str(tiny_model), workdir=site / "work", promotion_id=None)
    finally:
        (artifact_dir / MANIFEST).write_text(original)
    message = str(info.value)  # the store refuses other bytes under the id it holds, naming both digests
    assert local.artifact.manifest_digest in message and "sha256:" in message.replace(
        local.artifact.manifest_digest, ""
    )  # type: ignore[union-attr]


@pytest.mark.slow
def test_pull_request_mode_waits_for_the_merge_then_resumes(tiny_model: Path, site: Path, shared_cache: Path) -> None:
    cfg = load_config(write(site, shared_cache, mode="pull-request"))
    hooks = Recording()
    record = promotion.promote(cfg, "local", str(tiny_model), workdir=site / "work", hooks=hooks)
    assert record.decision == "waiting" and "waiting for merge" in record.reason
    assert record.branch == f"modelctl/local/{record.id}" and f"--resume {record.id}" in record.reason
    assert hooks.events[-1] == "slot-local", "the environment's slot is released while waiting"
    assert GitOps.open(str(site / "remote.git"), site / "look").history("local") == [], "nothing on main yet"
    with pytest.raises(TerminalError, match="is not merged"):
        promotion.resume(cfg, "local", record.id, workdir=site / "work")
    git = ["git", "--git-dir", str(site / "remote.git")]
    subprocess.run([*git, "update-ref", "refs/heads/main", f"refs/heads/{record.branch}"], check=True)  # the merge
    merged = GitOps.open(str(site / "remote.git"), site / "look2")
    assert promotion.waiting_for_merge(merged, "local") == record.id, "what the watch flow resumes"
    again = Recording()
    done = promotion.resume(cfg, "local", record.id, workdir=site / "work", hooks=again)
    assert done.decision == "promoted" and done.id == record.id and done.commit == record.commit
    assert again.events == ["slot+local", "slot-local"], "resume takes the slot again"
    assert values(site, "local")["model"]["artifact"] == record.artifact.id  # type: ignore[union-attr]
