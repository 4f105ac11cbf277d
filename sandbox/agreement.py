"""Do Git and the (simulated) cluster agree? What the demo checks at its end, read as a person would with kubectl.

For an environment: the branch head of the GitOps repo, the artifact its values file names, and what the cluster
runs: the Argo CD Application synced to that head and Healthy, the Rollout Healthy and settled (stable == current)
on a template whose artifact is Git's, and every Ready pod of the release on that template.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config

from .pods import HASH_LABEL, is_ready


@dataclass(frozen=True)
class Agreement:
    """What Git says and what the cluster runs for one environment; ``problems`` empty when they agree."""

    env: str
    git_head: str
    git_artifact: str
    synced_revision: str | None
    health: str | None
    rollout_phase: str | None
    live_artifact: str | None
    ready_pods: int
    problems: list[str] = field(default_factory=list)

    @property
    def agree(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        if self.agree:
            return (
                f"{self.env}: Git and the cluster agree: {self.git_head[:12]} is synced and {self.health}, the Rollout "
                f"is {self.rollout_phase} on {self.git_artifact or '(no artifact)'} with {self.ready_pods} Ready pod(s)"
            )
        return f"{self.env}: Git and the cluster DISAGREE: " + "; ".join(self.problems)


def _git(gitops: Path, *args: str) -> str:
    done = subprocess.run(["git", "--git-dir", str(gitops), *args], capture_output=True, text=True, check=True)
    return done.stdout


def check(
    kubeconfig: Path,
    gitops: Path,
    env: str,
    values_file: str,
    application: str,
    namespace: str,
    rollout: str = "llm-inference",
    branch: str = "main",
) -> Agreement:
    """Compare the branch head of ``gitops`` with the cluster behind ``kubeconfig`` for one environment."""
    head = _git(gitops, "rev-parse", branch).strip()
    values = yaml.safe_load(_git(gitops, "show", f"{head}:{values_file}")) or {}
    artifact = str((values.get("model") or {}).get("artifact") or "")
    api = client.ApiClient(config.new_client_from_config(config_file=str(kubeconfig)).configuration)
    custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
    try:
        app: dict[str, Any] = custom.get_namespaced_custom_object(  # type: ignore[assignment]
            "argoproj.io", "v1alpha1", "argocd", "applications", application
        )
        ro: dict[str, Any] = custom.get_namespaced_custom_object(  # type: ignore[assignment]
            "argoproj.io", "v1alpha1", namespace, "rollouts", rollout
        )
        listed = core.list_namespaced_pod(namespace, label_selector="app.kubernetes.io/name=llm-inference")
        pods: list[dict[str, Any]] = api.sanitize_for_serialization(listed).get("items") or []
    finally:
        api.close()
    status = app.get("status") or {}
    synced = (status.get("sync") or {}).get("revision")
    sync_status = (status.get("sync") or {}).get("status")
    health = (status.get("health") or {}).get("status")
    rstatus = ro.get("status") or {}
    annotations = ((ro["spec"].get("template") or {}).get("metadata") or {}).get("annotations") or {}
    live = annotations.get("modelctl.io/artifact")
    stable, current = rstatus.get("stableRS"), rstatus.get("currentPodHash")
    ready = [p for p in pods if is_ready(p)]
    problems: list[str] = []
    if synced != head or sync_status != "Synced":
        problems.append(f"Argo CD has {sync_status} {str(synced)[:12]}, Git's head is {head[:12]}")
    if health != "Healthy":
        problems.append(f"the Application is {health}, not Healthy")
    if rstatus.get("phase") != "Healthy" or stable != current:
        problems.append(f"the Rollout is {rstatus.get('phase')} (stable {stable}, current {current})")
    if (live or "") != artifact:
        problems.append(f"the Rollout's template runs {live or '(none)'}, Git says {artifact or '(none)'}")
    strays = [
        str(p["metadata"]["name"]) for p in ready if (p["metadata"].get("labels") or {}).get(HASH_LABEL) != stable
    ]
    if strays:
        problems.append(f"Ready pods not on the stable template: {', '.join(strays)}")
    if artifact and not ready:
        problems.append("no Ready pod serves the model")
    return Agreement(
        env=env,
        git_head=head,
        git_artifact=artifact,
        synced_revision=synced,
        health=health,
        rollout_phase=rstatus.get("phase"),
        live_artifact=live,
        ready_pods=len(ready),
        problems=problems,
    )
