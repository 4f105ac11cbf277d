"""The GitOps repo with real git: a bare remote in a temporary directory, clones promoting, pushing and reverting."""

from __future__ import annotations

import difflib
import json
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.errors import TerminalError, TransientError
from pipeline.gitops import CommitResult, GitOps, Promotion, edit_values, init_repo
from pipeline.gitops.repo import Pending
from pipeline.record import PromotionRecord

PROD, STAGING = "envs/prod/values.yaml", "envs/staging/values.yaml"
SHA_A, SHA_B, SHA_C = "a" * 40, "b" * 40, "c" * 40

Clone = Callable[..., GitOps]


def git(where: Path | str, *args: str) -> str:
    return subprocess.run(["git", "-C", str(where), *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture
def remote(tmp_path: Path) -> Path:
    path = tmp_path / "remote.git"
    init_repo(path)
    return path


@pytest.fixture
def clone(remote: Path, tmp_path: Path) -> Clone:
    def make(name: str = "pipeline", author: str = "modelctl", **kw: str) -> GitOps:
        return GitOps.open(str(remote), tmp_path / name, author_name=author, author_email=f"{author}@example.com", **kw)

    return make


def promotion(env: str = "prod", revision: str = SHA_A, artifact: str = "qwen-awq-1", **kw: object) -> Promotion:
    return Promotion(
        env=env, model="org/name", revision=revision, artifact=artifact, format="awq-w4a16", quantization="awq", **kw
    )


def remote_file(remote: Path, name: str) -> str:
    return git(remote, "show", f"main:{name}")


def test_promote_commits_values_and_record_with_trailers(clone: Clone, remote: Path) -> None:
    repo = clone()
    p = promotion(
        eval="pass: fact_recall 0.99 (baseline 0.99)", latency="pass: ttft_p95 120 ms <= 300", flow_run="fr-1"
    )
    result = repo.promote(p, PROD)

    assert result.pushed and not result.skipped
    assert git(remote, "rev-parse", "main").strip() == result.commit
    message = git(remote, "log", "-1", "--format=%B", "main")
    assert message.startswith("promote(prod): org/name@aaaaaaaaaaaa awq-w4a16 qwen-awq-1\n")
    expected = [f"Promotion-Id: {p.id}", "Environment: prod", "Model: org/name", f"Revision: {SHA_A}"]
    expected += ["Artifact: qwen-awq-1", "Eval: pass: fact_recall 0.99", "Latency: pass: ttft_p95", "Flow-Run: fr-1"]
    for trailer in expected:
        assert trailer in message
    assert 'artifact: "qwen-awq-1"' in remote_file(remote, PROD)
    stored = json.loads(remote_file(remote, f"records/prod/{p.id}.json"))
    assert stored["decision"] == "promoted" and stored["artifact"]["id"] == "qwen-awq-1"

    entry = repo.current("prod")
    assert entry is not None and entry.promotion_id == p.id and entry.artifact == "qwen-awq-1"
    assert entry.eval.startswith("pass") and entry.author == "modelctl <modelctl@example.com>"
    assert repo.current("staging") is None
    stored_artifact = repo.record("prod", p.id).artifact
    assert stored_artifact is not None and (stored_artifact.id, stored_artifact.format) == ("qwen-awq-1", "awq-w4a16")


def test_promoting_what_already_runs_is_a_skip_not_an_empty_commit(clone: Clone, remote: Path) -> None:
    repo = clone()
    first = repo.promote(promotion(), PROD)
    again = repo.promote(promotion(), PROD)  # a new promotion id, the same values
    rerun = repo.promote(promotion().model_copy(update={"id": first.promotion_id}), PROD)  # a crashed run re-run

    assert again.skipped and again.commit == first.commit
    assert rerun.skipped and rerun.commit == first.commit
    assert git(remote, "rev-list", "--count", "main").strip() == "2"  # the template + one promotion


def test_history_lists_promotions_of_one_environment_newest_first(clone: Clone) -> None:
    repo = clone()
    repo.promote(promotion(revision=SHA_A, artifact="a1"), PROD)
    repo.promote(promotion(env="staging", revision=SHA_B, artifact="b1"), STAGING)
    repo.promote(promotion(revision=SHA_C, artifact="c1"), PROD)

    assert [e.artifact for e in repo.history("prod")] == ["c1", "a1"]
    assert [e.artifact for e in repo.history("staging")] == ["b1"]
    assert [e.artifact for e in repo.history("prod", limit=1)] == ["c1"]


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"canary_steps": [{"setWeight": 150}]}, "canary.steps.0.setWeight: 150 is greater than the maximum of 100"),
        ({"revision": "main"}, "model.revision: 'main' does not match"),
        ({"artifact": "Not A Dir/../x"}, "model.artifact"),
        ({"replicas": -1}, "replicas: -1 is less than the minimum of 0"),
    ],
)
def test_values_that_break_the_schema_commit_nothing(
    clone: Clone, remote: Path, change: dict[str, object], named: str
) -> None:
    repo = clone()
    before = git(remote, "rev-parse", "main")
    with pytest.raises(TerminalError) as caught:
        repo.promote(promotion(**{"revision": SHA_A, **change}) if "revision" in change else promotion(**change), PROD)

    assert named in str(caught.value) and "nothing was written or committed" in str(caught.value)
    assert git(remote, "rev-parse", "main") == before
    assert git(repo.workdir, "status", "--porcelain") == ""
    assert git(repo.workdir, "rev-parse", "HEAD") == before


