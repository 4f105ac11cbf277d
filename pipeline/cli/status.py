"""`modelctl status`: what runs where (from Git); on a cluster, the Rollout and any promotion in flight.

It needs no Prefect: the promotion commands that run flows (promote, rollback, approve) live in flows/cli.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any

import typer

from pipeline.cli.render import (
    JsonFlag,
    WideFlag,
    emit_json,
    errors,
    fit_table,
    model_ref,
    out,
    short_artifact,
    short_sha,
)

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="promotion.yaml")]
WorkdirOption = Annotated[
    Path | None, typer.Option(help="the pipeline's clone of the GitOps repo (default: under $MODELCTL_CACHE)")
]


def register(app: typer.Typer) -> None:
    app.command("status")(status)


def status(
    config: ConfigOption = Path("promotion.yaml"),
    env: Annotated[str | None, typer.Option("--env", "-e", help="one environment (default: all)")] = None,
    workdir: WorkdirOption = None,
    wide: WideFlag = False,
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
                "guarded": guarded_change(gitops, name, history),
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
        change = row.get("guarded")
        if change and change["live"]:
            mark = "[bold yellow]![/]" if change["kind"] == "unvetted" else "[cyan]g[/]"
            out.print(f"{mark} {row['env']} runs {change['description']}", highlight=False)
    cells = []
    for row in rows:
        current = row["current"]
        change = row.get("guarded")
        if change and change["live"]:  # a person's change runs now, not the pipeline's last promotion
            current = change["entry"]
        cells.append([
            row["env"],
            model_ref(current["model"], current["revision"], wide) if current else "-",
            short_artifact(current["artifact"], wide) if current else "-",
            short_sha(current["commit"], wide) if current else "-",
            row["rollout"] or "-",
            row["in_flight"] or "-",
        ])  # fmt: skip
    headers = ["environment", "running", "artifact", "commit", "rollout", "in flight"]
    out.print(fit_table(headers, cells, {"running": 18, "rollout": 10, "in flight": 10}, wide))  # 100 columns


def guarded_change(gitops: Any, env: str, history: list[Any]) -> dict[str, Any] | None:
    """The newest change the guard picked up in ``env`` (a person's commit, vetted or unvetted), when it is still
    what runs: no pipeline promotion or revert came after it and the guard did not revert it. None otherwise."""
    from pipeline.gitops.guarded import GUARD_ACTIONS, record_at

    entry = next((e for e in history if e.action in GUARD_ACTIONS), None)
    if entry is None:
        return None
    record = record_at(gitops, entry.commit, env, entry.promotion_id)
    if record is None or record.guarded is None:
        return None
    later = [e for e in history[: history.index(entry)] if e.action not in GUARD_ACTIONS]
    live = record.decision != "reverted" and not later
    change = record.guarded
    kind = entry.action
    how = record.reason if kind == "unvetted" else "vetted by the guard" + (" (fast path)" if change.fast_path else "")
    description = (
        f"{change.commit[:12]} by {change.author}, a change the pipeline did not make, {how} (record {record.id})"
    )
    return {
        "kind": kind, "live": live, "promotion_id": record.id, "commit": change.commit, "author": change.author,
        "decision": record.decision, "reason": record.reason, "fast_path": change.fast_path,
        "description": description, "entry": {**dataclasses.asdict(entry), "commit": change.commit},
    }  # fmt: skip


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
