"""`modelctl lease show|release --env E`: who holds an environment's promotion slot on this machine; free it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.render import JsonFlag, emit_json, errors, out

lease_app = typer.Typer(help="The promotion slot of an environment on this machine.", no_args_is_help=True)

EnvOption = Annotated[str, typer.Option("--env", "-e", help="environment name from promotion.yaml")]
RootOption = Annotated[Path | None, typer.Option(help="lease folder (default: $MODELCTL_CACHE/leases)")]


def register(app: typer.Typer) -> None:
    app.add_typer(lease_app, name="lease")


@lease_app.command("show")
def show(env: EnvOption, root: RootOption = None, as_json: JsonFlag = False) -> None:
    """Who holds the environment's promotion slot, since when, and whether the holder still lives."""
    from pipeline.slot import Slot

    slot = Slot(env, root)
    held = slot.current()
    stale = slot.stale(held) if held else ""
    if as_json:
        emit_json({"ok": True, "env": env, "lease": dataclasses.asdict(held) if held else None, "stale": stale})
        return
    if held is None:
        out.print(f"{env}: free")
    else:
        state = f"free to take over: {stale}" if stale else "held"
        out.print(f"{env}: {state}; holder {held.describe()} since {held.since_text()}", highlight=False)


@lease_app.command("release")
def release(
    env: EnvOption,
    root: RootOption = None,
    force: Annotated[bool, typer.Option(help="free it even though its holder still runs")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Free the environment's promotion slot (a holder that is gone is taken over anyway by the next promotion)."""
    from pipeline.errors import TerminalError
    from pipeline.slot import Slot

    slot = Slot(env, root)
    with errors(as_json):
        held = slot.current()
        if held is not None and not slot.stale(held) and not force:
            raise TerminalError(
                f"{env}'s slot is held by {held.describe()} since {held.since_text()}, and that process still runs",
                hint=f"let it finish, stop it, or free the slot anyway: `modelctl lease release --env {env} --force`",
            )
        freed = slot.release()
    if as_json:
        emit_json({"ok": True, "env": env, "released": dataclasses.asdict(freed) if freed else None})
        return
    out.print(f"{env}: released the slot of {freed.describe()}" if freed else f"{env}: the slot was free already")
