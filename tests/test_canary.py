"""The cluster driver end to end: a real GitOps repo, the fake cluster, Argo CD and Argo Rollouts simulated.

Each test commits a promotion with pipeline.gitops, then lets pipeline.canary make it live and walk the canary,
and checks where Git and the cluster end up.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pipeline.canary import Check, deploy, guarded, revert
from pipeline.config import ArgoCDApp, CanaryPolicy, load_config
from pipeline.config import RolloutRef as Ref
from pipeline.errors import TerminalError
from pipeline.gates import GateResult, GateRow
from pipeline.gitops import GitOps, Promotion, init_repo
from pipeline.kube import Backoff, Kube
from pipeline.kube.argocd import AppState
from pipeline.rollout import ObservedRollout
from sandbox.cluster import FakeCluster, rollout_manifest
from sandbox.workloads import add_gpu_node, add_gpu_pod

ROOT = Path(__file__).resolve().parent.parent
VALUES = "envs/staging/values.yaml"
STEPS = [{"setWeight": 10}, {"pause": {}}, {"setWeight": 50}, {"pause": {}}, {"setWeight": 100}]
GOOD = GateResult(gate="canary", rows=[GateRow(name="ttft_p95", value=90, limit="<= 300 ms", verdict="pass", why="ok")])
BAD = GateResult(
    gate="canary",
    rows=[GateRow(name="ttft_p95", value=950, limit="<= 300 ms", verdict="fail", why="950 ms > 300 ms")],
)
BASE = load_config(ROOT / "examples" / "cluster" / "promotion.yaml").environment("staging")
ENV = BASE.model_copy(
    update={
        "argocd": ArgoCDApp(application="llm-inference-staging"),
        "rollout": Ref(name="llm-inference", namespace="llm-staging"),
        "canary": CanaryPolicy(consecutive_passes=2, check_interval_s=0.01, step_timeout_s=10, sync_timeout_s=10),
    }
)


@dataclass
class Stage:
    cluster: FakeCluster
    kube: Kube
    gitops: GitOps
    remote: Path

    def promote(self, artifact: str) -> tuple[Promotion, str]:
        promotion = Promotion(
            env="staging", model="org/model", revision="a" * 40, artifact=artifact, format="awq-w4a16",
            quantization="compressed-tensors",
        )  # fmt: skip
        return promotion, self.gitops.promote(promotion, VALUES).commit

    def template_hash(self) -> str:
        rollout = self.cluster.rollout("llm-staging", "llm-inference")
        return str(rollout["spec"]["template"]["metadata"]["annotations"]["modelctl.io/values-hash"])

    def seen(self) -> ObservedRollout:
        assert ENV.rollout is not None
        return self.kube.rollout(ENV.rollout)


@pytest.fixture
def stage(tmp_path: Path) -> Iterator[Stage]:
    remote = tmp_path / "gitops.git"
    init_repo(remote)
    gitops = GitOps.open(str(remote), tmp_path / "work")
    cluster = FakeCluster()
    try:
        cluster.create_rollout("llm-staging", rollout_manifest("llm-inference", STEPS, deadline_s=120))
        cluster.with_argocd(str(remote)).add_application(
            "llm-inference-staging", VALUES, "llm-staging", "llm-inference"
        )
        cluster.tick()
        kube = Kube(cluster.api_client, Backoff(attempts=4, first_s=0.01, max_s=0.05, request_timeout_s=1))
        yield Stage(cluster, kube, gitops, remote)
    finally:
        cluster.close()


def checks(bad_from_step: int | None = None) -> tuple[list[int | None], Check]:
    seen_steps: list[int | None] = []

    def check(seen: ObservedRollout) -> GateResult:
        seen_steps.append(seen.step_index)
        return BAD if bad_from_step is not None and (seen.step_index or 0) >= bad_from_step else GOOD

    return seen_steps, check


def test_happy_path_walks_every_step_to_healthy(stage: Stage) -> None:
    promotion, commit = stage.promote("awq-w4a16-g128-0000000000000001")
    steps, check = checks()
    with stage.cluster.running():
        outcome = deploy(stage.kube, stage.gitops, "staging", ENV, commit, promotion.id, check)
    assert outcome.final == "done", outcome.reason
    assert [e.action for e in outcome.steps if e.action != "check"] == ["synced", "promote", "promote", "done"]
    assert steps == [1, 1, 3, 3]  # two passing checks at each pause step
    seen = stage.seen()
    assert seen.client_phase == "Healthy" and seen.finished
    assert [e.action for e in stage.gitops.history("staging")] == ["promote"]


def test_breach_at_the_second_step_aborts_and_reverts(stage: Stage) -> None:
    before = stage.template_hash()
    promotion, commit = stage.promote("awq-w4a16-g128-0000000000000002")
    _, check = checks(bad_from_step=3)
    with stage.cluster.running():
        outcome = deploy(stage.kube, stage.gitops, "staging", ENV, commit, promotion.id, check)
    assert outcome.final == "reverted"
    assert "canary check failed at step 3/5" in outcome.reason and "950 ms > 300 ms" in outcome.reason
    assert outcome.revert is not None and outcome.revert.aborted and outcome.revert.pushed
    assert set(outcome.revert.timings) == {"aborted_s", "revert_pushed_s", "refresh_requested_s", "healthy_s"}
    history = stage.gitops.history("staging")
    assert history[0].reverts == promotion.id and history[0].commit == outcome.revert.revert_commit
    assert stage.template_hash() == before, "the Rollout runs the old template again"
    seen = stage.seen()
    assert seen.client_phase == "Healthy" and seen.finished and not seen.aborted
    aborts = [r.body for r in stage.cluster.server.sent("patch", "/rollouts/llm-inference/status")]
    assert {"status": {"abort": True}} in aborts


def test_progress_deadline_is_degraded_and_reverted(stage: Stage) -> None:
    stage.cluster.rollouts.set_canary_ready("llm-staging", "llm-inference", ready=False)
    promotion, commit = stage.promote("awq-w4a16-g128-0000000000000003")
    _, check = checks()
    stop = threading.Event()

    def time_passes() -> None:  # the canary pods never get ready while minutes go by
        while not stop.wait(0.02):
            stage.cluster.clock.advance(30)

    clock = threading.Thread(target=time_passes, daemon=True)
    clock.start()
    try:
        with stage.cluster.running():
            outcome = deploy(stage.kube, stage.gitops, "staging", ENV, commit, promotion.id, check)
    finally:
        stop.set()
        clock.join()
    assert outcome.final == "reverted" and "Degraded" in outcome.reason
    assert stage.gitops.history("staging")[0].reverts == promotion.id
    assert stage.seen().client_phase == "Healthy"


def test_an_application_that_never_syncs_is_reverted_in_git_and_says_what_is_left(stage: Stage) -> None:
    assert stage.cluster.argocd is not None
    stage.cluster.argocd.never_sync.add("llm-inference-staging")
    fast = ENV.model_copy(update={"canary": ENV.canary.model_copy(update={"sync_timeout_s": 0.5})})
    promotion, commit = stage.promote("awq-w4a16-g128-0000000000000004")
    _, check = checks()
    with stage.cluster.running(), pytest.raises(TerminalError) as info:
        deploy(stage.kube, stage.gitops, "staging", fast, commit, promotion.id, check)
    assert "is pushed, but the cluster did not settle on it" in str(info.value)
    assert "argocd app get llm-inference-staging" in str(info.value)
    assert stage.gitops.history("staging")[0].reverts == promotion.id, "Git no longer asks for the failed version"


def test_a_failed_git_revert_leaves_the_rollout_aborted_and_says_what_to_do(stage: Stage) -> None:
    _, commit = stage.promote("awq-w4a16-g128-0000000000000005")
    assert ENV.argocd is not None
    stage.kube.request_refresh(ENV.argocd)
    with stage.cluster.running():
        stage.kube.wait_synced(ENV.argocd, commit, 10)
    with pytest.raises(TerminalError) as info:
        revert(stage.kube, stage.gitops, "staging", ENV, "0123456789abcdef", "canary failed")
    message = str(info.value)
    assert "is aborted (traffic is on the stable version)" in message and "reverting promotion" in message
    assert "modelctl rollback --env staging" in message
    stage.cluster.tick()
    assert stage.seen().aborted and stage.seen().client_phase == "Degraded"


def test_a_held_lease_refuses_a_second_promotion_before_any_commit(stage: Stage) -> None:
    add_gpu_node(stage.cluster.server, "gpu-1", {"cloud.google.com/gke-accelerator": "nvidia-l4"}, gpus=2)
    tip = stage.gitops.sync()
    with (
        guarded(stage.kube, "staging", ENV, holder="flow-run-1"),
        pytest.raises(TerminalError, match="flow-run-1") as info,
        guarded(stage.kube, "staging", ENV, holder="flow-run-2"),
    ):
        stage.promote("awq-w4a16-g128-0000000000000006")
    assert "since" in str(info.value)
    assert stage.gitops.sync() == tip, "nothing was committed"


def test_too_few_free_gpus_refuses_before_any_commit(stage: Stage) -> None:
    add_gpu_node(stage.cluster.server, "gpu-1", {"cloud.google.com/gke-accelerator": "nvidia-l4"}, gpus=1)
    add_gpu_pod(stage.cluster.server, "llm-staging", "stable-0", "gpu-1", gpus=1)
    tip = stage.gitops.sync()
    with pytest.raises(TerminalError) as info, guarded(stage.kube, "staging", ENV, holder="flow-run-1"):
        stage.promote("awq-w4a16-g128-0000000000000007")
    assert "not enough free nvidia.com/gpu" in str(info.value) and "0 of 1 are free" in str(info.value)
    assert stage.gitops.sync() == tip, "nothing was committed"
    hold = stage.kube.acquire_lease("staging", "llm-staging", "flow-run-2")  # the refusal released the Lease
    assert hold.holder == "flow-run-2"


def test_a_failed_flow_run_reverts_the_promotion_it_committed(
    stage: Stage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The promote flow's on_failure/on_crashed hook, against the fake cluster reached through a kubeconfig."""
    from types import SimpleNamespace

    from flows.promote import revert_after_failure

    kubeconfig = write_kubeconfig(stage, tmp_path)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    config = tmp_path / "promotion.yaml"
    text = (ROOT / "examples" / "cluster" / "promotion.yaml").read_text()
    text = text.replace("https://github.com/example-org/llm-gitops.git", str(stage.remote))
    config.write_text(
        text.replace("check_interval_s: 30", "check_interval_s: 0.01").replace(
            "sync_timeout_s: 300", "sync_timeout_s: 10"
        )
    )
    flow_run = SimpleNamespace(
        id="0f6c2d6e-1111-2222-3333-444455556666",
        name="crashed-run",
        parameters={"env": "staging", "config": str(config), "workdir": str(tmp_path / "work")},
    )
    promotion = Promotion(
        env="staging", model="org/model", revision="a" * 40, artifact="art-9", flow_run=str(flow_run.id)
    )
    commit = stage.gitops.promote(promotion, VALUES).commit
    assert ENV.argocd is not None
    stage.kube.request_refresh(ENV.argocd)
    with stage.cluster.running():
        stage.kube.wait_synced(ENV.argocd, commit, 10)
        revert_after_failure(None, flow_run, SimpleNamespace(name="Crashed", message="the worker died"))
    history = stage.gitops.history("staging")
    assert history[0].action == "revert" and history[0].reverts == promotion.id
    assert stage.seen().client_phase == "Healthy" and stage.seen().finished


