"""The guard end to end on the fake cluster: people's commits to the GitOps repo are vetted like promotions.

A real GitOps repo (a bare remote from the template) that the pipeline and a person both push to, the artifact
store with eval reports kept by manifest digest (so the eval gate judges a stored report, no lm-eval run), and the
fake Kubernetes API with Argo CD and Argo Rollouts simulated, reached as the pipeline's ServiceAccount.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.canary import deploy
from pipeline.cli import app
from pipeline.config import (
    ArgoCDApp,
    CanaryPolicy,
    Gates,
    GuardSettings,
    LocalArtifactStore,
    PromotionConfig,
    load_config,
)
from pipeline.config import EvalGate as EvalGateSettings
from pipeline.config import RolloutRef as Ref
from pipeline.gates import GateResult, GateRow
from pipeline.gitops import GitOps, Promotion, init_repo
from pipeline.guard import GuardResult, guard
from pipeline.kube import Backoff, Kube
from pipeline.rollout import ObservedRollout
from pipeline.store import LocalStore
from sandbox.argocd import default_render
from sandbox.cluster import FakeCluster, rollout_manifest
from tests.test_gitops_verify import config_text, edit, git, model, publish, runner

ROOT = Path(__file__).resolve().parent.parent
VALUES = "envs/staging/values.yaml"
STEPS = [{"setWeight": 10}, {"pause": {}}, {"setWeight": 50}, {"pause": {}}, {"setWeight": 100}]
OLD, GOOD, BAD = (f"awq-w4a16-g128-00000000000000{x}" for x in ("a0", "b0", "c0"))
PASS = GateResult(gate="canary", rows=[GateRow(name="ttft_p95", value=90, limit="<= 300 ms", verdict="pass", why="ok")])


def canary_check(seen: ObservedRollout) -> GateResult:
    return PASS


def render(values_text: str, base_template: dict[str, Any]) -> dict[str, Any]:
    """The simulator's stand-in for the chart, with the values' model.artifact in the pod template."""
    template = default_render(values_text, base_template)
    artifact = (yaml.safe_load(values_text) or {}).get("model", {}).get("artifact", "")
    template["metadata"]["annotations"]["modelctl.io/artifact-id"] = artifact
    return template


@dataclass
class Stage:
    cfg: PromotionConfig
    cluster: FakeCluster
    kube: Kube
    gitops: GitOps
    store: LocalStore
    person: Path

    def guard(self) -> GuardResult:
        with self.cluster.running():
            return guard(self.cfg, "staging", gitops=self.gitops, store=self.store, kube=self.kube, check=canary_check)

    def push(self, changes: dict[str, object], message: str = "bump the staging model") -> str:
        """Alice's commit to the staging values, pushed to the branch Argo CD watches."""
        git(self.person, "pull", "-q", "--rebase")
        commit = edit(self.person, changes, message)
        git(self.person, "push", "-q", "origin", "HEAD:main")
        return commit

    def artifact_live(self) -> str:
        rollout = self.cluster.rollout("llm-staging", "llm-inference")
        return str(rollout["spec"]["template"]["metadata"]["annotations"]["modelctl.io/artifact-id"])


@pytest.fixture
def stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stage]:
    monkeypatch.setenv("MODELCTL_CACHE", str(tmp_path / "cache"))  # the guard's slot (lease file) lives here
    remote = tmp_path / "gitops.git"
    init_repo(remote)
    store = LocalStore(tmp_path / "store")
    publish(store, tmp_path / "build", OLD, 0.97, b"old weights" * 64)
    publish(store, tmp_path / "build", GOOD, 0.97, b"good weights" * 64)
    publish(store, tmp_path / "build", BAD, 0.30, b"damaged weights" * 64)
    base = load_config(ROOT / "examples" / "cluster" / "promotion.yaml")
    env = base.environments["staging"].model_copy(
        update={
            "argocd": ArgoCDApp(application="llm-inference-staging"),
            "rollout": Ref(name="llm-inference", namespace="llm-staging"),
            "gates": Gates(eval=EvalGateSettings(suite="smoke")),
            "canary": CanaryPolicy(consecutive_passes=2, check_interval_s=0.01, step_timeout_s=10, sync_timeout_s=10),
        }
    )
    cfg = base.model_copy(
        update={
            "gitops": base.gitops.model_copy(update={"url": str(remote)}),
            "artifacts": LocalArtifactStore(store="local", path=str(tmp_path / "store")),
            "environments": {"staging": env},
        }
    )
    gitops = GitOps.open(str(remote), tmp_path / "work")
    person = tmp_path / "person"
    subprocess.run(["git", "clone", "-q", str(remote), str(person)], check=True)
    cluster = FakeCluster()
    try:
        cluster.create_rollout("llm-staging", rollout_manifest("llm-inference", STEPS, deadline_s=120))
        cluster.with_argocd(str(remote), render=render).add_application(
            "llm-inference-staging", VALUES, "llm-staging", "llm-inference"
        )
        cluster.tick()
        kube = Kube(cluster.api_client, Backoff(attempts=4, first_s=0.01, max_s=0.05, request_timeout_s=1))
        promotion = Promotion(env="staging", model="org/model", revision="b" * 40, artifact=OLD, format="awq-w4a16")
        commit = gitops.promote(promotion, VALUES).commit  # the pipeline's own promotion, live and Healthy
        with cluster.running():
            assert deploy(kube, gitops, "staging", env, commit, promotion.id, canary_check).final == "done"
        yield Stage(cfg, cluster, kube, gitops, store, person)
    finally:
        cluster.close()


