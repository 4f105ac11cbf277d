"""`modelctl guard --env E [--once]`: vet the changes people commit to the GitOps repo (pipeline/guard.py).

Without ``--once`` it keeps watching, one pass every ``--every`` seconds, until interrupted; the Prefect
deployment (flows/guard_flow.py) runs the same pass on a schedule instead.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from pipeline.cli.render import JsonFlag, emit_json, errors, out

if TYPE_CHECKING:
    from pipeline.guard import GuardResult

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="promotion.yaml")]


def register(app: typer.Typer) -> None:
    app.command("guard")(guard)


def guard(
    env: Annotated[str, typer.Option("--env", "-e", help="environment name from promotion.yaml")],
    config: ConfigOption = Path("promotion.yaml"),
    once: Annotated[bool, typer.Option("--once", help="one pass, then exit")] = False,
    every: Annotated[float, typer.Option(help="seconds between passes without --once")] = 60.0,
    workdir: Annotated[Path | None, typer.Option(help="the pipeline's clone of the GitOps repo")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Pick up a change to the environment's values the pipeline did not make, gate it, walk its canary or revert."""
    from pipeline.config import load_config
    from pipeline.guard import guard as run_guard

    while True:
        with errors(as_json):
            cfg = load_config(config)  # read per pass: a long-running guard follows edits to promotion.yaml
            result = run_guard(cfg, env, workdir=workdir)
        show(result, as_json)
        if once:
            return
        time.sleep(every)  # the watch interval, not a timing


def show(result: GuardResult, as_json: bool) -> None:
    """One line per pass (or one JSON object): what the guard did, and the record it wrote."""
    record = result.record
    if as_json:
        data: dict[str, Any] = {"ok": True, "env": result.env, "action": result.action, "reason": result.reason}
        data["record"] = record.model_dump(mode="json") if record is not None else None
        emit_json(data)
        return
    if record is None or record.guarded is None:
        out.print(f"[dim]=[/] {result.env}: {result.reason}", highlight=False)
        return
    who = f"{record.guarded.commit[:12]} by {record.guarded.author}"
    mark = {"promoted": "[green]✓[/]", "reverted": "[bold red]↩[/]"}.get(record.decision, "[yellow]?[/]")
    what = "unvetted" if not record.guarded.vetted else "guarded" + (" (fast path)" if record.guarded.fast_path else "")
    out.print(f"{mark} {result.env}: {what} {who}: {record.decision}: {record.reason}", highlight=False)
    out.print(f"  record {record.id}", highlight=False)