def write_kubeconfig(stage: Stage, tmp_path: Path) -> Path:
    """A kubeconfig pointing at the fake API server with the pipeline ServiceAccount's token, as a real cluster's."""
    return stage.cluster.write_kubeconfig(tmp_path / "kubeconfig")


def test_status_shows_a_dangling_promotion(stage: Stage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from typer.testing import CliRunner

    from pipeline.cli import app

    monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(stage, tmp_path)))
    config = tmp_path / "promotion.yaml"
    text = (ROOT / "examples" / "cluster" / "promotion.yaml").read_text()
    config.write_text(text.replace("https://github.com/example-org/llm-gitops.git", str(stage.remote)))
    promotion, commit = stage.promote("awq-w4a16-g128-0000000000000008")
    assert ENV.argocd is not None
    stage.kube.request_refresh(ENV.argocd)
    with stage.cluster.running():
        stage.kube.wait_synced(ENV.argocd, commit, 10)  # the canary now waits at its first pause, nobody drives it
    args = ["status", "-c", str(config), "--env", "staging", "--workdir", str(tmp_path / "work")]
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.stdout)["environments"]
    assert row["current"]["promotion_id"] == promotion.id
    assert row["dangling"] and f"--id {promotion.id}" in row["dangling"] and "Paused" in row["rollout"]
    with stage.kube.hold_lease("staging", "llm-staging", "flow-run-7"):  # a live promotion drives it: not dangling
        busy = CliRunner().invoke(app, [*args, "--json"])
    assert json.loads(busy.stdout)["environments"][0]["dangling"] is None


