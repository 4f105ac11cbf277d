"""A run's terminal shows its steps; everything the libraries print goes to the run's log file.

Real processes: a script prints the way libraries do (print, logging, warnings, a tqdm-like bar, C's stdio, a
child process) inside ``run_log`` and reports steps; the terminal (its captured stdout and stderr) must hold the
step lines only, and the log all the rest.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pipeline.runlog import RunLog

ROOT = Path(__file__).resolve().parent.parent

NOISY = """
import ctypes, logging, subprocess, sys, warnings
from pathlib import Path
from pipeline.runlog import run_log

logging.basicConfig(level=logging.INFO)  # a handler on sys.stderr made before the run, as libraries do
with run_log(Path(sys.argv[1]), name="promote") as log:
    log.step_started("quantize")
    print("grid search line 1 of 200")
    logging.getLogger("llmcompressor").info("bytecode listing")
    warnings.warn("torch_dtype is deprecated")
    sys.stderr.write("\\r 40%|####      | 4/10 [00:01<00:02]")
    libc = ctypes.CDLL(None)
    libc.printf(b"from C stdio\\n")
    subprocess.run(["sh", "-c", "echo from a child; echo child stderr >&2"], check=True)
    log.progress("quantize", 0.5)
    log.step_done("quantize", "done", 12.34, "awq-w4a16-0123456789abcdef")
    log.step_started("preload")
    log.step_done("preload", "skipped", 0.01, "warm entry, verified")
    log.print("# report: promoted")
    if sys.argv[2] == "fail":
        log.step_started("evaluate")
        print("lm-eval: RuntimeError: CUDA out of memory in the evaluator")
        raise RuntimeError("evaluate failed")
    if sys.argv[2] == "decided":
        from pipeline.errors import Decided
        log.step_done("evaluate", "done", 3.2, "")
        raise Decided("the eval gate refused the candidate")
print("after the run: on the terminal again")
"""


def run(tmp_path: Path, mode: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", NOISY, str(tmp_path / "logs"), mode],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )


def test_the_terminal_shows_one_line_per_step_and_the_log_holds_what_the_libraries_print(tmp_path: Path) -> None:
    result = run(tmp_path, "ok")
    assert result.returncode == 0, result.stderr
    (log_file,) = (tmp_path / "logs").glob("promote-*.log")
    lines = result.stdout.splitlines()
    assert lines[0] == f"log: {log_file}"
    assert lines[1].startswith("✓ quantize") and "12.3 s" in lines[1] and "awq-w4a16-0123456789abcdef" in lines[1]
    assert lines[2].startswith("= preload") and "warm entry, verified" in lines[2]
    assert lines[3:] == ["# report: promoted", "after the run: on the terminal again"]
    assert result.stderr == "", "nothing a library printed reached the terminal"

    logged = log_file.read_text()
    for noise in (
        "grid search line 1 of 200",
        "INFO:llmcompressor:bytecode listing",
        "torch_dtype is deprecated",
        "4/10 [00:01<00:02]",
        "from C stdio",
        "from a child",
        "child stderr",
    ):
        assert noise in logged, noise
    assert "quantize" not in logged and "after the run" not in logged


def test_a_failure_shows_the_tail_of_the_log_on_the_terminal(tmp_path: Path) -> None:
    result = run(tmp_path, "fail")
    assert result.returncode == 1
    (log_file,) = (tmp_path / "logs").glob("promote-*.log")
    assert f"the log ends with ({log_file}):" in result.stdout
    assert "  lm-eval: RuntimeError: CUDA out of memory in the evaluator" in result.stdout
    assert "Traceback" in result.stderr and "evaluate failed" in result.stderr, "the error goes on to the caller"
    assert "from a child" in log_file.read_text()


def test_a_decision_shows_no_log_tail_the_command_shows_what_decided(tmp_path: Path) -> None:
    result = run(tmp_path, "decided")
    assert result.returncode == 1
    assert "the log ends with" not in result.stdout and "grid search" not in result.stdout
    assert "the eval gate refused the candidate" in result.stderr, "the error goes on to the caller"


class Terminal:
    """A terminal stand-in: collects what is written, claims to be a tty."""

    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return True


def test_on_a_terminal_a_running_step_shows_a_spinner_with_time_and_progress(tmp_path: Path) -> None:
    now = [100.0]
    terminal = Terminal()
    log = RunLog(tmp_path / "x.log", terminal, clock=lambda: now[0], live=True)  # type: ignore[arg-type]
    log._running["build"] = (now[0], None)
    now[0] += 42
    log.progress("build", 0.25)
    log._draw()
    assert "build 42 s  25%" in terminal.text and terminal.text[0] in "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
    log.step_done("build", "done", detail="tiny-llama")
    assert terminal.text.endswith("\r\x1b[2K✓ build           42.0 s  tiny-llama\n"), repr(terminal.text)
    log.close()
