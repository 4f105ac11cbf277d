"""The Argo CD simulator with a real Application: the GitOps template's chart rendered by Helm for staging's values,
every object applied with annotation tracking, promotion on refresh, prune, self-heal, and a broken chart or a
refused object failing with nothing applied (the old objects keep running)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import git
import jsonschema
import pytest
import yaml

from pipeline.config import ArgoCDApp
from pipeline.errors import TerminalError
from pipeline.gitops import Promotion, edit_values, init_repo
from pipeline.kube import Backoff, Kube
from sandbox.argocd import ArgoCDSimulator
from sandbox.cluster import FakeCluster
from sandbox.helmapp import TRACKING, body
from sandbox.store import BY_KIND, Obj

ROOT = Path(__file__).resolve().parent.parent
APP = "llm-inference-staging"
NS = "llm-staging"
VALUES = "envs/staging/values.yaml"
CHART_OBJECTS = {
    ("Rollout", "llm-inference"), ("Service", "llm-inference"), ("Service", "llm-inference-stable"),
    ("Service", "llm-inference-canary"), ("PersistentVolumeClaim", "model-cache"),
    ("AnalysisTemplate", "llm-inference-vllm"), ("PodMonitor", "llm-inference"),
    ("PodDisruptionBudget", "llm-inference"),
}  # fmt: skip


def manifest(remote: Path, ignore: list[Obj] | None = None) -> Obj:
    """gitops/argocd/application-staging.yaml pointed at the test's repository."""
    app: Obj = yaml.safe_load((ROOT / "gitops" / "argocd" / "application-staging.yaml").read_text())
    app["spec"]["source"]["repoURL"] = f"file://{remote}"
    app["spec"]["ignoreDifferences"] += ignore or []
    return app


@dataclass
class Stage:
    cluster: FakeCluster
    argocd: ArgoCDSimulator
    work: git.Repo
    remote: Path

    def commit(self, path: str, change: Callable[[str], str], message: str) -> str:
        """Edit a file of the GitOps repo, commit and push it (as a person or the pipeline would)."""
        file = Path(self.work.working_tree_dir or ".") / path
        file.write_text(change(file.read_text()))
        self.work.index.add([path])
        sha = self.work.index.commit(message).hexsha
        self.work.remote().push("main").raise_if_error()
        return sha

    def values(self, changes: dict[str, Any], message: str) -> str:
        return self.commit(VALUES, lambda text: edit_values(text, changes), message)

    def refresh(self, ticks: int = 3) -> Obj:
        """Ask for a refresh as the pipeline does, then let the controllers run (0: Argo CD's reconcile only)."""
        self.cluster.update("Application", "argocd", APP, lambda o: o["metadata"].setdefault("annotations", {}).update(
            {"argocd.argoproj.io/refresh": "normal"}))  # fmt: skip
        if ticks:
            self.cluster.tick(ticks)
        else:
            self.argocd.tick()
        return self.app()

    def kube(self) -> Kube:
        """The pipeline's cluster driver, as the pipeline's ServiceAccount over HTTP."""
        return Kube(self.cluster.api_client, Backoff(attempts=4, first_s=0.01, max_s=0.05, request_timeout_s=1))

    def app(self) -> Obj:
        return self.cluster.get("Application", "argocd", APP)

    def get(self, kind: str, name: str) -> Obj:
        return self.cluster.get(kind, NS, name)

    def objects(self) -> dict[tuple[str, str], Obj]:
        """Every object in the namespace but the pipeline's RBAC (and pods: none run here), by kind and name."""
        found = {}
        for resource in BY_KIND.values():
            if resource.namespaced and resource.group != "rbac.authorization.k8s.io" and resource.kind not in (
                "ServiceAccount", "Pod", "ReplicaSet", "Event"):  # fmt: skip
                for item in self.cluster.store.list(resource, NS)[0]:
                    found[(item["kind"], item["metadata"]["name"])] = item
        return found


