"""What every command shares: consoles, --json output, error handling, progress bars."""

from __future__ import annotations

import errno
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stdout
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich import box
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from pipeline.errors import PipelineError, TerminalError, TransientError, first_problem

out = Console(soft_wrap=True)
err = Console(stderr=True)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")]


def emit_json(data: Any) -> None:
    """Print ``data`` as the command's one JSON object on stdout (on one line inside a pipeline Job)."""
    indent = None if os.environ.get("MODELCTL_JSON_ONE_LINE") == "1" else 2
    sys.stdout.write(json.dumps(data, indent=indent, default=str) + "\n")


def debug() -> bool:
    """True with ``modelctl --debug`` (or MODELCTL_DEBUG=1): unexpected errors keep their traceback."""
    return os.environ.get("MODELCTL_DEBUG") == "1"


def as_pipeline_error(exc: BaseException) -> PipelineError | None:
    """A library's exception as the pipeline error it means for the user, or None for a bug.

    Invalid input (pydantic) and what the machine refuses for good (a full disk, a denied permission, a
    damaged safetensors file) are terminal; a dropped connection or a timeout may pass on retry.
    """
    if isinstance(exc, PipelineError):
        return exc
    if isinstance(exc, ValidationError):
        return TerminalError(f"invalid input: {first_problem(exc)}", hint="correct the value and run again")
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" writing {exc.filename}" if exc.filename else ""
        return TerminalError(
            f"no space left on the device{where}", hint="free space on that volume (or point the cache elsewhere)"
        )
    if isinstance(exc, PermissionError):
        return TerminalError(
            f"permission denied: {exc.filename or exc.strerror}",
            hint="give this user access to that path, or point modelctl at one it may use",
        )
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return TransientError(f"{type(exc).__name__}: {exc}", hint="check the network or the service, then retry")
    if type(exc).__name__ == "SafetensorError":
        return TerminalError(
            f"a .safetensors file cannot be read: {exc}",
            hint="the file is empty, truncated or damaged; rebuild or download it again",
        )
    return None


def report(exc: BaseException, as_json: bool) -> int:
    """Print ``exc`` for a person (or as the command's JSON) and return the exit code: 2, 75, or 1 for a bug."""
    mapped = as_pipeline_error(exc)
    if mapped is None:
        what = f"unexpected {type(exc).__name__}: {exc}"
        hint = "run again with --debug for the traceback, and report it if it is not your input"
        if as_json:
            emit_json({"ok": False, "error": "bug", "message": what, "problems": None, "hint": hint})
        else:
            _say(what, hint)
        return 1
    code = 75 if isinstance(mapped, TransientError) else 2
    if as_json:
        kind = "transient" if code == 75 else "terminal"
        problems = getattr(mapped, "problems", None)
        payload = {"ok": False, "error": kind, "message": mapped.what, "problems": problems, "hint": mapped.hint}
        record = getattr(mapped, "record", None)  # a reverted promotion's finished record (its canary timeline)
        if record is not None and hasattr(record, "model_dump"):
            payload["record"] = record.model_dump(mode="json")
        emit_json(payload)
    else:
        _say(mapped.what, mapped.hint)
    return code


def _say(what: str, hint: str | None) -> None:
    """``error: ...`` and ``fix: ...`` on stderr; the texts are printed as they are (no markup read in them)."""
    err.print(Text.assemble(("error: ", "bold red"), what), highlight=False, soft_wrap=True)
    if hint:
        err.print(Text.assemble(("fix: ", "bold"), hint), highlight=False, soft_wrap=True)


@contextmanager
def errors(as_json: bool) -> Iterator[None]:
    """Turn errors into a clear message and an exit code, never a traceback (unless ``--debug``).

    TerminalError and what the user must change exit 2, TransientError and what may pass on retry 75, a bug 1.
    """
    try:
        yield
    except (typer.Exit, typer.Abort, KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:
        if debug() and as_pipeline_error(exc) is None:
            raise
        raise typer.Exit(report(exc, as_json)) from None


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


class ModelctlApp(typer.Typer):
    """The `modelctl` app: an error that escapes a command's own handling still gets one clear line and its exit
    code (2 fix the input, 75 retry, 1 a bug), never a traceback unless ``--debug``."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except Exception as exc:
            if debug() and as_pipeline_error(exc) is None:
                raise
            sys.exit(report(exc, "--json" in sys.argv))


DebugFlag = Annotated[bool, typer.Option("--debug", help="Show the traceback of an unexpected error.")]


def set_debug(enabled: bool) -> None:
    """Turn on tracebacks for this run (``modelctl --debug ...``)."""
    if enabled:
        os.environ["MODELCTL_DEBUG"] = "1"


WideFlag = Annotated[bool, typer.Option("--wide", help="Full ids, shas and every column (for a wide terminal).")]


def short_sha(sha: str, wide: bool = False) -> str:
    """A commit sha as tables show it: 8 hex digits (all 40 with ``--wide``)."""
    return sha if wide else sha[:8]


def short_artifact(artifact_id: str, wide: bool = False) -> str:
    """An artifact id as tables show it: its recipe prefix and 8 of its 16 hex digits (whole with ``--wide``)."""
    prefix, _, digest = artifact_id.rpartition("-")
    if wide or not prefix or len(digest) != 16 or any(c not in "0123456789abcdef" for c in digest):
        return artifact_id
    return f"{prefix}-{digest[:8]}"


def model_ref(model: str, revision: str, wide: bool = False) -> str:
    """``org/name@rev`` with the revision cut to 8 hex digits (12 with ``--wide``)."""
    return f"{model}@{revision[: 12 if wide else 8]}" if model else "-"


def fit_table(headers: list[str], rows: list[list[str]], flexible: dict[str, int], wide: bool = False) -> Table:
    """A table that reads at 100 columns: ids, shas and dates exactly as wide as their longest value (never cut
    or wrapped); the ``flexible`` columns (header -> minimum width) share what is left and end in an ellipsis
    (wrap whole with ``wide``)."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, padding=(0, 1), collapse_padding=True)
    for i, header in enumerate(headers):
        if header in flexible:
            least = min(flexible[header], max(len(header), *(len(r[i]) for r in rows)))
            table.add_column(header, overflow="fold" if wide else "ellipsis", min_width=least)
        else:
            table.add_column(header, no_wrap=True, width=max(len(header), *(len(r[i]) for r in rows)))
    for row in rows:
        table.add_row(*row)
    return table