def untouched(before: str, after: str) -> tuple[list[str], list[str]]:
    """The removed and added lines of a line diff."""
    diff = list(difflib.ndiff(before.splitlines(keepends=True), after.splitlines(keepends=True)))
    return [d[2:] for d in diff if d.startswith("- ")], [d[2:] for d in diff if d.startswith("+ ")]


def test_round_trip_changes_only_the_promoted_lines_of_every_env_file(clone: Clone) -> None:
    repo = clone()
    for env in ("local", "staging", "prod"):
        path = repo.workdir / f"envs/{env}/values.yaml"
        before = path.read_bytes()
        result = repo.promote(promotion(env=env, served_name="served"), f"envs/{env}/values.yaml")
        after = path.read_bytes()
        assert result.pushed
        removed, added = untouched(before.decode(), after.decode())
        changed_keys = {line.split(":")[0].strip() for line in removed + added}
        assert changed_keys <= {"repo", "revision", "artifact", "format", "quantization", "servedName"}, changed_keys
        assert len(removed) == len(added)  # each changed key stays on its own line, in place
        # every untouched byte survives: putting the old lines back gives the original bytes
        restored = after.decode()
        for old, new in zip(removed, added, strict=True):
            restored = restored.replace(new, old, 1)
        assert restored.encode() == before


def test_round_trip_keeps_comments_quotes_flow_style_and_a_foreign_indentation() -> None:
    text = (
        "# top comment\n"
        "model:\n"
        "    repo: 'org/old'   # single-quoted, with a comment\n"
        '    revision: "0000000000000000000000000000000000000000"\n'
        "    artifact: old-art\n"
        "    extraArgs: [--enforce-eager, '--seed=1']\n"
        "canary:\n"
        "    steps:\n"
        "    - setWeight: 20\n"
        "    - pause: {duration: 1m}\n"
        "replicas: 3   # keep\n"
    )
    after = edit_values(text, {"model.repo": "org/new", "model.revision": SHA_B, "model.artifact": "new-art"})
    removed, added = untouched(text, after)

    assert added == [
        "    repo: 'org/new'   # single-quoted, with a comment\n",
        f'    revision: "{SHA_B}"\n',
        "    artifact: new-art\n",
    ]
    assert len(removed) == 3
    assert edit_values(text, {"model.artifact": "old-art"}) == text  # nothing to change: the very same text


def test_two_clones_promoting_different_environments_at_once_both_land(clone: Clone, remote: Path) -> None:
    clones = {"prod": clone("a", author="alice"), "staging": clone("b", author="bob")}
    barrier = threading.Barrier(len(clones))
    results: dict[str, CommitResult] = {}
    failures: list[BaseException] = []

    def run(env: str) -> None:
        try:
            for i, sha in enumerate((SHA_A, SHA_B, SHA_C)):
                barrier.wait(timeout=60)
                file = PROD if env == "prod" else STAGING
                results[f"{env}{i}"] = clones[env].promote(promotion(env, sha, f"{env}-art-{i}"), file)
        except BaseException as exc:  # surfaced below
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(env,)) for env in clones]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert not failures, failures
    assert all(r.pushed for r in results.values()) and len(results) == 6
    log = git(remote, "log", "--format=%H", "main").split()
    assert {r.commit for r in results.values()} <= set(log)  # nothing lost
    assert 'artifact: "prod-art-2"' in remote_file(remote, PROD)
    assert 'artifact: "staging-art-2"' in remote_file(remote, STAGING)


