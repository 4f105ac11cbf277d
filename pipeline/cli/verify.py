"""`modelctl gitops verify`: the check a GitOps repo's CI runs on every pull request (exit 0 pass, 1 fail, 2 bad
input). Registered under the `gitops` command group (pipeline/cli/gitops.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.render import JsonFlag, emit_json, errors, out

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="promotion.yaml")]


def register(app: typer.Typer) -> None:
    from pipeline.cli.gitops import gitops_app

    gitops_app.command("verify")(verify)


def verify(
    config: ConfigOption = Path("promotion.yaml"),
    base: Annotated[
        str | None, typer.Option(help="compare with this ref (default: merge-base with the tracked branch, or HEAD~1)")
    ] = None,
    repo: Annotated[Path, typer.Option(help="the GitOps repo checkout")] = Path("."),
    as_json: JsonFlag = False,
) -> None:
    """Check every environment whose values changed: schema, chart render, pinned revision, stored artifact, eval."""
    from pipeline.config import load_config
    from pipeline.gitops.verify import verify_checkout
    from pipeline.store import store_from_settings

    with errors(as_json):
        cfg = load_config(config)
        store = store_from_settings(cfg.artifacts) if cfg.artifacts is not None else None
        result = verify_checkout(cfg, repo, base, store)
    if as_json:
        emit_json(result.as_dict())
    else:
        if not result.environments:
            out.print(f"no environment's values changed since {result.base[:12]}: nothing to verify")
        for env in result.environments:
            mark = "[green]✓[/]" if env.passed else "[bold red]✗[/]"
            out.print(f"{mark} {env.env} ({env.values_file})", highlight=False)
            for check in env.checks:
                sign = "[green]pass[/]" if check.passed else "[red]FAIL[/]"
                out.print(f"    {sign} {check.name}: {check.reason}", highlight=False)
    if not result.passed:
        raise typer.Exit(1)
