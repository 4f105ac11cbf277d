"""Start and stop a local OpenAI-compatible server on a model directory (the local environment only).

It runs `transformers serve` (CPU is fine; ``--continuous-batching`` lets it batch concurrent streams) on
127.0.0.1 and a free port, pinned to the one model directory, waits until ``/health`` answers, and always
stops it (the whole process group) when the block ends. If it fails to start, the error carries the tail of
its log. Note that `transformers serve` rejects unknown request fields and answers only for the exact model
path it pinned: send ``LocalServer.model`` as the model name.

Example:
    >>> with local_server("demo-output/tiny") as server:  # doctest: +SKIP
    ...     report = run_load(Target(server.url, server.model), profile, prompts)
"""

from __future__ import annotations

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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import TerminalError, TransientError
from pipeline.secrets import redact

SERVING_MODULES = ("fastapi", "uvicorn", "openai")  # what `transformers[serving]` adds
_LAUNCH = "from transformers.cli.transformers import main; main()"


@dataclass(frozen=True)
class LocalServer:
    """A running server: its base URL, the model name requests must carry, its process id and log file."""

    url: str
    model: str
    pid: int
    log_path: Path
    startup_s: float


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


def _check(model_dir: Path) -> None:
    """Validate before starting anything.

    Raises:
        TerminalError: the directory is not a model, or `transformers serve`'s dependencies are missing.
    """
    if not (model_dir / "config.json").is_file():
        raise TerminalError(
            f"{model_dir} is not a model directory (no config.json)",
            hint="pass the directory of a saved model or quantized artifact",
        )
    missing = [name for name in SERVING_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise TerminalError(
            f"`transformers serve` cannot run: missing {', '.join(missing)}",
            hint="install the serving extra: pip install 'transformers[serving]' (within constraints.txt)",
        )


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1.0) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _stop(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """Stop the server's whole process group: SIGTERM, then SIGKILL after ``grace_s``."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(grace_s)
    except ProcessLookupError:
        pass


@contextmanager
def local_server(
    model_dir: str | Path,
    *,
    port: int | None = None,
    continuous_batching: bool = False,
    startup_timeout_s: float = 180.0,
    log_dir: Path | None = None,
    device: str = "cpu",
) -> Iterator[LocalServer]:
    """Serve ``model_dir`` with `transformers serve` on 127.0.0.1 for the duration of the block; always stop it.

    Raises:
        TerminalError: bad model directory, missing serving dependencies, or the server exited while starting
            (the message carries its log tail).
        TransientError: the server did not become healthy within ``startup_timeout_s`` (log tail included).
    """
    model = Path(model_dir).expanduser().resolve()
    _check(model)
    port = port or free_port()
    logs = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="modelctl-serve-"))
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"serve-{port}.log"
    hub_cache = logs / "hub-cache"  # an empty Hub cache: offline, and /v1/models answers instead of failing
    hub_cache.mkdir(exist_ok=True)
    cmd = [sys.executable, "-c", _LAUNCH, "serve", str(model), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--device", device, "--log-level", "info"]
    cmd += ["--continuous-batching"] if continuous_batching else []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache)}
    env["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        while not _healthy(url):
            if proc.poll() is not None:
                raise TerminalError(
                    f"the local server for {model.name} exited with code {proc.returncode} while starting; "
                    f"its log ends with:\n{log_tail(log_path)}",
                    hint=f"read the whole log at {log_path}; check the model loads with transformers",
                )
            if time.perf_counter() - started > startup_timeout_s:
                raise TransientError(
                    f"the local server for {model.name} was not healthy after {startup_timeout_s:g} s; "
                    f"its log ends with:\n{log_tail(log_path)}",
                    hint="raise the start-up timeout on a slow machine, or read the whole log at " + str(log_path),
                )
            time.sleep(0.2)
        yield LocalServer(url, str(model), proc.pid, log_path, round(time.perf_counter() - started, 2))
    finally:
        _stop(proc)
