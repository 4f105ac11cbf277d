"""Processes sharing one GitOps clone (one ``$MODELCTL_CACHE``): what each caller is told matches the remote.

Real processes, a real bare remote, the pipeline's default clone under one cache directory. Also the refusals a
remote gives for good (read-only) end at once, as terminal errors, instead of being retried.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import TerminalError
from pipeline.gitops import GitOps, Promotion, init_repo
from pipeline.gitops.repo import default_workdir

ROOT = Path(__file__).resolve().parent.parent
ENVS = ("local", "staging", "prod")

# One worker: promote ``count`` revisions to one environment through the shared default clone; print one JSON
# line per promotion with what the caller was told.
WORKER = """
import json, sys
from pipeline.errors import TerminalError, TransientError
from pipeline.gitops import GitOps, Promotion
from pipeline.gitops.repo import default_workdir
remote, env, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
for n in range(count):
    p = Promotion(env=env, model="org/name", revision=f"{n + 1:x}" * 40, artifact=f"{env}-{n}", format="awq")
    told = {"id": p.id, "env": env}
    try:
        repo = GitOps.open(remote, default_workdir(remote, "main"))
        result = repo.promote(p, f"envs/{env}/values.yaml")
        said = "skipped" if result.skipped else "pushed" if result.pushed else "local"
        told |= {"told": said, "commit": result.commit}
    except TerminalError as exc:
        told |= {"told": "terminal", "why": exc.what}
    except TransientError as exc:
        told |= {"told": "transient", "why": exc.what}
    print(json.dumps(told), flush=True)
"""

HISTORY = """
import sys
from pipeline.gitops import GitOps
from pipeline.gitops.repo import default_workdir
remote = sys.argv[1]
repo = GitOps.open(remote, default_workdir(remote, "main"))
print(len(repo.history("prod")))
"""


def _env(cache: Path) -> dict[str, str]:
    return {**os.environ, "MODELCTL_CACHE": str(cache), "PYTHONPATH": str(ROOT)}


def _remote_ids(remote: Path) -> list[str]:
    out = subprocess.run(
        ["git", "-C", str(remote), "log", "--format=%(trailers:key=Promotion-Id,valueonly)", "main"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def test_three_processes_promoting_through_one_clone_are_told_the_truth(tmp_path: Path) -> None:
    remote = tmp_path / "remote.git"
    init_repo(remote)
    cache = tmp_path / "cache"
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(remote), env, "3"],
            env=_env(cache),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for env in ENVS
    ]
    told: list[dict[str, str]] = []
    for worker in workers:
        out, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err[-2000:]
        told += [json.loads(line) for line in out.splitlines()]

    assert len(told) == 9
    on_remote = _remote_ids(remote)
    pushed = {t["id"] for t in told if t["told"] == "pushed"}
    failed = {t["id"] for t in told if t["told"] in ("terminal", "transient")}
    assert pushed == set(on_remote), f"told pushed: {sorted(pushed)}, on the remote: {sorted(on_remote)}"
    assert not failed & set(on_remote), "a caller was told it failed, but its commit landed"
    assert len(on_remote) == len(set(on_remote)), "a promotion landed twice"
    # The environments are disjoint, so no promotion conflicts: every one of them must land.
    assert len(pushed) == 9, [t for t in told if t["told"] != "pushed"]
    for t in told:
        assert (
            subprocess.run(
                ["git", "-C", str(remote), "merge-base", "--is-ancestor", t["commit"], "main"], check=False
            ).returncode
            == 0
        )


def test_parallel_history_on_a_fresh_cache_never_fails(tmp_path: Path) -> None:
    remote = tmp_path / "remote.git"
    init_repo(remote)
    GitOps.open(str(remote), tmp_path / "seed").promote(
        Promotion(env="prod", model="org/name", revision="d" * 40, artifact="a1"), "envs/prod/values.yaml"
    )
    for round_ in range(2):
        cache = tmp_path / f"cache-{round_}"
        readers = [
            subprocess.Popen(
                [sys.executable, "-c", HISTORY, str(remote)],
                env=_env(cache),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(4)
        ]
        for reader in readers:
            out, err = reader.communicate(timeout=300)
            assert reader.returncode == 0, err[-2000:]
            assert out.strip() == "1"
        assert (default_workdir(str(remote), "main").name) in os.listdir(cache / "gitops")
        assert not [p for p in os.listdir(cache / "gitops") if ".cloning-" in p], "a half-made clone was left"


def _refuse_pushes(remote: Path) -> Path:
    """A server-side refusal for good (a protected branch): every push is declined; returns the tally."""
    tally = remote / "pushes-tried"
    hook = remote / "hooks" / "pre-receive"
    refusal = "GH006: Protected branch update failed for refs/heads/main. You may not push to this branch."
    hook.write_text(f"#!/bin/sh\necho x >> {tally}\necho '{refusal}' >&2\nexit 1\n")
    hook.chmod(0o755)
    return tally


def test_a_protected_branch_is_terminal_after_one_try(tmp_path: Path) -> None:
    remote = tmp_path / "remote.git"
    init_repo(remote)
    tally = _refuse_pushes(remote)
    repo = GitOps.open(str(remote), tmp_path / "clone")
    p = Promotion(env="prod", model="org/name", revision="d" * 40, artifact="a1")

    with pytest.raises(TerminalError) as info:
        repo.promote(p, "envs/prod/values.yaml")

    assert tally.read_text().count("x") == 1, "a refusal for good was retried"
    assert "read-only" in info.value.what and "write access" in (info.value.hint or "")
    assert "keeps moving" not in str(info.value)
    assert _remote_ids(remote) == []


def test_a_remote_the_process_may_not_write_is_terminal_with_a_permission_hint(tmp_path: Path) -> None:
    """A local bare repo without write permission (as a non-root user would see it)."""
    from git import GitCommandError

    from pipeline.gitops.remote import classify

    # git's own words when the remote's object directory is not writable (captured from a real push).
    stderr = (
        "error: remote unpack failed: unable to create temporary object directory\n"
        " ! [remote rejected] HEAD -> main (unpacker error)\nerror: failed to push some refs to '/srv/remote.git'"
    )
    error = classify(GitCommandError(["git", "push"], 1, stderr), "pushing to /srv/remote.git", "x", "GITOPS_TOKEN")
    assert isinstance(error, TerminalError) and "read-only" in error.what
    assert "file permissions" in (error.hint or "")
    # A lost race is still worth a retry.
    raced = classify(
        GitCommandError(["git", "push"], 1, " ! [rejected] main -> main (fetch first)"), "pushing", "x", "GITOPS_TOKEN"
    )
    assert raced.retryable
