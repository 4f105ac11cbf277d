"""`modelctl gitops verify` as a GitOps repo's CI runs it on a pull request: a checkout of the repo, a person's
values change on top, the artifact store the pipeline publishes to (with eval reports kept by manifest digest)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import PromotionConfig, parse_config
from pipeline.evaluate.report import EvalReport, MetricValue
from pipeline.gitops import Promotion, edit_values, init_repo
from pipeline.gitops.verify import verify_checkout
from pipeline.store import LocalStore, StoredArtifact
from tests.test_store import build

runner = CliRunner()
SHA = "b" * 40
VALUES = "envs/staging/values.yaml"
GOOD_ID = "awq-w4a16-g128-00000000000000aa"
BAD_ID = "awq-w4a16-g128-00000000000000bb"


def eval_report(subject: str, score: float) -> EvalReport:
    """An eval report of the smoke suite with both metrics at ``score`` (what the evaluate step stores)."""
    return EvalReport(
        suite="smoke", suite_sha256="0" * 64, subject=subject, backend="vllm", lm_eval_version="test",
        tasks={
            "facts_mc": {"acc,none": MetricValue(value=score, stderr=0.01, n=120)},
            "facts_gen": {"exact_match,strip": MetricValue(value=score, stderr=0.01, n=120)},
        },
    )  # fmt: skip


def publish(store: LocalStore, root: Path, artifact_id: str, score: float | None, weights: bytes) -> StoredArtifact:
    """Publish a small artifact; keep an eval report for its bytes when ``score`` is given."""
    stored = store.publish(build(root, weights=weights, artifact_id=artifact_id))
    if score is not None:
        store.put_report(stored.manifest_digest, "eval", eval_report(artifact_id, score))
    return stored


def config_text(tmp_path: Path, remote: Path, extra: str = "") -> str:
    return (
        f"version: 1\ngitops:\n  url: {remote}\nartifacts:\n  store: local\n  path: {tmp_path / 'store'}\n"
        "environments:\n  staging:\n    values_file: envs/staging/values.yaml\n"
        f"    cache: {{root: {tmp_path / 'cache'}}}\n    gates:\n      eval: {{suite: smoke}}\n{extra}"
    )


def git(checkout: Path, *args: str, author: str = "Alice Person") -> str:
    email = author.split()[0].lower() + "@example.com"
    ident = ["-c", f"user.name={author}", "-c", f"user.email={email}"]
    done = subprocess.run(["git", "-C", str(checkout), *ident, *args], capture_output=True, text=True, check=True)
    return done.stdout.strip()


def edit(checkout: Path, changes: dict[str, object], message: str = "bump the staging model") -> str:
    """A person's change of the staging values, committed in the checkout; returns the commit."""
    path = checkout / VALUES
    path.write_text(edit_values(path.read_text(), changes))
    git(checkout, "commit", "-qam", message)
    return git(checkout, "rev-parse", "HEAD")


def model(artifact: str, revision: str = SHA) -> dict[str, object]:
    return Promotion(
        env="staging", model="org/model", revision=revision, artifact=artifact, format="awq-w4a16",
        quantization="compressed-tensors",
    ).changes()  # fmt: skip


@pytest.fixture
def world(tmp_path: Path) -> tuple[PromotionConfig, Path, LocalStore, Path]:
    remote = tmp_path / "gitops.git"
    init_repo(remote)
    checkout = tmp_path / "checkout"
    subprocess.run(["git", "clone", "-q", str(remote), str(checkout)], check=True)
    store = LocalStore(tmp_path / "store")
    publish(store, tmp_path / "build", GOOD_ID, 0.97, bytes(range(256)) * 8)
    config = tmp_path / "promotion.yaml"
    config.write_text(config_text(tmp_path, remote))
    return parse_config(config.read_text(), str(config)), checkout, store, config


def failed(result: object, env: str = "staging") -> dict[str, str]:
    verdict = next(e for e in result.environments if e.env == env)  # type: ignore[attr-defined]
    return {c.name: c.reason for c in verdict.checks if not c.passed}


