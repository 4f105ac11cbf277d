"""RBAC that is enforced: the fake API server's authorizer, and gitops/rbac/ as least privilege for the pipeline.

The fake API server authorizes every request as Kubernetes' RBAC authorizer does (tests/cluster/rbac.py). Every
cluster test runs as the pipeline's ServiceAccount with gitops/rbac/ loaded, so a missing grant fails the test
that makes the call. Here, the pipeline's representative operations run in both inference namespaces, and the
(verb, resource, namespace) uses the API server recorded (those and every other cluster test's so far in this
session) are compared with the grants both ways: a use without a grant and a grant without a use both fail, and
every single grant is shown to be needed by evaluating the authorizer on the recorded requests without it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import git
import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from pipeline.canary import guarded
from pipeline.config import CanaryPolicy, Environment, load_config
from pipeline.errors import Forbidden, TerminalError
from pipeline.gates import GateResult, GateRow
from pipeline.jobs import job_manifest
from pipeline.kube import Backoff, Kube
from pipeline.rollout import Done, Promote, Wait, decide
from pipeline.steps.preload import PreloadRequest
from sandbox import rbac
from sandbox.cluster import PIPELINE, FakeCluster, commit_values, rollout_manifest
from sandbox.store import BY_KIND, Obj, Store
from sandbox.workloads import JobPlan, add_gpu_node

ROOT = Path(__file__).resolve().parent.parent
CONFIG = load_config(ROOT / "examples" / "cluster" / "promotion.yaml")
STEPS = [{"setWeight": 50}, {"pause": {}}, {"setWeight": 100}]
FAST = Backoff(attempts=3, first_s=0.01, max_s=0.05, request_timeout_s=2)
GOOD = GateResult(gate="canary", rows=[GateRow(name="ttft_p95", value=90, limit="<= 300", verdict="pass", why="ok")])


# -- the authorizer's semantics ------------------------------------------------------------------------------------
def role(kind: str, name: str, rules: list[Obj], namespace: str = "") -> Obj:
    meta = {"name": name, **({"namespace": namespace} if namespace else {})}
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": kind, "metadata": meta, "rules": rules}


def binding(kind: str, name: str, ref_kind: str, ref: str, subjects: list[Obj], namespace: str = "") -> Obj:
    meta = {"name": name, **({"namespace": namespace} if namespace else {})}
    ref_obj = {"apiGroup": "rbac.authorization.k8s.io", "kind": ref_kind, "name": ref}
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": kind, "metadata": meta, "roleRef": ref_obj,
            "subjects": subjects}  # fmt: skip


SA = {"kind": "ServiceAccount", "name": "bot", "namespace": "tools"}
BOT = rbac.service_account("tools", "bot")


def store_with(*docs: Obj) -> Store:
    store = Store()
    rbac.load(store, [{"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "bot", "namespace": "tools"}},
                      *docs])  # fmt: skip
    return store


def can(store: Store, verb: str, resource: str, namespace: str = "", name: str = "", group: str = "",
        who: rbac.Identity = BOT) -> bool:  # fmt: skip
    base, _, sub = resource.partition("/")
    return rbac.authorize(store, who, rbac.Attributes(verb, group, base, sub, namespace, name))


def test_subresources_are_granted_only_by_name_or_wildcard() -> None:
    rules = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]
    store = store_with(role("ClusterRole", "r", rules), binding("ClusterRoleBinding", "b", "ClusterRole", "r", [SA]))
    assert can(store, "get", "pods", "a") and not can(store, "get", "pods/log", "a")  # "pods" is not "pods/log"
    for grant in (["pods/log"], ["*/log"], ["*"]):
        rules = [{"apiGroups": [""], "resources": grant, "verbs": ["get"]}]
        store = store_with(
            role("ClusterRole", "r", rules), binding("ClusterRoleBinding", "b", "ClusterRole", "r", [SA])
        )
        assert can(store, "get", "pods/log", "a"), grant
        assert can(store, "get", "pods", "a") == (grant == ["*"]), grant  # "*/log" and "pods/log": not the pod
        assert not can(store, "get", "pods/status", "a") or grant == ["*"], grant


def test_verbs_groups_and_resource_names() -> None:
    rules = [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "update"],
         "resourceNames": ["mine"]},
        {"apiGroups": ["*"], "resources": ["jobs"], "verbs": ["*"]},
    ]  # fmt: skip
    store = store_with(role("ClusterRole", "r", rules), binding("ClusterRoleBinding", "b", "ClusterRole", "r", [SA]))
    lease = {"group": "coordination.k8s.io"}
    assert can(store, "get", "leases", "a", "mine", **lease) and can(store, "update", "leases", "a", "mine", **lease)
    assert not can(store, "get", "leases", "a", "theirs", **lease)
    assert not can(store, "create", "leases", "a", **lease)  # create has no name: resourceNames never match it
    assert not can(store, "list", "leases", "a", **lease) and not can(store, "delete", "leases", "a", "mine", **lease)
    assert not can(store, "get", "leases", "a", "mine")  # wrong API group ("")
    assert can(store, "deletecollection", "jobs", "a", group="batch") and can(store, "patch", "jobs", group="x")
    assert not can(store, "get", "jobs/status", "a", group="batch")  # "jobs" does not cover the subresource


def test_a_cluster_role_through_a_role_binding_grants_only_in_that_namespace() -> None:
    rules = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]
    store = store_with(
        role("ClusterRole", "read", rules),
        binding("RoleBinding", "b", "ClusterRole", "read", [SA], namespace="team-a"),
        role("Role", "local", [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["list"]}], namespace="team-b"),
        binding("RoleBinding", "c", "Role", "local", [SA], namespace="team-b"),
    )
    assert can(store, "list", "pods", "team-a")
    assert not can(store, "list", "pods", "team-b") and not can(store, "list", "pods")  # nor all namespaces
    assert not can(store, "list", "nodes")  # a Role in a namespace never grants at the cluster scope
    store.create(BY_KIND["ClusterRoleBinding"], "", binding("ClusterRoleBinding", "all", "ClusterRole", "read", [SA]))
    assert can(store, "list", "pods") and can(store, "list", "pods", "team-b")


def test_subjects_service_accounts_groups_users() -> None:
    rules = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]
    other_ns = {"kind": "ServiceAccount", "name": "bot", "namespace": "elsewhere"}
    store = store_with(role("ClusterRole", "r", rules), binding("ClusterRoleBinding", "b", "ClusterRole", "r",
                                                                  [other_ns]))  # fmt: skip
    assert not can(store, "get", "pods", "a")  # same name, other namespace: another identity
    group = {"kind": "Group", "name": "system:serviceaccounts:tools", "apiGroup": "rbac.authorization.k8s.io"}
    store.create(BY_KIND["ClusterRoleBinding"], "", binding("ClusterRoleBinding", "g", "ClusterRole", "r", [group]))
    assert can(store, "get", "pods", "a")
    assert can(store, "delete", "nodes", who=rbac.ADMIN)  # the admin (system:masters) is never refused
    missing = binding("ClusterRoleBinding", "m", "ClusterRole", "gone", [SA])
    store = store_with(missing)
    assert not can(store, "get", "pods", "a")  # a binding to a missing role grants nothing


@pytest.fixture
def bare() -> Iterator[FakeCluster]:
    """A cluster whose only RBAC is one ServiceAccount with no grants; api_client acts as it."""
    sa = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "bot", "namespace": "tools"}}
    fake = FakeCluster(rbac_objects=[sa], identity=BOT)
    try:
        yield fake
    finally:
        fake.close()


def test_the_server_answers_403_as_kubernetes_does_and_401_without_a_valid_token(bare: FakeCluster) -> None:
    custom = client.CustomObjectsApi(bare.api_client)
    with pytest.raises(ApiException) as caught:
        custom.patch_namespaced_custom_object_status("argoproj.io", "v1alpha1", "llm", "rollouts", "r", {})
    status = json.loads(caught.value.body)
    assert (caught.value.status, status["reason"], status["details"]) == (
        403, "Forbidden", {"name": "r", "group": "argoproj.io", "kind": "rollouts"}
    )  # fmt: skip
    assert status["message"] == (
        'rollouts.argoproj.io "r" is forbidden: User "system:serviceaccount:tools:bot" cannot patch resource '
        '"rollouts/status" in API group "argoproj.io" in the namespace "llm"'
    )
    with pytest.raises(ApiException) as caught:
        client.CoreV1Api(bare.api_client).list_node()
    assert json.loads(caught.value.body)["message"] == (
        'nodes is forbidden: User "system:serviceaccount:tools:bot" cannot list resource "nodes" in API group "" '
        "at the cluster scope"
    )
    assert client.CoreV1Api(bare.admin_client).list_node().items == []  # the admin sets tests up
    with pytest.raises(ApiException) as caught:  # authorized before routing: a kind the fake lacks is refused too
        client.CoreV1Api(bare.api_client).list_namespaced_replication_controller("llm")
    assert caught.value.status == 403
    with pytest.raises(ApiException) as caught:
        client.CoreV1Api(bare.admin_client).list_namespaced_replication_controller("llm")
    assert caught.value.status == 404
    config = client.Configuration()
    config.host, config.retries = bare.server.url, False
    config.api_key, config.api_key_prefix = {"authorization": "made-up"}, {"authorization": "Bearer"}
    with client.ApiClient(config) as stranger, pytest.raises(ApiException) as caught:
        client.CoreV1Api(stranger).list_node()
    assert caught.value.status == 401
    bare.store.delete(BY_KIND["ServiceAccount"], "tools", "bot")
    with pytest.raises(ApiException) as caught:  # a deleted ServiceAccount's token stops working
        client.CoreV1Api(bare.api_client).list_namespaced_pod("tools")
    assert caught.value.status == 401


def test_a_watch_of_one_object_by_name_is_authorized_by_resource_names(bare: FakeCluster) -> None:
    rules = [{"apiGroups": ["argoproj.io"], "resources": ["applications"], "verbs": ["watch"], "resourceNames": ["a"]}]
    bare.store.create(BY_KIND["Role"], "argocd", role("Role", "w", rules, namespace="argocd"))
    bare.store.create(BY_KIND["RoleBinding"], "argocd", binding("RoleBinding", "w", "Role", "w", [SA], "argocd"))
    custom = client.CustomObjectsApi(bare.api_client)
    args = ("argoproj.io", "v1alpha1", "argocd", "applications")
    custom.list_namespaced_custom_object(*args, watch=True, field_selector="metadata.name=a", timeout_seconds=1)
    with pytest.raises(ApiException, match="403"):
        custom.list_namespaced_custom_object(*args, watch=True, field_selector="metadata.name=b", timeout_seconds=1)
    with pytest.raises(ApiException, match="403"):
        custom.list_namespaced_custom_object(*args, watch=True, timeout_seconds=1)


# -- the pipeline's uses against gitops/rbac -----------------------------------------------------------------------
@dataclass
class Recorded:
    uses: list[rbac.Attributes]  # this module's scenarios, as the pipeline
    session: list[rbac.Use]  # every non-admin request of the session so far (other cluster tests included)
    grants: list[rbac.Grant]  # what gitops/rbac gives the pipeline
    jobs: list[Obj]  # the Jobs the pipeline created
    store: Store


def environment(name: str) -> Environment:
    env = CONFIG.environment(name)
    return env.model_copy(update={"canary": CanaryPolicy(consecutive_passes=1, check_interval_s=0.01)})


def step_job(artifact: str, name: str, env: Environment) -> Obj:
    """A step's Job exactly as pipeline.jobs writes it (its namespace, its pods' ServiceAccount)."""
    return job_manifest(PreloadRequest(artifact_dir=f"/models/artifacts/{artifact}", cache_root="/models"), name, env)


def walk_to_the_end(kube: Kube, cluster: FakeCluster, env: Environment) -> list[str]:
    """The canary walk of pipeline.canary, one controller tick per decision; every check passes."""
    assert env.rollout is not None
    taken: list[str] = []
    checks: list[GateResult] = []
    for _ in range(40):
        cluster.tick()
        action = decide(kube.rollout(env.rollout), env.canary, checks, step_elapsed_s=0)
        if isinstance(action, Wait):
            checks += [GOOD] if action.check else []
            continue
        taken.append(action.kind)
        if isinstance(action, Promote):
            kube.promote(env.rollout)
            checks = []
        elif isinstance(action, Done):
            return taken
    raise AssertionError(f"the canary walk did not end: {taken}")


def scenario(kube: Kube, cluster: FakeCluster, repo: git.Repo, name: str) -> None:
    """What one promotion does to the cluster: Lease + GPU preflight, steps as Jobs, sync, canary, abort/retry."""
    env = environment(name)
    assert env.rollout is not None and env.argocd is not None
    with guarded(kube, name, env, holder=f"rbac-{name}") as hold:
        kube.renew_lease(hold)
        assert kube.lease_holder(name, env.rollout.namespace) is not None
        good, bad = step_job("art-1", name, env), step_job("art-2", name, env)
        namespace = good["metadata"]["namespace"]
        cluster.jobs.plan(bad["metadata"]["name"], JobPlan(exit_code=1, log="Traceback: out of memory\n"))
        with cluster.running():
            done = kube.run_job(namespace, good, timeout_s=10)
            assert done.succeeded and kube.job_logs(namespace, done.name, tail_lines=5)
            with pytest.raises(TerminalError, match="out of memory"):  # a failed Job: its pods' logs are read
                kube.run_job(namespace, bad, timeout_s=10)
        sha = commit_values(repo, f"model:\n  artifactId: art-{name}\n", f"promote {name}", env.values_file)
        kube.request_refresh(env.argocd)
        with cluster.running():
            kube.wait_synced(env.argocd, sha, timeout_s=20)
        kube.abort(env.rollout)
        cluster.tick()
        kube.retry(env.rollout)
        assert walk_to_the_end(kube, cluster, env)[-1] == "done"
        with cluster.running():
            kube.wait_rollout(env.rollout, lambda seen: seen.finished, timeout_s=10)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Recorded]:
    repo = git.Repo.init(tmp_path_factory.mktemp("rbac") / "gitops", initial_branch="main")
    with repo.config_writer() as config:
        config.set_value("user", "name", "test")
        config.set_value("user", "email", "test@localhost")
    for name in ("staging", "prod"):
        commit_values(repo, "model:\n  artifactId: art-0\n", "initial", CONFIG.environment(name).values_file)
    cluster = FakeCluster()
    try:
        argocd = cluster.with_argocd(str(repo.working_tree_dir))
        for name in ("staging", "prod"):
            env = CONFIG.environment(name)
            assert env.rollout is not None and env.argocd is not None
            cluster.create_rollout(env.rollout.namespace, rollout_manifest(env.rollout.name, STEPS))
            argocd.add_application(env.argocd.application, env.values_file, env.rollout.namespace, env.rollout.name)
        selector = dict(CONFIG.environment("staging").gpu_pool.node_selector)
        add_gpu_node(cluster.server, "gpu-1", selector, gpus=4)
        cluster.tick()
        kube = Kube(cluster.api_client, FAST)
        for name in ("staging", "prod"):
            scenario(kube, cluster, repo, name)
        jobs = [r.body for r in cluster.server.requests if r.attrs and r.attrs.verb == "create" and
                r.attrs.resource == "jobs"]  # fmt: skip
        yield Recorded(
            cluster.server.uses(PIPELINE.user),
            rbac.session_uses(),
            list(rbac.grants(cluster.store, PIPELINE)),
            jobs,
            cluster.store,
        )
    finally:
        cluster.close()


def compare(uses: list[rbac.Attributes], grants: list[rbac.Grant], store: Store) -> tuple[list[str], list[str]]:
    """(uses no grant allows, grants no use needs), both readable."""
    missing = [a for a in uses if not rbac.authorize(store, PIPELINE, a)]
    return rbac.describe(missing), sorted(str(g) for g in rbac.unused(grants, uses))


def test_gitops_rbac_grants_exactly_what_the_pipeline_calls(recorded: Recorded) -> None:
    pipeline_uses = [u.attrs for u in recorded.session if u.user == PIPELINE.user]
    denied = rbac.describe(u.attrs for u in recorded.session if u.user == PIPELINE.user and not u.allowed)
    assert denied == [], f"cluster tests of this session were refused these calls (grant them): {denied}"
    missing, unused = compare(recorded.uses + pipeline_uses, recorded.grants, recorded.store)
    assert missing == [], f"the pipeline calls these without a grant in gitops/rbac: {missing}"
    assert unused == [], f"gitops/rbac grants these but nothing calls them: {unused}"
    assert rbac.describe(recorded.uses) == [
        "create jobs (batch) in llm-prod",
        "create jobs (batch) in llm-staging",
        "create leases (coordination.k8s.io) in llm-prod",
        "create leases (coordination.k8s.io) in llm-staging",
        "delete leases (coordination.k8s.io) in llm-prod",
        "delete leases (coordination.k8s.io) in llm-staging",
        "get applications (argoproj.io) in argocd",
        "get jobs/status (batch) in llm-prod",
        "get jobs/status (batch) in llm-staging",
        "get leases (coordination.k8s.io) in llm-prod",
        "get leases (coordination.k8s.io) in llm-staging",
        "get pods/log (core) in llm-prod",
        "get pods/log (core) in llm-staging",
        "get rollouts (argoproj.io) in llm-prod",
        "get rollouts (argoproj.io) in llm-staging",
        "list nodes (core) cluster-wide",
        "list pods (core) cluster-wide",
        "list pods (core) in llm-prod",
        "list pods (core) in llm-staging",
        "patch applications (argoproj.io) in argocd",
        "patch rollouts/status (argoproj.io) in llm-prod",
        "patch rollouts/status (argoproj.io) in llm-staging",
        "update leases (coordination.k8s.io) in llm-prod",
        "update leases (coordination.k8s.io) in llm-staging",
        "watch applications (argoproj.io) in argocd",
    ]


def test_the_comparison_fails_for_one_call_added_or_one_call_gone(recorded: Recorded) -> None:
    added = rbac.Attributes("list", "", "services", "", "llm-staging")
    missing, unused = compare([*recorded.uses, added], recorded.grants, recorded.store)
    assert missing == ["list services (core) in llm-staging"] and unused == []
    gone = [a for a in recorded.uses if a.combined != "pods/log" or a.namespace != "llm-prod"]
    missing, unused = compare(gone, recorded.grants, recorded.store)
    assert missing == [] and unused == ["get pods/log (core) in llm-prod [RoleBinding llm-prod/modelctl-promote -> "
                                        "ClusterRole modelctl-promote]"]  # fmt: skip


def test_every_single_grant_is_needed(recorded: Recorded) -> None:
    assert len(recorded.grants) == 23
    for grant in recorded.grants:
        refused = [a for a in recorded.uses if not rbac.authorize(recorded.store, PIPELINE, a, without=grant)]
        assert refused, f"nothing the pipeline does needs {grant}"


def test_job_pods_run_as_a_service_account_that_exists_where_the_jobs_run(recorded: Recorded) -> None:
    accounts = {(d["metadata"]["namespace"], d["metadata"]["name"]): d for d in rbac.manifests()
                if d["kind"] == "ServiceAccount"}  # fmt: skip
    assert {j["metadata"]["namespace"] for j in recorded.jobs} == {"llm-staging", "llm-prod"}
    for job in recorded.jobs:
        key = (job["metadata"]["namespace"], job["spec"]["template"]["spec"]["serviceAccountName"])
        assert key in accounts, f"Job pods in {key[0]} run as ServiceAccount {key[1]}, which gitops/rbac lacks"
        assert accounts[key]["automountServiceAccountToken"] is False  # the steps never call the API
    assert not any(rbac.authorize(recorded.store, rbac.service_account(*key), a) for key in accounts
                   if key[0] != "modelctl" for a in recorded.uses)  # fmt: skip


# -- a refusal tells what to grant ---------------------------------------------------------------------------------
def without_rule(resource: str) -> FakeCluster:
    """The cluster with gitops/rbac minus the modelctl-promote rule on ``resource``."""
    cluster = FakeCluster()
    cluster.change_rbac(
        "ClusterRole",
        "",
        "modelctl-promote",
        lambda obj: obj.update(rules=[r for r in obj["rules"] if resource not in r["resources"]]),
    )
    return cluster


def test_a_403_names_verb_resource_namespace_and_service_account_and_what_to_grant() -> None:
    cluster = without_rule("rollouts/status")
    try:
        cluster.create_rollout("llm-staging", rollout_manifest("llm-inference", STEPS))
        kube = Kube(cluster.api_client, FAST)
        env = CONFIG.environment("staging")
        assert env.rollout is not None
        with pytest.raises(Forbidden) as caught:
            kube.abort(env.rollout)
    finally:
        cluster.close()
    error = caught.value
    assert (error.verb, error.resource, error.group, error.namespace) == (
        "patch", "rollouts/status", "argoproj.io", "llm-staging"
    )  # fmt: skip
    assert error.user == "system:serviceaccount:modelctl:modelctl" and not error.retryable
    text = str(error)
    assert (
        "the ServiceAccount modelctl/modelctl may not patch rollouts/status (API group argoproj.io) in the "
        "namespace llm-staging" in text
    )
    assert 'apiGroups: ["argoproj.io"], resources: ["rollouts/status"], verbs: ["patch"]' in text
    assert "RoleBinding" in text and "kubectl auth can-i patch rollouts.argoproj.io --subresource=status" in text


def test_a_403_on_the_lease_is_not_read_as_free() -> None:
    cluster = without_rule("leases")
    try:
        kube = Kube(cluster.api_client, FAST)
        with pytest.raises(Forbidden, match=r"may not get leases .* in the namespace llm-staging"):
            kube.acquire_lease("staging", "llm-staging", "me")
        with pytest.raises(Forbidden, match="may not get leases"):
            kube.lease_holder("staging", "llm-staging")  # never "nobody holds it"
        created = [r for r in cluster.server.requests if r.attrs and r.attrs.verb == "create"]
    finally:
        cluster.close()
    assert created == [], "a refused read must not be taken for a free Lease (nothing is created)"


def test_the_gpu_preflight_needs_cluster_wide_pod_listing() -> None:
    cluster = FakeCluster()
    try:
        cluster.change_rbac("ClusterRoleBinding", "", "modelctl-gpu-capacity")
        env = CONFIG.environment("staging")
        with pytest.raises(Forbidden, match=r"may not list nodes .* at the cluster scope") as caught:
            Kube(cluster.api_client, FAST).require_gpus(env.gpu_pool)
    finally:
        cluster.close()
    assert "ClusterRoleBinding" in str(caught.value)
