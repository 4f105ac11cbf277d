"""`modelctl gitops init`, `modelctl plan` and `modelctl history` as a user runs them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.gitops import GitOps, Promotion

runner = CliRunner()
SHA = "e" * 40


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A GitOps remote made by `modelctl gitops init` and a promotion.yaml pointing at it."""
    monkeypatch.setenv("MODELCTL_CACHE", str(tmp_path / "cache"))
    result = runner.invoke(app, ["gitops", "init", str(tmp_path / "remote.git"), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["ok"] and not data["skipped"] and data["files"] > 10
    config = tmp_path / "promotion.yaml"
    config.write_text(
        "version: 1\ngitops:\n  url: ./remote.git\nenvironments:\n"
        "  prod:\n    values_file: envs/prod/values.yaml\n    cache: {root: ./cache}\n"
    )
    return config


def test_init_twice_is_a_skip(setup: Path) -> None:
    result = runner.invoke(app, ["gitops", "init", str(setup.parent / "remote.git")])
    assert result.exit_code == 0
    assert "is already a GitOps repo" in result.output


def test_plan_shows_the_values_diff_and_commits_nothing(setup: Path) -> None:
    remote = setup.parent / "remote.git"
    before = subprocess.run(["git", "-C", str(remote), "rev-parse", "main"], capture_output=True, text=True).stdout
    args = ["plan", f"org/name@{SHA}", "--env", "prod", "--config", str(setup), "--artifact", "art-7"]
    args += ["--format", "awq-w4a16", "--quantization", "awq"]

    human = runner.invoke(app, args)
    assert human.exit_code == 0, human.output
    assert "promote(prod): org/name@eeeeeeeeeeee awq-w4a16 art-7" in human.output
    assert f'+  revision: "{SHA}"' in human.output and "nothing was committed" in human.output

    data = json.loads(runner.invoke(app, [*args, "--json"]).stdout)
    assert data["changed"]["model.artifact"] == {"from": "", "to": "art-7"}
    assert data["already_current"] is False and data["current"] is None
    after = subprocess.run(["git", "-C", str(remote), "rev-parse", "main"], capture_output=True, text=True).stdout
    assert after == before


def test_plan_refuses_a_branch_name_and_bad_values_with_exit_2(setup: Path) -> None:
    base = ["plan", "--env", "prod", "--config", str(setup)]
    result = runner.invoke(app, [*base, "org/name@main", "--artifact", "art-7"])
    assert result.exit_code == 2 and "not a pinned 40-hex commit sha" in result.output
    result = runner.invoke(app, [*base, f"org/name@{SHA}", "--artifact", "art-7", "--quantization", "int3", "--json"])
    assert result.exit_code == 2
    data = json.loads(result.stdout)
    assert data["error"] == "terminal" and "model.quantization" in data["message"]
    result = runner.invoke(
        app, [*base[:1], f"org/name@{SHA}", "--env", "nope", "--config", str(setup), "--artifact", "a"]
    )
    assert result.exit_code == 2 and "no such environment" in result.output


def test_history_lists_what_was_promoted(setup: Path, tmp_path: Path) -> None:
    repo = GitOps.open(str(tmp_path / "remote.git"), tmp_path / "other-clone")
    p = Promotion(env="prod", model="org/name", revision=SHA, artifact="art-7", format="awq-w4a16", eval="pass")
    repo.promote(p, "envs/prod/values.yaml")

    data = json.loads(runner.invoke(app, ["history", "--env", "prod", "--config", str(setup), "--json"]).stdout)
    assert [e["promotion_id"] for e in data["entries"]] == [p.id]
    assert data["entries"][0]["artifact"] == "art-7" and data["entries"][0]["eval"] == "pass"

    human = runner.invoke(app, ["history", "--env", "prod", "--config", str(setup)])
    assert human.exit_code == 0 and "now running in prod: org/name@eeeeeeee art-7\n" in human.output
    assert f"promotion {p.id}, commit" in human.output


def test_history_and_status_read_at_100_columns_and_wide_shows_everything(
    setup: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = GitOps.open(str(tmp_path / "remote.git"), tmp_path / "other-clone")
    ids, commits = [], []
    for n, artifact in enumerate(("awq-w4a16-0123456789abcdef", "gptq-w4a16-fedcba9876543210")):
        p = Promotion(
            env="prod", model="Qwen/Qwen2.5-0.5B-Instruct", revision=f"{n + 1}" * 40, artifact=artifact,
            format="awq-w4a16", eval="pass: fact_recall 0.99 >= baseline 0.99 - 0.05 (stderr 0.01)",
            latency="pass: ttft_p95 120 ms <= 300 ms, e2e_p95 900 ms <= 2000 ms",
        )  # fmt: skip
        done = repo.promote(p, "envs/prod/values.yaml")
        ids.append(done.promotion_id)
        commits.append(done.commit)
    revert = repo.revert(ids[1], reason="latency regression")
    monkeypatch.setenv("COLUMNS", "100")

    narrow = runner.invoke(app, ["history", "--env", "prod", "--config", str(setup)])
    assert narrow.exit_code == 0, narrow.output
    lines = narrow.output.splitlines()
    assert all(len(line) <= 100 for line in lines), "\n".join(lines)
    header = next(line for line in lines if "promotion" in line)
    assert "promotion" in header.split() and "commit" in header.split(), "the header breaks no word"
    for promotion_id in [*ids, revert.promotion_id]:
        assert promotion_id in narrow.output, "a promotion id is never cut or wrapped"
    assert "awq-w4a16-01234567 " in narrow.output and revert.commit[:8] in narrow.output
    assert f"↩ {ids[1]}" in narrow.output and "pass/pass" in narrow.output
    assert revert.commit[:12] not in narrow.output, "short shas at 100 columns"

    monkeypatch.setenv("COLUMNS", "250")
    wide = runner.invoke(app, ["history", "--env", "prod", "--config", str(setup), "--wide"])
    assert wide.exit_code == 0 and revert.commit in wide.output and "awq-w4a16-0123456789abcdef" in wide.output
    assert "e2e_p95 900 ms <= 2000 ms" in wide.output and "modelctl <modelctl@localhost>" in wide.output

    monkeypatch.setenv("COLUMNS", "100")
    status = runner.invoke(app, ["status", "--config", str(setup)])
    assert status.exit_code == 0, status.output
    assert all(len(line) <= 100 for line in status.output.splitlines()), status.output
    assert "Qwen/Qwen2.5-0.5B-Instruct@11111111" in status.output and "awq-w4a16-01234567" in status.output
    assert commits[0][:8] in status.output and "commit" in status.output.split(), "the live promotion's commit"