def test_a_stale_clone_rebases_onto_the_new_tip_and_lands(clone: Clone, remote: Path) -> None:
    a, b = clone("a", author="alice"), clone("b", author="bob")
    pending = b.prepare(promotion("staging", SHA_B, "b-art"), STAGING)  # committed locally, not pushed
    assert isinstance(pending, Pending)
    a.promote(promotion("prod", SHA_A, "a-art"), PROD)  # the remote moves on

    result = b.publish(pending)

    assert result.pushed and result.attempts == 2
    log = git(remote, "log", "--format=%an %s", "main").splitlines()
    assert log[0].startswith("bob promote(staging)") and log[1].startswith("alice promote(prod)")


def test_a_concurrent_change_of_the_same_keys_is_terminal_and_names_who(clone: Clone, remote: Path) -> None:
    a, b = clone("a", author="alice"), clone("b", author="bob")
    pending = b.prepare(promotion("prod", SHA_B, "bob-art"), PROD)
    assert isinstance(pending, Pending)
    landed = a.promote(promotion("prod", SHA_A, "alice-art"), PROD)

    with pytest.raises(TerminalError) as caught:
        b.publish(pending)

    message = str(caught.value)
    assert "model.revision" in message and "model.artifact" in message
    assert "alice <alice@example.com>" in message and landed.commit[:7] in message
    assert git(remote, "rev-parse", "main").strip() == landed.commit
    assert 'artifact: "alice-art"' in remote_file(remote, PROD)


def test_revert_restores_the_previous_model_keeps_records_and_is_idempotent(clone: Clone, remote: Path) -> None:
    repo = clone()
    good = repo.promote(promotion(revision=SHA_A, artifact="good"), PROD)
    good_values = remote_file(remote, PROD)
    bad = repo.promote(promotion(revision=SHA_B, artifact="bad"), PROD)

    reverted = repo.revert(bad.promotion_id, reason="canary: ttft_p95 900 ms > 300 ms", flow_run="fr-9")

    assert reverted.pushed and remote_file(remote, PROD) == good_values
    message = git(remote, "log", "-1", "--format=%B", "main")
    assert message.startswith(f"revert(prod): {bad.promotion_id} org/name@bbbbbbbbbbbb")
    assert f"Reverts: {bad.promotion_id}" in message and f"Reverted-Commit: {bad.commit}" in message
    now = repo.current("prod")
    assert now is not None and now.action == "revert" and now.artifact == "good" and now.revision == SHA_A
    assert remote_file(remote, f"records/prod/{bad.promotion_id}.json")  # the reverted promotion's record stays
    record = PromotionRecord.from_json(remote_file(remote, f"records/prod/{reverted.promotion_id}.json"))
    assert record.decision == "reverted" and record.reverts == bad.promotion_id

    baseline = repo.baseline("prod")  # the next eval baseline: the model that runs again, not the reverted one
    assert baseline is not None and baseline.id == good.promotion_id and baseline.artifact is not None
    assert (baseline.artifact.id, baseline.artifact.format) == ("good", "awq-w4a16")
    assert repo.baseline("staging") is None
    again = repo.revert(bad.commit)  # by commit this time: already done
    assert again.skipped and again.commit == reverted.commit
    assert [e.action for e in repo.history("prod")] == ["revert", "promote", "promote"]
    assert good.commit in {e.commit for e in repo.history("prod")}


def test_revert_of_an_older_promotion_whose_lines_changed_since_names_the_later_commit(clone: Clone) -> None:
    repo = clone()
    first = repo.promote(promotion(revision=SHA_A, artifact="first"), PROD)
    second = repo.promote(promotion(revision=SHA_B, artifact="second"), PROD)

    with pytest.raises(TerminalError) as caught:
        repo.revert(first.promotion_id)

    assert second.commit[:7] in str(caught.value) and "revert the later commits first" in str(caught.value)
    assert git(repo.workdir, "status", "--porcelain") == ""
    with pytest.raises(TerminalError, match="not a promotion commit or promotion id"):
        repo.revert("0123456789abcdef")