# the timeline: weight and figures at each step -----------------------------------------------------------------
def metrics_like(canary_s: float, stable_s: float) -> GateResult:
    """A check built from the metrics check's own rows (pipeline.checks.metrics_rows), as Prometheus would feed it."""
    from pipeline.checks import metrics_rows

    return GateResult(gate="canary metrics", rows=metrics_rows(canary_s, stable_s, 0.0, ENV))


def test_walk_records_the_weight_and_the_figures_that_decided_and_the_timeline_shows_them(stage: Stage) -> None:
    from rich.console import Console

    from pipeline.cli.timeline import timeline_rows, timeline_table

    promotion, commit = stage.promote("awq-w4a16-g128-0000000000000011")
    with stage.cluster.running():
        outcome = deploy(
            stage.kube, stage.gitops, "staging", ENV, commit, promotion.id, lambda _: metrics_like(0.09, 0.08)
        )
    assert outcome.final == "done", outcome.reason
    checks_ = [e for e in outcome.steps if e.action == "check"]
    assert [e.weight for e in checks_] == [10, 10, 50, 50]  # the last setWeight at or before each pause step
    assert all(e.verdict == "pass" for e in checks_)
    figures = checks_[0].figures or {}
    assert figures["canary ttft_p95 vs stable"] == 90 and figures["canary ttft_p95 vs stable baseline"] == 80
    assert figures["canary 5xx ratio"] == 0.0
    promotes = [e for e in outcome.steps if e.action == "promote"]
    assert [e.weight for e in promotes] == [10, 50] and promotes[0].figures is None

    rows = timeline_rows(outcome)
    assert rows[1]["canary_ttft_p95_ms"] == 90 and rows[1]["stable_ttft_p95_ms"] == 80 and rows[1]["decision"] == "pass"
    console = Console(width=140, record=True)
    console.print(timeline_table(outcome))
    text = console.export_text()
    assert "canary TTFT p95" in text and "stable TTFT p95" in text
    assert "90 ms" in text and "80 ms" in text and "10%" in text and "50%" in text and "promote" in text


