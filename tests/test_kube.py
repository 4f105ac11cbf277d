"""kube.py against the fake cluster over HTTP: Argo CD sync, the canary walk, abort, faults, Lease, GPUs, Jobs."""

from __future__ import annotations

import threading
from pathlib import Path

import git
import pytest
from cluster.fixtures import cluster_fixture, gitops_repo_fixture  # noqa: F401  (the fixtures)
from kubernetes import client

from pipeline.config import ArgoCDApp, CanaryPolicy, GpuPool, RolloutRef
from pipeline.errors import Conflict, Forbidden, NotFound, TerminalError, TransientError
from pipeline.gates import GateResult, GateRow
from pipeline.kube import ARGO, Backoff, Kube
from pipeline.rollout import Abort, Done, Promote, Wait, decide
from sandbox.cluster import VALUES_FILE, FakeCluster, commit_values, rollout_manifest
from sandbox.store import ApiError
from sandbox.workloads import JobPlan, add_gpu_node, add_gpu_pod

APP = ArgoCDApp(application="llm-staging", namespace="argocd")
REF = RolloutRef(name="llm", namespace="llm-staging")
NS = REF.namespace  # Leases and Jobs live in the Rollout's namespace, as the pipeline puts them
STEPS = [{"setWeight": 50}, {"pause": {}}, {"setWeight": 100}, {"pause": {}}]
GOOD = GateResult(gate="canary", rows=[GateRow(name="ttft_p95", value=90, limit="<= 200", verdict="pass", why="ok")])
BAD = GateResult(
    gate="canary", rows=[GateRow(name="ttft_p95", value=450, limit="<= 200", verdict="fail", why="450 > 200")]
)


@pytest.fixture
def kube(cluster: FakeCluster) -> Kube:
    return Kube(cluster.api_client, Backoff(attempts=4, first_s=0.01, max_s=0.05, request_timeout_s=1))


@pytest.fixture
def staging(cluster: FakeCluster, gitops_repo: git.Repo) -> git.Repo:
    """A Rollout with four canary steps, managed by an Argo CD application that follows the GitOps repo."""
    cluster.create_rollout(REF.namespace, rollout_manifest(REF.name, STEPS, deadline_s=120))
    cluster.with_argocd(str(gitops_repo.working_tree_dir)).add_application(
        APP.application, VALUES_FILE, REF.namespace, REF.name
    )
    cluster.tick()
    return gitops_repo


def push_and_sync(kube: Kube, cluster: FakeCluster, repo: git.Repo, artifact: str) -> str:
    sha = commit_values(repo, f"model:\n  artifactId: {artifact}\n", f"promote {artifact}")
    kube.request_refresh(APP)
    with cluster.running():
        kube.wait_synced(APP, sha, timeout_s=20)
    return sha


def walk(kube: Kube, cluster: FakeCluster, checks_by_step: dict[int, GateResult]) -> list[Promote | Abort | Done]:
    """Drive the canary with rollout.decide, one controller tick per decision; GOOD checks unless told."""
    policy, taken, checks, step = CanaryPolicy(consecutive_passes=2), [], [], None
    for _ in range(60):
        cluster.tick()
        seen = kube.rollout(REF)
        if seen.step_index != step:
            step, checks = seen.step_index, []
        action = decide(seen, policy, checks, step_elapsed_s=0)
        if isinstance(action, Wait):
            if action.check:
                checks.append(checks_by_step.get(seen.step_index or 0, GOOD))
            continue
        taken.append(action)
        if isinstance(action, Promote):
            kube.promote(REF)
            checks = []
        else:
            return taken
    raise AssertionError(f"the canary walk did not end: {taken}")