def test_pull_request_mode_pushes_a_branch_and_leaves_main_alone(clone: Clone, remote: Path) -> None:
    repo = clone(mode="pull-request")
    before = git(remote, "rev-parse", "main")
    result = repo.promote(promotion(), PROD)

    assert result.pushed and result.branch == f"modelctl/prod/{result.promotion_id}"
    assert git(remote, "rev-parse", "main") == before
    assert git(remote, "rev-parse", result.branch).strip() == result.commit


def test_open_refuses_credentials_in_the_url_and_a_foreign_workdir(tmp_path: Path, remote: Path) -> None:
    with pytest.raises(TerminalError) as caught:
        GitOps.open("https://user:hunter2-secret@example.com/repo.git", tmp_path / "w")
    assert "hunter2-secret" not in str(caught.value) and "GITOPS_TOKEN" in str(caught.value)

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    with pytest.raises(TerminalError, match="not a clone of the GitOps repo"):
        GitOps.open(str(remote), tmp_path / "busy")
    with pytest.raises(TerminalError, match=r"does not exist(.|\n)*Fix: check gitops.url"):
        GitOps.open(str(tmp_path / "missing.git"), tmp_path / "w2")


def test_init_refuses_a_non_repo_and_skips_an_existing_one(tmp_path: Path, remote: Path) -> None:
    again = init_repo(remote)
    assert again.skipped and again.commit == git(remote, "rev-parse", "main").strip()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x").write_text("x")
    with pytest.raises(TerminalError, match="is not a GitOps repo"):
        init_repo(tmp_path / "junk")
    files = git(remote, "ls-tree", "-r", "--name-only", "main").split()
    assert {"charts/llm-inference/values.schema.json", "envs/local/values.yaml", "argocd/project.yaml"} <= set(files)


def test_commits_are_signed_when_git_config_asks_for_it(clone: Clone, tmp_path: Path) -> None:
    key = tmp_path / "signing-key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    repo = clone()
    git(repo.workdir, "config", "gpg.format", "ssh")
    git(repo.workdir, "config", "commit.gpgsign", "true")
    git(repo.workdir, "config", "user.signingkey", str(key) + ".missing")
    with pytest.raises(TerminalError, match="could not commit") as caught:
        repo.promote(promotion(), PROD)
    assert "user.signingkey" in str(caught.value) and git(repo.workdir, "status", "--porcelain") == ""

    git(repo.workdir, "config", "user.signingkey", str(key))
    result = repo.promote(promotion(), PROD)
    assert "-----BEGIN SSH SIGNATURE-----" in git(repo.workdir, "cat-file", "commit", result.commit)


def test_round_trip_keeps_hand_written_layout_that_yaml_libraries_normalize() -> None:
    text = (
        "replicas:   2\n"
        'image:  {repository: "vllm/vllm-openai",   tag: v0.11.0}   \n'
        "nodeSelector: ~\n"
        "extra: [1,2,  3]\n"
        "probes:\n"
        "      startup: {periodSeconds: 10}\n"
        "model:\n"
        '  artifact: ""   # set by the pipeline\n'
        "canary:\n"
        "  steps:\n"
        "  - setWeight: 5\n"
    )
    after = edit_values(text, {"model.artifact": "new", "canary.steps": [{"setWeight": 10}, {"pause": {}}]})
    removed, added = untouched(text, after)

    assert removed == ['  artifact: ""   # set by the pipeline\n', "  - setWeight: 5\n"]
    assert added == ['  artifact: "new" # set by the pipeline\n', "  - setWeight: 10\n", "  - pause: {}\n"]


def test_a_remote_that_keeps_refusing_pushes_is_transient_after_bounded_retries(clone: Clone, remote: Path) -> None:
    repo = clone()
    hook = remote / "hooks" / "pre-receive"
    hook.write_text("#!/bin/sh\necho 'read-only: maintenance window' >&2\nexit 1\n")
    hook.chmod(0o755)
    before = git(remote, "rev-parse", "main")
    repo.max_attempts = 2

    with pytest.raises(TransientError) as caught:
        repo.promote(promotion(), PROD)

    assert "after 2 attempts" in str(caught.value) and "maintenance window" in str(caught.value)
    assert "idempotent" in str(caught.value)
    assert git(remote, "rev-parse", "main") == before
    assert git(repo.workdir, "rev-parse", "HEAD") == before and git(repo.workdir, "status", "--porcelain") == ""
    hook.unlink()
    assert repo.promote(promotion(), PROD).pushed  # the same step, run again, lands
