"""Start and stop a local OpenAI-compatible server on a model directory: the gates' server here.

The default engine is vLLM, the engine production runs: the same release as the chart's image, from its own
environment (``.venv-vllm``, built by ``make vllm``), started with the args the chart gives the vLLM container
for the environment's values (only the model path, host and port rewritten: see pipeline/vllm.py). The
fallback engine, for platforms with no vLLM build, is `transformers serve` (``--continuous-batching`` lets it
batch concurrent streams; it rejects unknown request fields and returns no prompt logprobs).

Either way the server listens on 127.0.0.1 and a free port, the block waits until ``/health`` answers, and the
server is always stopped (its whole process group, grandchildren too) when the block ends, on an error or on
Ctrl-C. If it fails to start, the error carries the tail of its log. Send ``LocalServer.model`` as the model
name (vLLM's ``--served-model-name`` from the chart; for transformers, the model path it pinned).

Example:
    >>> with local_server("demo-output/tiny") as server:  # doctest: +SKIP
    ...     report = run_load(Target(server.url, server.model), profile, prompts)
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline import processes, vllm
from pipeline.errors import TerminalError, TransientError
from pipeline.secrets import redact

SERVING_MODULES = ("fastapi", "uvicorn", "openai")  # what `transformers[serving]` adds
_LAUNCH = "from transformers.cli.transformers import main; main()"
Engine = Literal["vllm", "transformers"]
ENGINES: tuple[Engine, ...] = ("vllm", "transformers")
EXTERNAL_URL = "MODELCTL_VLLM_URL"  # set in a Job's pod whose vLLM sidecar serves the step's model


class ServerStartError(TerminalError):
    """The server exited while starting; ``log_path`` holds its whole log (the message carries the tail)."""

    def __init__(self, what: str, *, hint: str | None = None, log_path: Path) -> None:
        self.log_path = log_path
        super().__init__(what, hint=hint)


@dataclass(frozen=True)
class LocalServer:
    """A running server: its base URL, the model name requests must carry, its process id and log file, and which
    engine (and release) serves, for reports."""

    url: str
    model: str
    pid: int
    log_path: Path
    startup_s: float
    engine: str = "transformers"
    version: str = ""
    argv: tuple[str, ...] = ()
    exit_code: Callable[[], int | None] = field(default=lambda: None, compare=False, repr=False)

    def check_alive(self) -> None:
        """Raise if the server has exited (e.g. killed or crashed during a gate).

        Raises:
            TransientError: the server is gone; the message carries its exit code and log tail.
        """
        code = self.exit_code()
        if code is not None:
            if self.pid > 0:  # what it leaves behind (its engine core, workers) goes now, not at the block's end
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.pid, signal.SIGKILL)
                deadline = time.monotonic() + 10.0
                while processes.group_alive(self.pid) and time.monotonic() < deadline:
                    time.sleep(0.05)
            raise TransientError(
                f"the {self.engine} server (pid {self.pid}) died with exit code {code} while it was being measured; "
                f"its log ends with:\n{log_tail(self.log_path)}",
                hint=f"read the whole log at {self.log_path} (out of memory? killed?); the gate is retried",
            )

    @property
    def served_by(self) -> str:
        """``vllm 0.32.0`` or ``transformers 5.x``: what reports name as the engine that served the gates."""
        return f"{self.engine} {self.version}".strip()


def choose_engine(model_dir: str | Path) -> tuple[Engine, str | None]:
    """The engine that serves ``model_dir`` for the gates here, and why it is not vLLM when it is not.

    vLLM by default (in a Job's pod its sidecar always serves). Only where this machine's vLLM build cannot serve
    the artifact's format (:func:`pipeline.vllm.cpu_unsupported`) does it fall back to `transformers serve`, and the
    reason travels into the record and the report: a fallback is never silent.
    """
    if os.environ.get(EXTERNAL_URL):
        return "vllm", None
    if vllm.cpu_unsupported(Path(model_dir)) is None:
        return "vllm", None
    return "transformers", f"vLLM {vllm.chart_version()}'s CPU build here has no W4A16 kernel (no AVX-512)"


def engine_version(engine: Engine) -> str:
    """The release of ``engine`` that serves here: vLLM's runtime (else the chart's pin), or transformers'."""
    if engine == "vllm":
        return vllm.runtime_version() or vllm.chart_version()
    return _transformers_version()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def log_tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a log file, secrets redacted (empty when there is no log)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return redact("\n".join(text.splitlines()[-lines:]))


