"""`modelctl promote`, `rollback`, `status`, `approve`: the product's commands, run through the Prefect flows.

The flows run against the Prefect server at PREFECT_API_URL when it is set, else against Prefect's embedded
server in this process (then `modelctl approve` cannot reach a paused run from another shell: use a server).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.table import Table

from pipeline.cli.render import JsonFlag, emit_json, errors, out

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="promotion.yaml")]
EnvOption = Annotated[str, typer.Option("--env", "-e", help="environment name from promotion.yaml")]
WorkdirOption = Annotated[
    Path | None, typer.Option(help="the pipeline's clone of the GitOps repo (default: under $MODELCTL_CACHE)")
]


def register(app: typer.Typer) -> None:
    app.command("promote")(promote)
    app.command("rollback")(rollback)
    app.command("status")(status)
    app.command("approve")(approve)


def _show_record(record: dict[str, Any]) -> None:
    from pipeline.record import PromotionRecord

    out.print(PromotionRecord.model_validate(record).markdown(), markup=False, highlight=False)


def promote(
    ref: Annotated[str, typer.Argument(help="org/name[@revision] on the Hub, or a local model directory")],
    env: EnvOption,
    config: ConfigOption = Path("promotion.yaml"),
    method: Annotated[Literal["awq", "gptq"] | None, typer.Option(help="default: the config's")] = None,
    backend: Annotated[Literal["llmcompressor", "autoawq"] | None, typer.Option(help="default: the config's")] = None,
    promotion_id: Annotated[
        str | None, typer.Option("--id", help="re-run a promotion by its id (it converges)")
    ] = None,
    workdir: WorkdirOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Promote a model revision to an environment: quantize, preload, gate, commit, canary (on a cluster)."""
    from flows.promote import promote as flow

    with errors(as_json):
        record = flow(
            ref,
            env,
            config=str(config),
            method=method,
            backend=backend,
            promotion_id=promotion_id,
            workdir=str(workdir) if workdir else None,
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


def status(
    config: ConfigOption = Path("promotion.yaml"),
    env: Annotated[str | None, typer.Option("--env", "-e", help="one environment (default: all)")] = None,
    workdir: WorkdirOption = None,
    as_json: JsonFlag = False,
) -> None:
    """What runs in each environment (from Git), and on a cluster the Rollout's phase and any promotion in flight."""
    from pipeline.config import load_config
    from pipeline.gitops import GitOps
    from pipeline.gitops.commits import live_promotions

    rows: list[dict[str, Any]] = []
    with errors(as_json):
        cfg = load_config(config)
        names = [env] if env else cfg.promotion_order()
        for name in names:
            cfg.environment(name)
        gitops = GitOps.from_settings(cfg.gitops, workdir)
        for name in names:
            history = gitops.history(name)
            live = live_promotions(history)
            row: dict[str, Any] = {
                "env": name,
                "current": dataclasses.asdict(live[0]) if live else None,
                "last_commit": dataclasses.asdict(history[0]) if history else None,
                "rollout": None,
                "in_flight": None,
                "dangling": None,
            }
            environment = cfg.environments[name]
            if environment.executor == "kubernetes":
                row.update(_cluster_status(name, environment))
                row["dangling"] = dangling(row, name)
            rows.append(row)
    if as_json:
        emit_json({"ok": True, "environments": rows})
        return
    for row in rows:
        if row.get("dangling"):
            out.print(f"[bold red]![/] {row['dangling']}")
    table = Table("environment", "running", "artifact", "since commit", "rollout", "in flight")
    for row in rows:
        current = row["current"]
        running = f"{current['model']}@{current['revision'][:12]}" if current else "-"
        table.add_row(
            row["env"],
            running,
            current["artifact"] if current else "-",
            current["commit"][:12] if current else "-",
            row["rollout"] or "-",
            row["in_flight"] or "-",
        )
    out.print(table)


def dangling(row: dict[str, Any], env: str) -> str | None:
    """A promotion left mid-canary with nobody driving it (its process was killed): what to do about it."""
    current, seen = row.get("current"), row.get("seen")
    if not current or seen is None or row.get("in_flight") or (seen["finished"] and not seen["aborted"]):
        return None
    pid = current["promotion_id"]
    return (
        f"promotion {pid} to {env} is dangling: its Rollout is {row['rollout']} and no promotion holds the "
        f"environment. Re-run it to finish or revert it (`modelctl promote {current['model']}@{current['revision']} "
        f"--env {env} --id {pid}`), or roll it back (`modelctl rollback --env {env}`)"
    )


def _cluster_status(name: str, environment: Any) -> dict[str, Any]:
    """The Rollout's phase and the Lease holder; 'unreachable' when there is no cluster connection."""
    from pipeline.errors import PipelineError
    from pipeline.kube import Kube

    try:
        kube = Kube.connect()
        seen = kube.rollout(environment.rollout)
        lease = kube.lease_holder(name, environment.rollout.namespace)
    except PipelineError as exc:
        return {"rollout": f"unreachable ({exc.what.splitlines()[0][:80]})"}
    rollout = f"{seen.client_phase} at {seen.step}" + (" (aborted)" if seen.aborted else "")
    return {"rollout": rollout, "in_flight": lease, "seen": {"finished": seen.finished, "aborted": seen.aborted}}


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
