"""The Rollouts simulator in pods mode: Pod objects per pod-template hash, readiness from their Ready condition, the
canary and stable Services' selectors, abort, rollback and the progress deadline. On a bare Store: the tests play
the kubelet by setting pods' Ready condition with ``store.update``."""

from __future__ import annotations

import random
from typing import Any

from sandbox.cluster import FakeClock, rollout_manifest
from sandbox.pods import HASH_LABEL, is_ready
from sandbox.replicasets import MANAGED_BY, POD, REPLICASET, SERVICE
from sandbox.rollouts import ROLLOUT, RolloutsSimulator
from sandbox.store import Obj, Store

NS = "llm"
STEPS = [{"setWeight": 50}, {"pause": {}}, {"setWeight": 100}]


def service(name: str) -> Obj:
    return {"metadata": {"name": name}, "spec": {"selector": {"app": "r"}, "ports": [{"port": 8000}]}}


def cluster(replicas: int = 2, deadline_s: int = 600) -> tuple[Store, RolloutsSimulator, FakeClock]:
    store, clock = Store(), FakeClock()
    for name in ("r", "r-stable", "r-canary"):  # the users' Service, and the two Argo pins to a hash
        store.create(SERVICE, NS, service(name))
    manifest = rollout_manifest("r", STEPS, replicas=replicas, deadline_s=deadline_s)
    manifest["spec"]["template"]["metadata"]["annotations"] = {"modelctl.io/artifact": "v1"}
    store.create(ROLLOUT, NS, manifest, keep_status=False)
    return store, RolloutsSimulator(store, clock=clock, pods=True, rng=random.Random(7)), clock


def pods(store: Store, pod_hash: str | None = None) -> list[Obj]:
    items, _ = store.list(POD, NS, labels=f"{HASH_LABEL}={pod_hash}" if pod_hash else None)
    return items


def set_ready(store: Store, pod_hash: str, ready: bool = True) -> None:
    """What the kubelet does once a pod's readiness probe passes (or fails)."""
    for pod in pods(store, pod_hash):

        def mark(obj: Obj) -> None:
            flag = "True" if ready else "False"
            obj["status"] = {"phase": "Running", "conditions": [{"type": "Ready", "status": flag}]}

        store.update(POD, NS, pod["metadata"]["name"], mark)


def status(store: Store) -> Any:
    return store.get(ROLLOUT, NS, "r")["status"]


def selectors(store: Store) -> dict[str, Any]:
    return {name: store.get(SERVICE, NS, name)["spec"]["selector"] for name in ("r", "r-stable", "r-canary")}


def new_template(store: Store, version: str) -> None:
    def change(obj: Obj) -> None:
        obj["spec"]["template"]["metadata"]["annotations"] = {"modelctl.io/artifact": version}

    store.update(ROLLOUT, NS, "r", change)


def healthy_v1() -> tuple[Store, RolloutsSimulator, FakeClock, str]:
    store, sim, clock = cluster()
    sim.tick()
    v1 = status(store)["currentPodHash"]
    set_ready(store, v1)
    sim.tick()
    assert status(store)["phase"] == "Healthy"
    return store, sim, clock, v1


def test_the_first_template_gets_its_pods_and_is_healthy_only_once_they_are_ready() -> None:
    store, sim, _ = cluster()
    sim.tick()
    first = status(store)
    v1 = first["currentPodHash"]
    made = pods(store, v1)
    assert len(made) == 2 and not any(is_ready(p) for p in made)
    assert (first["phase"], first["message"]) == ("Progressing", "updated replicas are still becoming available")
    pod = made[0]
    assert pod["metadata"]["name"].startswith(f"r-{v1}-") and len(pod["metadata"]["name"]) == len(f"r-{v1}-") + 5
    assert pod["metadata"]["labels"] == {"app": "r", HASH_LABEL: v1}
    assert pod["metadata"]["annotations"] == {"modelctl.io/artifact": "v1"}
    assert pod["spec"]["containers"][0]["name"] == "vllm"
    rollout = store.get(ROLLOUT, NS, "r")
    assert pod["metadata"]["ownerReferences"][0]["uid"] == rollout["metadata"]["uid"]
    set_ready(store, v1)
    sim.tick()
    assert status(store)["phase"] == "Healthy" and status(store)["availableReplicas"] == 2
    rs = store.get(REPLICASET, NS, f"r-{v1}")
    assert (rs["spec"]["replicas"], rs["status"]["readyReplicas"]) == (2, 2)
    # both Argo Services on the one hash; the users' Service (every pod) untouched
    pinned = {"app": "r", HASH_LABEL: v1}
    assert selectors(store) == {"r": {"app": "r"}, "r-stable": pinned, "r-canary": pinned}
    assert store.get(SERVICE, NS, "r-canary")["metadata"]["annotations"][MANAGED_BY] == "r"


