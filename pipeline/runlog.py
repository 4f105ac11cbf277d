"""A run's output for a person: one line per step on the terminal, everything else in a per-run log file.

Inside :func:`run_log`, file descriptors 1 and 2 point at ``<dir>/<name>-<time>.log`` (``os.dup2``), so whatever
the libraries print lands there: Python logging and warnings, tqdm bars, C extensions writing to fd 1/2, and
child processes (which inherit the descriptors). ``sys.stdout``/``sys.stderr`` write there too. The terminal
keeps a handle of its own, on which :class:`RunLog` prints the log's path, then one line per step as it ends
(mark, name, seconds, outcome), a spinner with elapsed time (and a fraction, when known) while a step runs on a
terminal, and on failure the log's tail. ``log.print(...)`` writes to the terminal (the final report).

Example:
    >>> with run_log(Path("demo-output/logs"), name="promote") as log:  # doctest: +SKIP
    ...     log.step_started("quantize")
    ...     artifact = quantize(...)
    ...     log.step_done("quantize", "done", 12.3, artifact.id)
"""

from __future__ import annotations

import ctypes
import io
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from pipeline.errors import Decided
from pipeline.secrets import redact

MARKS = {"done": "✓", "passed": "✓", "succeeded": "✓", "skipped": "=", "failed": "✗", "rejected": "✗"}
SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
TAIL_LINES = 20
Clock = Callable[[], float]


def _terminal(stream: Any) -> tuple[IO[str], bool]:
    """A text handle on where ``stream`` goes now, that survives fd 1/2 being pointed elsewhere; and whether we
    own it."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return stream, False  # not a file descriptor (a test runner's buffer): write to the object itself
    return os.fdopen(os.dup(fd), "w", buffering=1, encoding="utf-8", errors="replace"), True


class RunLog:
    """The step printer of one run (see the module doc); made by :func:`run_log`."""

    def __init__(self, path: Path, terminal: IO[str], *, clock: Clock = time.monotonic, live: bool | None = None):
        self.path = path
        self.terminal = terminal
        self.clock = clock
        self.live = terminal.isatty() if live is None else live  # a spinner only where a person watches
        self.width = shutil.get_terminal_size((100, 24)).columns
        self._lock = threading.Lock()
        self._running: dict[str, tuple[float, float | None]] = {}  # step -> (started, fraction)
        self._stop = threading.Event()
        self._spinner: threading.Thread | None = None
        self._frame = 0

    def print(self, text: str = "") -> None:
        """Write ``text`` and a newline to the terminal (above the spinner line)."""
        with self._lock:
            self._clear()
            self.terminal.write(text + "\n")
            self._draw()
            self.terminal.flush()

    def _clear(self) -> None:
        """Erase the spinner line (a terminal only)."""
        if self.live:
            self.terminal.write("\r\x1b[2K")

    def fit(self, line: str) -> str:
        """``line`` cut to the terminal's width (ending in an ellipsis when cut)."""
        return self._fit(line)

    def _fit(self, line: str) -> str:
        return line if len(line) <= self.width else line[: self.width - 1] + "…"

    def step_started(self, name: str) -> None:
        """A step began: on a terminal its spinner turns until :meth:`step_done`."""
        with self._lock:
            self._running[name] = (self.clock(), None)
        if self.live and self._spinner is None:
            self._spinner = threading.Thread(target=self._spin, name="runlog-spinner", daemon=True)
            self._spinner.start()

    def progress(self, name: str, fraction: float) -> None:
        """How far a running step is (0..1), shown beside its spinner."""
        with self._lock:
            if name in self._running:
                self._running[name] = (self._running[name][0], max(0.0, min(1.0, fraction)))

    def step_done(self, name: str, status: str, seconds: float | None = None, detail: str = "") -> None:
        """A step ended: one line with its mark, name, time and outcome (``status``: done/skipped/failed/...)."""
        with self._lock:
            started = self._running.pop(name, None)
            if seconds is None:
                seconds = self.clock() - started[0] if started else 0.0
            mark = MARKS.get(status, "•")
            outcome = detail or status
            line = self._fit(f"{mark} {name:<12} {seconds:>7.1f} s  {redact(outcome)}")
            self._clear()
            self.terminal.write(line + "\n")
            self._draw()
            self.terminal.flush()

    def _draw(self) -> None:
        """The spinner line of the running steps (a terminal only)."""
        if not self.live or not self._running:
            return
        now = self.clock()
        parts = []
        for name, (started, fraction) in self._running.items():
            done = f" {fraction:4.0%}" if fraction is not None else ""
            parts.append(f"{name} {now - started:.0f} s{done}")
        frame = SPINNER[self._frame % len(SPINNER)]
        self.terminal.write(self._fit(f"{frame} " + ", ".join(parts)))

    def _spin(self) -> None:
        while not self._stop.wait(0.1):  # a redraw interval on a terminal, not a timing anything depends on
            with self._lock:
                if not self._running:
                    continue
                self._frame += 1
                self._clear()
                self._draw()
                self.terminal.flush()

    def tail(self, lines: int = TAIL_LINES) -> str:
        """The last ``lines`` lines of the log, secrets redacted."""
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return redact("\n".join(text.splitlines()[-lines:]))

    def close(self) -> None:
        self._stop.set()
        if self._spinner is not None:
            self._spinner.join()
        with self._lock:
            if self._running:
                self._clear()
            self._running.clear()
            self.terminal.flush()


@contextmanager
def run_log(
    directory: Path,
    *,
    name: str = "run",
    clock: Clock = time.monotonic,
    live: bool | None = None,
    on_stderr: bool = False,
) -> Iterator[RunLog]:
    """Send everything printed in the block (fd 1 and 2, this process and its children) to a new log file in
    ``directory``; yield the :class:`RunLog` that prints steps on the terminal (on stderr with ``on_stderr``, so
    that stdout carries a command's JSON alone). On an exception the terminal shows the log's tail (not for a
    :class:`~pipeline.errors.Decided` one: the command shows what decided), then the exception goes on."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    path = directory / f"{name}-{stamp}-{os.getpid()}.log"
    terminal, owned = _terminal(sys.stderr if on_stderr else sys.stdout)
    saved_streams: tuple[Any, Any] = (sys.stdout, sys.stderr)
    for stream in saved_streams:
        _flush(stream)
    saved = os.dup(1), os.dup(2)
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    text = open(path, "a", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115 - kept open, below
    sys.stdout = sys.stderr = text
    log = RunLog(path, terminal, clock=clock, live=live)
    log.print(f"log: {path}")
    failed: BaseException | None = None
    try:
        yield log
    except BaseException as exc:
        failed = exc
        raise
    finally:
        _flush(text)
        _flush_c_stdio()  # what C code buffered belongs to the log, not to the terminal after the restore
        sys.stdout, sys.stderr = saved_streams
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
        # ``text`` stays open: a library that took sys.stderr inside the block (Prefect's console handler) logs
        # again at exit (its server stopping), and that belongs to the log, not to an error on a closed file.
        log.close()
        if failed is not None and not isinstance(failed, (KeyboardInterrupt, SystemExit, Decided)):
            tail = log.tail()
            if tail:
                log.print(f"the log ends with ({path}):")
                log.print("\n".join(f"  {line}" for line in tail.splitlines()))
        if owned:
            terminal.close()


def _flush_c_stdio() -> None:
    with suppress(OSError, AttributeError):
        ctypes.CDLL(None).fflush(None)


def _flush(stream: Any) -> None:
    with suppress(AttributeError, OSError, ValueError):
        stream.flush()