def test_a_failed_check_keeps_the_figures_that_failed_it(stage: Stage) -> None:
    promotion, commit = stage.promote("awq-w4a16-g128-0000000000000012")
    with stage.cluster.running():
        outcome = deploy(
            stage.kube, stage.gitops, "staging", ENV, commit, promotion.id, lambda _: metrics_like(0.9, 0.1)
        )
    assert outcome.final == "reverted" and "900 ms vs stable 100 ms" in outcome.reason
    failed = next(e for e in outcome.steps if e.action == "check")
    assert failed.verdict == "fail" and failed.weight == 10
    assert (failed.figures or {})["canary ttft_p95 vs stable"] == 900
    assert (failed.figures or {})["canary ttft_p95 vs stable baseline"] == 100
    abort = next(e for e in outcome.steps if e.action == "abort")
    assert abort.weight == 10 and "900 ms vs stable 100 ms" in abort.reason


def test_a_reverted_canarys_timeline_is_kept_in_git_and_the_timeline_command_reads_it(
    stage: Stage, tmp_path: Path
) -> None:
    """The promotion's own record is committed before its canary; the revert's record keeps the canary's steps
    (weight, figures, verdict), so Git says why a version was reverted."""
    import json

    from typer.testing import CliRunner

    from pipeline.cli import app

    promotion, commit = stage.promote("awq-w4a16-g128-0000000000000015")
    with stage.cluster.running():
        outcome = deploy(
            stage.kube, stage.gitops, "staging", ENV, commit, promotion.id, lambda _: metrics_like(0.9, 0.1)
        )
    assert outcome.final == "reverted"
    revert_entry = stage.gitops.history("staging")[0]
    assert revert_entry.reverts == promotion.id
    kept = stage.gitops.record("staging", revert_entry.promotion_id).rollout
    assert kept is not None and kept.final == "reverted" and "900 ms vs stable 100 ms" in kept.reason
    failed = next(e for e in kept.steps if e.action == "check")
    assert failed.verdict == "fail" and (failed.figures or {})["canary ttft_p95 vs stable"] == 900

    config = tmp_path / "promotion.yaml"
    text = (ROOT / "examples" / "cluster" / "promotion.yaml").read_text()
    config.write_text(text.replace("https://github.com/example-org/llm-gitops.git", str(stage.remote)))
    args = ["timeline", "--env", "staging", "-c", str(config), "--workdir", str(tmp_path / "w")]
    shown = CliRunner().invoke(app, args, terminal_width=160)
    assert shown.exit_code == 0, shown.output
    assert f"canary of promotion {promotion.id}: reverted" in shown.output
    assert "900 ms" in shown.output and "100 ms" in shown.output and "fail" in shown.output
    as_json = json.loads(CliRunner().invoke(app, [*args, "--json"]).output)
    assert as_json["promotion_id"] == promotion.id and as_json["final"] == "reverted"
    assert any(row["decision"] == "fail" and row["canary_ttft_p95_ms"] == 900 for row in as_json["steps"])


