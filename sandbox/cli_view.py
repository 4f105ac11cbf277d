"""What `modelctl sandbox status` shows: Applications, Rollouts and Pods of the SIMULATED cluster, read through its
kubeconfig with the official client, as `kubectl get` would (cluster-wide, or where the identity may not list
cluster-wide, in the namespaces and by the names the sandbox's promotion.yaml gives)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ARGO = "argoproj.io"
Named = dict[str, list[tuple[str, str]]]  # kind -> [(namespace, name)] the sandbox's promotion.yaml names


def _items(api: Any, kind: str, named: Named) -> list[dict[str, Any]] | None:
    """Every object of ``kind`` (applications, rollouts or pods) the identity may see: one cluster-wide list; where
    that is forbidden (403), a list per namespace of ``named``; where that is too, a get of each named object.
    None when nothing of ``kind`` may be read."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)

    def items(namespace: str | None) -> list[dict[str, Any]]:
        if kind == "pods":
            raw = (
                core.list_namespaced_pod(namespace, _preload_content=False)
                if namespace
                else core.list_pod_for_all_namespaces(_preload_content=False)
            )
            data: dict[str, Any] = json.loads(raw.data)  # type: ignore[attr-defined]
        elif namespace:
            data = custom.list_namespaced_custom_object(ARGO, "v1alpha1", namespace, kind)  # type: ignore[assignment]
        else:
            data = custom.list_cluster_custom_object(ARGO, "v1alpha1", kind)  # type: ignore[assignment]
        return list(data.get("items") or [])

    def each(tries: list[Any]) -> list[dict[str, Any]] | None:
        found: list[dict[str, Any]] = []
        for attempt in tries:
            try:
                found += attempt()
            except ApiException as exc:
                if exc.status != 403:
                    raise
                return None
        return found

    refs = named.get(kind, [])
    namespaces = sorted({ns for ns, _ in refs})
    listed = each([lambda: items(None)])
    if listed is None and namespaces:
        listed = each([lambda ns=ns: items(ns) for ns in namespaces])
    if listed is None and refs and kind != "pods":
        listed = each([
            lambda ns=ns, name=name: [custom.get_namespaced_custom_object(ARGO, "v1alpha1", ns, kind, name)]
            for ns, name in refs
        ])  # fmt: skip
    return listed


def cluster_view(kubeconfig: Path, named: Named | None = None) -> dict[str, list[dict[str, Any]] | None]:
    """Applications (sync, health, revision), Rollouts (phase, step, weight, stable and canary hash) and Pods
    (ready, restarts), read with the official client through ``kubeconfig``: in every namespace, or, where the
    kubeconfig's identity may not list them cluster-wide, in the namespaces (or by the names) ``named`` gives.
    A kind the identity may not read at all is None.

    Raises:
        TransientError: the API server did not answer.
    """
    from kubernetes import config
    from kubernetes.client.exceptions import ApiException

    from pipeline.errors import TransientError

    api = config.new_client_from_config(config_file=str(kubeconfig))
    try:
        found = {kind: _items(api, kind, named or {}) for kind in ("applications", "rollouts", "pods")}
    except ApiException as exc:
        raise TransientError(f"the sandbox's API server answered {exc.status} {exc.reason}", hint="retry") from None
    except Exception as exc:  # urllib3's connection errors: the sandbox's API server is not answering
        raise TransientError(f"the sandbox's API server did not answer: {exc}"[:300], hint="is it up?") from None
    finally:
        api.close()
    return {kind: None if objs is None else [ROWS[kind](obj) for obj in objs] for kind, objs in found.items()}


def _name(obj: dict[str, Any]) -> str:
    return f"{obj['metadata'].get('namespace', '')}/{obj['metadata']['name']}"


def _application_row(app: dict[str, Any]) -> dict[str, Any]:
    st = app.get("status") or {}
    return {
        "name": _name(app), "sync": (st.get("sync") or {}).get("status") or "-",
        "health": (st.get("health") or {}).get("status") or "-",
        "revision": ((st.get("sync") or {}).get("revision") or "-")[:12],
        "operation": (st.get("operationState") or {}).get("phase") or "-",
    }  # fmt: skip


def _rollout_row(obj: dict[str, Any]) -> dict[str, Any]:
    from pipeline.rollout import observe_rollout

    seen = observe_rollout(obj)
    return {
        "name": _name(obj), "phase": seen.client_phase + (" (aborted)" if seen.aborted else ""),
        "step": seen.step, "weight": "-" if seen.weight is None else f"{seen.weight}%",
        "stable": seen.stable_rs or "-", "canary": seen.current_pod_hash or "-",
    }  # fmt: skip


def _pod_row(pod: dict[str, Any]) -> dict[str, Any]:
    st = pod.get("status") or {}
    statuses = st.get("containerStatuses") or []
    ready = sum(1 for c in statuses if c.get("ready"))
    return {
        "name": _name(pod), "ready": f"{ready}/{len((pod.get('spec') or {}).get('containers') or [])}",
        "status": st.get("phase") or "-", "restarts": sum(int(c.get("restartCount") or 0) for c in statuses),
        "hash": (pod["metadata"].get("labels") or {}).get("rollouts-pod-template-hash", "-"),
    }  # fmt: skip


ROWS = {"applications": _application_row, "rollouts": _rollout_row, "pods": _pod_row}


def named_in(config: Path) -> Named:
    """The Applications and Rollouts the sandbox's promotion.yaml names, and their namespaces for the pods
    (empty when it cannot be read)."""
    from pipeline.config import load_config
    from pipeline.errors import PipelineError

    try:
        cfg = load_config(config)
    except (PipelineError, OSError):
        return {}
    apps = sorted({(e.argocd.namespace, e.argocd.application) for e in cfg.environments.values() if e.argocd})
    rollouts = sorted({(e.rollout.namespace, e.rollout.name) for e in cfg.environments.values() if e.rollout})
    return {"applications": apps, "rollouts": rollouts, "pods": rollouts}
