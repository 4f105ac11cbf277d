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
    assert (
        human.exit_code == 0 and f"now running in prod: org/name@eeeeeeeeeeee art-7 (promotion {p.id}," in human.output
    )
