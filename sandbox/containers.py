"""How the sandbox's kubelet turns a container spec into a local process: image -> argv, env, mounts and ports.

A pod here has no filesystem or network namespace of its own, so both are emulated by rewriting the strings the
container sees: a volume's ``mountPath`` becomes the host directory behind it (:func:`map_paths`, and back again
when logs are served), and a container port becomes the free host port the kubelet gave it (:func:`map_ports`).
"""

from __future__ import annotations

import base64
import os
import re
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import vllm

from .store import BY_KIND, ApiError, Obj, Store

SECRET, CONFIGMAP = BY_KIND["Secret"], BY_KIND["ConfigMap"]
VLLM_PORT = 8000  # vLLM's default --port
BASE_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "USER", "TZ")  # what any container image would have


class ContainerError(Exception):
    """Why a container cannot start: ``reason`` is the waiting reason the pod shows (ErrImagePull, ...)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def repository(image: str) -> str:
    """The image's repository without tag or digest (``vllm/vllm-openai:v0.32.0`` -> ``vllm/vllm-openai``)."""
    name = image.split("@", 1)[0]
    head, _, tail = name.rpartition(":")
    return head if head and "/" not in tail else name


def is_vllm(container: Obj) -> bool:
    """The chart's serving image (any registry): runs as vLLM from the serving runtime."""
    return repository(str(container.get("image") or "")).endswith("vllm-openai")


def declared_port(args: list[str]) -> int | None:
    """The ``--port`` an argv sets (``--port=N`` or ``--port N``), or None."""
    for i, arg in enumerate(args):
        if arg.startswith("--port="):
            return int(arg.split("=", 1)[1])
        if arg == "--port" and i + 1 < len(args):
            return int(args[i + 1])
    return None


@dataclass
class Runtime:
    """What runs containers here: the vLLM and pipeline interpreters, extra env, and images tests register.

    ``images`` maps an image repository (no tag) to a function from the container spec to its argv.
    """

    vllm_python: Path = field(default_factory=vllm.runtime_python)  # $MODELCTL_VLLM_PYTHON, else .venv-vllm
    pipeline_python: Path = field(default_factory=lambda: Path(sys.executable))
    env: dict[str, str] = field(default_factory=dict)
    images: dict[str, Callable[[Obj], list[str]]] = field(default_factory=dict)

    def argv(self, container: Obj) -> tuple[list[str], dict[str, str]]:
        """The argv (before port and path rewriting) and the runtime's env for ``container``.

        Raises:
            ContainerError: ErrImagePull, for an image the sandbox cannot run.
        """
        image = str(container.get("image") or "")
        command = [str(c) for c in container.get("command") or []]
        args = [str(a) for a in container.get("args") or []]
        custom = self.images.get(repository(image))
        if custom is not None:
            return custom(container), {}
        if is_vllm(container):
            rest = args if command[:2] == ["vllm", "serve"] or not command else [*command[2:], *args]
            model = rest[0] if rest and not rest[0].startswith("-") else None
            if model is None:
                model = next((rest[i + 1] for i, a in enumerate(rest[:-1]) if a == "--model"), None)
            if model is None:
                raise ContainerError("RunContainerError", f"{image}: no model path in the args {args}")
            port = declared_port(rest) or VLLM_PORT
            argv = [str(self.vllm_python), "-m", vllm.ENTRYPOINT, *vllm.rewrite_args(rest, model, "127.0.0.1", port)]
            return argv, dict(vllm.SERVER_ENV)
        if command and command[0] in ("python", "python3"):
            return [str(self.pipeline_python), *command[1:], *args], {}
        known = ", ".join(["*/vllm-openai", "a command starting with python", *sorted(self.images)])
        raise ContainerError(
            "ErrImagePull",
            f'Failed to pull image "{image}": the sandbox runs only local processes ({known}); '
            "point the container at one of those",
        )


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pod_ports(pod: Obj) -> list[int]:
    """The container ports of a pod that need a host port: declared ports, vLLM's ``--port``, probe ports."""
    spec = pod.get("spec") or {}
    found: set[int] = set()
    for container in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
        found.update(int(p["containerPort"]) for p in container.get("ports") or [] if "containerPort" in p)
        if is_vllm(container):
            found.add(declared_port([str(a) for a in container.get("args") or []]) or VLLM_PORT)
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            port = ((container.get(kind) or {}).get("httpGet") or {}).get("port")
            if isinstance(port, int) or (isinstance(port, str) and port.isdigit()):
                found.add(int(port))
    return sorted(found)


