"""`modelctl`, composed: the library's commands (pipeline.cli) plus the ones that run Prefect flows.

`promote` (and `promote --resume`), `rollback` and `approve` run the flows in flows/, so they are registered
here, never imported by `pipeline`. The console script `modelctl` points at :data:`app`. The flows run against
the Prefect server at PREFECT_API_URL when it is set, else against Prefect's embedded server in this process
(then `modelctl approve` cannot reach a paused run from another shell: use a server).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from pipeline.cli import app
from pipeline.cli.render import JsonFlag, emit_json, errors, out
from pipeline.errors import TerminalError

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="promotion.yaml")]
EnvOption = Annotated[str, typer.Option("--env", "-e", help="environment name from promotion.yaml")]
WorkdirOption = Annotated[
    Path | None, typer.Option(help="the pipeline's clone of the GitOps repo (default: under $MODELCTL_CACHE)")
]

__all__ = ["app", "main"]


def _show_record(record: dict[str, Any]) -> None:
    from pipeline.record import PromotionRecord

    out.print(PromotionRecord.model_validate(record).markdown(), markup=False, highlight=False)


def promote(
    ref: Annotated[
        str | None, typer.Argument(help="org/name[@revision] on the Hub, or a local model directory")
    ] = None,
    env: EnvOption = "",
    config: ConfigOption = Path("promotion.yaml"),
    method: Annotated[Literal["awq", "gptq"] | None, typer.Option(help="default: the config's")] = None,
    backend: Annotated[Literal["llmcompressor", "autoawq"] | None, typer.Option(help="default: the config's")] = None,
    promotion_id: Annotated[
        str | None, typer.Option("--id", help="re-run a promotion by its id (it converges)")
    ] = None,
    resume: Annotated[
        str | None, typer.Option("--resume", help="finish a pull-request promotion (by id) after its merge")
    ] = None,
    workdir: WorkdirOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Promote a model revision to an environment: quantize, publish, preload, gate, commit, canary (on a cluster).

    In pull-request mode it stops once the branch is pushed ("waiting for merge"); `--resume ID` finishes it.
    """
    from flows.promote import promote as flow
    from flows.promote import resume as resume_flow

    where = str(workdir) if workdir else None
    with errors(as_json):
        if not env:
            raise TerminalError("--env is required", hint="name an environment of promotion.yaml: --env staging")
        if resume:
            record = resume_flow(env, resume, config=str(config), workdir=where)
        elif ref is None:
            raise TerminalError(
                "name the model to promote (REF), or --resume ID", hint="modelctl promote ORG/NAME@REV --env ENV"
            )
        else:
            record = flow(
                ref,
                env,
                config=str(config),
                method=method,
                backend=backend,
                promotion_id=promotion_id,
                workdir=where,
            )
    if as_json:
        emit_json({"ok": True, "record": record})
        return
    _show_record(record)


def rollback(
    env: EnvOption,
    config: ConfigOption = Path("promotion.yaml"),
    to: Annotated[str | None, typer.Option(help="promotion id to go back to (default: the previous one)")] = None,
    reason: Annotated[str, typer.Option(help="why, for the revert commit")] = "",
    workdir: WorkdirOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Roll an environment back to its previous promotion (or to --to ID), through the revert path."""
    from flows.rollback import rollback as flow

    with errors(as_json):
        result = flow(env, config=str(config), to=to, reason=reason, workdir=str(workdir) if workdir else None)
    if as_json:
        emit_json({"ok": True, **result})
        return
    if not result["reverted"]:
        out.print(f"[yellow]=[/] {env} already runs {to}: nothing to roll back")
        return
    for item in result["reverted"]:
        out.print(f"[green]✓[/] reverted promotion {item['promotion_id']} (commit {item['revert_commit'][:12]})")


def approve(
    run: Annotated[str, typer.Argument(help="the paused flow run's id")],
    approver: Annotated[str, typer.Option(help="who approves")],
    comment: Annotated[str, typer.Option(help="why")] = "",
    reject: Annotated[bool, typer.Option("--reject", help="reject instead of approve")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Approve (or --reject) a promotion paused for manual approval."""
    from flows.approve import approve as answer

    with errors(as_json):
        answer(run, approver, comment, approved=not reject)
    if as_json:
        emit_json({"ok": True, "run": run, "approved": not reject})
        return
    out.print(f"[green]✓[/] {'rejected' if reject else 'approved'} flow run {run} as {approver}")


app.command("promote")(promote)
app.command("rollback")(rollback)
app.command("approve")(approve)


def main() -> None:
    app()