def test_a_persons_good_commit_walks_its_canary_and_is_recorded_as_guarded_once(stage: Stage) -> None:
    commit = stage.push(model(GOOD))
    result = stage.guard()
    record = result.record
    assert result.action == "guarded" and record is not None, result.reason
    assert record.decision == "promoted", record.reason
    assert record.guarded is not None and record.guarded.vetted and not record.guarded.fast_path
    assert record.guarded.commit == commit and record.guarded.author.startswith("Alice Person")
    assert record.eval_gate is not None and record.eval_gate.passed
    assert record.rollout is not None and record.rollout.final == "done"
    assert [e.action for e in record.rollout.steps if e.action != "check"] == ["synced", "promote", "promote", "done"]
    assert stage.artifact_live() == GOOD
    assert stage.gitops.history("staging")[0].action == "guarded"
    again = stage.guard()
    assert again.action == "nothing" and again.record is None, "a second run picks nothing up"


def test_a_commit_the_eval_gate_refuses_is_reverted_before_its_canary_finishes(stage: Stage) -> None:
    commit = stage.push(model(BAD), message="try the new quant")
    assert stage.cfg.environments["staging"].argocd is not None
    stage.kube.request_refresh(stage.cfg.environments["staging"].argocd)  # Argo CD's poll sees the push first
    stage.cluster.tick(3)
    assert stage.artifact_live() == BAD, "the person's commit is live, its canary in flight"
    before = len(stage.cluster.server.sent("patch", "/rollouts/llm-inference/status"))
    result = stage.guard()
    record = result.record
    assert record is not None and record.decision == "reverted"
    assert "eval gate fail" in record.reason and commit[:12] in record.reason and "Alice Person" in record.reason
    assert record.rollout is not None and record.rollout.revert is not None and record.rollout.revert.aborted
    patches = stage.cluster.server.sent("patch", "/rollouts/llm-inference/status")[before:]
    assert [r.body for r in patches] == [{"status": {"abort": True}}], "aborted, never advanced"
    history = stage.gitops.history("staging")
    revert = next(e for e in history if e.action == "revert")
    assert commit[:12] in revert.subject and "Alice Person" in revert.subject, revert.subject
    assert revert.artifact == OLD and stage.artifact_live() == OLD
    assert stage.guard().action == "nothing", "the guard's own revert is the pipeline's"


def test_a_persons_git_revert_to_the_previous_artifact_takes_the_fast_path(stage: Stage) -> None:
    bump = stage.push(model(GOOD))
    assert stage.guard().record is not None
    git(stage.person, "pull", "-q", "--rebase")
    git(stage.person, "revert", "--no-edit", bump)
    git(stage.person, "push", "-q", "origin", "HEAD:main")
    result = stage.guard()
    record = result.record
    assert record is not None and record.decision == "promoted", result.reason
    assert record.guarded is not None and record.guarded.fast_path
    assert record.eval_gate is None, "no re-gate on the way back to what ran before"
    assert record.rollout is not None and record.rollout.final == "done"
    assert stage.artifact_live() == OLD


