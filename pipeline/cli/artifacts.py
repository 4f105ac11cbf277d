"""`modelctl quantize` and `modelctl preload`: build an artifact, put it on the cache volume."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.table import Table

from pipeline.cli.render import JsonFlag, emit_json, errors, out, progress

ConfigOption = Annotated[
    Path | None, typer.Option("--config", help="promotion.yaml: recipe defaults and source policy")
]


def register(app: typer.Typer) -> None:
    app.command("quantize")(quantize)
    app.command("preload")(preload)


def quantize(
    ref: Annotated[str, typer.Argument(help="org/name[@revision] on the Hub, or a local model directory")],
    method: Annotated[
        Literal["awq", "gptq", "none"] | None,
        typer.Option(help="default: the config's, else awq; none = unquantized (the source's weights)"),
    ] = None,
    backend: Annotated[Literal["llmcompressor", "autoawq"] | None, typer.Option(help="default: llmcompressor")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="where artifacts are kept")] = Path("artifacts"),
    samples: Annotated[int | None, typer.Option(help="calibration samples (default: the config's)")] = None,
    max_seq_len: Annotated[int | None, typer.Option(help="calibration sequence length (default: the config's)")] = None,
    asymmetric: Annotated[bool | None, typer.Option("--asymmetric/--symmetric", help="zero points or not")] = None,
    config: ConfigOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Quantize a model (AWQ or GPTQ, 4-bit; or none: unquantized) into an artifact; an existing one is a skip."""
    from pipeline.config import Quantization, load_config
    from pipeline.quantize import Calibration, Recipe
    from pipeline.quantize import quantize as run
    from pipeline.source import SourcePolicy, resolve
    from pipeline.steps import source_policy

    with errors(as_json), progress(not as_json) as bar:
        cfg = load_config(config) if config else None
        settings = cfg.model.quantization if cfg else Quantization()
        recipe = Recipe.from_config(settings, method)
        updates: dict[str, object] = {}
        calibration = recipe.calibration.model_dump()
        calibration.update({k: v for k, v in (("samples", samples), ("max_seq_len", max_seq_len)) if v is not None})
        updates["calibration"] = Calibration(**calibration)
        if asymmetric is not None:
            updates["symmetric"] = not asymmetric
        recipe = recipe.model_copy(update=updates)
        policy = source_policy(cfg.model) if cfg else SourcePolicy()
        source = resolve(ref, policy)
        artifact = run(source, recipe, out_dir, backend or settings.backend, policy=policy, progress=bar)
    if as_json:
        emit_json({**artifact.model_dump(mode="json"), "skipped": artifact.skipped})
        return
    verb = "already built (skipped)" if artifact.skipped else f"built in {artifact.timings.get('total_s', 0):.1f} s"
    out.print(f"[green]✓[/] {artifact.id} {verb}")
    table = Table("field", "value")
    table.add_row("source", artifact.source.ref)
    table.add_row("recipe", f"{artifact.recipe.name} ({artifact.backend}, {artifact.format})")
    table.add_row("path", artifact.path)
    table.add_row("files", f"{len(artifact.files)} ({sum(f.size for f in artifact.files) / 1e6:.1f} MB)")
    out.print(table)


def preload(
    artifact: Annotated[str, typer.Argument(help="an artifact directory (with artifact.json), or org/name[@rev]")],
    cache_root: Annotated[Path, typer.Option("--cache-root", help="the cache volume's mount path")],
    verify: Annotated[bool, typer.Option(help="re-hash a warm entry too (finds silent corruption)")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Copy an artifact (or a Hub repo at a pinned sha) onto the cache volume, verifying every file."""
    from pipeline.cache import preload as run
    from pipeline.cache import preload_hub
    from pipeline.source import looks_local, resolve

    with errors(as_json), progress(not as_json) as bar:
        if looks_local(artifact):
            entry = run(Path(artifact), cache_root, verify=verify, progress=bar)
        else:
            entry = preload_hub(resolve(artifact), cache_root, verify=verify, progress=bar)
    if as_json:
        emit_json(entry.model_dump(mode="json"))
        return
    if entry.skipped:
        out.print(f"[green]✓[/] {entry.artifact_id} already in {entry.path} (verified {entry.verified_at})")
        return
    repaired = f", repaired {', '.join(entry.repaired)}" if entry.repaired else ""
    out.print(
        f"[green]✓[/] {entry.artifact_id} preloaded to {entry.path}: {entry.files} files, "
        f"{entry.bytes / 1e6:.1f} MB verified{repaired}"
    )
