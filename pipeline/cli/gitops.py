"""`modelctl gitops init`, `modelctl plan`, `modelctl history`: the GitOps repo Argo CD watches."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.syntax import Syntax
from rich.table import Table

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

if TYPE_CHECKING:
    from pipeline.gitops import HistoryEntry

gitops_app = typer.Typer(help="The GitOps repo Argo CD watches.", no_args_is_help=True)

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="promotion.yaml")]
EnvOption = Annotated[str, typer.Option("--env", "-e", help="environment name from promotion.yaml")]
WorkdirOption = Annotated[
    Path | None, typer.Option(help="the pipeline's clone of the GitOps repo (default: under $MODELCTL_CACHE)")
]


def register(app: typer.Typer) -> None:
    app.add_typer(gitops_app, name="gitops")
    app.command("plan")(plan)
    app.command("history")(history)


@gitops_app.command("init")
def gitops_init(
    path: Annotated[Path, typer.Argument(help="where to create the (bare) GitOps repo")],
    template: Annotated[Path | None, typer.Option(help="template folder (default: gitops/ of modelctl)")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Create a new GitOps repo from the template: a bare repo, usable as a remote (a skip if it exists)."""
    from pipeline.gitops import init_repo

    with errors(as_json):
        result = init_repo(path, template)
    if as_json:
        emit_json({"ok": True, **dataclasses.asdict(result)})
        return
    if result.skipped:
        out.print(f"[yellow]=[/] {path} is already a GitOps repo (main at {result.commit[:12]}); nothing to do")
    else:
        out.print(f"[green]✓[/] created {path} from the template: {result.files} files, commit {result.commit[:12]}")


def plan(
    ref: Annotated[str, typer.Argument(help="model to promote: org/name@<40-hex sha> (or org/name with --revision)")],
    env: EnvOption,
    artifact: Annotated[str, typer.Option(help="artifact id (the quantized model's directory in the cache)")],
    config: ConfigOption = Path("promotion.yaml"),
    revision: Annotated[str | None, typer.Option(help="pinned 40-hex source commit, if REF has none")] = None,
    recipe_format: Annotated[str, typer.Option("--format", help="recipe label, e.g. awq-w4a16")] = "",
    quantization: Annotated[str, typer.Option(help="vLLM --quantization of the artifact")] = "none",
    workdir: WorkdirOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Show the values diff a promotion would commit, validated against the chart's schema, without committing."""
    from pipeline.config import load_config
    from pipeline.gitops import GitOps, Promotion

    with errors(as_json):
        cfg = load_config(config)
        values_file = cfg.environment(env).values_file
        promotion = Promotion.from_ref(ref, env, artifact, revision, format=recipe_format, quantization=quantization)
        repo = GitOps.from_settings(cfg.gitops, workdir)
        result = repo.plan(promotion, values_file)
        current = repo.current(env)
    summary = {
        "ok": True,
        "env": env,
        "remote": repo.remote,
        "values_file": values_file,
        "subject": result.subject,
        "already_current": result.current,
        "changed": {key: {"from": old, "to": new} for key, (old, new) in result.changed.items()},
        "diff": result.diff,
        "current": dataclasses.asdict(current) if current else None,
    }
    if as_json:
        emit_json(summary)
        return
    if result.current:
        out.print(f"[yellow]=[/] {env} already runs this: promoting would be a skip, not a commit")
        return
    out.print(f"[bold]would commit to {repo.remote}:[/] {result.subject}", highlight=False)
    out.print(Syntax(result.diff, "diff", theme="ansi_dark", background_color="default"))
    out.print("[green]✓[/] the values pass the chart's values.schema.json; nothing was committed")


def history(
    env: EnvOption,
    config: ConfigOption = Path("promotion.yaml"),
    limit: Annotated[int, typer.Option(help="newest N entries (0 = all)")] = 20,
    workdir: WorkdirOption = None,
    wide: WideFlag = False,
    as_json: JsonFlag = False,
) -> None:
    """The promotions and reverts of an environment, newest first, read from the GitOps repo's commit trailers."""
    from pipeline.config import load_config
    from pipeline.gitops import GitOps

    with errors(as_json):
        cfg = load_config(config)
        cfg.environment(env)
        repo = GitOps.from_settings(cfg.gitops, workdir)
        entries = repo.history(env, limit or None)
    if as_json:
        emit_json({"ok": True, "env": env, "remote": repo.remote, "entries": [dataclasses.asdict(e) for e in entries]})
        return
    if not entries:
        out.print(f"no promotions to {env} yet in {repo.remote}")
        return
    out.print(history_table(entries, wide))
    now = entries[0]
    running = (
        f"{model_ref(now.model, now.revision, wide)} {short_artifact(now.artifact, wide)}"
        if now.model
        else "nothing (reverted to empty values)"
    )
    out.print(f"now running in {env}: {running}", highlight=False)
    guarded = now.action in ("guarded", "unvetted")  # a person's change the guard picked up
    what = f"{now.action} by the guard (a change the pipeline did not make), record" if guarded else "promotion"
    out.print(f"  {what} {now.promotion_id}, commit {short_sha(now.commit, wide)}", highlight=False)


def _verdict(text: str) -> str:
    """The first word of a gate's one-line verdict (pass, fail, inconclusive), or -."""
    return text.split(":", 1)[0].split()[0] if text.strip() else "-"


def history_table(entries: list[HistoryEntry], wide: bool = False) -> Table:
    """History as a table that reads at 100 columns: ids and shas never cut or wrapped, the model column (the one
    free-length text) ends in an ellipsis; a revert shows "↩ <the promotion it undid>". ``wide`` shows full shas
    and artifact ids, both gates' verdict lines, what a revert went back to, and the author.
    """
    rows = []
    for entry in entries:
        when = datetime.fromtimestamp(entry.timestamp, tz=UTC).strftime("%Y-%m-%d %H:%M" if wide else "%m-%d %H:%M")
        reverted = entry.action == "revert" and entry.reverts
        model = model_ref(entry.model, entry.revision, wide)
        if reverted:
            model = f"undo {entry.reverts}, back to {model}" if wide else f"↩ {entry.reverts}"  # the id stays whole
        verdicts = f"{_verdict(entry.eval)}/{_verdict(entry.latency)}"
        gates = [entry.eval or "-", entry.latency or "-"] if wide else [verdicts]
        row = [when, entry.promotion_id, entry.action, model, short_artifact(entry.artifact, wide) or "-", *gates]
        rows.append([*row, short_sha(entry.commit, wide), *([entry.author] if wide else [])])
    headers = ["when (UTC)", "promotion", "action", "model", "artifact"]
    headers += ["eval", "latency", "commit", "by"] if wide else ["gates", "commit"]
    return fit_table(headers, rows, {"model": 18, "eval": 8, "latency": 8, "by": 8}, wide)
