"""`modelctl tinymodel ...`: the small trained model used by the demo and the tests."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from pipeline.cli.render import JsonFlag, emit_json, errors, out, progress
from pipeline.tinymodel import SLOW_INTERMEDIATE, SLOW_LAYERS, V1_STRENGTH

tiny_app = typer.Typer(help="The small trained model used by the demo and the tests.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(tiny_app, name="tinymodel")


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

    with errors(as_json), progress(not as_json) as bar:
        result = tinymodel.build(directory, cache_dir=cache_dir, progress=bar)
    summary = {
        "path": str(result.path),
        "cached": result.cached,
        "seconds": round(result.seconds, 2),
        "train_seconds": result.train_seconds,
        "builder_version": result.builder_version,
        "scores": result.scores,
    }
    if as_json:
        emit_json(summary)
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
    strength: Annotated[
        float,
        typer.Option(
            help="noise, in multiples of each weight matrix's std: 4.0 (default) takes the model to chance, a "
            f"bad candidate; {V1_STRENGTH} leaves it above the smoke suite's floors (0.8) but below the clean "
            "model, the sandbox demo's first version v1"
        ),
    ] = 4.0,
    as_json: JsonFlag = False,
) -> None:
    """Write a copy with noisy weights: a bad candidate that the gates must refuse (or, mildly, a weaker one).

    The sandbox demo promotes v1 = `damage --strength V1` (passes the floors with no baseline), then v2 = the clean
    model (better than v1), then v3 = `deepen` of v2 (as good as v2, much slower: the canary reverts it).
    """
    from pipeline import tinymodel

    with errors(as_json):
        path = tinymodel.damage(source, dest, strength=strength)
    if as_json:
        emit_json({"path": str(path), "strength": strength})
        return
    out.print(f"[yellow]![/] damaged copy written to {path} (noise x{strength})")


@tiny_app.command("deepen")
def tiny_deepen(
    source: Annotated[Path, typer.Argument(help="a model directory (unquantized Llama, single safetensors file)")],
    dest: Annotated[Path, typer.Argument(help="where to write the deeper copy (new or empty)")],
    layers: Annotated[
        int, typer.Option(help=f"decoder layers in the copy (the sandbox demo's slow v3: {SLOW_LAYERS})")
    ],
    intermediate: Annotated[
        int | None,
        typer.Option(help=f"MLP width in the copy (default: the source's; the demo's v3: {SLOW_INTERMEDIATE})"),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Write a deeper (optionally wider) copy whose answers are the source's: a slow candidate.

    The added layers and MLP units compute in full but their output projections are zero, so the copy scores as
    the source does (it passes the eval gate against it) while costing several times the compute per token.
    It is the sandbox demo's v3 (`--layers {SLOW_LAYERS} --intermediate {SLOW_INTERMEDIATE}` of the clean model),
    which the canary's latency check must catch and revert.
    """
    from pipeline import tinymodel

    with errors(as_json):
        path = tinymodel.deepen(source, dest, layers, intermediate)
    if as_json:
        emit_json({"path": str(path), "layers": layers, "intermediate": intermediate})
        return
    width = f", intermediate {intermediate}" if intermediate else ""
    out.print(f"[green]✓[/] deeper copy written to {path} ({layers} layers{width}, the same answers)")


@tiny_app.command("score")
def tiny_score(
    directory: Annotated[Path, typer.Argument(help="a model directory")],
    as_json: JsonFlag = False,
) -> None:
    """Score a model on the small model's fact-recall task (a quick check, not the eval gate)."""
    from pipeline import tinymodel

    with errors(as_json):
        scores = tinymodel.score(directory)
    if as_json:
        emit_json({"path": str(directory), "scores": scores})
        return
    _print_scores(scores)