def test_records_written_before_the_timeline_fields_still_load() -> None:
    from pipeline.record import PromotionRecord

    old = {
        "id": "0123456789abcdef", "env": "staging", "decision": "promoted",
        "rollout": {"final": "done", "reason": "Healthy", "steps": [
            {"at": "step 1/5", "action": "check", "reason": "canary gate passed (1 checks)", "seconds": 3.5},
        ]},
    }  # fmt: skip
    import json

    record = PromotionRecord.from_json(json.dumps(old))
    assert record.rollout is not None
    event = record.rollout.steps[0]
    assert event.weight is None and event.figures is None and event.verdict is None


def test_the_weight_in_force_is_the_last_set_weight_and_zero_once_aborted() -> None:
    from pipeline.rollout import observe_rollout

    def seen(index: int | None, abort: bool = False) -> ObservedRollout:
        status = {"currentStepIndex": index, "abort": abort} if index is not None else {}
        return observe_rollout({"metadata": {"generation": 1}, "spec": {"strategy": {"canary": {"steps": STEPS}}},
                                "status": status})  # fmt: skip

    assert [seen(i).weight for i in range(6)] == [10, 10, 50, 50, 100, 100]
    assert seen(None).weight is None
    assert seen(1, abort=True).weight == 0


# Argo CD reports that a commit cannot be synced -----------------------------------------------------------------
def app_state(status: dict[str, Any], refresh_pending: bool = False) -> AppState:
    annotations = {"argocd.argoproj.io/refresh": "normal"} if refresh_pending else {}
    return AppState.of({"metadata": {"annotations": annotations}, "status": status})


