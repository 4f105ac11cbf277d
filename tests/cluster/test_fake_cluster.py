"""The fake cluster itself: API semantics over HTTP with the official client, faults, and the Argo simulators."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import git
import jsonschema
import pytest
import yaml
from kubernetes import client, watch

from sandbox.cluster import VALUES_FILE, FakeCluster, commit_values, rollout_manifest

ARGO = ("argoproj.io", "v1alpha1")


def custom(cluster: FakeCluster) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(cluster.admin_client)


def test_create_get_list_with_selectors(cluster: FakeCluster) -> None:
    api = custom(cluster)
    made = api.create_namespaced_custom_object(*ARGO, "ns", "rollouts", rollout_manifest("a", []))
    assert made["metadata"]["resourceVersion"] and made["metadata"]["generation"] == 1  # 201 with the object
    for name, tier in (("b", "gpu"), ("c", "cpu")):
        body = rollout_manifest(name, [])
        body["metadata"]["labels"]["tier"] = tier
        api.create_namespaced_custom_object(*ARGO, "ns", "rollouts", body)

    def names(selector: str) -> list[str]:
        items = api.list_namespaced_custom_object(*ARGO, "ns", "rollouts", label_selector=selector)["items"]
        return [i["metadata"]["name"] for i in items]

    assert names("tier=gpu") == ["b"]
    assert names("tier!=gpu") == ["a", "c"]
    assert names("tier in (gpu,cpu)") == ["b", "c"]
    assert names("tier notin (gpu),app") == ["a", "c"]
    assert names("!tier") == ["a"]
    with pytest.raises(client.ApiException) as caught:
        api.create_namespaced_custom_object(*ARGO, "ns", "rollouts", rollout_manifest("a", []))
    assert caught.value.status == 409 and "already exists" in (caught.value.body or "")
    with pytest.raises(client.ApiException) as missing:
        api.get_namespaced_custom_object(*ARGO, "ns", "rollouts", "nope")
    assert missing.value.status == 404


def test_status_subresource_generation_and_resource_version(cluster: FakeCluster) -> None:
    api = custom(cluster)
    api.create_namespaced_custom_object(*ARGO, "ns", "rollouts", {**rollout_manifest("r", []), "status": {"x": 1}})
    both = {"spec": {"replicas": 9}, "status": {"abort": True}}
    on_status = api.patch_namespaced_custom_object_status(*ARGO, "ns", "rollouts", "r", both)
    assert on_status["spec"]["replicas"] == 2 and on_status["status"] == {"abort": True}  # status on create dropped
    assert on_status["metadata"]["generation"] == 1  # status changes do not bump the generation
    on_object = api.patch_namespaced_custom_object(*ARGO, "ns", "rollouts", "r", {**both, "status": {"abort": False}})
    assert on_object["spec"]["replicas"] == 9 and on_object["status"] == {"abort": True}
    assert on_object["metadata"]["generation"] == 2
    same = api.patch_namespaced_custom_object(*ARGO, "ns", "rollouts", "r", {"spec": {"replicas": 9}})
    assert same["metadata"]["resourceVersion"] == on_object["metadata"]["resourceVersion"]  # a no-op write
    json_patch = [
        {"op": "replace", "path": "/spec/replicas", "value": 3},
        {"op": "add", "path": "/spec/paused", "value": True},
    ]
    patched = api.patch_namespaced_custom_object(
        *ARGO, "ns", "rollouts", "r", json_patch, _content_type="application/json-patch+json"
    )
    assert (patched["spec"]["replicas"], patched["spec"]["paused"], patched["metadata"]["generation"]) == (3, True, 3)
    stale = {
        **patched,
        "metadata": {**patched["metadata"], "resourceVersion": on_object["metadata"]["resourceVersion"]},
    }
    with pytest.raises(client.ApiException) as caught:
        api.replace_namespaced_custom_object(*ARGO, "ns", "rollouts", "r", stale)
    assert caught.value.status == 409 and "has been modified" in (caught.value.body or "")
    assert api.replace_namespaced_custom_object(*ARGO, "ns", "rollouts", "r", patched)["metadata"]["generation"] == 3


def test_watch_streams_changes_and_faults_fail_a_chosen_number_of_times(cluster: FakeCluster) -> None:
    api = custom(cluster)
    first = api.create_namespaced_custom_object(*ARGO, "ns", "rollouts", rollout_manifest("w", []))
    api.patch_namespaced_custom_object(*ARGO, "ns", "rollouts", "w", {"spec": {"replicas": 5}})
    api.create_namespaced_custom_object(*ARGO, "ns", "rollouts", rollout_manifest("other", []))
    events = watch.Watch().stream(
        api.list_namespaced_custom_object, *ARGO, "ns", "rollouts", field_selector="metadata.name=w",
        resource_version=first["metadata"]["resourceVersion"], timeout_seconds=1,
    )  # fmt: skip
    seen = [(e["type"], e["object"]["spec"]["replicas"]) for e in events]
    assert seen == [("MODIFIED", 5)]  # only changes after the given version, only the selected object

    cluster.server.fail("watch", "rollouts", mode="drop", after_events=1, times=1)
    dropped = watch.Watch().stream(api.list_namespaced_custom_object, *ARGO, "ns", "rollouts", timeout_seconds=1)
    assert len(list(dropped)) == 1  # the stream ended after one of the two ADDED events

    fault = cluster.server.fail("get", "rollouts", name="w", code=500, times=2)
    for _ in range(2):
        with pytest.raises(client.ApiException) as caught:
            api.get_namespaced_custom_object(*ARGO, "ns", "rollouts", "w")
        assert caught.value.status == 500
    assert api.get_namespaced_custom_object(*ARGO, "ns", "rollouts", "w")["spec"]["replicas"] == 5
    assert fault.hits == 2


def test_core_kinds_leases_jobs_pods_logs(cluster: FakeCluster) -> None:
    core, batch = client.CoreV1Api(cluster.admin_client), client.BatchV1Api(cluster.admin_client)
    pvc = {"metadata": {"name": "model-cache"}, "spec": {"accessModes": ["ReadWriteMany"]}}
    assert core.create_namespaced_persistent_volume_claim("ns", pvc).metadata.name == "model-cache"
    event = {"metadata": {"name": "e1"}, "involvedObject": {"kind": "Job", "name": "j"}, "reason": "Started"}
    assert core.create_namespaced_event("ns", event).reason == "Started"
    spec = {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "i"}]}}}
    batch.create_namespaced_job("ns", {"metadata": {"name": "j"}, "spec": spec})
    cluster.jobs.tick()
    assert batch.read_namespaced_job_status("j", "ns").status.succeeded == 1
    [pod] = core.list_namespaced_pod("ns", label_selector="job-name=j").items
    assert core.read_namespaced_pod_log(pod.metadata.name, "ns") == "done\n"
    batch.delete_namespaced_job("j", "ns", propagation_policy="Background")
    assert core.list_namespaced_pod("ns").items == []  # the Job's pods went with it


# the Argo Rollouts simulator -------------------------------------------------------------------------------------
STEPS = [{"setWeight": 25}, {"pause": {}}, {"setWeight": 75}, {"pause": {"duration": "1m"}}]


def new_template(cluster: FakeCluster, image: str) -> None:
    cluster.update("Rollout", "ns", "r", lambda o: o["spec"]["template"]["spec"]["containers"][0].update(image=image))


def status(cluster: FakeCluster) -> dict[str, Any]:
    found: dict[str, Any] = cluster.rollout("ns", "r")["status"]
    return found


def test_rollouts_simulator_walks_the_canary_steps(cluster: FakeCluster) -> None:
    cluster.create_rollout("ns", rollout_manifest("r", STEPS, replicas=4))
    cluster.tick()
    stable = status(cluster)["stableRS"]
    assert status(cluster)["phase"] == "Healthy" and status(cluster)["observedGeneration"] == "1"
    new_template(cluster, "vllm:2")
    cluster.rollouts.hold("ns", "r")
    cluster.tick()
    assert status(cluster)["observedGeneration"] == "1"  # held: the new generation is not observed
    cluster.rollouts.hold("ns", "r", held=False)
    cluster.tick()
    s = status(cluster)
    assert (s["phase"], s["currentStepIndex"], s["controllerPause"]) == ("Paused", 1, True)
    assert s["pauseConditions"][0]["reason"] == "CanaryPauseStep" and s["updatedReplicas"] == 1
    cluster.tick(3)
    assert status(cluster)["currentStepIndex"] == 1  # pause {} waits for a promote
    cluster.update("Rollout", "ns", "r", lambda o: o["status"].pop("pauseConditions"))  # what promote writes
    cluster.tick()
    s = status(cluster)
    assert (s["phase"], s["currentStepIndex"], s["updatedReplicas"]) == ("Paused", 3, 3)  # at the timed pause
    cluster.clock.advance(59)
    cluster.tick()
    assert status(cluster)["phase"] == "Paused"
    cluster.clock.advance(2)
    cluster.tick()
    s = status(cluster)
    assert (s["phase"], s["currentStepIndex"]) == ("Healthy", 4)
    assert s["stableRS"] == s["currentPodHash"] != stable


def test_rollouts_simulator_abort_retry_rollback_and_deadline(cluster: FakeCluster) -> None:
    cluster.create_rollout("ns", rollout_manifest("r", STEPS, deadline_s=60))
    cluster.tick()
    stable = status(cluster)["stableRS"]
    new_template(cluster, "vllm:2")
    cluster.tick()
    cluster.update("Rollout", "ns", "r", lambda o: o["status"].update(abort=True))
    cluster.tick()
    s = status(cluster)
    assert (s["phase"], s["currentStepIndex"], s["updatedReplicas"]) == ("Degraded", 0, 0)
    assert s["message"].startswith("RolloutAborted") and "abortedAt" in s
    cluster.update("Rollout", "ns", "r", lambda o: o["status"].update(abort=False))  # retry
    cluster.tick()
    assert status(cluster)["phase"] == "Paused"
    new_template(cluster, "vllm")  # the template back to stable: no steps
    cluster.tick()
    s = status(cluster)
    assert (s["phase"], s["currentPodHash"], s.get("abort")) == ("Healthy", stable, None)
    assert s["conditions"][-1]["message"] == "Rollback to stable ReplicaSets"

    cluster.rollouts.set_canary_ready("ns", "r", ready=False)
    new_template(cluster, "vllm:3")
    cluster.tick()
    assert status(cluster)["phase"] == "Progressing"  # stuck at setWeight: the canary pod is not ready
    cluster.clock.advance(61)
    cluster.tick()
    s = status(cluster)
    assert s["phase"] == "Degraded" and s["message"].startswith("ProgressDeadlineExceeded")


def test_argocd_simulator_syncs_on_refresh_only(cluster: FakeCluster, gitops_repo: git.Repo) -> None:
    cluster.create_rollout("ns", rollout_manifest("r", STEPS))
    argocd = cluster.with_argocd(str(gitops_repo.working_tree_dir))
    argocd.add_application("app", VALUES_FILE, "ns", "r")
    cluster.tick()
    head = commit_values(gitops_repo, "model:\n  artifactId: art-2\n", "next")
    cluster.tick(3)
    app = cluster.get("Application", "argocd", "app")["status"]
    assert app["sync"]["revision"] != head and app["health"]["status"] == "Healthy"  # no refresh: not seen
    argocd.slow_ticks["app"] = 2
    cluster.update("Application", "argocd", "app", lambda o: o["metadata"].setdefault("annotations", {}).update(
        {"argocd.argoproj.io/refresh": "normal"}))  # fmt: skip
    cluster.tick()
    app = cluster.get("Application", "argocd", "app")
    assert "argocd.argoproj.io/refresh" not in app["metadata"]["annotations"]
    assert (app["status"]["sync"]["status"], app["status"]["operationState"]["phase"]) == ("OutOfSync", "Running")
    cluster.tick(2)
    app = cluster.get("Application", "argocd", "app")["status"]
    assert (app["sync"]["status"], app["sync"]["revision"], app["operationState"]["syncResult"]["revision"]) == (
        "Synced", head, head)  # fmt: skip
    assert app["health"]["status"] == "Suspended" and app["reconciledAt"] >= app["operationState"]["finishedAt"]
    template = cluster.rollout("ns", "r")["spec"]["template"]
    assert template["metadata"]["annotations"]["modelctl.io/artifact-id"] == "art-2"
    assert "--artifact-id=art-2" in template["spec"]["containers"][0]["args"]


def _schema(crds: Path, name: str) -> dict[str, Any]:
    crd = yaml.load((crds / name).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    found: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return found


def test_what_the_simulators_write_fits_the_official_crds(
    cluster: FakeCluster, gitops_repo: git.Repo, shared_crds: Path
) -> None:
    rollout_schema = _schema(shared_crds, "argo-rollouts-v1.9.1-rollout-crd.yaml")
    app_schema = _schema(shared_crds, "argo-cd-v3.5.1-application-crd.yaml")
    cluster.create_rollout("ns", rollout_manifest("r", STEPS, replicas=3))
    cluster.with_argocd(str(gitops_repo.working_tree_dir)).add_application("app", VALUES_FILE, "ns", "r")
    cluster.tick()
    commit_values(gitops_repo, "model:\n  artifactId: art-2\n", "next")
    cluster.update("Application", "argocd", "app", lambda o: o["metadata"].setdefault("annotations", {}).update(
        {"argocd.argoproj.io/refresh": "hard"}))  # fmt: skip
    snapshots = []
    for change in (None, "abort", None, "deadline"):
        if change == "abort":
            cluster.update("Rollout", "ns", "r", lambda o: o["status"].update(abort=True))
        if change == "deadline":
            cluster.rollouts.set_canary_ready("ns", "r", ready=False)
            new_template(cluster, "vllm:9")
            cluster.tick()
            cluster.clock.advance(601)
        cluster.tick()
        snapshots.append((cluster.rollout("ns", "r"), cluster.get("Application", "argocd", "app")))
    for rollout, app in snapshots:
        jsonschema.validate(rollout, rollout_schema, cls=jsonschema.Draft7Validator)
        jsonschema.validate(app, app_schema, cls=jsonschema.Draft7Validator)
    broken = {**snapshots[0][0], "status": {**snapshots[0][0]["status"], "currentStepIndex": "one"}}
    with pytest.raises(jsonschema.ValidationError):  # the schemas do check what we write
        jsonschema.validate(broken, rollout_schema, cls=jsonschema.Draft7Validator)
    assert {s[0]["status"]["phase"] for s in snapshots} >= {"Paused", "Degraded"}