def _check(model_dir: Path, engine: str) -> None:
    """Validate before starting anything.

    Raises:
        TerminalError: an unknown engine, the directory is not a model, or the engine's runtime is missing.
    """
    if engine not in ENGINES:
        raise TerminalError(f"unknown serving engine {engine!r}", hint=f"use one of: {', '.join(ENGINES)}")
    if not (model_dir / "config.json").is_file():
        raise TerminalError(
            f"{model_dir} is not a model directory (no config.json)",
            hint="pass the directory of a saved model or quantized artifact",
        )
    if engine == "vllm":
        vllm.check_runtime()
        return
    missing = [name for name in SERVING_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise TerminalError(
            f"`transformers serve` cannot run: missing {', '.join(missing)}",
            hint="install the serving extra: pip install 'transformers[serving]' (within constraints.txt)",
        )


def _transformers_command(model: Path, port: int, device: str, continuous_batching: bool) -> list[str]:
    cmd = [sys.executable, "-c", _LAUNCH, "serve", str(model), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--device", device, "--log-level", "info"]
    return cmd + (["--continuous-batching"] if continuous_batching else [])


def _transformers_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformers")
    except PackageNotFoundError:
        return ""


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1.0) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _external(url: str, model: Path, timeout_s: float) -> LocalServer:
    """The vLLM sidecar of a Job's pod, once healthy (it was started with the chart's args for ``model``).

    Raises:
        TransientError: it did not become healthy within ``timeout_s``.
    """
    started = time.perf_counter()
    while not _healthy(url):
        if time.perf_counter() - started > timeout_s:
            raise TransientError(
                f"the vLLM sidecar at {url} was not healthy after {timeout_s:g} s",
                hint="read its log: kubectl logs <pod> -c vllm",
            )
        time.sleep(1.0)
    name = os.environ.get("MODELCTL_VLLM_MODEL") or str(model)
    elapsed = round(time.perf_counter() - started, 2)
    return LocalServer(url, name, 0, Path(os.devnull), elapsed, "vllm", vllm.chart_version(), ())


@contextmanager
def local_server(
    model_dir: str | Path,
    *,
    engine: Engine = "vllm",
    values: dict[str, Any] | None = None,
    port: int | None = None,
    continuous_batching: bool = False,
    startup_timeout_s: float = 600.0,
    log_dir: Path | None = None,
    device: str = "cpu",
) -> Iterator[LocalServer]:
    """Serve ``model_dir`` on 127.0.0.1 for the duration of the block; always stop it.

    ``engine="vllm"`` starts vLLM with the args the chart renders for ``values`` (an environment's values file
    as a dict; default: the local environment's); ``engine="transformers"`` starts `transformers serve`.

    Raises:
        TerminalError: bad model directory, missing runtime, or the server exited while starting (the message
            carries its log tail: vLLM's own reason).
        TransientError: the server did not become healthy within ``startup_timeout_s`` (log tail included).
    """
    model = Path(model_dir).expanduser().resolve()
    external = os.environ.get(EXTERNAL_URL) if engine == "vllm" else None
    if external:  # in a Job's pod: vLLM already runs beside this container (pipeline/jobs.py), serving model_dir
        yield _external(external, model, startup_timeout_s)
        return
    _check(model, engine)
    port = port or free_port()
    if engine == "vllm":
        python = vllm.runtime_python()
        cmd = vllm.server_argv(python, model, vllm.load_values() if values is None else values, "127.0.0.1", port)
        name, version = vllm.served_name(cmd, str(model)), vllm.runtime_version(python) or ""
    else:
        cmd = _transformers_command(model, port, device, continuous_batching)
        name, version = str(model), _transformers_version()
    logs = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="modelctl-serve-"))
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"serve-{port}.log"
    hub_cache = logs / "hub-cache"  # an empty Hub cache: offline, and /v1/models answers instead of failing
    hub_cache.mkdir(exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache)}
    env["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
    if engine == "vllm":
        env = {**env, **vllm.SERVER_ENV, **{k: v for k, v in os.environ.items() if k.startswith("VLLM_")}}
        env.pop("PYTHONPATH", None)  # the vLLM environment must not see this one's packages
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    with log_path.open("wb") as log:
        proc = processes.start(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)  # dies with us, grandchildren too
    try:
        while not _healthy(url):
            if proc.poll() is not None:
                raise ServerStartError(
                    f"the {engine} server for {model.name} exited with code {proc.returncode} while starting; "
                    f"its log ends with:\n{log_tail(log_path)}",
                    hint=f"read the whole log at {log_path}; check the model loads with {engine}",
                    log_path=log_path,
                )
            if time.perf_counter() - started > startup_timeout_s:
                raise TransientError(
                    f"the {engine} server for {model.name} was not healthy after {startup_timeout_s:g} s; "
                    f"its log ends with:\n{log_tail(log_path)}",
                    hint="raise the start-up timeout on a slow machine, or read the whole log at " + str(log_path),
                )
            time.sleep(0.2)
        startup_s = round(time.perf_counter() - started, 2)
        yield LocalServer(url, name, proc.pid, log_path, startup_s, engine, version, tuple(cmd), proc.poll)
    finally:
        processes.stop(proc)
