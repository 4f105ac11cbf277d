"""`modelctl`, composed: the library's commands (pipeline.cli) plus the ones that run Prefect flows.

`promote` (and `promote --resume`), `rollback` and `approve` run the flows in flows/, so they are registered
here, never imported by `pipeline`. The console script `modelctl` points at :data:`app`. The flows run against
the Prefect server at PREFECT_API_URL when it is set, else against Prefect's embedded server in this process
(then `modelctl approve` cannot reach a paused run from another shell: use a server).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from pipeline.cli import app
from pipeline.cli.render import JsonFlag, emit_json, errors, out
from pipeline.errors import TerminalError, TransientError

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="promotion.yaml")]
EnvOption = Annotated[str, typer.Option("--env", "-e", help="environment name from promotion.yaml")]
WorkdirOption = Annotated[
    Path | None, typer.Option(help="the pipeline's clone of the GitOps repo (default: under $MODELCTL_CACHE)")
]

__all__ = ["app", "main"]


STEP_OUTCOME = {"succeeded": "done", "skipped": "reused (already done)", "failed": "failed", "done": "done"}
DECISION_MARK = {"promoted": "✓", "waiting": "…", "skipped": "=", "rejected": "✗", "reverted": "✗"}


def _summary(record: dict[str, Any], width: int = 100) -> list[str]:
    """The finished promotion for a terminal: the decision and why (wrapped to ``width``), then one line per fact
    (no markdown)."""
    import textwrap

    from pipeline.cli.timeline import timeline_lines
    from pipeline.record import PromotionRecord

    rec = PromotionRecord.model_validate(record)
    lines = [f"{DECISION_MARK.get(rec.decision, '•')} {rec.decision}: promotion {rec.id} to {rec.env}"]
    if rec.reason:
        lines += textwrap.wrap(rec.reason, width, initial_indent="  why       ", subsequent_indent=" " * 12)
    if rec.model is not None:
        lines.append(f"  model     {rec.model.ref}")
    if rec.artifact is not None:
        lines.append(f"  artifact  {rec.artifact.id} ({rec.artifact.format or '-'})")
        if rec.artifact.manifest_digest:
            lines.append(f"  bytes     {rec.artifact.manifest_digest}")
    if rec.commit:
        lines.append(f"  commit    {rec.commit[:12]}")
    if rec.served_by:  # the engine and release that served the gates; a fallback says why
        lines.append(f"  served by {rec.served_by}" + (f": {rec.serving_fallback}" if rec.serving_fallback else ""))
    for label, gate in (("eval", rec.eval_gate), ("latency", rec.load_gate)):
        if gate is not None:
            lines.append(f"  {label:<9} {gate.summary()}")
    if rec.rollout is not None:
        lines.append(f"  canary    {rec.rollout.final}: {rec.rollout.reason}")
        lines += [f"            {row}" for row in timeline_lines(rec.rollout)]
    if rec.branch:
        lines.append(f"  branch    {rec.branch}")
    return lines


def _checked(config: Path, env: str, ids: dict[str, str | None]) -> None:
    """Everything a promotion takes from its arguments and its configuration, checked before any heavy work and
    before Prefect starts: a failure here has built, started and written nothing.

    Raises:
        TerminalError: no --env, a malformed id, an unknown environment; ConfigError: a missing or invalid
            configuration, an unknown eval suite, a values file missing from the GitOps repo (the file named).
    """
    import re

    from pipeline import preflight
    from pipeline.config import load_config
    from pipeline.record import PROMOTION_ID_PATTERN

    if not env:
        raise TerminalError("--env is required", hint="name an environment of promotion.yaml: --env staging")
    for option, value in ids.items():
        if value is not None and not re.fullmatch(PROMOTION_ID_PATTERN, value):
            raise TerminalError(
                f"{option} {value!r} is not a promotion id (16 characters: digits and a-z without i, l, o, u)",
                hint="copy the id from `modelctl history`" + (", or leave --id out" if option == "--id" else ""),
            )
    cfg = load_config(config)
    if env not in cfg.environments:
        known = ", ".join(sorted(cfg.environments)) or "none"
        raise TerminalError(
            f"{config}: no environment {env!r} (known: {known})", hint="pass --env with one of the environments"
        )
    preflight.check(cfg, str(config))


def _run_promotion(as_json: bool, start: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``start`` with everything the libraries print sent to a per-run log (its path printed first), one
    line per step on the terminal as it ends, and the summary; on failure the log's tail."""
    from pipeline import processes
    from pipeline.config import cache_home
    from pipeline.promotion import PromotionRejected, PromotionReverted, listening
    from pipeline.runlog import run_log

    # Whatever this run starts dies with it, also by kill -9: Prefect's embedded server, servers, their children.
    processes.watch_descendants()
    with run_log(cache_home() / "logs", name="promote", on_stderr=as_json) as log:

        def on_step(step: str, status: str) -> None:
            if status == "started":
                log.step_started(step)
            else:
                log.step_done(step, status, detail=STEP_OUTCOME.get(status, status))

        # Prefect's embedded server gets more than its default 20 s to start on a busy machine.
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
        with listening(on_step):
            try:
                record = start()
            except (PromotionRejected, PromotionReverted) as exc:  # the summary (gates, timeline) before the error
                if not as_json:
                    for line in _summary(exc.record.model_dump(mode="json"), log.width):
                        log.print(log.fit(line))
                raise
            except RuntimeError as exc:
                if "ephemeral Prefect API server" not in str(exc):
                    raise
                raise TransientError(
                    "Prefect's embedded server did not start in time",
                    hint="retry, raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or run a Prefect server "
                    "and set PREFECT_API_URL",
                ) from None
        if not as_json:
            for line in _summary(record, log.width):
                log.print(log.fit(line))
    return record


def promote(
    ref: Annotated[
        str | None, typer.Argument(help="org/name[@revision] on the Hub, or a local model directory")
    ] = None,
    env: EnvOption = "",
    config: ConfigOption = Path("promotion.yaml"),
    method: Annotated[
        Literal["awq", "gptq", "none"] | None,
        typer.Option(help="default: the config's; none = unquantized (for engines without 4-bit kernels)"),
    ] = None,
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

    def flow(*args: Any, **kwargs: Any) -> dict[str, Any]:  # imports Prefect only once the input is checked
        from flows.promote import promote

        return promote(*args, **kwargs)

    def resume_flow(*args: Any, **kwargs: Any) -> dict[str, Any]:
        from flows.promote import resume

        return resume(*args, **kwargs)

    where = str(workdir) if workdir else None
    with errors(as_json):
        if not resume and ref is None:
            raise TerminalError(
                "name the model to promote (REF), or --resume ID", hint="modelctl promote ORG/NAME@REV --env ENV"
            )
        _checked(config, env, {"--id": promotion_id, "--resume": resume})
        if resume:
            record = _run_promotion(as_json, lambda: resume_flow(env, resume, config=str(config), workdir=where))
        else:
            record = _run_promotion(
                as_json,
                lambda: flow(
                    str(ref),
                    env,
                    config=str(config),
                    method=method,
                    backend=backend,
                    promotion_id=promotion_id,
                    workdir=where,
                ),
            )
    if as_json:
        emit_json({"ok": True, "record": record})


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
