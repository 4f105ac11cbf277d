"""`modelctl step run --request JSON`: run one step request and print its StepResult (what a Kubernetes Job runs).

The request is validated before anything runs; the result is printed as one JSON line, last, also when the step
failed (then with the failure's kind). Exit codes: 0 done or skipped, 2 terminal failure, 75 transient failure.
"""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.render import errors, progress

step_app = typer.Typer(help="Run one pipeline step from a typed request (the Kubernetes Jobs' entrypoint).")


def register(app: typer.Typer) -> None:
    app.add_typer(step_app, name="step")


@step_app.command("run")
def run(
    request: Annotated[str, typer.Option("--request", help="the request as JSON, or the path of a JSON file")],
) -> None:
    """Validate a step request, run it here, and print its result as the last line (JSON)."""
    from pipeline.errors import PipelineError, TransientError
    from pipeline.steps import failed, parse_request
    from pipeline.steps import run as run_step

    with errors(as_json=True):
        text = request if request.lstrip().startswith("{") else Path(request).read_text(encoding="utf-8")
        parsed = parse_request(text, where="--request")
    started_at, t0 = datetime.now(UTC), time.perf_counter()
    try:
        with progress(False):  # whatever the libraries print goes to stderr: stdout ends with the result
            result = run_step(parsed)
    except PipelineError as exc:
        sys.stdout.write(failed(parsed.step, exc, started_at, time.perf_counter() - t0).model_dump_json() + "\n")
        raise typer.Exit(75 if isinstance(exc, TransientError) else 2) from None
    sys.stdout.write(result.model_dump_json() + "\n")
