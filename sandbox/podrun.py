"""One pod as the kubelet runs it: its containers' processes, restarts, probes, and the status they add up to.

:class:`ContainerRun` is one container (init, native sidecar or main) and its current process; :class:`PodRun`
holds a pod's containers in start order, its host ports and mounts, and computes the pod's ``status`` the way
the kubelet reports it (phase, conditions, container statuses with state, lastState and restartCount).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .containers import map_paths, map_ports
from .probes import Prober
from .store import Obj, now_rfc3339

PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
MAX_BACKOFF_S = 300.0
FIRST_BACKOFF_S = 10.0


@dataclass
class ContainerRun:
    """One container: its spec, role (``init``, ``sidecar``, ``main``) and current process."""

    spec: Obj
    role: str
    log: Path
    mounts: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    state: Obj = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: Obj = field(default_factory=dict)
    restarts: int = 0
    retry_at: float = 0.0  # kubelet clock time before which a crashed container is not restarted
    done: bool = False  # terminated for good (no restart under the pod's policy)
    exit_code: int | None = None
    probes: dict[str, Prober] = field(default_factory=dict)
    stopping: bool = False  # a probe failure asked for a kill: the exit that follows is a restart
    pending_restart: bool = False  # exited, waiting for its back-off to end
    env: dict[str, str] = field(default_factory=dict)  # the process's env (exec probes run with it)

    @property
    def name(self) -> str:
        return str(self.spec.get("name"))

    @property
    def started(self) -> bool:
        """Running, and its startup probe (if any) has passed."""
        startup = self.probes.get("startupProbe")
        has_startup = "startupProbe" in self.spec
        return self.proc is not None and (not has_startup or (startup is not None and startup.ever_succeeded))

    @property
    def ready(self) -> bool:
        """Started, and its readiness probe (if any) passes now."""
        readiness = self.probes.get("readinessProbe")
        has_readiness = "readinessProbe" in self.spec
        return self.started and (not has_readiness or (readiness is not None and readiness.succeeded))

    def stop_probes(self) -> None:
        for prober in self.probes.values():
            prober.stop()
        self.probes.clear()

    def status(self, image_id: str = "") -> Obj:
        """The containerStatuses entry."""
        found: Obj = {
            "name": self.name,
            "image": self.spec.get("image", ""),
            "imageID": image_id,
            "ready": self.ready,
            "started": self.started,
            "restartCount": self.restarts,
            "state": self.state,
            "lastState": self.last_state,
        }
        if self.proc is not None:
            found["containerID"] = f"sandbox://{self.proc.pid}"
        return found


def restart_policy(pod_policy: str, role: str) -> str:
    """A container's effective restart policy: sidecars always restart; init containers never beyond OnFailure."""
    if role == "sidecar":
        return "Always"
    if role == "init" and pod_policy == "Always":
        return "OnFailure"
    return pod_policy


def backoff_s(restarts: int) -> float:
    """CrashLoopBackOff's delay before restart number ``restarts + 1``: 10 s, 20 s, 40 s ... at most 5 min."""
    return float(min(FIRST_BACKOFF_S * 2**restarts, MAX_BACKOFF_S))


@dataclass
class PodRun:
    """A pod the kubelet started: containers in start order (init and sidecars, then main), ports, paths."""

    namespace: str
    name: str
    uid: str
    pod: Obj
    workdir: Path
    ports: dict[int, int]
    containers: list[ContainerRun]
    phase: str = "Pending"
    start_time: str = field(default_factory=now_rfc3339)
    init_done: bool = False
    transitions: dict[str, tuple[str, str]] = field(default_factory=dict)  # condition -> (status, since)

    @property
    def policy(self) -> str:
        return str((self.pod.get("spec") or {}).get("restartPolicy") or "Always")

    @property
    def finished(self) -> bool:
        return self.phase in ("Succeeded", "Failed")

    def mains(self) -> list[ContainerRun]:
        return [c for c in self.containers if c.role == "main"]

    def inits(self) -> list[ContainerRun]:
        return [c for c in self.containers if c.role != "main"]

    def initialized(self) -> bool:
        """Every plain init container completed and every sidecar started, in order (once true, it stays true:
        a sidecar that restarts later does not hold the main containers back)."""
        if not self.init_done:
            self.init_done = all(
                (c.role == "init" and c.done and c.exit_code == 0) or (c.role == "sidecar" and c.started)
                for c in self.inits()
            )
        return self.init_done

    def container(self, name: str | None) -> ContainerRun | None:
        """A container by name; None: the pod's only main container (as `kubectl logs` picks it)."""
        if name is None:
            mains = self.mains()
            return mains[0] if len(mains) == 1 else None
        return next((c for c in self.containers if c.name == name), None)

    def host_paths(self) -> dict[str, str]:
        """Host dir -> mountPath over all containers (for serving logs as the container saw its paths)."""
        return {host: mount for c in self.containers for mount, host in c.mounts.items()}

    def read_log(self, container: str | None) -> str | None:
        """A container's log as the container saw its world: host dirs named by their mount paths again, and
        ``127.0.0.1:<host port>`` by the container port; None for an unknown container."""
        found = self.container(container)
        if found is None:
            return None
        try:
            text = found.log.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        return map_ports(map_paths(text, self.host_paths()), {host: port for port, host in self.ports.items()})

    def _condition(self, kind: str, ok: bool, reason: str | None = None, message: str | None = None) -> Obj:
        status = "True" if ok else "False"
        previous = self.transitions.get(kind)
        since = previous[1] if previous and previous[0] == status else now_rfc3339()
        self.transitions[kind] = (status, since)
        condition: Obj = {"type": kind, "status": status, "lastProbeTime": None, "lastTransitionTime": since}
        if reason:
            condition["reason"] = reason
        if message:
            condition["message"] = message
        return condition

    def status(self, node_ip: str) -> Obj:
        """The pod's status as the kubelet reports it now."""
        initialized = self.initialized()
        mains = self.mains()
        ready = initialized and not self.finished and all(c.ready for c in mains)
        ready = ready and all(c.ready for c in self.inits() if c.role == "sidecar")
        not_ready = None if ready else ("PodCompleted" if self.finished else "ContainersNotReady")
        names = [c.name for c in mains if not c.ready]
        message = f"containers with unready status: [{' '.join(names)}]" if names and not self.finished else None
        conditions = [
            self._condition("PodScheduled", True),
            self._condition("Initialized", initialized, None if initialized else "ContainersNotInitialized"),
            self._condition("ContainersReady", ready, not_ready, message),
            self._condition("Ready", ready, not_ready, message),
        ]
        status: dict[str, Any] = {
            "phase": self.phase,
            "conditions": conditions,
            "hostIP": node_ip,
            "podIP": node_ip,
            "podIPs": [{"ip": node_ip}],
            "startTime": self.start_time,
            "containerStatuses": [c.status() for c in mains],
        }
        if self.inits():
            status["initContainerStatuses"] = [c.status() for c in self.inits()]
        return status
