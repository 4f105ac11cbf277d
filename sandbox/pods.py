"""What the sandbox's parts agree on about pods: readiness, selectors, and where a pod's ports are on this host.

Every pod of the sandbox runs on 127.0.0.1. The kubelet gives each container port a free host port and writes
the mapping into the pod's annotation ``HOST_PORTS`` (JSON: container port number as a string -> host port); the
Service proxies and Prometheus read it with :func:`host_port`. A pod takes traffic once its ``Ready`` condition is
True, as a real endpoints controller decides.
"""

from __future__ import annotations

import json
from typing import Any

Obj = dict[str, Any]

HOST_PORTS = "sandbox.modelctl.io/host-ports"
POD_IP = "127.0.0.1"
HASH_LABEL = "rollouts-pod-template-hash"


def is_ready(pod: Obj) -> bool:
    """The pod's Ready condition is True (and it is not being deleted)."""
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def selects(selector: dict[str, str] | None, labels: dict[str, str] | None) -> bool:
    """A map selector (a Service's ``spec.selector``, a ``matchLabels``): every pair present. An empty or missing
    selector selects nothing, as a Service without a selector gets no endpoints."""
    if not selector:
        return False
    labels = labels or {}
    return all(labels.get(key) == value for key, value in selector.items())


def container_port(pod: Obj, port: int | str) -> int | None:
    """A port as a Service's ``targetPort`` or a PodMonitor's ``port`` names it: a number, or a container port's
    name looked up in the pod's containers."""
    if isinstance(port, int) or (isinstance(port, str) and port.isdigit()):
        return int(port)
    for container in (pod.get("spec") or {}).get("containers") or []:
        for declared in container.get("ports") or []:
            if declared.get("name") == port:
                return int(declared["containerPort"])
    return None


def host_ports(pod: Obj) -> dict[int, int]:
    """The pod's container ports -> host ports, as the kubelet wrote them ({} before it started the pod)."""
    text = ((pod.get("metadata") or {}).get("annotations") or {}).get(HOST_PORTS)
    if not text:
        return {}
    return {int(k): int(v) for k, v in json.loads(text).items()}


def host_port(pod: Obj, port: int | str) -> int | None:
    """Where ``port`` (number or name) of ``pod`` listens on this host; None when unknown or not started."""
    number = container_port(pod, port)
    return None if number is None else host_ports(pod).get(number)
