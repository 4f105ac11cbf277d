"""`modelctl config ...`: validate promotion.yaml."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from pipeline.cli.render import JsonFlag, emit_json, errors, out

config_app = typer.Typer(help="Validate promotion.yaml.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(config_app, name="config")


@config_app.command("check")
def config_check(
    file: Annotated[Path, typer.Argument(help="promotion.yaml to validate")],
    as_json: JsonFlag = False,
) -> None:
    """Validate a promotion.yaml, the suites and values files it names, and print the resolved configuration."""
    from pipeline.config import load_config
    from pipeline.preflight import check

    with errors(as_json):
        cfg = load_config(file)
        suites = check(cfg, str(file))  # suites by name, values files in the GitOps repo (when readable offline)
    resolved = cfg.model_dump(mode="json")
    if as_json:
        emit_json({"ok": True, "file": str(file), "order": cfg.promotion_order(), "config": resolved, "suites": suites})
        return
    out.print(
        f"[green]✓[/] {file} is valid: {len(cfg.environments)} environment(s), in order "
        f"{' -> '.join(cfg.promotion_order())}"
    )
    table = Table("environment", "executor", "values file", "rollout", "gates", "approval", "requires")
    for name in cfg.promotion_order():
        env = cfg.environments[name]
        gates = [g for g in ("eval", "load") if getattr(env.gates, g) is not None]
        rollout = f"{env.rollout.namespace}/{env.rollout.name}" if env.rollout else "-"
        table.add_row(
            name,
            env.executor,
            env.values_file,
            rollout,
            ", ".join(gates) or "-",
            "required" if env.approval.required else "-",
            ", ".join(env.requires) or "-",
        )
    out.print(table)
    for env_name, suite in suites.items():
        out.print(f"[green]✓[/] {env_name}: eval suite {suite}")
    out.print("[bold]resolved configuration[/] (defaults filled in, paths made absolute):")
    from ruamel.yaml import YAML

    yaml = YAML()
    yaml.default_flow_style = False
    yaml.dump(resolved, out.file)
