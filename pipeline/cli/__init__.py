"""`modelctl`: parse, call, render. No logic of its own.

One module per area of commands, each with ``register(app)``; the shared rendering (consoles, ``--json``,
errors, progress bars) lives in ``render.py``. Every command prints a human view by default and one JSON object
with ``--json``. Pipeline errors print without a traceback: TerminalError exits 2, TransientError exits 75.
"""

from __future__ import annotations

from importlib import import_module

from pipeline.cli.render import DebugFlag, JsonFlag, ModelctlApp, emit_json, out, set_debug

app = ModelctlApp(
    name="modelctl",
    help="Promote LLM revisions to production with GitOps: quantize, preload, gate, commit, canary, revert.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _options(debug: DebugFlag = False) -> None:
    """Promote LLM revisions to production with GitOps: quantize, preload, gate, commit, canary, revert."""
    set_debug(debug)


# Command areas, in the order `modelctl --help` lists them. Add a module here to add its commands.
# The commands that run Prefect flows (promote, rollback, approve) are added by flows/cli.py, which composes
# this app with them: `pipeline` itself never imports Prefect or flows/.
AREAS = (
    "config", "tinymodel", "artifacts", "gitops", "verify", "lease", "loadtest", "evaluate", "status", "timeline",
    "guard", "step",
)  # fmt: skip

for _area in AREAS:
    import_module(f"pipeline.cli.{_area}").register(app)

# `modelctl sandbox up|down|status`: the simulated cluster. sandbox.cli imports only typer at the top (the
# cluster's own modules load when a command runs), so `modelctl --help` stays fast.
import_module("sandbox.cli").register(app)


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
        emit_json(found)
        return
    for name, value in found.items():
        out.print(f"{name:14} {value or '-'}")


def main() -> None:
    app()