def test_refresh_then_sync_to_the_exact_commit(kube: Kube, cluster: FakeCluster, staging: git.Repo) -> None:
    sha = commit_values(staging, "model:\n  artifactId: art-000002\n", "promote art-000002")
    kube.request_refresh(APP)
    [refresh] = cluster.server.sent("patch", "/applications/llm-staging")
    assert refresh.body == {"metadata": {"annotations": {"argocd.argoproj.io/refresh": "normal"}}}
    assert "merge-patch" in refresh.content_type
    with cluster.running():
        state = kube.wait_synced(APP, sha, timeout_s=20)
    assert (state.sync_status, state.sync_revision, state.operation_revision) == ("Synced", sha, sha)
    assert state.health == "Suspended"  # the canary is paused at its first pause step
    assert (
        cluster.rollout(REF.namespace, REF.name)["spec"]["template"]["metadata"]["annotations"][
            "modelctl.io/artifact-id"
        ]
        == "art-000002"
    )


def test_an_application_that_never_syncs_times_out_saying_what_it_saw(
    kube: Kube,
    cluster: FakeCluster,
    staging: git.Repo,
) -> None:
    assert cluster.argocd is not None
    cluster.argocd.never_sync.add(APP.application)
    sha = commit_values(staging, "model:\n  artifactId: art-000002\n", "promote")
    kube.request_refresh(APP)
    with cluster.running(), pytest.raises(TerminalError) as caught:
        kube.wait_synced(APP, sha, timeout_s=1.5)
    message = str(caught.value)
    assert f"did not make commit {sha[:12]} live within 1.5s" in message
    assert "sync is OutOfSync" in message and "argocd app get llm-staging" in message


def test_the_happy_path_promotes_every_step_to_healthy(kube: Kube, cluster: FakeCluster, staging: git.Repo) -> None:
    push_and_sync(kube, cluster, staging, "art-000002")
    actions = walk(kube, cluster, {})
    assert [a.kind for a in actions] == ["promote", "promote", "done"]
    promotes = [r for r in cluster.server.sent("patch", "/rollouts/llm/status")]
    assert [r.body for r in promotes] == [{"status": {"pauseConditions": None}}] * 2  # exactly what ARGO.md lists
    seen = kube.rollout(REF)
    assert seen.client_phase == "Healthy" and seen.stable_rs == seen.current_pod_hash
    with cluster.running():
        assert kube.wait_synced(APP, staging.head.commit.hexsha, 10, accept_suspended=False).health == "Healthy"


def test_a_breach_at_the_second_step_aborts_and_the_revert_restores_the_old_template(
    kube: Kube,
    cluster: FakeCluster,
    staging: git.Repo,
) -> None:
    before = cluster.rollout(REF.namespace, REF.name)
    push_and_sync(kube, cluster, staging, "art-000002")
    actions = walk(kube, cluster, {3: BAD})
    assert [a.kind for a in actions] == ["promote", "abort"]
    assert "450 > 200" in actions[-1].reason and "step 3/4" in actions[-1].reason
    assert kube.abort(REF) == [("status", {"status": {"abort": True}})]
    cluster.tick()
    seen = kube.rollout(REF)
    assert seen.client_phase == "Degraded" and "RolloutAborted" in seen.condition_reasons
    with cluster.running(), pytest.raises(TerminalError, match="but it is Degraded"):
        kube.wait_synced(APP, staging.head.commit.hexsha, timeout_s=10)  # aborted shows as Synced/Degraded

    staging.git.revert("HEAD", no_edit=True)
    revert = staging.head.commit.hexsha
    kube.request_refresh(APP)
    with cluster.running():
        state = kube.wait_synced(APP, revert, timeout_s=20, accept_suspended=False)
        healthy = kube.wait_rollout(REF, lambda s: s.client_phase == "Healthy", timeout_s=10)
    after = cluster.rollout(REF.namespace, REF.name)
    assert state.health == "Healthy" and healthy.current_pod_hash == before["status"]["stableRS"] == healthy.stable_rs
    assert after["spec"]["template"] == before["spec"]["template"]
    assert not after["status"].get("abort")  # the template back on stable clears the abort