def stage_for(tmp_path: Path, ignore: list[Obj] | None = None, **knobs: Any) -> Iterator[Stage]:
    remote = tmp_path / "gitops.git"
    init_repo(remote)
    work = git.Repo.clone_from(str(remote), tmp_path / "edit")
    with work.config_writer() as config:
        config.set_value("user", "name", "test")
        config.set_value("user", "email", "test@localhost")
    cluster = FakeCluster()
    try:
        argocd = cluster.with_argocd(str(remote), **knobs)
        argocd.add_application_manifest(manifest(remote, ignore))
        cluster.tick(2)
        yield Stage(cluster, argocd, work, remote)
    finally:
        work.close()
        cluster.close()


@pytest.fixture
def stage(tmp_path: Path) -> Iterator[Stage]:
    yield from stage_for(tmp_path)


def promotion(artifact: str) -> Promotion:
    return Promotion(
        env="staging", model="org/model", revision="a" * 40, artifact=artifact, format="awq-w4a16", quantization="awq"
    )


def test_the_staging_application_applies_every_object_the_chart_renders(stage: Stage) -> None:
    head = stage.work.head.commit.hexsha
    objects = stage.objects()
    assert set(objects) == CHART_OBJECTS
    for (kind, name), obj in objects.items():
        group = obj["apiVersion"].rpartition("/")[0]
        assert obj["metadata"]["annotations"][TRACKING] == f"{APP}:{group}/{kind}:{NS}/{name}"
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == "llm-inference"
    assert stage.cluster.get("Namespace", "", NS)  # CreateNamespace=true
    rollout = objects[("Rollout", "llm-inference")]
    pod = rollout["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}  # staging's values
    assert "--max-model-len=8192" in pod["containers"][0]["args"] and rollout["spec"]["replicas"] == 0  # nothing yet
    assert rollout["spec"]["strategy"]["canary"]["steps"][1] == {"pause": {"duration": "5m"}}
    assert objects[("PersistentVolumeClaim", "model-cache")]["status"]["phase"] == "Bound"
    status = stage.app()["status"]
    assert (status["sync"]["status"], status["sync"]["revision"]) == ("Synced", head)
    operation = status["operationState"]
    assert (operation["phase"], operation["syncResult"]["revision"]) == ("Succeeded", head)
    assert {r["message"].split()[-1] for r in operation["syncResult"]["resources"]} == {"created"}
    assert [h["revision"] for h in status["history"]] == [head]
    assert status["health"]["status"] == "Healthy" and status["reconciledAt"] >= operation["finishedAt"]
    assert {(r["kind"], r["name"]) for r in status["resources"]} == CHART_OBJECTS
    assert "conditions" not in status


def test_a_promotion_changes_the_rollout_template_on_refresh_only_and_the_status_survives(stage: Stage) -> None:
    before = stage.get("Rollout", "llm-inference")
    stable = before["status"]["stableRS"]
    sha = stage.values(promotion("awq-0001").changes(), "promote(staging): awq-0001")
    stage.cluster.tick(3)
    assert stage.app()["status"]["sync"]["revision"] != sha  # no refresh yet: Argo CD has not polled
    app = stage.refresh(ticks=0)
    assert (app["status"]["sync"]["status"], app["status"]["operationState"]["phase"]) == ("OutOfSync", "Running")
    assert "argocd.argoproj.io/refresh" not in app["metadata"]["annotations"]
    stage.cluster.tick()
    rollout = stage.get("Rollout", "llm-inference")
    container = rollout["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][0] == "/models/awq-0001" and "--quantization=awq" in container["args"]
    assert rollout["spec"]["replicas"] == 1 and rollout["metadata"]["generation"] > before["metadata"]["generation"]
    assert rollout["status"]["stableRS"] == stable != rollout["status"]["currentPodHash"]  # the canary started
    status = stage.app()["status"]
    assert (status["sync"]["status"], status["operationState"]["syncResult"]["revision"]) == ("Synced", sha)
    assert len(status["history"]) == 2

    kube = stage.kube()
    nxt = stage.values(promotion("awq-0002").changes(), "promote(staging): awq-0002")
    kube.request_refresh(ArgoCDApp(application=APP))
    with stage.cluster.running():
        state = kube.wait_synced(ArgoCDApp(application=APP), nxt, timeout_s=20)
    assert (state.sync_revision, state.operation_revision) == (nxt, nxt)
    assert stage.get("Rollout", "llm-inference")["spec"]["template"]["spec"]["containers"][0]["args"][0] == (
        "/models/awq-0002"
    )


def test_a_commit_that_disables_the_podmonitor_prunes_it(stage: Stage) -> None:
    stage.values({"metrics.podMonitor.enabled": False}, "staging: no PodMonitor")
    stage.refresh()
    assert set(stage.objects()) == CHART_OBJECTS - {("PodMonitor", "llm-inference")}
    status = stage.app()["status"]
    assert status["sync"]["status"] == "Synced"
    pruned = [r for r in status["operationState"]["syncResult"]["resources"] if r["status"] == "Pruned"]
    assert [(r["kind"], r["name"]) for r in pruned] == [("PodMonitor", "llm-inference")]


def test_spec_edits_outside_git_are_healed_and_status_or_added_fields_are_not_drift(stage: Stage) -> None:
    store, rollout = stage.cluster.store, BY_KIND["Rollout"]
    image = stage.get("Rollout", "llm-inference")["spec"]["template"]["spec"]["containers"][0]["image"]
    patch = {"spec": {"template": {"spec": {"containers": [{"name": "vllm", "image": "evil:latest"}]}}}}
    store.patch(rollout, NS, "llm-inference", patch, "application/merge-patch+json", None)  # kubectl edit
    stage.argocd.tick()
    status = stage.app()["status"]
    assert status["sync"]["status"] == "OutOfSync" and status["operationState"]["phase"] == "Running"
    assert next(r for r in status["resources"] if r["kind"] == "Rollout")["status"] == "OutOfSync"
    stage.cluster.tick(2)
    healed = stage.get("Rollout", "llm-inference")["spec"]["template"]["spec"]["containers"][0]
    assert healed["image"] == image and len(healed) > 2  # the whole container is back, not just the image
    assert stage.app()["status"]["sync"]["status"] == "Synced"

    stage.cluster.store.delete(BY_KIND["PodDisruptionBudget"], NS, "llm-inference")  # deleted by hand
    stage.argocd.tick()
    assert stage.app()["status"]["health"]["status"] == "Missing"
    stage.cluster.tick(2)
    assert stage.get("PodDisruptionBudget", "llm-inference") and stage.app()["status"]["health"]["status"] == "Healthy"

    rv = stage.app()["metadata"]["resourceVersion"]
    stage.cluster.update("Service", NS, "llm-inference", lambda o: o["spec"].update(clusterIP="10.0.0.7"))
    stage.cluster.update("Service", NS, "llm-inference", lambda o: o.update(status={"loadBalancer": {}}))
    stage.cluster.update("Rollout", NS, "llm-inference", lambda o: o["status"].update(promoteFull=True))
    stage.cluster.tick(2)
    status = stage.app()["status"]
    assert status["sync"]["status"] == "Synced" and status["operationState"]["phase"] == "Succeeded"
    assert stage.get("Service", "llm-inference")["spec"]["clusterIP"] == "10.0.0.7"  # the API server's field stays
    assert int(stage.app()["metadata"]["resourceVersion"]) >= int(rv)


def test_ignored_differences_keep_the_controllers_values(tmp_path: Path) -> None:
    replicas = {"group": "argoproj.io", "kind": "Rollout", "jsonPointers": ["/spec/replicas"]}
    for stage in stage_for(tmp_path, ignore=[replicas]):
        gateway = {"type": "gatewayAPI", "gatewayAPI": {"parentRefs": [{"name": "inference", "namespace": "gw"}]}}
        stage.values({"trafficRouting": gateway}, "staging: Gateway API")
        stage.refresh()
        assert ("HTTPRoute", "llm-inference") in stage.objects() and ("Service", "llm-inference") not in stage.objects()

        def weights(route: Obj) -> None:
            route["spec"]["rules"][0]["backendRefs"][0]["weight"] = 60  # the Rollouts plugin at a canary step
            route["spec"]["rules"][0]["backendRefs"][1]["weight"] = 40

        stage.cluster.update("HTTPRoute", NS, "llm-inference", weights)
        stage.cluster.update("Rollout", NS, "llm-inference", lambda o: o["spec"].update(replicas=4))  # KEDA
        stage.cluster.update("Rollout", NS, "llm-inference", lambda o: o["spec"].update(revisionHistoryLimit=9))
        stage.cluster.tick(3)
        route = stage.get("HTTPRoute", "llm-inference")["spec"]["rules"][0]["backendRefs"]
        assert [b["weight"] for b in route] == [60, 40]
        rollout = stage.get("Rollout", "llm-inference")["spec"]
        assert (rollout["replicas"], rollout["revisionHistoryLimit"]) == (4, 3)  # ignored kept, the rest healed


@pytest.mark.parametrize("broken", ["values", "template"])
def test_a_commit_that_breaks_the_chart_fails_with_helms_error_and_nothing_changes(stage: Stage, broken: str) -> None:
    good = stage.work.head.commit.hexsha
    before = {key: body(obj) for key, obj in stage.objects().items()}
    if broken == "values":
        sha = stage.values({"replicas": "two", **promotion("awq-0003").changes()}, "staging: two replicas")
        named = "at '/replicas': got string, want integer"
    else:
        sha = stage.commit(
            "charts/llm-inference/templates/pdb.yaml", lambda t: t + '{{ fail "pdb: pick one" }}\n', "chart: broken"
        )
        named = "llm-inference/templates/pdb.yaml"
    status = stage.refresh()["status"]
    (condition,) = status["conditions"]
    assert condition["type"] == "ComparisonError" and named in condition["message"]
    assert condition["message"].startswith("Failed to load target state: failed to generate manifest")
    assert "`helm template . --name-template llm-inference --namespace llm-staging" in condition["message"]
    assert status["sync"]["status"] == "Unknown" and "revision" not in status["sync"]
    assert (status["operationState"]["phase"], status["operationState"]["syncResult"]["revision"]) == (
        "Succeeded", good)  # fmt: skip  # Argo CD skips auto-sync when it cannot compare
    assert status["health"]["status"] == "Healthy"  # the old objects keep running
    assert {r["status"] for r in status["resources"]} == {"Unknown"} and len(status["resources"]) == len(before)
    assert {key: body(obj) for key, obj in stage.objects().items()} == before

    with stage.cluster.running(), pytest.raises(TerminalError) as caught:
        stage.kube().wait_synced(ArgoCDApp(application=APP), sha, timeout_s=10)
    assert "ComparisonError" in str(caught.value) and named in str(caught.value)  # at once, Helm's error named

    if broken == "values":
        fixed = stage.values({"replicas": 1}, "staging: one replica")
    else:
        fixed = stage.commit("charts/llm-inference/templates/pdb.yaml", lambda t: t.split("{{ fail")[0], "chart: fix")
    status = stage.refresh()["status"]
    assert "conditions" not in status and (status["sync"]["status"], status["sync"]["revision"]) == ("Synced", fixed)
    if broken == "values":  # the fix forward carries the promotion: synced
        assert status["operationState"]["syncResult"]["revision"] == fixed
        assert stage.get("Rollout", "llm-inference")["spec"]["replicas"] == 1
    else:  # the chart renders as before the break: Synced at the new commit with no sync operation, as Argo CD
        assert status["operationState"]["syncResult"]["revision"] == good
        assert {key: body(obj) for key, obj in stage.objects().items()} == before


def test_an_object_the_api_server_refuses_fails_the_sync_and_nothing_is_applied(stage: Stage) -> None:
    before = {key: body(obj) for key, obj in stage.objects().items()}
    bad = {"metrics.podMonitor.labels": {"release": "kube prometheus"}, **promotion("awq-0004").changes()}
    sha = stage.values(bad, "promote with a bad label")
    operation = stage.refresh()["status"]["operationState"]
    refused = 'PodMonitor.monitoring.coreos.com "llm-inference" is invalid: metadata.labels: Invalid value'
    assert (operation["phase"], operation["syncResult"]["revision"], operation["retryCount"]) == ("Running", sha, 1)
    assert operation["message"].startswith(f"one or more objects failed to apply (dry run), reason: {refused}")
    assert "Retrying attempt #1 at " in operation["message"]  # syncPolicy.retry: limit 5, backoff 10s x2 to 3m
    stage.cluster.tick(3)
    assert stage.app()["status"]["operationState"]["retryCount"] == 1  # the backoff has not passed
    with stage.cluster.running(), pytest.raises(TerminalError) as caught:  # still retrying: not over yet
        stage.kube().wait_synced(ArgoCDApp(application=APP), sha, timeout_s=1)
    assert "did not make commit" in str(caught.value) and "operation Running" in str(caught.value)
    for _ in range(5):
        stage.cluster.clock.advance(180)
        stage.cluster.tick()
    status = stage.app()["status"]
    operation = status["operationState"]
    assert (operation["phase"], operation["retryCount"]) == ("Failed", 5)
    assert operation["message"].endswith("(retried 5 times).") and refused in operation["message"]
    assert status["sync"]["status"] == "OutOfSync" and status["health"]["status"] == "Healthy"
    assert {key: body(obj) for key, obj in stage.objects().items()} == before  # the Rollout was not promoted
    stage.cluster.clock.advance(600)
    stage.cluster.tick(3)
    assert stage.app()["status"]["operationState"]["phase"] == "Failed"  # not synced again on the same commit
    with stage.cluster.running(), pytest.raises(TerminalError) as caught:
        stage.kube().wait_synced(ArgoCDApp(application=APP), sha, timeout_s=10)
    assert "ended Failed" in str(caught.value) and "metadata.labels" in str(caught.value)

    fixed = stage.values({"metrics.podMonitor.labels": {"release": "kube-prometheus"}}, "fix the label")
    status = stage.refresh()["status"]
    assert (status["operationState"]["phase"], status["sync"]["revision"]) == ("Succeeded", fixed)
    assert "retryCount" not in status["operationState"]
    assert stage.get("Rollout", "llm-inference")["spec"]["template"]["spec"]["containers"][0]["args"][0] == (
        "/models/awq-0004"
    )


def test_polling_finds_a_commit_without_the_annotation_and_a_pending_claim_is_progressing(tmp_path: Path) -> None:
    for stage in stage_for(tmp_path, poll_s=180, bind_claims=False):
        assert stage.get("PersistentVolumeClaim", "model-cache").get("status", {}).get("phase") is None
        status = stage.app()["status"]
        assert status["health"]["status"] == "Progressing"  # a claim no provisioner binds
        sha = stage.values(promotion("awq-0005").changes(), "promote")
        stage.cluster.clock.advance(100)
        stage.cluster.tick(2)
        assert stage.app()["status"]["sync"]["revision"] != sha
        stage.cluster.clock.advance(80)
        stage.cluster.tick(2)
        assert stage.app()["status"]["operationState"]["syncResult"]["revision"] == sha
        stage.cluster.update("PersistentVolumeClaim", NS, "model-cache", lambda o: o.update(status={"phase": "Bound"}))
        stage.cluster.tick()
        claim = next(r for r in stage.app()["status"]["resources"] if r["kind"] == "PersistentVolumeClaim")
        assert claim["health"]["status"] == "Healthy"


def test_the_knobs_hold_a_helm_sync_as_they_hold_the_stand_in(stage: Stage) -> None:
    stage.argocd.slow_ticks[APP] = 2
    sha = stage.values(promotion("awq-0006").changes(), "promote")
    stage.refresh(ticks=0)
    for _ in range(2):
        stage.argocd.tick()
        assert stage.app()["status"]["operationState"]["phase"] == "Running"
    stage.argocd.tick()
    assert stage.app()["status"]["operationState"]["syncResult"]["revision"] == sha
    stage.argocd.slow_ticks.pop(APP)
    stage.argocd.never_sync.add(APP)
    nxt = stage.values(promotion("awq-0007").changes(), "promote again")
    status = stage.refresh()["status"]
    assert (status["sync"]["status"], status["sync"]["revision"]) == ("OutOfSync", nxt)
    assert status["operationState"]["syncResult"]["revision"] == sha  # seen, never applied


def test_what_the_simulator_writes_fits_the_official_application_crd(stage: Stage, shared_crds: Path) -> None:
    crd = yaml.safe_load((shared_crds / "argo-cd-v3.5.1-application-crd.yaml").read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    snapshots = [stage.app()]
    stage.values({"replicas": "two"}, "broken values")
    snapshots.append(stage.refresh())  # ComparisonError
    stage.values({"replicas": 1, "metrics.podMonitor.labels": {"release": "a b"}}, "refused label")
    snapshots.append(stage.refresh())  # a failed sync attempt, retried
    for _ in range(5):
        stage.cluster.clock.advance(180)
        stage.cluster.tick()
    snapshots.append(stage.app())  # the retries spent: Failed
    stage.values({"metrics.podMonitor.enabled": False}, "no PodMonitor")
    snapshots.append(stage.refresh())  # synced, one object pruned
    phases = [s["status"]["operationState"]["phase"] for s in snapshots]
    assert phases == ["Succeeded", "Succeeded", "Running", "Failed", "Succeeded"]
    for app in snapshots:
        jsonschema.validate(app, schema, cls=jsonschema.Draft7Validator)
    broken = {**snapshots[0], "status": {**snapshots[0]["status"], "history": [{"id": "one"}]}}
    with pytest.raises(jsonschema.ValidationError):  # the schema does check what is written
        jsonschema.validate(broken, schema, cls=jsonschema.Draft7Validator)


def test_value_files_merge_in_order_a_null_removes_a_value_and_each_app_tracks_its_own(stage: Stage) -> None:
    extra = "replicas: 3\nprogressDeadlineSeconds: 900\nnodeSelector: null\n"  # null: staging's selector removed
    (Path(stage.work.working_tree_dir or ".") / "envs/staging/extra.yaml").write_text(extra)
    stage.commit("envs/staging/extra.yaml", lambda text: text, "extra values")
    app = stage.app()
    app["spec"]["source"]["helm"]["valueFiles"] += ["../../envs/staging/extra.yaml"]
    app["metadata"] = {"name": "second", "namespace": "argocd"}
    app["spec"]["destination"]["namespace"] = "llm-second"
    stage.argocd.add_application_manifest(app)
    stage.values(promotion("awq-0008").changes(), "promote")  # the later file's replicas win over staging's 1
    stage.argocd.tick()
    stage.cluster.update("Application", "argocd", "second", lambda o: o["metadata"].setdefault("annotations", {})
                         .update({"argocd.argoproj.io/refresh": "normal"}))  # fmt: skip
    stage.cluster.tick(2)
    rollout = stage.cluster.get("Rollout", "llm-second", "llm-inference")["spec"]
    assert (rollout["replicas"], rollout["progressDeadlineSeconds"]) == (3, 900)
    assert "nodeSelector" not in rollout["template"]["spec"]
    assert stage.get("Rollout", "llm-inference")["spec"]["template"]["spec"]["nodeSelector"]  # staging's own
    tracking = stage.cluster.get("Rollout", "llm-second", "llm-inference")["metadata"]["annotations"][TRACKING]
    assert tracking == "second:argoproj.io/Rollout:llm-second/llm-inference"  # each Application tracks its own
    stage.cluster.tick(2)
    assert stage.get("Rollout", "llm-inference")["metadata"]["annotations"][TRACKING].startswith(f"{APP}:")
    bad = stage.app()
    bad["metadata"] = {"name": "third", "namespace": "argocd"}
    bad["spec"]["ignoreDifferences"] = [{"group": "", "kind": "Service", "jqPathExpressions": [".spec | keys"]}]
    with pytest.raises(ValueError, match=r"unsupported jqPathExpression '\.spec \| keys'"):
        stage.argocd.add_application_manifest(bad)