def test_a_canary_steps_forward_as_its_pods_get_ready_and_the_services_follow() -> None:
    store, sim, _, v1 = healthy_v1()
    new_template(store, "v2")
    sim.tick()
    v2 = status(store)["currentPodHash"]
    assert v2 != v1 and status(store)["currentStepIndex"] == 0
    assert len(pods(store, v2)) == 1 and len(pods(store, v1)) == 2  # stable keeps its pods until the canary is Ready
    assert pods(store, v2)[0]["metadata"]["annotations"] == {"modelctl.io/artifact": "v2"}
    assert selectors(store)["r-canary"][HASH_LABEL] == v2 and selectors(store)["r-stable"][HASH_LABEL] == v1
    sim.tick()
    assert status(store)["currentStepIndex"] == 0  # not Ready: the setWeight step is not done
    set_ready(store, v2)
    sim.tick()
    now = status(store)
    assert (now["currentStepIndex"], now["phase"]) == (1, "Paused") and len(pods(store, v1)) == 1
    store.patch(ROLLOUT, NS, "r", {"status": {"pauseConditions": None}}, "application/merge-patch+json", "status")
    sim.tick()
    assert status(store)["currentStepIndex"] == 2 and len(pods(store, v2)) == 2
    assert len(pods(store, v1)) == 1  # setWeight 100: the old pods stay until every new one is Ready
    assert status(store)["stableRS"] == v1
    set_ready(store, v2)
    sim.tick()
    done = status(store)
    assert (done["phase"], done["stableRS"], done["currentPodHash"]) == ("Healthy", v2, v2)
    assert pods(store, v1) == [] and len(pods(store, v2)) == 2
    assert selectors(store)["r-canary"][HASH_LABEL] == v2 and selectors(store)["r-stable"][HASH_LABEL] == v2
    assert store.get(REPLICASET, NS, f"r-{v1}")["spec"]["replicas"] == 0


def test_abort_deletes_the_canary_pods_and_the_template_back_to_stable_runs_no_steps() -> None:
    store, sim, _, v1 = healthy_v1()
    new_template(store, "v2")
    sim.tick()
    v2 = status(store)["currentPodHash"]
    set_ready(store, v2)
    sim.tick()
    assert status(store)["phase"] == "Paused" and len(pods(store, v1)) == 1
    store.patch(ROLLOUT, NS, "r", {"status": {"abort": True}}, "application/merge-patch+json", "status")
    sim.tick()
    aborted = status(store)
    assert aborted["phase"] == "Degraded" and "RolloutAborted" in aborted["message"]
    assert pods(store, v2) == [] and len(pods(store, v1)) == 2  # canary gone at once, stable back to full
    assert selectors(store)["r-canary"][HASH_LABEL] == v1  # an aborted canary Service points at stable
    new_template(store, "v1")  # the revert in Git
    sim.tick()
    back = status(store)
    assert back["currentPodHash"] == v1 and back["currentStepIndex"] == len(STEPS) and not back.get("abort")
    assert back["phase"] == "Progressing"  # the stable pod made again is not Ready yet
    set_ready(store, v1)
    sim.tick()
    assert status(store)["phase"] == "Healthy" and len(pods(store, v1)) == 2
    assert any(c["message"] == "Rollback to stable ReplicaSets" for c in status(store)["conditions"])


