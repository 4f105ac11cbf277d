"""What every command shares: consoles, --json output, error handling, progress bars."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stdout
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from pipeline.errors import PipelineError, TransientError

out = Console(soft_wrap=True)
err = Console(stderr=True)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")]


def emit_json(data: Any) -> None:
    """Print ``data`` as the command's one JSON object on stdout (on one line inside a pipeline Job)."""
    indent = None if os.environ.get("MODELCTL_JSON_ONE_LINE") == "1" else 2
    sys.stdout.write(json.dumps(data, indent=indent, default=str) + "\n")


@contextmanager
def errors(as_json: bool) -> Iterator[None]:
    """Turn pipeline errors into a clear message and an exit code; anything else is a bug and stays loud.

    TerminalError exits 2 (fix the input), TransientError exits 75 (try again).
    """
    try:
        yield
    except PipelineError as exc:
        code = 75 if isinstance(exc, TransientError) else 2
        if as_json:
            kind = "transient" if isinstance(exc, TransientError) else "terminal"
            problems = getattr(exc, "problems", None)
            emit_json({"ok": False, "error": kind, "message": exc.what, "problems": problems, "hint": exc.hint})
        else:
            err.print(f"[bold red]error:[/] {exc.what}", highlight=False, markup=True, soft_wrap=True)
            if exc.hint:
                err.print(f"[bold]fix:[/] {exc.hint}", highlight=False, soft_wrap=True)
        raise typer.Exit(code) from None


@contextmanager
def progress(enabled: bool) -> Iterator[Callable[[str, float], None] | None]:
    """A rich progress bar fed by a library callback ``(message, fraction)``.

    Under --json there is no bar, and whatever the libraries print meanwhile goes to stderr, so stdout carries
    nothing but the command's one JSON object.
    """
    if not enabled:
        with redirect_stdout(sys.stderr):
            yield None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"))
    with Progress(*columns, TimeElapsedColumn(), console=err, transient=True) as bar:
        task = bar.add_task("starting", total=1.0)

        def update(message: str, fraction: float) -> None:
            bar.update(task, description=message, completed=fraction)

        yield update