def test_a_forged_trailer_is_treated_as_a_persons_commit(stage: Stage) -> None:
    forged = "promote(staging): org/model\n\nPromotion-Id: 0123456789abcdef\nEnvironment: staging\nAction: promote"
    commit = stage.push(model(GOOD), message=forged)
    stage.gitops.sync()
    assert stage.gitops.history("staging")[0].promotion_id == "0123456789abcdef", "the trailer reads as a promotion"
    result = stage.guard()
    record = result.record
    assert record is not None and record.guarded is not None, result.reason
    assert record.guarded.commit == commit and record.guarded.author.startswith("Alice Person")
    assert record.decision == "promoted" and stage.artifact_live() == GOOD


def test_an_artifact_missing_from_the_store_is_recorded_as_unvetted(stage: Stage) -> None:
    missing = "awq-w4a16-g128-00000000000000d0"
    stage.push(model(missing))
    record = stage.guard().record
    assert record is not None and record.guarded is not None and not record.guarded.vetted
    assert record.decision == "skipped" and f"unvetted: artifact {missing} is not in" in record.reason
    assert stage.gitops.history("staging")[0].action == "unvetted"
    assert stage.guard().action == "nothing"


def test_an_artifact_missing_from_the_store_is_reverted_when_the_environment_enforces(stage: Stage) -> None:
    enforce = stage.cfg.environments["staging"].model_copy(update={"guard": GuardSettings(enforce=True)})
    stage.cfg = stage.cfg.model_copy(update={"environments": {"staging": enforce}})
    missing = "awq-w4a16-g128-00000000000000d0"
    commit = stage.push(model(missing))
    record = stage.guard().record
    assert record is not None and record.decision == "reverted"
    assert f"artifact {missing} is not in" in record.reason and commit[:12] in record.reason
    assert [e.action for e in stage.gitops.history("staging")[:2]] == ["guarded", "revert"]
    assert stage.artifact_live() == OLD


@pytest.fixture
def local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, LocalStore]:
    """A local environment (no cluster: the gates only), its promotion.yaml, and a person's clone of the repo."""
    monkeypatch.setenv("MODELCTL_CACHE", str(tmp_path / "cache"))
    remote = tmp_path / "gitops.git"
    init_repo(remote)
    store = LocalStore(tmp_path / "store")
    publish(store, tmp_path / "build", GOOD, 0.97, b"good weights" * 64)
    publish(store, tmp_path / "build", BAD, 0.30, b"damaged weights" * 64)
    config = tmp_path / "promotion.yaml"
    config.write_text(config_text(tmp_path, remote))
    person = tmp_path / "person"
    subprocess.run(["git", "clone", "-q", str(remote), str(person)], check=True)
    return config, person, store


def test_modelctl_guard_once_and_status_show_a_persons_change_apart(local: tuple[Path, Path, LocalStore]) -> None:
    config, person, _ = local
    commit = edit(person, model("awq-w4a16-g128-00000000000000d0"))  # not in the store, and enforce is off
    git(person, "push", "-q", "origin", "HEAD:main")
    args = ["guard", "--env", "staging", "--config", str(config), "--once"]
    first = runner.invoke(app, [*args, "--json"])
    assert first.exit_code == 0, first.output
    data = json.loads(first.stdout)
    assert data["action"] == "guarded" and data["record"]["guarded"]["vetted"] is False
    assert data["record"]["guarded"]["commit"] == commit
    second = runner.invoke(app, args)
    assert second.exit_code == 0 and "no change to the model in envs/staging/values.yaml since" in second.output
    status = runner.invoke(app, ["status", "--config", str(config), "--json"])
    change = json.loads(status.stdout)["environments"][0]["guarded"]
    assert change["kind"] == "unvetted" and change["live"] and change["author"].startswith("Alice Person")
    human = runner.invoke(app, ["status", "--config", str(config)])
    assert f"staging runs {commit[:12]} by Alice Person" in human.output and "unvetted" in human.output
    history = runner.invoke(app, ["history", "--env", "staging", "--config", str(config), "--json"])
    assert [e["action"] for e in json.loads(history.stdout)["entries"]] == ["unvetted"]
    table = runner.invoke(app, ["history", "--env", "staging", "--config", str(config)]).output
    assert "unvetted by the guard (a change the pipeline did not make)" in table