def test_sync_failed_reads_failed_operations_and_render_errors_of_this_commit_only() -> None:
    sha, other = "c" * 40, "d" * 40
    state = app_state

    def operation(phase: str, revision: str) -> dict[str, Any]:
        return {"operationState": {"phase": phase, "message": "one or more objects failed to apply",
                                   "operation": {"sync": {"revision": revision}}}}  # fmt: skip

    for phase in ("Failed", "Error"):
        why = state(operation(phase, sha)).sync_failed(sha)
        assert why is not None and f"ended {phase}" in why and "failed to apply" in why
    assert state(operation("Failed", other)).sync_failed(sha) is None, "another commit's failure"
    assert state(operation("Running", sha)).sync_failed(sha) is None, "retrying: still a wait"
    helm = "Failed to load target state: failed to generate manifest for source 1 of 1: helm template: nil pointer"
    broken = {"sync": {"status": "Unknown"}, "conditions": [{"type": "ComparisonError", "message": helm}]}
    assert state(broken, refresh_pending=True).sync_failed(sha) is None, "Argo CD has not re-read Git yet"
    why = state(broken).sync_failed(sha)
    assert why is not None and "ComparisonError" in why and "nil pointer" in why
    dns = "Failed to load target state: failed to list refs: dial tcp: lookup github.com: i/o timeout"
    unreachable = {"sync": {"status": "Unknown"}, "conditions": [{"type": "ComparisonError", "message": dns}]}
    assert state(unreachable).sync_failed(sha) is None, "an unreachable repository may come back"
    attempt = {"conditions": [{"type": "SyncError", "message": f"Failed sync attempt to {sha}: one or more..."}]}
    assert "SyncError" in (state(attempt).sync_failed(sha) or "")
    assert state(attempt).sync_failed(other) is None
    live = {"sync": {"status": "Synced", "revision": sha}, "conditions": [{"type": "ComparisonError", "message": helm}],
            "operationState": {"phase": "Succeeded", "syncResult": {"revision": sha}}}  # fmt: skip
    assert state(live).sync_failed(sha) is None, "already applied: not this commit's failure"


def test_a_commit_that_renders_what_already_runs_is_live_without_a_sync_of_its_own() -> None:
    """A revert back to the live manifests: Argo CD shows it Synced at once and its auto-sync runs nothing (it skips a
    Synced application), so the last operation stays the older commit's. Live, once freshly compared; not while a
    sync runs or the refresh is pending; and a commit that is not Synced is never live."""
    sha, older = "e" * 40, "f" * 40
    healthy = {"health": {"status": "Healthy"}, "reconciledAt": "2026-12-01T10:00:05Z"}
    earlier = {"phase": "Succeeded", "syncResult": {"revision": older}, "finishedAt": "2026-12-01T10:00:00Z",
               "operation": {"sync": {"revision": older}}}  # fmt: skip
    same = {"sync": {"status": "Synced", "revision": sha}, "operationState": earlier, **healthy}
    assert app_state(same).missing_for(sha) is None
    assert app_state(same, refresh_pending=True).missing_for(sha) is not None, "not compared since the refresh"
    running = {**same, "operationState": {**earlier, "phase": "Running"}}
    assert "Running" in (app_state(running).missing_for(sha) or "")
    differs = {**same, "sync": {"status": "OutOfSync", "revision": sha}}
    assert "OutOfSync" in (app_state(differs).missing_for(sha) or "")
    own = {**same, "operationState": {**earlier, "phase": "Running", "operation": {"sync": {"revision": sha}}}}
    assert app_state(own).missing_for(sha) is not None, "its own sync is still running"


def test_a_sync_argo_cd_reports_failed_reverts_the_promotion_with_argos_message(stage: Stage) -> None:
    """Argo CD tries the commit and the sync operation ends Failed (as it writes it); the pipeline reverts at once."""
    import git

    from sandbox.store import BY_KIND

    argocd = stage.cluster.argocd
    assert argocd is not None
    before = stage.template_hash()
    promotion, commit = stage.promote("awq-w4a16-g128-0000000000000013")
    message = 'one or more objects failed to apply, reason: Rollout.argoproj.io "llm-inference" is invalid'

    def failed(obj: dict[str, object]) -> None:
        status = obj.setdefault("status", {})
        assert isinstance(status, dict)
        status["operationState"] = {
            "operation": {"sync": {"revision": commit}}, "phase": "Failed", "message": message,
            "startedAt": "2026-01-01T00:00:00Z", "finishedAt": "2026-01-01T00:00:01Z",
            "syncResult": {"revision": commit},
        }  # fmt: skip

    def gate() -> bool:  # the sync of the promoted commit fails; once Git moved on (the revert), syncs succeed
        with git.Repo(stage.remote) as repo:
            head = repo.commit("main").hexsha
        if head == commit:
            stage.cluster.store.update(BY_KIND["Application"], "argocd", "llm-inference-staging", failed)
            return False
        return True

    argocd.sync_gate["llm-inference-staging"] = gate
    with stage.cluster.running():
        outcome = deploy(stage.kube, stage.gitops, "staging", ENV, commit, promotion.id, checks()[1])
    assert outcome.final == "reverted"
    assert f"cannot make commit {commit[:12]} live" in outcome.reason and "ended Failed" in outcome.reason
    assert message in outcome.reason
    assert [e.action for e in outcome.steps] == ["revert"], "no canary step ran"
    assert stage.gitops.history("staging")[0].reverts == promotion.id
    assert stage.template_hash() == before
    assert stage.seen().client_phase == "Healthy"


