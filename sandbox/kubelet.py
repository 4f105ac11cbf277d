"""The sandbox's kubelet: schedules pods onto the simulated nodes and runs their containers as local processes.

Every :meth:`Kubelet.tick` (quick; the sandbox calls it about every 0.2 s) binds new PersistentVolumeClaims,
schedules unbound pods (sandbox/scheduler.py), starts the containers of newly bound pods (init containers, then
native sidecars until their startup probe passes, then the main containers), follows exits, restarts and probes,
writes each pod's status, and kills the processes of deleted pods. Containers become processes as
sandbox/containers.py says; probes run in their own threads (sandbox/probes.py).

Every container is its own process group (``pipeline.processes.start``: it also dies with this process, even on
``kill -9``); :meth:`Kubelet.close` ends them all. Pods that arrive with a phase other than Pending (canned pods a
test wrote with their status) are left alone.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipeline import processes

from . import scheduler
from .apiserver import FakeApiServer
from .containers import (
    ContainerError,
    Runtime,
    base_env,
    container_env,
    exec_argv,
    free_port,
    is_vllm,
    map_paths,
    map_ports,
    pod_ports,
    rewrite_argv,
)
from .podrun import ContainerRun, PodRun, backoff_s, restart_policy
from .pods import HOST_PORTS, POD_IP
from .probes import Check, Prober, exec_check, http_check, tcp_check
from .store import BY_KIND, ApiError, Obj, now_rfc3339

CPU_BIND = "VLLM_CPU_OMP_THREADS_BIND"
POD, NODE, PVC = BY_KIND["Pod"], BY_KIND["Node"], BY_KIND["PersistentVolumeClaim"]
MAX_GRACE_S = 5.0


class Kubelet:
    """Runs the pods of the sandbox's nodes as processes; see the module doc."""

    def __init__(
        self,
        server: FakeApiServer,
        workdir: Path,
        runtime: Runtime | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``clock`` times restart back-offs (tests replace it); probes run on real time."""
        self.server = server
        self.store = server.store
        self.workdir = Path(workdir)
        self.runtime = runtime or Runtime()
        self.clock = clock
        self.runs: dict[tuple[str, str], PodRun] = {}
        self._lock = threading.RLock()
        self._killers: list[threading.Thread] = []
        # one long-lived thread starts every process: the parent-death signal follows the thread that forked
        self._launcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kubelet-launcher")
        self._closed = False
        (self.workdir / "pods").mkdir(parents=True, exist_ok=True)
        server.log_provider = self.read_log
        atexit.register(self.close)

    # public --------------------------------------------------------------------------------------------------
    def volume_dir(self, namespace: str, claim: str) -> Path:
        """The host directory behind a PersistentVolumeClaim (created)."""
        path = self.workdir / "volumes" / namespace / claim
        path.mkdir(parents=True, exist_ok=True)
        return path

    def read_log(self, namespace: str, pod: str, container: str | None) -> str | None:
        """A container's log as ``GET pods/{name}/log`` serves it; None for a pod this kubelet never ran.

        Raises:
            ApiError: 400 for a container the pod does not have (or none named in a pod with several).
        """
        with self._lock:
            run = self.runs.get((namespace, pod))
        if run is None:
            return None
        text = run.read_log(container)
        if text is None:
            names = [c.name for c in run.containers]
            raise ApiError(400, "BadRequest", f"a container name must be one of {names} for pod {pod}")
        return text

    def pids(self) -> list[int]:
        """The process (group) ids of every container process running now."""
        with self._lock:
            return [c.proc.pid for r in self.runs.values() for c in r.containers if c.proc is not None]

    def tick(self) -> None:
        """One pass of the kubelet's loop (non-blocking: kills and probes happen in other threads)."""
        with self._lock:
            if self._closed:
                return
            self._bind_claims()
            pods, _ = self.store.list(POD, None)
            self._forget_deleted(pods)
            self._schedule(pods)
            for pod in pods:
                meta = pod["metadata"]
                key = (meta["namespace"], meta["name"])
                if key not in self.runs and pod["spec"].get("nodeName") and self._adoptable(pod):
                    try:
                        self.runs[key] = self._prepare(pod)
                    except ApiError:
                        continue  # deleted meanwhile
                run = self.runs.get(key)
                if run is not None and not run.finished:
                    run.pod = pod
                    self._step(run)
                    self._write_status(run)

    def close(self) -> None:
        """Kill every container process (SIGTERM, SIGKILL after ~5 s) and wait; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for run in self.runs.values():
                self._kill_run(run, MAX_GRACE_S)
            killers = list(self._killers)
        for thread in killers:
            thread.join()
        self._launcher.shutdown(wait=True)
        atexit.unregister(self.close)

    # scheduling ----------------------------------------------------------------------------------------------
    def _bind_claims(self) -> None:
        claims, _ = self.store.list(PVC, None)
        for claim in claims:
            if (claim.get("status") or {}).get("phase") != "Bound":
                meta = claim["metadata"]
                self.volume_dir(meta["namespace"], meta["name"])
                self.store.update(PVC, meta["namespace"], meta["name"], _bound)

    def _schedule(self, pods: list[Obj]) -> None:
        nodes, _ = self.store.list(NODE, None)
        for pod in pods:
            if (pod.get("spec") or {}).get("nodeName") or not self._adoptable(pod):
                continue
            meta = pod["metadata"]
            node, message = scheduler.schedule(pod, nodes, pods)
            if node is not None:
                pod["spec"]["nodeName"] = node  # later pods of this pass see the requests taken
                change = scheduler.bind(node)
            else:
                change = scheduler.unschedulable(message)
            try:
                self.store.update(POD, meta["namespace"], meta["name"], change)
            except ApiError:
                continue  # deleted meanwhile

    @staticmethod
    def _adoptable(pod: Obj) -> bool:
        meta, phase = pod["metadata"], (pod.get("status") or {}).get("phase")
        return not meta.get("deletionTimestamp") and phase in (None, "Pending")

    # starting ------------------------------------------------------------------------------------------------
    def _prepare(self, pod: Obj) -> PodRun:
        """A bound pod's run: host ports (written to its annotation), mounts, log files; nothing started yet."""
        meta, spec = pod["metadata"], pod.get("spec") or {}
        ns, name = meta["namespace"], meta["name"]
        pod_dir = Path(tempfile.mkdtemp(prefix=f"{ns}_{name}.", dir=self.workdir / "pods"))
        ports = {port: free_port() for port in pod_ports(pod)}
        volumes = {v.get("name"): v for v in spec.get("volumes") or []}
        containers: list[ContainerRun] = []
        roles = [
            ("sidecar" if c.get("restartPolicy") == "Always" else "init", c) for c in spec.get("initContainers") or []
        ]
        for role, container in [*roles, *(("main", c) for c in spec.get("containers") or [])]:
            mounts = {}
            for mount in container.get("volumeMounts") or []:
                volume = volumes.get(mount.get("name")) or {}
                if "persistentVolumeClaim" in volume:
                    host = self.volume_dir(ns, volume["persistentVolumeClaim"].get("claimName", ""))
                else:  # emptyDir and anything else: a directory of this pod
                    host = pod_dir / "volumes" / str(mount.get("name"))
                    host.mkdir(parents=True, exist_ok=True)
                mounts[str(mount["mountPath"])] = str(host)
            log = self.workdir / "pods" / f"{ns}_{name}.{container.get('name')}.log"
            log.write_bytes(b"")  # a new pod of an old name starts a new log
            containers.append(ContainerRun(container, role, log, mounts))
        annotation = json.dumps({str(k): v for k, v in ports.items()}, sort_keys=True)
        self.store.update(
            POD, ns, name, lambda o: o["metadata"].setdefault("annotations", {}).update({HOST_PORTS: annotation})
        )
        return PodRun(ns, name, meta["uid"], pod, pod_dir, ports, containers)

    def _start(self, run: PodRun, c: ContainerRun) -> None:
        """Start a container's process (or leave it waiting with the reason it cannot start)."""
        # only what the container spec says is rewritten (never the runtime's interpreter or the host's PATH)
        spec = dict(c.spec)
        for key in ("command", "args"):
            spec[key] = rewrite_argv([str(a) for a in c.spec.get(key) or []], c.mounts, run.ports)
        try:
            argv, image_env = self.runtime.argv(spec)
            own = container_env(self.store, run.namespace, c.spec)
        except ContainerError as exc:
            c.state = {"waiting": {"reason": exc.reason, "message": exc.message}}
            return
        own = {k: map_ports(map_paths(v, c.mounts), run.ports) for k, v in own.items()}
        env = {**base_env(), **self.runtime.env, **image_env, **own}
        if is_vllm(c.spec) and CPU_BIND not in env:  # a CPU manager's static policy: one core per vLLM
            env[CPU_BIND] = str(self._free_core())
        with c.log.open("ab") as log:
            future = self._launcher.submit(
                processes.start,
                argv,
                grace_s=MAX_GRACE_S,
                env=env,
                cwd=str(run.workdir),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            try:
                c.proc = future.result()
            except OSError as exc:
                c.state = {"waiting": {"reason": "RunContainerError", "message": f"cannot run {argv[0]}: {exc}"}}
                return
        c.state = {"running": {"startedAt": now_rfc3339()}}
        c.stopping, c.env = False, env
        if "startupProbe" in c.spec:
            self._probe(run, c, "startupProbe", env)

    def _free_core(self) -> int:
        """The core the fewest running vLLM containers are bound to. vLLM binds its compute threads to core 0 by
        default: a stable and a canary pod would share one core while the other idles, and the slower one would
        slow the faster one down (benchmarks/sandbox_models.py measured a verdict flipped by it)."""
        used = [0] * (os.cpu_count() or 1)
        for run in self.runs.values():
            for other in run.containers:
                bound = other.env.get(CPU_BIND, "")
                if other.proc is not None and other.proc.poll() is None and bound.isdigit() and int(bound) < len(used):
                    used[int(bound)] += 1
        return min(range(len(used)), key=lambda core: used[core])

    def _probe(self, run: PodRun, c: ContainerRun, kind: str, env: dict[str, str]) -> None:
        spec = c.spec[kind]
        check: Check

        def host_port(port: object) -> int:  # a container port (number or name) -> the pod's port on this host
            if isinstance(port, str) and not port.isdigit():
                declared = [p for p in c.spec.get("ports") or [] if p.get("name") == port]
                port = declared[0]["containerPort"] if declared else 0
            number = int(str(port or 0))
            return run.ports.get(number, number)

        if "httpGet" in spec:
            get = spec["httpGet"]
            check = http_check(host_port(get.get("port")), str(get.get("path") or "/"), get.get("scheme", "HTTP"))
        elif "tcpSocket" in spec:
            check = tcp_check(host_port(spec["tcpSocket"].get("port")))
        elif "exec" in spec:
            argv = exec_argv(spec["exec"].get("command") or [], self.runtime, c.mounts, run.ports)
            check = exec_check(argv, env, str(run.workdir))
        else:  # grpc: not emulated, always passing
            check = _always
        prober = Prober(kind, spec, check)
        c.probes[kind] = prober
        prober.start()

    # running -------------------------------------------------------------------------------------------------
    def _step(self, run: PodRun) -> None:
        """Advance a pod: init containers in order, sidecars until started, then the main containers; its phase."""
        for c in run.inits():
            self._drive(run, c)
            if c.role == "init" and c.done and c.exit_code != 0:
                self._finish(run, "Failed")
                return
            waiting = not c.done if c.role == "init" else not c.started
            if waiting and not run.initialized():
                return
        for c in run.mains():
            self._drive(run, c)
        mains = run.mains()
        if all(c.done for c in mains):
            self._finish(run, "Succeeded" if all(c.exit_code == 0 for c in mains) else "Failed")
        elif any(c.proc is not None or c.restarts for c in mains):
            run.phase = "Running"

    def _drive(self, run: PodRun, c: ContainerRun) -> None:
        """Start, restart, probe or reap one container."""
        if c.done:
            return
        if c.proc is None:
            if self.clock() >= c.retry_at:
                if c.pending_restart:
                    c.restarts, c.pending_restart = c.restarts + 1, False
                self._start(run, c)
            return
        if c.started:
            for kind in ("readinessProbe", "livenessProbe"):
                if kind in c.spec and kind not in c.probes:
                    self._probe(run, c, kind, c.env)
        failed = [k for k in ("startupProbe", "livenessProbe") if k in c.probes and c.probes[k].failed]
        if failed and not c.stopping:
            c.stopping = True
            self._kill_container(c, _grace(run.pod))
        code = c.proc.poll()
        if code is None:
            return
        c.stop_probes()
        processes.stop(c.proc, grace_s=0)  # the rest of its group goes with it, and its watchdog
        exit_code = code if code >= 0 else 128 - code
        reason = "Completed" if exit_code == 0 else "Error"
        started = (c.state.get("running") or {}).get("startedAt")
        terminated = {"exitCode": exit_code, "reason": reason, "startedAt": started, "finishedAt": now_rfc3339()}
        c.proc, c.exit_code = None, exit_code
        policy = restart_policy(run.policy, c.role)
        if policy == "Always" or (policy == "OnFailure" and exit_code != 0):
            delay = backoff_s(c.restarts)
            c.last_state = {"terminated": terminated}
            c.retry_at, c.pending_restart = self.clock() + delay, True
            message = f"back-off {delay:g}s restarting failed container={c.name} pod={run.name}"
            c.state = {"waiting": {"reason": "CrashLoopBackOff", "message": message}}
        else:
            c.state = {"terminated": terminated}
            c.done = True

    def _finish(self, run: PodRun, phase: str) -> None:
        """The pod is over: its sidecars (and anything still running) are stopped."""
        for c in run.containers:
            c.stop_probes()
            if c.proc is not None:
                self._kill_container(c, _grace(run.pod))
                c.state = {"terminated": {"exitCode": 0, "reason": "Completed", "finishedAt": now_rfc3339()}}
                c.proc = None
        run.phase = phase

    def _write_status(self, run: PodRun) -> None:
        status = run.status(POD_IP)
        with contextlib.suppress(ApiError):  # deleted meanwhile: the next tick forgets it
            self.store.update(POD, run.namespace, run.name, lambda o: o.__setitem__("status", status))

    # stopping ------------------------------------------------------------------------------------------------
    def _kill_container(self, c: ContainerRun, grace_s: float) -> None:
        """Stop a container's process group in the background (the tick does not wait)."""
        proc = c.proc
        if proc is None:
            return
        thread = threading.Thread(target=processes.stop, args=(proc, grace_s), name="kubelet-kill", daemon=True)
        self._killers = [t for t in self._killers if t.is_alive()] + [thread]
        thread.start()

    def _kill_run(self, run: PodRun, grace_s: float) -> None:
        for c in run.containers:
            c.stop_probes()
            self._kill_container(c, grace_s)

    def _forget_deleted(self, pods: list[Obj]) -> None:
        """Kill the processes of pods deleted from the store (or being deleted), then forget them."""
        present = {(p["metadata"]["namespace"], p["metadata"]["name"]): p for p in pods}
        for key, run in list(self.runs.items()):
            pod = present.get(key)
            if pod is not None and pod["metadata"]["uid"] == run.uid and not pod["metadata"].get("deletionTimestamp"):
                continue
            self._kill_run(run, _grace(run.pod))
            del self.runs[key]
            if pod is not None and pod["metadata"].get("deletionTimestamp"):
                with contextlib.suppress(ApiError):
                    self.store.delete(POD, key[0], key[1])


def _always(timeout_s: float) -> bool:
    return True


def _grace(pod: Obj) -> float:
    """The pod's terminationGracePeriodSeconds, capped at 5 s here."""
    return min(float((pod.get("spec") or {}).get("terminationGracePeriodSeconds", 30)), MAX_GRACE_S)


def _bound(claim: Obj) -> None:
    claim.setdefault("status", {})["phase"] = "Bound"