def test_a_canary_that_never_gets_ready_hits_the_progress_deadline(
    kube: Kube,
    cluster: FakeCluster,
    staging: git.Repo,
) -> None:
    cluster.rollouts.set_canary_ready(REF.namespace, REF.name, ready=False)
    push_and_sync_without_health(kube, cluster, staging)
    cluster.clock.advance(121)
    cluster.tick()
    decision = decide(kube.rollout(REF), CanaryPolicy(), [], step_elapsed_s=121)
    assert isinstance(decision, Abort) and "ProgressDeadlineExceeded" in decision.reason
    assert cluster.get("Application", APP.namespace, APP.application)["status"]["health"]["status"] == "Degraded"
    kube.abort(REF)  # the revert path: abort first, then put the old values back in Git
    staging.git.revert("HEAD", no_edit=True)
    kube.request_refresh(APP)
    with cluster.running():
        state = kube.wait_synced(APP, staging.head.commit.hexsha, timeout_s=20, accept_suspended=False)
    assert state.health == "Healthy" and kube.rollout(REF).finished


def push_and_sync_without_health(kube: Kube, cluster: FakeCluster, repo: git.Repo) -> str:
    sha = commit_values(repo, "model:\n  artifactId: art-000003\n", "promote art-000003")
    kube.request_refresh(APP)
    cluster.tick(2)
    return sha


def test_promote_full_and_retry_send_the_argo_patches(kube: Kube, cluster: FakeCluster, staging: git.Repo) -> None:
    push_and_sync(kube, cluster, staging, "art-000002")
    assert kube.promote(REF) == [("status", {"status": {"pauseConditions": None}})]
    assert kube.promote(REF) == []  # the first promote is not applied yet: a second must not skip a step
    cluster.tick()
    assert kube.rollout(REF).step_index == 3
    kube.abort(REF)
    cluster.tick()
    assert kube.retry(REF) == [("status", {"status": {"abort": None}})]  # removed, as Argo CD's retry does
    cluster.tick()
    assert kube.rollout(REF).client_phase == "Paused"  # back at the first pause step
    assert kube.promote(REF, full=True) == [("status", {"status": {"promoteFull": True}})]
    cluster.tick()
    seen = kube.rollout(REF)
    assert seen.client_phase == "Healthy" and seen.finished
    assert kube.promote(REF) == []  # nothing left to promote


def test_500s_409s_hangs_and_dropped_watches_are_survived(kube: Kube, cluster: FakeCluster, staging: git.Repo) -> None:
    server = cluster.server
    assert cluster.argocd is not None
    faults = [
        server.fail("get", "applications", code=500, times=2),
        server.fail("watch", "applications", mode="drop", times=1),
        server.fail("watch", "applications", code=410, times=1),  # resourceVersion too old: re-list
        server.fail("patch", "applications", code=503, times=1),
    ]
    cluster.argocd.sync_gate[APP.application] = lambda: all(f.times == 0 for f in faults)  # sync after the faults
    push_and_sync(kube, cluster, staging, "art-000002")
    faults += [
        server.fail("get", "rollouts", code=500, times=2),
        server.fail("get", "rollouts", mode="hang", times=1),
        server.fail("patch", "rollouts", subresource="status", code=409, times=1),
    ]
    cluster.tick()
    assert kube.promote(REF) == [("status", {"status": {"pauseConditions": None}})]
    assert [(f.verb, f.plural) for f in faults if f.times] == [], "every injected fault was met and survived"
    assert len(server.sent("patch", "/rollouts/llm/status")) == 2  # the 409, re-read, then the patch that landed
    cluster.tick()
    assert kube.rollout(REF).step_index == 3