def test_a_canary_pod_that_never_gets_ready_reaches_the_progress_deadline() -> None:
    store, sim, clock, v1 = healthy_v1()
    store.update(ROLLOUT, NS, "r", lambda obj: obj["spec"].update(progressDeadlineSeconds=60))
    new_template(store, "v2")
    sim.tick()
    v2 = status(store)["currentPodHash"]
    set_ready(store, v2, ready=False)  # CrashLoopBackOff: the kubelet keeps it not Ready
    clock.advance(59)
    sim.tick()
    assert status(store)["phase"] == "Progressing"
    clock.advance(2)
    sim.tick()
    stuck = status(store)
    assert stuck["phase"] == "Degraded" and "ProgressDeadlineExceeded" in stuck["message"]
    assert f"r-{v2}" in stuck["message"]
    assert len(pods(store, v1)) == 2 and all(is_ready(p) for p in pods(store, v1))  # users still served by stable


def test_a_first_version_whose_pods_never_get_ready_is_degraded_and_recovers_once_they_are() -> None:
    store, sim, clock = cluster(deadline_s=60)
    sim.tick()
    v1 = status(store)["currentPodHash"]
    clock.advance(61)
    sim.tick()
    assert status(store)["phase"] == "Degraded" and "ProgressDeadlineExceeded" in status(store)["message"]
    set_ready(store, v1)
    sim.tick()
    assert status(store)["phase"] == "Healthy"


def test_surplus_pods_go_not_ready_first() -> None:
    store, sim, _ = cluster(replicas=3)
    sim.tick()
    v1 = status(store)["currentPodHash"]
    set_ready(store, v1)
    sick = pods(store, v1)[1]["metadata"]["name"]
    store.update(POD, NS, sick, lambda obj: obj["status"]["conditions"][0].update(status="False"))
    store.update(ROLLOUT, NS, "r", lambda obj: obj["spec"].update(replicas=2))
    sim.tick()
    left = [p["metadata"]["name"] for p in pods(store, v1)]
    assert len(left) == 2 and sick not in left
    assert status(store)["phase"] == "Healthy"


def test_a_pod_that_ended_is_replaced_and_kept_until_its_version_goes() -> None:
    store, sim, _, v1 = healthy_v1()
    dead = pods(store, v1)[0]["metadata"]["name"]
    store.update(POD, NS, dead, lambda obj: obj["status"].update(phase="Failed", conditions=[]))
    sim.tick()
    assert len(pods(store, v1)) == 3 and status(store)["replicas"] == 2  # a replacement; the failed one kept
    assert status(store)["phase"] == "Progressing"  # the replacement is not Ready yet
    new_template(store, "v2")
    sim.tick()
    set_ready(store, status(store)["currentPodHash"])
    sim.tick()
    store.patch(ROLLOUT, NS, "r", {"status": {"pauseConditions": None}}, "application/merge-patch+json", "status")
    sim.tick()
    set_ready(store, status(store)["currentPodHash"])
    sim.tick()
    assert status(store)["phase"] == "Healthy" and pods(store, v1) == []  # the old version's pods, failed too


def test_deleting_the_rollout_deletes_its_pods_and_replicasets() -> None:
    store, sim, _, _ = healthy_v1()
    other = {"metadata": {"name": "someone-elses"}, "spec": {"containers": []}}
    store.create(POD, NS, other)
    store.delete(ROLLOUT, NS, "r")  # Argo CD prunes it
    sim.tick()
    assert [p["metadata"]["name"] for p in pods(store)] == ["someone-elses"]
    assert store.list(REPLICASET, NS)[0] == []


def test_count_mode_makes_no_pods() -> None:
    store = Store()
    store.create(ROLLOUT, NS, rollout_manifest("r", STEPS), keep_status=False)
    RolloutsSimulator(store).tick()
    assert status(store)["phase"] == "Healthy" and pods(store) == []