_PATH_CHAR = r"[\w.\-/~]"


def map_paths(text: str, mounts: dict[str, str]) -> str:
    """Replace each mount path (key) by its target (value) wherever it stands as a whole path or a path prefix.

    ``/models`` matches in ``/models``, ``/models/tiny``, ``"--model=/models/x"`` and inside JSON
    (``{"dir":"/models/x"}``), never in ``/models-old`` or ``/data/models``. Used both ways: mountPath -> host dir
    for what a container is given, host dir -> mountPath for the logs it writes.
    """
    for source in sorted(mounts, key=len, reverse=True):
        source_path = source.rstrip("/") or "/"
        pattern = re.compile(rf"(?<!{_PATH_CHAR}){re.escape(source_path)}(?=/|$|[^\w.\-~])")
        target = mounts[source].rstrip("/") or "/"
        text = pattern.sub(lambda _m: target, text)  # noqa: B023 (used at once, in this iteration)
    return text


def map_ports(text: str, ports: dict[int, int]) -> str:
    """Container ports -> host ports in ``--port=N``, ``127.0.0.1:N`` and ``localhost:N`` (one string)."""

    def swap(match: re.Match[str]) -> str:
        port = int(match.group(2))
        return match.group(1) + str(ports.get(port, port))

    text = re.sub(r"((?:127\.0\.0\.1|localhost):)(\d+)(?!\d)", swap, text)
    return re.sub(r"^(--port=)(\d+)$", swap, text)


def rewrite_argv(argv: list[str], mounts: dict[str, str], ports: dict[int, int]) -> list[str]:
    """Paths and ports of a whole argv (``--port N`` as two words included)."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        if i > 0 and argv[i - 1] == "--port" and arg.isdigit():
            out.append(str(ports.get(int(arg), int(arg))))
        else:
            out.append(map_ports(map_paths(arg, mounts), ports))
    return out


def _key_ref(store: Store, namespace: str, ref: Obj, secret: bool) -> str | None:
    """A Secret's or ConfigMap's key (None when absent)."""
    try:
        obj = store.get(SECRET if secret else CONFIGMAP, namespace, str(ref.get("name") or ""))
    except ApiError:
        return None
    key = str(ref.get("key") or "")
    if secret and key in (obj.get("stringData") or {}):
        return str(obj["stringData"][key])
    data = obj.get("data") or {}
    if key not in data:
        return None
    return base64.b64decode(data[key]).decode() if secret else str(data[key])


def container_env(store: Store, namespace: str, container: Obj) -> dict[str, str]:
    """The container's ``env`` list resolved: values and secretKeyRef/configMapKeyRef (an optional missing key
    stays unset).

    Raises:
        ContainerError: CreateContainerConfigError, for a required key that does not exist (the message names it).
    """
    env: dict[str, str] = {}
    for item in container.get("env") or []:
        name = str(item.get("name"))
        if "valueFrom" not in item:
            env[name] = str(item.get("value", ""))
            continue
        source = item["valueFrom"] or {}
        for kind, secret in (("secretKeyRef", True), ("configMapKeyRef", False)):
            ref = source.get(kind)
            if ref is None:
                continue
            value = _key_ref(store, namespace, ref, secret)
            if value is not None:
                env[name] = value
            elif not ref.get("optional", False):
                what = "secret" if secret else "configmap"
                raise ContainerError(
                    "CreateContainerConfigError",
                    f'{what} "{ref.get("name")}" (key "{ref.get("key")}") not found: env {name} of container '
                    f'"{container.get("name")}" needs it',
                )
    return env


def base_env() -> dict[str, str]:
    """What every container starts with: the host's PATH, HOME and locale, nothing else of the host's env."""
    return {k: os.environ[k] for k in BASE_ENV if k in os.environ}


def exec_argv(command: list[Any], runtime: Runtime, mounts: dict[str, str], ports: dict[int, int]) -> list[str]:
    """An exec probe's command as run here: ``python``/``python3`` is the pipeline's interpreter."""
    argv = rewrite_argv([str(c) for c in command], mounts, ports)
    if argv and argv[0] in ("python", "python3"):
        argv[0] = str(runtime.pipeline_python)
    return argv