def test_a_persons_commit_the_gate_refuses_is_reverted_here_too(local: tuple[Path, Path, LocalStore]) -> None:
    config, person, _ = local
    commit = edit(person, model(BAD))
    git(person, "push", "-q", "origin", "HEAD:main")
    result = runner.invoke(app, ["guard", "--env", "staging", "--config", str(config), "--once"])
    assert result.exit_code == 0, result.output
    assert "reverted" in result.output and "eval gate fail" in result.output and commit[:12] in result.output
    history = json.loads(runner.invoke(app, ["history", "-e", "staging", "-c", str(config), "--json"]).stdout)
    assert [e["action"] for e in history["entries"]] == ["guarded", "revert"]
    assert history["entries"][0]["artifact"] != BAD, "the newest entry names what runs after the revert"
    assert "Alice Person" in history["entries"][1]["subject"]
    status = json.loads(runner.invoke(app, ["status", "--config", str(config), "--json"]).stdout)
    assert status["environments"][0]["guarded"]["live"] is False, "what runs is the state before the person's commit"


@pytest.mark.prefect
def test_the_guard_flow_vets_each_environment_once(prefect_harness: None, local: tuple[Path, Path, LocalStore]) -> None:
    from flows.guard_flow import guard as guard_flow

    config, person, _ = local
    edit(person, model(GOOD))
    git(person, "push", "-q", "origin", "HEAD:main")
    [first] = guard_flow(config=str(config))
    assert first["action"] == "guarded" and first["record"], first
    assert first["reason"] == "every gate passed"
    [second] = guard_flow(config=str(config))
    assert second["action"] == "nothing" and second["record"] is None


def test_the_merge_of_a_pipeline_pull_request_is_the_pipelines_and_a_fresh_repo_has_nothing_to_guard(
    local: tuple[Path, Path, LocalStore], tmp_path: Path
) -> None:
    config, person, _ = local
    args = ["guard", "--env", "staging", "--config", str(config), "--once", "--json"]
    fresh = json.loads(runner.invoke(app, args).stdout)
    assert fresh["action"] == "nothing", "the template's first commit changes nothing that ran before"
    remote = tmp_path / "gitops.git"
    pipeline = GitOps.open(str(remote), tmp_path / "pr-work", mode="pull-request")
    promotion = Promotion(env="staging", model="org/model", revision="b" * 40, artifact=GOOD, format="awq-w4a16")
    branch = pipeline.promote(promotion, VALUES).branch
    git(person, "fetch", "-q", "origin", f"{branch}:refs/remotes/origin/{branch}")
    git(person, "merge", "-q", "--no-ff", "-m", "Merge pull request #7", f"origin/{branch}")
    git(person, "push", "-q", "origin", "HEAD:main")
    merged = json.loads(runner.invoke(app, args).stdout)
    assert merged["action"] == "nothing" and "is the pipeline's" in merged["reason"], merged


def test_an_unpinned_revision_is_unvetted_or_reverted_when_the_environment_enforces(
    local: tuple[Path, Path, LocalStore], tmp_path: Path
) -> None:
    config, person, _ = local
    args = ["guard", "--env", "staging", "--config", str(config), "--once", "--json"]
    edit(person, {"model.revision": "main", "model.artifact": GOOD, "model.repo": "org/model"})
    git(person, "push", "-q", "origin", "HEAD:main")
    loose = json.loads(runner.invoke(app, args).stdout)["record"]
    assert loose["decision"] == "skipped" and "unvetted: model.revision 'main' is not a pinned" in loose["reason"]

    config.write_text(config_text(tmp_path, tmp_path / "gitops.git", extra="    guard: {enforce: true}\n"))
    git(person, "pull", "-q", "--rebase")
    commit = edit(person, {"model.revision": "v2"}, message="try v2")
    git(person, "push", "-q", "origin", "HEAD:main")
    enforced = json.loads(runner.invoke(app, args).stdout)["record"]
    assert enforced["decision"] == "reverted" and "model.revision 'v2' is not a pinned" in enforced["reason"]
    assert commit[:12] in enforced["reason"] and "Alice Person" in enforced["reason"]
    git(person, "pull", "-q", "--rebase")
    values = yaml.safe_load((person / VALUES).read_text())
    assert values["model"]["revision"] == "main", "back to the values before the person's commit"


def test_a_persons_change_that_leaves_the_model_alone_is_not_guarded(local: tuple[Path, Path, LocalStore]) -> None:
    config, person, _ = local
    edit(person, {"replicas": 2}, message="scale staging")
    git(person, "push", "-q", "origin", "HEAD:main")
    result = json.loads(runner.invoke(app, ["guard", "-e", "staging", "-c", str(config), "--once", "--json"]).stdout)
    assert result["action"] == "nothing" and "no change to the model" in result["reason"]