def test_api_errors_are_bounded_and_carry_no_secrets(
    kube: Kube,
    cluster: FakeCluster,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    token = "ghp_abcdefghijklmnop1234"
    monkeypatch.setenv("GITOPS_TOKEN", "s3cret-gitops-value")
    cluster.server.fail(
        "get", "rollouts", name="llm", code=500, times=4, message=f"etcd: token {token} s3cret-gitops-value"
    )
    with pytest.raises(TransientError) as caught:
        kube.rollout(REF)
    assert "gave up after 4 attempts" in str(caught.value) and "500" in str(caught.value)
    assert token not in str(caught.value) and "s3cret-gitops-value" not in str(caught.value)
    with pytest.raises(NotFound, match="answered 404"):
        kube.rollout(RolloutRef(name="missing", namespace="llm-staging"))


def test_api_errors_are_told_apart_by_status(kube: Kube, cluster: FakeCluster) -> None:
    """404 NotFound and 403 Forbidden are terminal (asked once), 409 Conflict is transient, 401 says credentials."""
    cluster.create_rollout(REF.namespace, rollout_manifest(REF.name, STEPS))
    with pytest.raises(NotFound) as missing:
        kube.rollout(RolloutRef(name="missing", namespace=REF.namespace))
    assert not missing.value.retryable and "check the name and namespace" in str(missing.value)
    assert len(cluster.server.sent("get", "/rollouts/missing")) == 1  # not retried
    assert kube.lease_holder("staging", REF.namespace) is None  # a 404 on the Lease: nobody holds it
    cluster.server.fail("patch", "rollouts", subresource="status", code=409, times=1)
    with pytest.raises(Conflict) as conflict:
        kube.call("abort", kube.custom.patch_namespaced_custom_object_status, *ARGO, REF.namespace, "rollouts",
                  REF.name, {"status": {"abort": True}})  # fmt: skip
    assert conflict.value.retryable and isinstance(conflict.value, TransientError)
    cluster.server.fail("patch", "rollouts", subresource="status", code=409, times=1)
    assert kube.abort(REF) == [("status", {"status": {"abort": True}})]  # the operation re-reads and retries
    assert len(cluster.server.sent("patch", f"/rollouts/{REF.name}/status")) == 3
    cluster.server.fail("get", "rollouts", code=403, times=1, message="denied by an admission webhook")
    with pytest.raises(Forbidden, match="answered 403 \\(denied by an admission webhook\\)") as refused:
        kube.rollout(REF)  # a 403 in another shape than RBAC's still reads as Forbidden
    assert not refused.value.retryable and "gitops/rbac/pipeline.yaml" in str(refused.value)
    config = client.Configuration()
    config.host, config.retries = cluster.server.url, False
    with client.ApiClient(config) as anonymous, pytest.raises(Forbidden, match="did not accept the credentials"):
        Kube(anonymous, Backoff(attempts=2, first_s=0.01)).rollout(REF)


def test_one_promotion_per_environment(kube: Kube, cluster: FakeCluster) -> None:
    mine = kube.acquire_lease("prod", NS, "promotion-a", duration_s=60)
    with pytest.raises(TerminalError) as caught:
        kube.acquire_lease("prod", NS, "promotion-b", duration_s=60)
    assert "already being promoted by promotion-a (since " in str(caught.value)
    assert mine.acquired_at.isoformat(timespec="seconds")[:16] in str(caught.value)
    assert kube.acquire_lease("staging", NS, "promotion-b").holder == "promotion-b"  # other envs are free
    cluster.server.fail("update", "leases", code=409, times=1)
    renewed = kube.renew_lease(mine)  # the 409 is re-read and retried
    assert renewed.resource_version != mine.resource_version and renewed.holder == "promotion-a"
    assert len(cluster.server.sent("update", "/leases/modelctl-promotion-prod")) == 2
    assert kube.release_lease(renewed) is True
    assert kube.acquire_lease("prod", NS, "promotion-b").holder == "promotion-b"


def test_a_held_lease_is_renewed_while_the_block_runs_and_released_after(kube: Kube, cluster: FakeCluster) -> None:
    with kube.hold_lease("prod", NS, "promotion-a", duration_s=1) as hold:
        first = cluster.get("Lease", NS, hold.name)["spec"]["renewTime"]
        with pytest.raises(TerminalError, match="already being promoted by promotion-a"):
            kube.acquire_lease("prod", NS, "promotion-b")
        renewed = False
        for _ in range(200):  # wait (bounded) for the renewal beat; no timing is asserted
            if cluster.get("Lease", NS, hold.name)["spec"]["renewTime"] != first:
                renewed = True
                break
            threading.Event().wait(0.02)
        assert renewed
    with pytest.raises(ApiError):  # released: the Lease is gone
        cluster.get("Lease", NS, hold.name)


def test_an_expired_lease_is_taken_over_and_its_old_holder_told(kube: Kube, cluster: FakeCluster) -> None:
    old = kube.acquire_lease("prod", NS, "crashed-run", duration_s=30)
    cluster.update("Lease", NS, old.name, lambda o: o["spec"].update(renewTime="2020-01-01T00:00:00.000000Z"))
    new = kube.acquire_lease("prod", NS, "promotion-b", duration_s=30)
    assert new.holder == "promotion-b"
    assert cluster.get("Lease", NS, old.name)["spec"]["leaseTransitions"] == 1
    with pytest.raises(TerminalError, match=r"lost the promotion lease .* to promotion-b"):
        kube.renew_lease(old)
    assert kube.release_lease(old) is False  # not ours any more: left alone
    assert kube.renew_lease(new).holder == "promotion-b"


def test_gpu_capacity_counts_requests_per_node_and_refuses_with_numbers(kube: Kube, cluster: FakeCluster) -> None:
    pool = GpuPool(node_selector={"pool": "gpu"}, gpus_per_replica=2)
    add_gpu_node(cluster.server, "gpu-a", {"pool": "gpu"}, gpus=4)
    add_gpu_node(cluster.server, "gpu-b", {"pool": "gpu"}, gpus=4)
    add_gpu_node(cluster.server, "gpu-c", {"pool": "gpu"}, gpus=8, unschedulable=True)  # cordoned: not counted
    add_gpu_node(cluster.server, "cpu-a", {"pool": "cpu"}, gpus=8)  # another pool
    add_gpu_pod(cluster.server, "serving", "stable-0", "gpu-a", gpus=3)
    add_gpu_pod(cluster.server, "serving", "stable-1", "gpu-b", gpus=3)
    add_gpu_pod(cluster.server, "batch", "finished", "gpu-b", gpus=1, phase="Succeeded")  # holds nothing
    capacity = kube.gpu_capacity(pool)
    assert (capacity.allocatable, capacity.requested, capacity.free) == (8, 6, 2)
    with pytest.raises(TerminalError) as caught:  # 2 free GPUs, but 1 per node: no node fits a 2-GPU replica
        kube.require_gpus(pool, replicas=1)
    assert "needs 1 replica(s) x 2 on one node each, but 2 of 8 are free" in str(caught.value)
    assert "gpu-a: 1/4 free, gpu-b: 1/4 free" in str(caught.value)
    assert kube.require_gpus(pool.model_copy(update={"gpus_per_replica": 1}), replicas=2).free == 2


def test_jobs_succeed_are_reused_and_fail_with_their_logs(kube: Kube, cluster: FakeCluster) -> None:
    def job(name: str) -> dict[str, object]:
        container = {"name": "step", "image": "modelctl", "args": ["quantize"]}
        spec = {"backoffLimit": 0, "template": {"spec": {"restartPolicy": "Never", "containers": [container]}}}
        return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name}, "spec": spec}

    cluster.jobs.plan("quantize-bad", JobPlan(exit_code=1, log="loading...\nValueError: group_size 96 unsupported\n"))
    with cluster.running():
        first = kube.run_job(NS, job("quantize-ok"), timeout_s=10)
        again = kube.run_job(NS, job("quantize-ok"), timeout_s=10)
        with pytest.raises(TerminalError) as caught:
            kube.run_job(NS, job("quantize-bad"), timeout_s=10)
    assert first.succeeded and first.created and again.succeeded and not again.created
    assert "BackoffLimitExceeded" in str(caught.value)
    assert "ValueError: group_size 96 unsupported" in str(caught.value)


def test_a_job_that_never_starts_times_out(kube: Kube, cluster: FakeCluster, tmp_path: Path) -> None:
    cluster.jobs.pending.add("preload")
    spec = {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "i"}]}}}
    with cluster.running(), pytest.raises(TerminalError, match=r"did not finish within 0\.5s"):
        kube.run_job(NS, {"metadata": {"name": "preload-1"}, "spec": spec}, timeout_s=0.5)
