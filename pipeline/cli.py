"""`modelctl`: parse, call, render. No logic of its own.

Every command prints a human view by default and one JSON object with ``--json``. Errors from the pipeline
are printed without a traceback: TerminalError exits 2 (fix the input), TransientError exits 75 (try again).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pipeline.errors import PipelineError, TransientError

app = typer.Typer(
    name="modelctl",
    help="Promote LLM revisions to production with GitOps: quantize, preload, gate, commit, canary, revert.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
config_app = typer.Typer(help="Validate promotion.yaml.", no_args_is_help=True)
tiny_app = typer.Typer(help="The small trained model used by the demo and the tests.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(tiny_app, name="tinymodel")

out = Console(soft_wrap=True)
err = Console(stderr=True)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")]


def _emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


@contextmanager
def _errors(as_json: bool) -> Iterator[None]:
    """Turn pipeline errors into a clear message and an exit code; anything else is a bug and stays loud."""
    try:
        yield
    except PipelineError as exc:
        code = 75 if isinstance(exc, TransientError) else 2
        if as_json:
            kind = "transient" if isinstance(exc, TransientError) else "terminal"
            problems = getattr(exc, "problems", None)
            _emit_json({"ok": False, "error": kind, "message": exc.what, "problems": problems, "hint": exc.hint})
        else:
            err.print(f"[bold red]error:[/] {exc.what}", highlight=False, markup=True, soft_wrap=True)
            if exc.hint:
                err.print(f"[bold]fix:[/] {exc.hint}", highlight=False, soft_wrap=True)
        raise typer.Exit(code) from None


@contextmanager
def _progress(enabled: bool) -> Iterator[Callable[[str, float], None] | None]:
    """A rich progress bar fed by a library callback ``(message, fraction)``; silent under --json."""
    if not enabled:
        yield None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"))
    with Progress(*columns, TimeElapsedColumn(), console=err, transient=True) as bar:
        task = bar.add_task("starting", total=1.0)

        def update(message: str, fraction: float) -> None:
            bar.update(task, description=message, completed=fraction)

        yield update


@app.command()
def version(as_json: JsonFlag = False) -> None:
    """Print the versions of modelctl and the stack it drives."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    names = ["modelctl", "torch", "transformers", "llmcompressor", "autoawq", "lm_eval", "prefect", "kubernetes"]
    found: dict[str, str | None] = {}
    for name in names:
        try:
            found[name] = dist_version(name)
        except PackageNotFoundError:
            found[name] = None
    if as_json:
        _emit_json(found)
        return
    for name, value in found.items():
        out.print(f"{name:14} {value or '-'}")


@config_app.command("check")
def config_check(
    file: Annotated[Path, typer.Argument(help="promotion.yaml to validate")],
    as_json: JsonFlag = False,
) -> None:
    """Validate a promotion.yaml and print the resolved configuration, or every error in it."""
    from pipeline.config import load_config

    with _errors(as_json):
        cfg = load_config(file)
    resolved = cfg.model_dump(mode="json")
    if as_json:
        _emit_json({"ok": True, "file": str(file), "order": cfg.promotion_order(), "config": resolved})
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
    out.print("[bold]resolved configuration[/] (defaults filled in, paths made absolute):")
    from ruamel.yaml import YAML

    yaml = YAML()
    yaml.default_flow_style = False
    yaml.dump(resolved, out.file)


@tiny_app.command("build")
def tiny_build(
    directory: Annotated[Path, typer.Argument(help="where to put the model (created if missing)")],
    cache_dir: Annotated[
        Path | None, typer.Option(help="build cache (default: $MODELCTL_CACHE, ~/.cache/modelctl)")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Build the small trained model (about 40 s the first time; a cache hit after that)."""
    from pipeline import tinymodel

    with _errors(as_json), _progress(not as_json) as progress:
        result = tinymodel.build(directory, cache_dir=cache_dir, progress=progress)
    summary = {
        "path": str(result.path),
        "cached": result.cached,
        "seconds": round(result.seconds, 2),
        "train_seconds": result.train_seconds,
        "builder_version": result.builder_version,
        "scores": result.scores,
    }
    if as_json:
        _emit_json(summary)
        return
    how = "taken from the cache" if result.cached else f"trained in {result.train_seconds:.1f} s"
    out.print(f"[green]✓[/] tinymodel {result.builder_version} at {result.path} ({how}, {result.seconds:.1f} s)")
    _print_scores(result.scores)


def _print_scores(scores: dict[str, float]) -> None:
    table = Table("eval task (fact recall)", "score")
    table.add_row("multiple choice accuracy", f"{scores['multiple_choice']:.3f}")
    table.add_row("generation exact match", f"{scores['generation']:.3f}")
    table.add_row("questions", f"{int(scores['n'])}")
    out.print(table)


@tiny_app.command("damage")
def tiny_damage(
    source: Annotated[Path, typer.Argument(help="a model directory")],
    dest: Annotated[Path, typer.Argument(help="where to write the damaged copy")],
    strength: Annotated[float, typer.Option(help="noise, in multiples of each weight matrix's std")] = 4.0,
    as_json: JsonFlag = False,
) -> None:
    """Write a copy with noisy weights: a bad candidate that the gates must refuse."""
    from pipeline import tinymodel

    with _errors(as_json):
        path = tinymodel.damage(source, dest, strength=strength)
    if as_json:
        _emit_json({"path": str(path), "strength": strength})
        return
    out.print(f"[yellow]![/] damaged copy written to {path} (noise x{strength})")


@tiny_app.command("score")
def tiny_score(
    directory: Annotated[Path, typer.Argument(help="a model directory")],
    as_json: JsonFlag = False,
) -> None:
    """Score a model on the small model's fact-recall task (a quick check, not the eval gate)."""
    from pipeline import tinymodel

    with _errors(as_json):
        scores = tinymodel.score(directory)
    if as_json:
        _emit_json({"path": str(directory), "scores": scores})
        return
    _print_scores(scores)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