def test_a_good_change_passes_every_check(world: tuple[PromotionConfig, Path, LocalStore, Path]) -> None:
    cfg, checkout, store, _ = world
    edit(checkout, model(GOOD_ID))
    result = verify_checkout(cfg, checkout, "HEAD~1", store)
    assert result.passed, failed(result)
    checks = {c.name for c in result.environments[0].checks}
    assert checks == {"schema", "render", "pinned", "artifact", "eval"}


def test_an_unpinned_revision_fails_naming_it(world: tuple[PromotionConfig, Path, LocalStore, Path]) -> None:
    cfg, checkout, store, _ = world
    edit(checkout, model(GOOD_ID, revision="main"))
    result = verify_checkout(cfg, checkout, "HEAD~1", store)
    assert not result.passed
    assert "'main' is not a pinned 40-hex commit sha" in failed(result)["pinned"]


def test_a_schema_break_fails_naming_the_key(world: tuple[PromotionConfig, Path, LocalStore, Path]) -> None:
    cfg, checkout, store, _ = world
    edit(checkout, {**model(GOOD_ID), "replicas": "many"})
    result = verify_checkout(cfg, checkout, "HEAD~1", store)
    problems = failed(result)
    assert set(problems) == {"schema"}, problems
    assert "replicas" in problems["schema"] and "values.schema.json" in problems["schema"]


def test_an_unevaluated_artifact_fails_naming_the_gate(
    world: tuple[PromotionConfig, Path, LocalStore, Path], tmp_path: Path
) -> None:
    cfg, checkout, store, _ = world
    stored = publish(store, tmp_path / "build", BAD_ID, None, b"other weights" * 64)
    edit(checkout, model(BAD_ID))
    result = verify_checkout(cfg, checkout, "HEAD~1", store)
    reason = failed(result)["eval"]
    assert "the eval gate (suite smoke) has not run" in reason and stored.manifest_digest in reason


def test_an_artifact_the_gate_refuses_or_the_store_lacks_fails(
    world: tuple[PromotionConfig, Path, LocalStore, Path], tmp_path: Path
) -> None:
    cfg, checkout, store, _ = world
    publish(store, tmp_path / "build", BAD_ID, 0.30, b"damaged weights" * 64)
    edit(checkout, model(BAD_ID))
    assert "eval gate fail" in failed(verify_checkout(cfg, checkout, "HEAD~1", store))["eval"]
    edit(checkout, model("awq-w4a16-g128-00000000000000cc"))
    assert "is not in the local artifact store" in failed(verify_checkout(cfg, checkout, "HEAD~1", store))["artifact"]


def test_unchanged_environments_are_not_checked(world: tuple[PromotionConfig, Path, LocalStore, Path]) -> None:
    cfg, checkout, store, _ = world
    (checkout / "README.md").write_text("notes\n")
    git(checkout, "add", "README.md")
    git(checkout, "commit", "-qm", "docs")
    result = verify_checkout(cfg, checkout, None, store)  # default base: the merge-base with origin/main
    assert result.passed and result.environments == []


def test_cli_exit_codes_and_json(world: tuple[PromotionConfig, Path, LocalStore, Path]) -> None:
    _, checkout, _, config = world
    edit(checkout, model(GOOD_ID))
    args = ["gitops", "verify", "--config", str(config), "--repo", str(checkout), "--base", "HEAD~1"]
    good = runner.invoke(app, [*args, "--json"])
    assert good.exit_code == 0, good.output
    assert json.loads(good.stdout)["ok"] is True
    edit(checkout, model(GOOD_ID, revision="v1.0"))
    bad = runner.invoke(app, args)
    assert bad.exit_code == 1 and "FAIL pinned" in bad.output and "'v1.0'" in bad.output
    wrong = runner.invoke(app, [*args[:-1], "no-such-ref", "--json"])
    assert wrong.exit_code == 2 and "is not a commit" in wrong.stdout