def test_timeline_command_prints_a_records_canary_and_says_when_git_has_none(stage: Stage, tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.record import PromotionRecord

    promotion, commit = stage.promote("awq-w4a16-g128-0000000000000014")
    with stage.cluster.running():
        outcome = deploy(
            stage.kube, stage.gitops, "staging", ENV, commit, promotion.id, lambda _: metrics_like(0.11, 0.1)
        )
    finished = PromotionRecord(id=promotion.id, env="staging", decision="promoted", rollout=outcome)
    path = tmp_path / "promote.json"
    path.write_text(json.dumps({"ok": True, "record": json.loads(finished.to_json())}))  # `modelctl promote --json`
    runner = CliRunner()
    shown = runner.invoke(app, ["timeline", "--record", str(path)])
    assert shown.exit_code == 0, shown.output
    assert f"canary of promotion {promotion.id}: done" in shown.output
    assert "110 ms" in shown.output and "100 ms" in shown.output and "50%" in shown.output
    as_json = json.loads(runner.invoke(app, ["timeline", "--record", str(path), "--json"]).output)
    check = next(s for s in as_json["steps"] if s["action"] == "check")
    assert check["weight"] == 10 and check["canary_ttft_p95_ms"] == 110 and check["stable_ttft_p95_ms"] == 100

    config = tmp_path / "promotion.yaml"
    text = (ROOT / "examples" / "cluster" / "promotion.yaml").read_text()
    config.write_text(text.replace("https://github.com/example-org/llm-gitops.git", str(stage.remote)))
    from_git = runner.invoke(app, ["timeline", "--env", "staging", "-c", str(config), "--workdir", str(tmp_path / "w")])
    assert from_git.exit_code == 2
    assert f"the record of promotion {promotion.id} in Git has no canary timeline" in from_git.output
    assert "--record FILE" in from_git.output


def test_a_first_version_is_promoted_in_full_without_checks(stage: Stage) -> None:
    """Nothing ran before it (the chart's empty stable ReplicaSet): no canary to compare, so promote --full."""
    promotion, commit = stage.promote("awq-w4a16-g128-0000000000000009")
    steps, check = checks()
    with stage.cluster.running():
        outcome = deploy(stage.kube, stage.gitops, "staging", ENV, commit, promotion.id, check, first_version=True)
    assert outcome.final == "done", outcome.reason
    assert steps == [], "no canary check: there is no stable version to compare with"
    promotes = [e for e in outcome.steps if e.action == "promote"]
    assert len(promotes) == 1 and "first version" in promotes[0].reason
    sent = [r.body for r in stage.cluster.server.sent("patch", "/rollouts/llm-inference/status")]
    assert {"status": {"promoteFull": True}} in sent
    seen = stage.seen()
    assert seen.client_phase == "Healthy" and seen.finished


def test_a_later_version_walks_its_canary_with_checks(stage: Stage) -> None:
    """The same deploy without first_version checks at each pause (the other side of the test above)."""
    promotion, commit = stage.promote("awq-w4a16-g128-0000000000000010")
    steps, check = checks()
    with stage.cluster.running():
        outcome = deploy(stage.kube, stage.gitops, "staging", ENV, commit, promotion.id, check)
    assert outcome.final == "done" and steps, "checks ran at the pause steps"
    sent = [r.body for r in stage.cluster.server.sent("patch", "/rollouts/llm-inference/status")]
    assert {"status": {"promoteFull": True}} not in sent
